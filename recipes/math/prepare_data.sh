#!/usr/bin/env bash
# Data for recipes/math:
#   $DATA_DIR/math/{train,test}.parquet      verl's own examples/data_preprocess/math_dataset.py
#                                           (MATH, data_source "DigitalLearningGmbH/MATH-lighteval")
#   $DATA_DIR/math/train_level3to5.parquet   its training rows at levels 3-5 (Dr. GRPO's question set)
#   $DATA_DIR/math500/test.parquet           MATH-500 in the same row format and prompt, data_source
#                                           "HuggingFaceH4/MATH-500" (verl's math reward)
#   $DATA_DIR/aime-2024.parquet              DAPO's AIME 2024 parquet, downloaded as verl-recipe's
#                                           dapo/prepare_dapo_data.sh does (to aime-2024.dapo.parquet;
#                                           verl's math_dapo reward), rewritten in the MATH-500 file's schema
# Steps 2-4 are recipes/math/prepare_extra.py (tested in tests/test_recipes_data.py): verl joins the
# validation files with datasets.concatenate_datasets, which needs one schema in all of them.
#
# Usage: [DATA_DIR=$HOME/data] [VERL_REPO=<verl checkout>] [RAW_DATA_DIR=<dir>] bash recipes/math/prepare_data.sh
#   VERL_REPO       run verl's own examples/data_preprocess/math_dataset.py from that checkout; unset:
#                   recipes/lib/preprocess.py, the same rows (see recipes/lib/prepare.sh)
#   RAW_DATA_DIR    read every dataset from $RAW_DATA_DIR/<hub id>/ (a local copy in the hub repository's
#                   layout; recipes/lib/cpu_sample.py writes a small one) instead of the Hugging Face hub
set -euo pipefail

RECIPES_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
DATA_DIR=${DATA_DIR:-$HOME/data}
PYTHON=${PYTHON:-python3}
AIME_URL=${AIME_URL:-https://huggingface.co/datasets/BytedTsinghua-SIA/AIME-2024/resolve/main/data/aime-2024.parquet?download=true}

RAW=${RAW_DATA_DIR:+$RAW_DATA_DIR/}

# shellcheck source-path=SCRIPTDIR source=../lib/prepare.sh
source "$RECIPES_DIR/lib/prepare.sh"
hmpo_preprocess math "$DATA_DIR/math" "${RAW:+${RAW}DigitalLearningGmbH/MATH-lighteval}"
mkdir -p "$DATA_DIR/math500"
"$PYTHON" "$RECIPES_DIR/math/prepare_extra.py" levels \
    "$DATA_DIR/math/train.parquet" "$DATA_DIR/math/train_level3to5.parquet"
"$PYTHON" "$RECIPES_DIR/math/prepare_extra.py" math500 "$DATA_DIR/math500/test.parquet" "${RAW}HuggingFaceH4/MATH-500"
if [[ -n "$RAW" ]]; then
    cp "${RAW}BytedTsinghua-SIA/AIME-2024/data/aime-2024.parquet" "$DATA_DIR/aime-2024.dapo.parquet"
elif [[ ! -f "$DATA_DIR/aime-2024.dapo.parquet" ]]; then
    curl -fL --retry 3 -o "$DATA_DIR/aime-2024.dapo.parquet" "$AIME_URL"
fi
"$PYTHON" "$RECIPES_DIR/math/prepare_extra.py" aime "$DATA_DIR/aime-2024.dapo.parquet" "$DATA_DIR/aime-2024.parquet"
ls -l "$DATA_DIR/math" "$DATA_DIR/math500" "$DATA_DIR/aime-2024.parquet"
