#!/usr/bin/env bash
# Data for recipes/gsm8k: verl's own examples/data_preprocess/gsm8k.py, then one step of ours.
# Writes $DATA_DIR/gsm8k/train.parquet (7473 questions) and test.parquet (1319), data_source
# "openai/gsm8k" -> verl's reward verl/utils/reward_score/gsm8k.py ("#### <number>").
# recipes/gsm8k/prepare_extra.py then adds a system message asking for "####", so that
# Qwen2.5-Math's chat template does not insert its default one asking for \boxed{} (see there).
#
# Usage: [DATA_DIR=$HOME/data] [VERL_REPO=<verl checkout>] [RAW_DATA_DIR=<dir>] bash recipes/gsm8k/prepare_data.sh
#   VERL_REPO       run verl's own examples/data_preprocess/gsm8k.py from that checkout; unset:
#                   recipes/lib/preprocess.py, the same rows (see recipes/lib/prepare.sh)
#   RAW_DATA_DIR    read the dataset from $RAW_DATA_DIR/openai/gsm8k, a local copy in the hub repository's
#                   layout (recipes/lib/cpu_sample.py writes a small one), instead of the Hugging Face hub;
#                   LOCAL_DATASET_PATH=<that folder> does the same
set -euo pipefail

RECIPES_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
DATA_DIR=${DATA_DIR:-$HOME/data}
PYTHON=${PYTHON:-python3}

LOCAL_DATASET_PATH=${LOCAL_DATASET_PATH:-${RAW_DATA_DIR:+$RAW_DATA_DIR/openai/gsm8k}}

# shellcheck source-path=SCRIPTDIR source=../lib/prepare.sh
source "$RECIPES_DIR/lib/prepare.sh"
hmpo_preprocess gsm8k "$DATA_DIR/gsm8k" "$LOCAL_DATASET_PATH"
for split in train test; do
    "$PYTHON" "$RECIPES_DIR/gsm8k/prepare_extra.py" system "$DATA_DIR/gsm8k/$split.parquet"
done
ls -l "$DATA_DIR/gsm8k"
