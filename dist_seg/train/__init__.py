"""Training: `python -m dist_seg.train` (command), fit() (loop), one optimizer step (step), the counters a
checkpoint keeps (state), resuming (resume), weight EMA, optimizer and scheduler (optim), losses, what goes to
TensorBoard and the console (reporting, tensorboard) and `dist-seg info`."""
