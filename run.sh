#!/usr/bin/env bash
# The main job, from nothing: set up .venv, make the synthetic passkey data (no download), train
# config/main.toml's recipe on the CPU (or a GPU if there is one), let it answer one passkey prompt,
# then test passkey retrieval from 1x to 256x the training length (32,768 tokens): the table and a heatmap PNG.
#   VARIANT=alibi ./run.sh       # another positional variant: nope | alibi | bam | scaleinv (the recipe
#                                # trains scaleinv without its p-RoPE: config/main.toml says why)
#   STEPS=1000 ./run.sh          # train longer (600 steps by default, about 2 CPU minutes)
#   ./run.sh --lr 1e-3           # any other train.py flag goes to train.py
set -euo pipefail
cd "$(dirname "$0")"
VARIANT=${VARIANT:-bam}
STEPS=${STEPS:-600}
OUT=out/$VARIANT
./setup.sh
PY=.venv/bin/python
$PY data/prepare.py synthetic
$PY train.py --config config/main.toml --attention "$VARIANT" --max-steps "$STEPS" --out-dir "$OUT" "$@"
$PY sample.py --ckpt "$OUT/best.pt" --num-samples 1 --max-new-tokens 6 --temperature 0 --prompt \
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you about the important information there. The grass is green. The sky is blue. The pass key is 52918. Remember it. 52918 is the pass key. The sun is yellow. Here we go. There and back again. What is the pass key? The pass key is"
$PY eval_extrapolate.py --ckpt "$OUT/best.pt" --task passkey --lengths 1x,4x,16x,64x,256x --depths 0,0.5,1 --samples 4
