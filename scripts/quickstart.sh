#!/usr/bin/env bash
# Quick start, from nothing: create .venv and install, make tiny random CLIP / Stable Diffusion priors,
# build the prior cache, train the quick-start model on the photos that ship with scikit-image
# (less two held-out photos), restore a held-out sample, evaluate (on ../shared test sets, or on the
# held-out photos without them), and write a report. Re-running resumes training and reuses what is done.
# Environment: RUN=folder (default runs/quickstart); extra args are passed to `lmdir train`
# (e.g. ./scripts/quickstart.sh --config.train.steps=200).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
RUN="${RUN:-runs/quickstart}"
LMDIR=.venv/bin/lmdir
PY=.venv/bin/python
mkdir -p "$RUN"
T0=$(date +%s)

echo "== [1/6] tiny random CLIP + Stable Diffusion (no download; use real weights via docs/priors.md)"
if [ ! -f "$RUN/priors-tiny/clip/config.json" ]; then
  $LMDIR priors make-tiny "$RUN/priors-tiny"
fi

echo "== [2/6] prior cache: captions, CLIP scene states and SD reference images per training photo"
$LMDIR priors build --data skimage --clip "$RUN/priors-tiny/clip" --sd "$RUN/priors-tiny/sd" \
  --output "$RUN/prior-cache" --steps 10

echo "== [3/6] training the quick-start model (configs/quickstart.py)"
if [ "$(uname)" = Linux ] && ! $PY -c "import sys; from lmdir_jax.runtime import find_tcmalloc; sys.exit(not find_tcmalloc())"; then
  echo "   (tip: 'sudo apt install libtcmalloc-minimal4' makes CPU training faster; lmdir uses it by itself)"
fi
$LMDIR train --config configs/quickstart.py --workdir "$RUN/train" \
  --config.priors.clip="$RUN/priors-tiny/clip" --config.priors.cache="$RUN/prior-cache" "$@"

echo "== [4/6] restoring a sample (noise + JPEG on a held-out photo the model never trained on; blind: the tiny CLIP is random, so its automatic guess is too)"
SAMPLE=$($PY -c "import os, skimage; print(os.path.join(skimage.data_dir, 'coffee.png'))")
rm -rf "$RUN/sample" "$RUN/restored"
$LMDIR degrade "$SAMPLE" --spec noise:25+jpeg:40 --seed 1 --output "$RUN/sample"
$LMDIR restore "$RUN/sample" --checkpoint "$RUN/train" --output "$RUN/restored" --blind

echo "== [5/6] evaluating (blind, then guided by the true degradation text)"
EVAL_ARGS=()
ORACLE_ARGS=()
if [ -d ../shared/data/test/CBSD68 ]; then
  EVAL_ARGS+=(--data ../shared/data/test/CBSD68 --spec noise:25)
  EVAL_ARGS+=(--data ../shared/data/test/Rain100L)
  [ -d ../shared/data/test/SOTS-outdoor-sample ] && EVAL_ARGS+=(--data ../shared/data/test/SOTS-outdoor-sample)
  ORACLE_ARGS+=(--data ../shared/data/test/CBSD68 --spec noise:25)
else
  # the skimage photos held out of training (coffee, chelsea), never the training photos
  EVAL_ARGS+=(--data skimage-heldout --spec noise:25 --data skimage-heldout --spec rain --data skimage-heldout --spec haze)
  ORACLE_ARGS+=(--data skimage-heldout --spec noise:25)
fi
{
  echo "Blind (no degradation prior):"
  $LMDIR evaluate --checkpoint "$RUN/train" "${EVAL_ARGS[@]}" --max-images 20 --blind \
    --json "$RUN/eval.json" --csv "$RUN/eval.csv"
  echo
  echo "Guided by each image's true degradation text (--oracle):"
  $LMDIR evaluate --checkpoint "$RUN/train" "${ORACLE_ARGS[@]}" --max-images 20 --oracle
} | tee "$RUN/eval.txt"

echo "== [6/6] report"
$LMDIR report --workdir "$RUN/train" --output "$RUN/report.md" --eval-text "$RUN/eval.txt" \
  --compare "$RUN/sample/coffee.png" "$RUN/restored/coffee.png" "$SAMPLE"
echo
echo "Done in $(( $(date +%s) - T0 )) s. Results:"
echo "  report:          $RUN/report.md"
echo "  restored sample: $RUN/restored/"
echo "  training run:    $RUN/train (checkpoints, metrics.jsonl, plots/, TensorBoard events)"
