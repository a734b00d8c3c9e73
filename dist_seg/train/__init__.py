"""Training: `python -m dist_seg.train` (command; config names and paths checked first by preflight), fit()
(loop), one optimizer step (step), the counters a checkpoint keeps and the step schedule (state), evaluation
and early stopping (validation), saving, resuming and the stop-signal exit (checkpointing, resume), weight EMA,
optimizer and scheduler (optim), losses, what goes to the console and TensorBoard (reporting, tensorboard) and
`dist-seg info`."""
