#!/usr/bin/env bash
# Quick start, from nothing: create .venv and install, make tiny random CLIP / Stable Diffusion priors,
# build the prior cache, train a degradation controller for the automatic mode, then the quick-start
# model on the photos that ship with scikit-image (less two held-out photos; a quarter of its
# examples are told the controller's choice), restore a held-out sample, evaluate blind / automatic /
# told the degradation (on ../shared test sets, or on the held-out photos without them), and write a
# report with the three side by side. Re-running resumes training and reuses what is done.
# Environment: RUN=folder (default runs/quickstart), CONTROLLER_STEPS (default: configs/controller.py's
# 4096; a multiple of 256). Extra args are passed to `lmdir train`
# (e.g. ./scripts/quickstart.sh --config.train.steps=200).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
RUN="${RUN:-runs/quickstart}"
LMDIR=.venv/bin/lmdir
PY=.venv/bin/python
mkdir -p "$RUN"
T0=$(date +%s)

echo "== [1/7] tiny random CLIP + Stable Diffusion (no download; use real weights via docs/priors.md)"
if [ ! -f "$RUN/priors-tiny/clip/config.json" ]; then
  $LMDIR priors make-tiny "$RUN/priors-tiny"
fi

echo "== [2/7] prior cache: captions, CLIP scene states and SD reference images per training photo"
$LMDIR priors build --data skimage --clip "$RUN/priors-tiny/clip" --sd "$RUN/priors-tiny/sd" \
  --output "$RUN/prior-cache" --steps 10

echo "== [3/7] degradation controller (DA-CLIP, configs/controller.py): the automatic mode's guess of the degradation"
# Trained on photos like the test sets' when ../shared has them (BSDS training photos), else on
# the skimage photos; never on a test folder.
CONTROLLER_DATA=skimage
[ -d ../shared/data/train/bsds ] && CONTROLLER_DATA=../shared/data/train/bsds
if [ ! -f "$RUN/controller/controller.json" ] || [ ! -d "$RUN/controller/plots" ]; then
  $LMDIR priors train-controller --clip "$RUN/priors-tiny/clip" --config configs/controller.py \
    --workdir "$RUN/controller" --config.data.source="$CONTROLLER_DATA" \
    ${CONTROLLER_STEPS:+--config.train.steps=$CONTROLLER_STEPS} --config.data.tasks.downsample=0.0
fi

echo "== [4/7] training the quick-start model (configs/quickstart.py)"
if [ "$(uname)" = Linux ] && ! $PY -c "import sys; from lmdir_jax.runtime import find_tcmalloc; sys.exit(not find_tcmalloc())"; then
  echo "   (tip: 'sudo apt install libtcmalloc-minimal4' makes CPU training faster; lmdir uses it by itself)"
fi
# A quarter of the examples are told what the automatic mode would tell them, the controller's
# choice (priors.auto_ratio), so the network learns what its guesses mean, mistakes included.
$LMDIR train --config configs/quickstart.py --workdir "$RUN/train" \
  --config.priors.clip="$RUN/priors-tiny/clip" --config.priors.cache="$RUN/prior-cache" \
  --config.priors.controller="$RUN/controller" --config.priors.auto_ratio=0.25 "$@"

echo "== [5/7] restoring a sample (noise + JPEG on a held-out photo the model never trained on; blind)"
SAMPLE=$($PY -c "import os, skimage; print(os.path.join(skimage.data_dir, 'coffee.png'))")
rm -rf "$RUN/sample" "$RUN/restored"
$LMDIR degrade "$SAMPLE" --spec noise:25+jpeg:40 --seed 1 --output "$RUN/sample"
$LMDIR restore "$RUN/sample" --checkpoint "$RUN/train" --output "$RUN/restored" --blind

