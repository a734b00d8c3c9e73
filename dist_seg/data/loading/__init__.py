"""Shards -> batches: the global data order and position (plan), the train and eval loaders (train_loader,
eval_loader) and their DataLoader (workers); augmentation and the host half of the input contract: crop,
flip, fill and padding, the order of the random draws, where an augmentation goes (transforms); the colour
step, the one normalisation path, run on the device (colour); copy-ahead to the device (prefetch). Never
imports data.prep: every DataLoader worker imports these modules."""
