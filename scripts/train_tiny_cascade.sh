#!/usr/bin/env bash
# Trains the whole tiny cascade on the synthetic dataset, stage after stage, and exports each stage
# as a model checkpoint (what mav_jax.sample reads). Prints how long each stage took.
#
#   bash scripts/train_tiny_cascade.sh [WORKROOT] [OUT]
#
# WORKROOT (default workdirs/tiny_cascade): training workdirs, one per stage (rerunning resumes).
# OUT (default $WORKROOT/models): exported models. The shipped checkpoints were made with
# OUT=checkpoints/tiny; an existing OUT/<stage> is never replaced unless OVERWRITE=1.
# SCALE (default 1) multiplies every stage's step count (SCALE=0.05 for a quick check).
# ONLY (default: all) names the stages to run, e.g. ONLY="interp sr_high"; the others are skipped
# (their exported models in OUT are used as they are).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-workdirs/tiny_cascade}
OUT=${2:-$ROOT/models}
SCALE=${SCALE:-1}
PY=${PYTHON:-python}
mkdir -p "$ROOT" "$OUT"
TIMES="$ROOT/timings.txt"
[[ -n "${ONLY:-}" ]] || : > "$TIMES"  # a partial rerun (ONLY) appends to the timings

steps() { "$PY" -c "print(max(2, int(round($1 * $SCALE))))"; }

# stage NAME CONFIG STEPS [overrides...]: train in $ROOT/NAME, then export to $OUT/NAME.
stage() {
  local name=$1 config=$2 n
  if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then return; fi
  n=$(steps "$3")
  shift 3
  echo "=== $name: $config, $n steps ==="
  local start=$SECONDS
  "$PY" -m mav_jax.train --config "$config" --workdir "$ROOT/$name" \
    --config.train.num_steps="$n" --config.train.checkpoint_every="$n" \
    --config.train.log_every=$(( n < 100 ? n : 100 )) --config.train.sample_every=0 "$@"
  local took=$(( SECONDS - start ))
  if [[ -e "$OUT/$name" && "${OVERWRITE:-0}" != 1 ]]; then
    echo "$OUT/$name exists; not replaced (OVERWRITE=1 to replace)"
  else
    "$PY" -m mav_jax.export --workdir "$ROOT/$name" --output "$OUT/$name" --overwrite
  fi
  printf '%-14s %6d steps %6d s\n' "$name" "$n" "$took" | tee -a "$TIMES"
}

CLIP="--config.conditioning.clip=$OUT/clip"
stage clip configs/clip.py:tiny 2000
stage prior configs/prior.py:tiny 3000 "$CLIP"
stage decoder_image configs/decoder.py:tiny 1000 "$CLIP" --config.data.kind=image
stage decoder configs/decoder.py:tiny 2000 "$CLIP" --config.train.init_from="$ROOT/decoder_image"
stage interp configs/interp.py:tiny 3000 "$CLIP" --config.train.init_from="$ROOT/decoder"
stage sr_low_image configs/sr_low.py:tiny 1500 --config.data.kind=image
stage sr_low configs/sr_low.py:tiny 1500 --config.train.init_from="$ROOT/sr_low_image"
stage sr_high configs/sr_high.py:tiny 2500
rm -rf "$OUT/decoder_image" "$OUT/sr_low_image"  # image stages are only starting points
echo "=== done: models in $OUT ==="
cat "$TIMES"
