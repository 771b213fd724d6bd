#!/usr/bin/env bash
# Re-create the committed sample bundles (deterministic on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
for setting in single multitask continual; do
    dualtui record digits --setting "$setting" -o "sample_runs/digits-$setting.safetensors"
    dualtui verify "sample_runs/digits-$setting.safetensors"
done
