#!/usr/bin/env bash
# Elastic multi-node training with torchrun's c10d rendezvous. Run the same command on every node:
#   python launch/rdzv_store.py 29400                     # once, on a machine that is NOT a training node
#   RDZV_HOST=10.0.0.100 NNODES=1:2 launch/multinode.sh configs/deconvnet_vgg16bn.yaml   # on each node
# Without a store machine, point MASTER_ADDR at node 0 (it then hosts the store inside its torchrun):
#   NNODES=1:2 MASTER_ADDR=10.0.0.1 launch/multinode.sh configs/deconvnet_vgg16bn.yaml   # on each node
# NNODES=MIN:MAX: the job runs on any number of nodes in [MIN, MAX] and survives a lost node while >= MIN
#   remain (train.resume=auto continues from out_dir/last.pt, resume.keep_global_batch keeps the global batch).
#   A plain number (NNODES=2) still works but is fixed: after a node loss the survivors wait up to
#   JOIN_TIMEOUT for a replacement instead of continuing.
# RDZV_HOST: where launch/rdzv_store.py runs (agents then never host the store: is_host=false). Unset, the
#   store lives in the torchrun on MASTER_ADDR's node, and losing THAT node ends the job on every node.
# NODE_RANK: accepted for compatibility and ignored; the c10d rendezvous assigns node ranks itself (torchrun
#   uses --node_rank only with the static rendezvous).
# NPROC_PER_NODE defaults to the node's GPU count; MASTER_PORT (the store's port) to 29400; RDZV_ID names the
# job. MAX_RESTARTS (default 10): every node loss costs each surviving agent one restart for the job's
# lifetime, as does a worker failure; a node joining costs none.
# SHUTDOWN_TIMEOUT (default 120 s): how long torchrun, once stopped by a signal (SIGTERM, Ctrl-C), lets the
# ranks finish the step and write the checkpoint before it SIGKILLs them (torchrun's own default is 30 s;
# the time it takes: README "Preemption, node loss and resize").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
CONFIG="${1:?usage: launch/multinode.sh CONFIG [key=value ...]}"; shift
: "${NNODES:?set NNODES, e.g. 1:2 (elastic, MIN:MAX) or 2 (fixed)}"
ENDPOINT_HOST="${RDZV_HOST:-${MASTER_ADDR:?set RDZV_HOST (launch/rdzv_store.py, recommended) or MASTER_ADDR (node 0)}}"
NPROC_PER_NODE="${NPROC_PER_NODE:-$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}"
# A fresh worker store per attempt, hosted by global rank 0, instead of the agent's store shared by all
# attempts: with the shared one a node cannot (re)join a running job (torch 2.14 does not republish
# MASTER_ADDR for the newcomer and both sides time out), and stale keys of earlier attempts linger.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
# Recovery after a node loss ~= collective error (up to train.timeout_s if the node vanished without a TCP
# reset) + heartbeat expiry (<= KEEP_ALIVE_INTERVAL x KEEP_ALIVE_MAX_ATTEMPT) + LAST_CALL_TIMEOUT + start + resume.
RDZV_CONF="join_timeout=${JOIN_TIMEOUT:-900},last_call_timeout=${LAST_CALL_TIMEOUT:-10}"
RDZV_CONF+=",keep_alive_interval=${KEEP_ALIVE_INTERVAL:-2},keep_alive_max_attempt=${KEEP_ALIVE_MAX_ATTEMPT:-5}"
if [ -n "${RDZV_HOST:-}" ]; then RDZV_CONF+=",is_host=false"; fi
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$ENDPOINT_HOST:${MASTER_PORT:-29400}" --rdzv-id="${RDZV_ID:-dist_seg}" \
    --rdzv-conf="$RDZV_CONF" --max-restarts="${MAX_RESTARTS:-10}" --shutdown-timeout="${SHUTDOWN_TIMEOUT:-120}" \
    -m dist_seg.train --config "$CONFIG" "$@"
