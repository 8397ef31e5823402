#!/usr/bin/env bash
# Issue 11, item 3: the pre-training choices, each changed alone from the shipped recipe
# (`medmeta train`'s defaults: protocol_benchmark.py passes on only what a choice sets) and
# judged on val classes only (`--skip-test`: nothing here looks at a test class). Fixed counts
# (epochs, episodes), so a loaded machine changes times, not results; a run of the shipped
# recipe takes 12-13 minutes on 2 idle cores, inside the 30-minute budget, and so does every
# choice but resnet12. Results: runs/choices/<protocol>-<choice>/benchmark.json (val accuracy
# of the kept model and of every candidate in its history).
# resnet12 at 84 px gets RESNET_EPOCHS pre-training epochs: set it to what
# `python benchmarks/backbone_budget.py` says the budget buys on the machine at hand.
# SCREEN=1 judges each choice on val right after pre-training, with no episodes (a third of
# the time; the episodic phase that follows is the same for every choice), into
# runs/choices-screen/.
# Usage: [RESNET_EPOCHS=N] [SEED=S] [SCREEN=1] bash benchmarks/pretraining_choices.sh [PROTOCOL ...]
set -euo pipefail
PROTOCOLS=("${@:-../shared/protocols/derm-rare.yaml ../shared/protocols/mri-new-modality.yaml}")
# the shipped recipe, as `medmeta train` runs it, on val classes only
BASE="--skip-test --seed ${SEED:-0}${SCREEN:+ --episodes 0 --calibration-episodes 10 --tuning-episodes 0}"
FOLDER="runs/choices${SCREEN:+-screen}"
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
    out="$FOLDER/$name-$choice"
    [ -f "$out/benchmark.json" ] && continue
    echo "== $name $choice"
    python benchmarks/protocol_benchmark.py "$protocol" --out "$out" $BASE ${CHOICES[$choice]} --max-minutes 30
  done
done
FOLDER="$FOLDER" python - <<'PY'
import json, os, pathlib
for path in sorted(pathlib.Path(os.environ["FOLDER"]).glob("*/benchmark.json")):
    report = json.loads(path.read_text())
    best = report.get("training", {}).get("best_val", {})
    print(f"{path.parent.name:40s} val {best.get('accuracy', float('nan')):.3f} ± {best.get('accuracy_ci95', float('nan')):.3f}"
          f"  (kept: {best.get('weights', 'weights')} of {best.get('phase')} episode {best.get('episode')})")
PY
