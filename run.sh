#!/usr/bin/env bash
# The main job, from nothing: set up .venv, make the synthetic data (no download), train the
# default variant on the CPU (or a GPU if there is one), sample from it, then test passkey
# retrieval from 1x to 64x the training length and print the table.
#   VARIANT=alibi ./run.sh       # another positional variant: nope | alibi | bam | scaleinv
#   STEPS=1000 ./run.sh          # train longer (250 steps by default, about 2.5 CPU minutes)
set -euo pipefail
cd "$(dirname "$0")"
VARIANT=${VARIANT:-bam}
STEPS=${STEPS:-250}
OUT=out/$VARIANT
./setup.sh
PY=.venv/bin/python
$PY data/prepare.py synthetic
$PY train.py --attention "$VARIANT" --max-steps "$STEPS" --out-dir "$OUT" "$@"
$PY sample.py --ckpt "$OUT/best.pt" --num-samples 1 --max-new-tokens 160 --temperature 0 \
    --prompt "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them."
$PY eval_extrapolate.py --ckpt "$OUT/best.pt" --task passkey --lengths 1x,4x,16x,64x --depths 0 --samples 1
