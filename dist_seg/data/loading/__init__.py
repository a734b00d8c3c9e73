"""Shards -> batches: the global data order and position (plan), the train and eval loaders, their worker
processes, augmentation (transforms) and the colour step on the device (colour). Never imports data.prep: every
DataLoader worker imports these modules."""
