#!/usr/bin/env bash
# Data for recipes/gsm8k: verl's own examples/data_preprocess/gsm8k.py, then one step of ours.
# Writes $DATA_DIR/gsm8k/train.parquet (7473 questions) and test.parquet (1319), data_source
# "openai/gsm8k" -> verl's reward verl/utils/reward_score/gsm8k.py ("#### <number>").
# recipes/gsm8k/prepare_extra.py then adds a system message asking for "####", so that
# Qwen2.5-Math's chat template does not insert its default one asking for \boxed{} (see there).
#
# Usage: [DATA_DIR=$HOME/data] [VERL_REPO=<verl checkout> | VERL_REF=v0.9.1] bash recipes/gsm8k/prepare_data.sh
# Needs network access to the Hugging Face hub (openai/gsm8k), or LOCAL_DATASET_PATH=<a local copy>.
set -euo pipefail

RECIPES_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
DATA_DIR=${DATA_DIR:-$HOME/data}
PYTHON=${PYTHON:-python3}

# shellcheck source-path=SCRIPTDIR source=../lib/prepare.sh
source "$RECIPES_DIR/lib/prepare.sh"
hmpo_verl_repo

mkdir -p "$DATA_DIR/gsm8k"
args=(--local_save_dir "$DATA_DIR/gsm8k")
if [[ -n "${LOCAL_DATASET_PATH:-}" ]]; then
    args+=(--local_dataset_path "$LOCAL_DATASET_PATH")
fi
"$PYTHON" "$VERL_REPO/examples/data_preprocess/gsm8k.py" "${args[@]}"
for split in train test; do
    "$PYTHON" "$RECIPES_DIR/gsm8k/prepare_extra.py" system "$DATA_DIR/gsm8k/$split.parquet"
done
ls -l "$DATA_DIR/gsm8k"
