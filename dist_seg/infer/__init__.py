"""Inference: scoring a model on batches (predictor: TTA, ensembles, sliding windows), the confusion matrix and
mIoU (metrics), the dense CRF, and the `dist-seg evaluate | predict | export` commands with the submission CSV.
Never imports dist_seg.train."""
