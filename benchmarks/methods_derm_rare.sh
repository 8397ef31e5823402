#!/usr/bin/env bash
# Every method on derm-rare, 3-way, 1- and 5-shot, on identical seeded test episodes.
# Backbones are pre-trained once per normalisation and shared (--init-from):
#   BatchNorm conv4: the ProtoNet run (benchmarks/protocol_benchmark.py ... --out runs/derm-rare)
#   GroupNorm conv4 (MAML family): a pre-training-only run below.
# Usage: bash benchmarks/methods_derm_rare.sh [PROTOCOL] [EVAL_EPISODES_MAML] [MINUTES]
set -euo pipefail
P=${1:-../shared/protocols/derm-rare.yaml}
EM=${2:-300}
MIN=${3:-6}
B="python benchmarks/protocol_benchmark.py $P --val-interval 100 --pretrain-epochs 0"
python benchmarks/protocol_benchmark.py "$P" --out runs/gn-pretrain --method fomaml --pretrain-epochs 12 \
  --episodes 0 --eval-episodes 50 --max-minutes 30
$B --out runs/fomaml --method fomaml --init-from runs/gn-pretrain --meta-batch 4 --lr 5e-4 \
  --method-option inner_steps=5 --method-option adapt_steps=10 --max-minutes "$MIN" --eval-episodes "$EM"
$B --out runs/anil --method anil --init-from runs/gn-pretrain --meta-batch 4 --lr 5e-4 \
  --method-option inner_steps=5 --method-option adapt_steps=10 --max-minutes "$MIN" --eval-episodes "$EM"
$B --out runs/maml --method maml --init-from runs/gn-pretrain --meta-batch 4 --lr 5e-4 \
  --method-option inner_steps=2 --method-option adapt_steps=10 --max-minutes "$MIN" --eval-episodes "$EM"
$B --out runs/matching --method matching --init-from runs/derm-rare --lr 5e-4 --max-minutes "$MIN"
$B --out runs/mann --method mann --init-from runs/derm-rare --lr 5e-4 --max-minutes "$MIN"