echo "== [6/7] evaluating: blind, automatic (the controller's guess), told the true degradation"
SHARED=../shared/data/test
EVAL_ARGS=()
if [ -d $SHARED/CBSD68 ]; then
  EVAL_ARGS+=(--data $SHARED/CBSD68 --spec noise:25 --data $SHARED/Rain100L)
  [ -d $SHARED/SOTS-outdoor-sample ] && EVAL_ARGS+=(--data $SHARED/SOTS-outdoor-sample)
else
  # the skimage photos held out of training (coffee, chelsea), never the training photos
  EVAL_ARGS+=(--data skimage-heldout --spec noise:25 --data skimage-heldout --spec rain --data skimage-heldout --spec haze)
fi
told() {  # told N ARGS...: `lmdir evaluate` told each image's true degradation -> eval-told-N.json
  local n=$1
  shift
  $LMDIR evaluate --checkpoint "$RUN/train" "$@" --max-images 20 --json "$RUN/eval-told-$n.json"
}
blind_and_automatic() {
  echo "Blind (no degradation prior):"
  $LMDIR evaluate --checkpoint "$RUN/train" "${EVAL_ARGS[@]}" --max-images 20 --blind \
    --json "$RUN/eval-blind.json" --csv "$RUN/eval-blind.csv"
  echo
  echo "Automatic (the controller names each image's degradation):"
  $LMDIR evaluate --checkpoint "$RUN/train" "${EVAL_ARGS[@]}" --max-images 20 \
    --controller "$RUN/controller" --json "$RUN/eval-automatic.json" --csv "$RUN/eval-automatic.csv"
}
told_all() {
  echo "Told the true degradation (synthetic sets: each image's label; Rain100L 'rain streaks', SOTS 'haze'):"
  if [ -d $SHARED/CBSD68 ]; then
    told 1 --data $SHARED/CBSD68 --spec noise:25 --oracle
    told 2 --data $SHARED/Rain100L --degradation "rain streaks"
    if [ -d $SHARED/SOTS-outdoor-sample ]; then
      told 3 --data $SHARED/SOTS-outdoor-sample --degradation "haze"
    fi
  else
    told 1 "${EVAL_ARGS[@]}" --oracle
  fi
}
rm -f "$RUN"/eval-told-*.json "$RUN"/eval-lane-*.txt "$RUN"/eval-lane-*.log
# Two evaluations at a time: each spends much of its time starting up and compiling on one thread,
# so two keep both cores busy. Tables go to eval-lane-N.txt, progress and errors to eval-lane-N.log.
echo "   (two at a time; their progress: $RUN/eval-lane-1.log, $RUN/eval-lane-2.log)"
(set -e; blind_and_automatic) > "$RUN/eval-lane-1.txt" 2> "$RUN/eval-lane-1.log" &
LANE=$!
FAILED=0
(set -e; told_all) > "$RUN/eval-lane-2.txt" 2> "$RUN/eval-lane-2.log" || FAILED=2
wait $LANE || FAILED=1
if [ $FAILED != 0 ]; then
  echo "evaluation failed: $RUN/eval-lane-$FAILED.log ends with:"
  tail -n 5 "$RUN/eval-lane-$FAILED.log"
  exit 1
fi
{ cat "$RUN/eval-lane-1.txt"; echo; cat "$RUN/eval-lane-2.txt"; } | tee "$RUN/eval.txt"
COMPARE=(--eval "blind=$RUN/eval-blind.json" --eval "automatic=$RUN/eval-automatic.json")
for f in "$RUN"/eval-told-*.json; do COMPARE+=(--eval "told=$f"); done

echo "== [7/7] report"
$LMDIR report --workdir "$RUN/train" --output "$RUN/report.md" --eval-text "$RUN/eval.txt" \
  --compare "$RUN/sample/coffee.png" "$RUN/restored/coffee.png" "$SAMPLE" "${COMPARE[@]}"
echo
echo "Done in $(( $(date +%s) - T0 )) s. Results:"
echo "  report:          $RUN/report.md"
echo "  restored sample: $RUN/restored/"
echo "  training run:    $RUN/train (checkpoints, metrics.jsonl, plots/, TensorBoard events)"
