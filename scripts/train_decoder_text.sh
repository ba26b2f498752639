#!/usr/bin/env bash
# Trains the text-aware tiny D^t (docs/text_motion.md) in one run from the shipped paper-faithful
# D^t, exports it and scores it on the motion benchmark.
#
#   bash scripts/train_decoder_text.sh [WORKDIR] [OUT]
#
# WORKDIR (default workdirs/decoder_text): the training workdir (rerunning resumes).
# OUT (default $WORKDIR/model): the exported model; never replaced unless OVERWRITE=1.
# The recipe is configs/decoder.py:tiny_text (4,500 steps of 16 clips); about 1.5-2 hours of one
# CPU core. Extra arguments go to mav_jax.train (e.g. --config.train.num_steps=100 for a quick look).
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=workdirs/decoder_text
if [[ $# -gt 0 && $1 != -* ]]; then WORKDIR=$1; shift; fi
OUT=$WORKDIR/model
if [[ $# -gt 0 && $1 != -* ]]; then OUT=$1; shift; fi
PY=${PYTHON:-python}

"$PY" -m mav_jax.train --config configs/decoder.py:tiny_text --workdir "$WORKDIR" "$@"
if [[ -e "$OUT" && "${OVERWRITE:-0}" != 1 ]]; then
  echo "$OUT exists; not replaced (OVERWRITE=1 to replace)"
else
  "$PY" -m mav_jax.export --workdir "$WORKDIR" --output "$OUT" --overwrite
fi
# The motion benchmark through the whole tiny cascade with this D^t: 120 clips, 2 per caption
# (~12 minutes on 2 cores); the table is in $WORKDIR/motion/results.md.
"$PY" -m mav_jax.evaluate --protocol motion --decoder "$OUT" --per_combination 2 \
  --output "$WORKDIR/motion"
