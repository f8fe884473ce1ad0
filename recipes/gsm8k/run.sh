#!/usr/bin/env bash
# hmpo-verl recipe | GSM8K | Qwen2.5-Math-1.5B (1 node) or -7B (1-2 nodes) | vLLM | FSDP2
#
# One run = recipes/gsm8k.yaml + recipes/size/$SIZE.yaml + recipes/mean/$MEAN.yaml, trained by
# verl's own entry point (python3 -m verl.trainer.main_ppo --config-path=... --config-name=gsm8k).
# Data: bash recipes/gsm8k/prepare_data.sh (verl's examples/data_preprocess/gsm8k.py).
#
# Usage: [VAR=value ...] bash recipes/gsm8k/run.sh [--dry-run] [hydra_override ...]
#   --dry-run         print the exact command (one shell-quoted line on stdout), run nothing;
#                     DRY_RUN=1 does the same
#   hydra_override    appended last, so it wins: trainer.total_epochs=1 'trainer.logger=[console,wandb]'
#                     (trainer.experiment_name= / trainer.default_local_dir= are EXPERIMENT_NAME / CKPT_DIR;
#                     mean= size= correction= async= are refused: set MEAN SIZE CORRECTION ASYNC)
# Environment (default):
#   MEAN              a file stem of recipes/mean/ (harmonic): grpo arithmetic geometric_seq
#                     geometric_token harmonic agm adaptive_ess adaptive_schedule adv_power_mean adv_agm
#   SIZE              a file stem of recipes/size/ (qwen2_5_math_1_5b): qwen2_5_math_1_5b qwen2_5_math_7b
#                     qwen3_30b_a3b_megatron (Megatron, MoE) qwen2_5_0_5b (1 GPU: the first run on new hardware)
#   CORRECTION        a file stem of recipes/correction/ (none): none token_tis token_mask
#   ASYNC             a file stem of recipes/async/ (none): none (verl's V1 sync), one_step_off (verl's
#                     one-step-off-policy trainer), separate_async (V1 with a separate rollout pool); the
#                     size file splits its node (recipes/split/: 4 trainer + 4 rollout GPUs, NCCL weight
#                     sync); with our losses take CORRECTION=none (ASYNC sets bypass_mode=true)
#   NNODES            nodes; NGPUS_PER_NODE  GPUs per node (unset: the size file's -- 1 x 8 for the
#                     GPU sizes, 1 x 1 for qwen2_5_0_5b; 1 x 2 trainer ranks for SIZE=cpu)
#   MODEL_PATH        local checkpoint dir or hub id (unset: the size file's, Qwen/Qwen2.5-Math-*)
#   DATA_DIR          ($HOME/data); TRAIN_FILES / VAL_FILES: comma-separated parquet paths
#   EXPERIMENT_NAME   (gsm8k-$SIZE-$MEAN, plus -$CORRECTION and -$ASYNC unless none, plus -o<hash> of your
#                     run-defining overrides if any: recipes/lib/launch.sh, hmpo_default_name); PYTHON (python3)
#   CKPT_DIR          absolute checkpoint directory, trainer.default_local_dir
#                     ($HOME/checkpoints/hmpo_verl/$EXPERIMENT_NAME); on several nodes put it on storage
#                     every node sees. verl's trainer.resume_mode=auto (its default) resumes from its
#                     latest global_step_* there -- hmpo_verl stops a resume whose settings differ from the
#                     checkpoint's (README, "Crash and resume"); trainer.resume_mode=disable starts afresh
#   LOGGER            comma-separated verl trackers (console): console,wandb  console,tensorboard ...
#   PREFLIGHT         1: check the software (recipes/lib/preflight.py against recipes/requirements-gpu*.txt
#                     and their lock files), the data, the model and CKPT_DIR's free disk before launching,
#                     on every node of the cluster when RAY_ADDRESS=<host>:<port>; 0: skip (1)
#   MIN_GPU_GIB       the GPU memory the preflight requires (75: the size files' 80 GB class); lower it to
#                     run a small size on a smaller card
#   RAY_ADDRESS       http://<head>:8265 to submit to a running Ray cluster (ray job submit);
#                     unset: run here (on a cluster's head node, verl's ray.init joins that cluster)
set -euo pipefail

RECIPES_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)

# ---- user-adjustable ----
TASK=gsm8k
MEAN=${MEAN:-harmonic}
SIZE=${SIZE:-qwen2_5_math_1_5b}
CORRECTION=${CORRECTION:-none}
ASYNC=${ASYNC:-none}
NNODES=${NNODES:-}
NGPUS_PER_NODE=${NGPUS_PER_NODE:-}
MODEL_PATH=${MODEL_PATH:-}
DATA_DIR=${DATA_DIR:-$HOME/data}
TRAIN_FILES=${TRAIN_FILES:-$DATA_DIR/gsm8k/train.parquet}
VAL_FILES=${VAL_FILES:-$DATA_DIR/gsm8k/test.parquet}
EXPERIMENT_NAME=${EXPERIMENT_NAME:-}  # unset: hmpo_default_name (launch.sh), once the overrides are known
CKPT_DIR=${CKPT_DIR:-}                # unset: $HOME/checkpoints/hmpo_verl/$EXPERIMENT_NAME
LOGGER=${LOGGER:-console}
PYTHON=${PYTHON:-python3}
PREFLIGHT=${PREFLIGHT:-1}
# ---- end user-adjustable ----

# shellcheck source-path=SCRIPTDIR source=../lib/launch.sh
source "$RECIPES_DIR/lib/launch.sh"
hmpo_launch "$@"
