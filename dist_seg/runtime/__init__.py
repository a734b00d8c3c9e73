"""Process-level machinery shared by training and inference: the process group and every collective, SyncBatchNorm on CPU, DDP and its hooks,
the rendezvous store (distributed),
autocast dtypes (precision), the process RNGs (rng_state), stop signals (preemption), fault drills switched on by
environment variables (fault_injection) and console progress lines (progress_lines). Imports nothing else of
dist_seg."""
