"""`python -m dist_seg.train` and `torchrun ... -m dist_seg.train`: see dist_seg.train.command."""

import sys

from dist_seg.train.command import main

sys.exit(main())
