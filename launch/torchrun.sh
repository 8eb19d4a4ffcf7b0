#!/usr/bin/env bash
# Workstation / multi-node launcher: torchrun around the same `reid train` entry point.
#   launch/torchrun.sh 4 --config configs/veriwild.yaml data.root=/data/VeRi-Wild      # 4 GPUs (or 4 CPU ranks)
# Multi-node: set NNODES, NODE_RANK and MASTER_ADDR (first node) on every node; MASTER_PORT defaults to 29500.
set -euo pipefail
NPROC=${1:?usage: launch/torchrun.sh NPROC_PER_NODE [reid train arguments...]}
shift
PYTHON=${REID_PYTHON:-python3}
if [ "${NNODES:-1}" -gt 1 ]; then
  exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK}" \
    --master_addr="${MASTER_ADDR:?set MASTER_ADDR}" --master_port="${MASTER_PORT:-29500}" \
    --nproc_per_node="$NPROC" -m reid train "$@"
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m reid train "$@"
