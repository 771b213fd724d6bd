#!/usr/bin/env bash
# Re-create the committed sample bundles (deterministic on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
for setting in single multitask continual; do
    dualtui record digits --setting "$setting" -o "sample_runs/digits-$setting.safetensors"
    dualtui verify "sample_runs/digits-$setting.safetensors"
done
# A character-level Transformer on the first 6,000 characters of Python's standard-library
# docstrings (gathered from the running Python: regenerate with Python 3.11 for the same text).
dualtui record text --max-chars 6000 --context 16 --width 16 --blocks 1 --heads 1 --steps 160 --batch-size 4 --tests 100 --dtype float16 -o sample_runs/text-docstrings.safetensors
dualtui verify sample_runs/text-docstrings.safetensors
