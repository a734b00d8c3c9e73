#!/usr/bin/env bash
# Multi-node training with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multinode.sh configs/deconvnet_vgg16bn.yaml   # node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/multinode.sh configs/deconvnet_vgg16bn.yaml   # node 1
# NPROC_PER_NODE defaults to the node's GPU count; MASTER_PORT to 29400; MAX_RESTARTS to 3 (with
# train.resume=auto the job continues from out_dir/last.pt after a worker failure). RDZV_ID names the job.
# SHUTDOWN_TIMEOUT (default 120 s): how long torchrun, once stopped by a signal (SIGTERM, Ctrl-C), lets the
# ranks finish the step and write the checkpoint before it SIGKILLs them (torchrun's own default is 30 s;
# the time it takes: README "Preemption, node loss and resize").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
CONFIG="${1:?usage: launch/multinode.sh CONFIG [key=value ...]}"; shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}"
exec torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29400}" --rdzv-id="${RDZV_ID:-dist_seg}" \
    --max-restarts="${MAX_RESTARTS:-3}" --shutdown-timeout="${SHUTDOWN_TIMEOUT:-120}" \
    -m dist_seg.train --config "$CONFIG" "$@"
