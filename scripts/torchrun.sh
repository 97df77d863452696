#!/usr/bin/env bash
# Multi-node training without a scheduler: run this same command on every node (node rank 0..N-1).
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 scripts/torchrun.sh \
#     --config configs/c2i/imagenet.yaml --config configs/c2i/lina_d48w768.yaml --config configs/trainer/fsdp2.yaml
# torchrun starts one process per GPU and sets the ranks; Lightning reads them (its TorchElastic environment),
# so trainer.devices/num_nodes must match what torchrun starts (passed below).
set -euo pipefail
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m lina_pl.cli fit "$@" --trainer.devices "$GPUS_PER_NODE" --trainer.num_nodes "$NNODES"
