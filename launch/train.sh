#!/usr/bin/env bash
# Single-node training on every GPU of this machine (or NPROC CPU processes when there is no GPU).
#   launch/train.sh configs/deconvnet_vgg16bn.yaml data.train_shards=shards/train train.epochs=20
#   NPROC=4 launch/train.sh configs/cpu_small.yaml data.train_shards=...   # override the process count
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
CONFIG="${1:?usage: launch/train.sh CONFIG [key=value ...]}"; shift
if [ -z "${NPROC:-}" ]; then
    NPROC="$(python -c 'import torch; print(torch.cuda.device_count() or 2)')"
fi
# one OpenMP thread per process unless asked otherwise: N processes each using every core thrash a CPU box
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
exec torchrun --standalone --nproc_per_node="$NPROC" -m dist_seg.train --config "$CONFIG" "$@"
