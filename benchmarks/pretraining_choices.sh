#!/usr/bin/env bash
# Issue 11, item 3: the pre-training choices, each changed alone from the shipped recipe and
# judged on val classes only (`--skip-test`: nothing here looks at a test class). Fixed counts
# (epochs, episodes), so a loaded machine changes times, not results; each run is far inside
# the 30-minute budget on 2 cores. Results: runs/choices/<protocol>-<choice>/benchmark.json
# (val accuracy of the kept model and of every candidate in its history).
# resnet12 at 84 px gets RESNET_EPOCHS pre-training epochs: set it to what
# `python benchmarks/backbone_budget.py` says 25 minutes buy on the machine at hand.
# Usage: [RESNET_EPOCHS=N] bash benchmarks/pretraining_choices.sh [PROTOCOL ...]
set -euo pipefail
PROTOCOLS=("${@:-../shared/protocols/derm-rare.yaml ../shared/protocols/mri-new-modality.yaml}")
# the shipped recipe (medmeta train's defaults), with 300 val episodes so choices a point
# apart are told from noise
BASE="--episodes 50 --val-interval 50 --pretrain-epochs 10 --val-episodes 300 --calibration-episodes 100 --skip-test"
declare -A CHOICES=(
  [base]=""
  [smooth01]="--label-smoothing 0.1"
  [contrastive05]="--contrastive 0.5"
  [distill2]="--generations 2"
  [gray02]="--grayscale 0.2"
  [resnet12-84]="--backbone resnet12 --image-size 84 --pretrain-epochs ${RESNET_EPOCHS:-4}"
)
for protocol in ${PROTOCOLS[@]}; do
  name=$(basename "$protocol" .yaml)
  for choice in base smooth01 contrastive05 distill2 gray02 resnet12-84; do
    out="runs/choices/$name-$choice"
    [ -f "$out/benchmark.json" ] && continue
    echo "== $name $choice"
    python benchmarks/protocol_benchmark.py "$protocol" --out "$out" $BASE ${CHOICES[$choice]} --max-minutes 30
  done
done
python - <<'PY'
import json, pathlib
for path in sorted(pathlib.Path("runs/choices").glob("*/benchmark.json")):
    report = json.loads(path.read_text())
    best = report.get("training", {}).get("best_val", {})
    print(f"{path.parent.name:40s} val {best.get('accuracy', float('nan')):.3f} ± {best.get('accuracy_ci95', float('nan')):.3f}"
          f"  (kept: {best.get('phase')} episode {best.get('episode')})")
PY
