# shellcheck shell=bash
# Shared launcher of the recipes/<task>/run.sh scripts (sourced, not run). The caller sets the
# variables of its "user-adjustable" block -- TASK, MEAN, SIZE, NNODES, NGPUS_PER_NODE,
# MODEL_PATH, TRAIN_FILES, VAL_FILES, EXPERIMENT_NAME, CKPT_DIR, LOGGER, PYTHON, and optionally CORRECTION
# (a file stem of recipes/correction/), ASYNC (a file stem of recipes/async/: none, one_step_off, separate_async)
# and PREFLIGHT (1: run recipes/lib/preflight.py first; MIN_GPU_GIB: the GPU memory it requires, default 75) -- then calls `hmpo_launch "$@"`, which builds verl's
# own command line,
#
#   python3 -m <entry point> --config-path=<recipes> --config-name=<TASK> \
#       mean=<MEAN> size=<SIZE> [correction=<CORRECTION>] [async=<ASYNC>] [trainer.nnodes=...] [trainer.n_gpus_per_node=...] \
#       data.train_files=[...] data.val_files=[...] trainer.experiment_name=... \
#       trainer.default_local_dir=<CKPT_DIR> trainer.logger=[<LOGGER>] \
#       [actor_rollout_ref.model.path=<MODEL_PATH>] [your overrides...]
#
# (the entry point: verl.trainer.main_ppo, or verl.experimental.one_step_off_policy.main_ppo for
# ASYNC=one_step_off: hmpo_entry_point)
# and either prints it (--dry-run / DRY_RUN=1: one line on stdout, quoted so that a shell
# reads it back as the same words; nothing is run)
# or replaces the shell with it (exec). With PREFLIGHT=1 (the GPU recipes' default) the software
# check recipes/lib/preflight.py runs first, with the same $PYTHON, and a failure stops the launch
# before Ray starts, naming every missing piece. With RAY_ADDRESS=http(s)://<head>:8265 the same command
# is submitted to a running Ray cluster from any machine:
#
#   ray job submit --address=$RAY_ADDRESS --working-dir=<recipes> -- [env VERL_PLATFORM=cpu] \
#       python3 -m verl.trainer.main_ppo --config-dir=. --config-name=<TASK> ...
#
# Ray uploads recipes/ (this checkout's, a few hundred kB) as the job's working directory and runs the
# command there, so `--config-dir=.` (Hydra: a directory relative to the working directory, unlike
# --config-path) finds the shipped YAML, whatever this machine's paths. Everything else must be valid ON THE
# CLUSTER: its Python ($PYTHON) with verl and hmpo-verl installed, and the data, model and CKPT_DIR paths
# (DATA_DIR / TRAIN_FILES / VAL_FILES / MODEL_PATH / CKPT_DIR: set them to the cluster's paths; the
# defaults under this machine's $HOME are only right where the cluster shares it).

# verl 0.9.1's trackers (verl/utils/tracking.py, Tracking.supported_backend; a test keeps this list equal).
HMPO_TRACKERS=(wandb mlflow swanlab vemlp_wandb tensorboard console clearml trackio file rl_insight)

# Credentials and tracker settings that a run joining a running Ray cluster (RAY_ADDRESS: `ray job submit` or a
# driver that connects) does not carry from this shell: the trainer's processes are Ray workers, started with the
# environment of their node's `ray start` (verl's runtime env forwards none of these); sending them
# (--runtime-env-json, ray_init.runtime_env) would put a secret on a command line and in the dashboard's job table.
# HMPO_NODES_SHARE_ENV=1 (recipes/slurm: its nodes' ray start ran in the job's environment) skips the warning.
HMPO_UNSENT_ENV=(WANDB_API_KEY WANDB_ENTITY WANDB_BASE_URL HF_TOKEN HUGGING_FACE_HUB_TOKEN SWANLAB_API_KEY
                 MLFLOW_TRACKING_URI MLFLOW_TRACKING_TOKEN)

hmpo_warn_unsent_env() {
    local name set=()
    for name in "${HMPO_UNSENT_ENV[@]}"; do
        [[ -z "${!name:-}" ]] || set+=("$name")
    done
    [[ ${#set[@]} -eq 0 ]] && return 0
    echo "$(basename -- "$0"): warning: ${set[*]} set in this shell do not reach the trainer on a running Ray" \
        "cluster (RAY_ADDRESS=$RAY_ADDRESS): its processes get the environment of each node's ray start. Set them" \
        "there (export before recipes/lib/cluster.sh head / worker, or wandb login / huggingface-cli login on each" \
        "node); if they are set there already, nothing is missing" >&2
}

hmpo_die() {
    echo "$(basename -- "$0"): $*" >&2
    exit 2
}

# The YAML stems of recipes/<group>/, comma-separated (for error messages).
hmpo_choices() {
    local f names=()
    for f in "$RECIPES_DIR/$1"/*.yaml; do
        [[ -e "$f" ]] && names+=("$(basename -- "$f" .yaml)")
    done
    local IFS=,
    echo "${names[*]}"
}

# A Hydra single-quoted string (callers have rejected values holding a quote).
hmpo_hydra_str() {
    printf "'%s'" "$1"
}

# "a,b,c" -> Hydra list ['a','b','c'].
hmpo_hydra_list() {
    local item out=() items
    IFS=, read -r -a items <<< "$1"
    for item in "${items[@]}"; do
        out+=("$(hmpo_hydra_str "$item")")
    done
    local IFS=,
    printf '[%s]' "${out[*]}"
}

# One word as a shell would need it typed: bare if harmless, else in double quotes, else %q
# (which also keeps a newline inside a word from breaking the one-line output).
hmpo_shell_word() {
    if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
        printf '%s' "$1"
    elif [[ "$1" != *[\\\"\$\`!]* && "$1" != *$'\n'* ]]; then
        printf '"%s"' "$1"
    else
        printf '%q' "$1"
    fi
}

# The check of every node (recipes/lib/preflight.py; through Ray on each node when joining a cluster): the pins of
# recipes/requirements-gpu*.txt and their lock files, the run's files, model and checkpoint disk,
# CUDA and NGPUS_PER_NODE visible GPUs, and hmpo-verl's verl.plugins entry point. Exits 3 naming what
# is missing. Skipped for `ray job submit` (the job runs on the cluster's software, not this shell's).
# Is the size file a CPU size (trainer.device: cpu)? Such a run needs VERL_PLATFORM=cpu (verl_cpu).
hmpo_cpu_size() {
    grep -Eq '^[[:space:]]+device:[[:space:]]*cpu[[:space:]]*(#.*)?$' "$RECIPES_DIR/size/$SIZE.yaml"
}

# hmpo_last KEY ARG...: the value of the last Hydra override of KEY among the ARGs (+KEY= / ++KEY= too; its
# quotes stripped, ${oc.env:HOME} expanded); fails (prints nothing) when none sets KEY.
hmpo_last() {
    local key=$1 arg value found=''
    shift
    for arg in "$@"; do
        arg=${arg#"${arg%%[!+~]*}"}
        [[ "$arg" == "$key="* ]] && value=${arg#*=} && found=1
    done
    [[ -n "$found" ]] || return 1
    value=${value//\$\{oc.env:HOME\}/$HOME}
    [[ "$value" =~ ^\'(.*)\'$ || "$value" =~ ^\"(.*)\"$ ]] && value=${BASH_REMATCH[1]}
    printf '%s\n' "$value"
}

# hmpo_yaml_value FILE DOTTED.KEY: the scalar a recipe YAML file sets for the key (its nesting, not its leaf
# alone), without quotes or comment; nothing if the file does not set it.
hmpo_yaml_value() {
    awk -v key="$2" '
        /^[[:space:]]*[A-Za-z0-9_]+:/ {
            indent = match($0, /[^ ]/) - 1
            while (depth > 0 && indents[depth] >= indent) depth--
            name = $0; sub(/^[[:space:]]*/, "", name); sub(/:.*/, "", name)
            indents[++depth] = indent; names[depth] = name
            path = names[1]; for (i = 2; i <= depth; i++) path = path "." names[i]
            value = $0; sub(/^[^:]*:[[:space:]]*/, "", value); sub(/[[:space:]]+#.*/, "", value)
            gsub(/^["\047]|["\047]$/, "", value)
            if (path == key && value != "") { print value; exit }
        }' "$1"
}

# The split file an ASYNC run's size selects (recipes/split/<hardware>/<ASYNC>.yaml; none for a size without one).
hmpo_split_file() {
    local hardware
    hardware=$(sed -n -E 's|^[[:space:]]*-[[:space:]]*/split/([A-Za-z0-9_]+)@_global_:.*|\1|p' "$RECIPES_DIR/size/$SIZE.yaml")
    [[ -z "$hardware" ]] || echo "$RECIPES_DIR/split/$hardware/${ASYNC:-none}.yaml"
}

# The value a run gets for <dotted.key>: its last Hydra override (HMPO_OVERRIDES: the launch's whole command, its
# own words and then the user's), else the split file's, the size file's, the task file's (the defaults' order:
# task, size, its split; the mean and correction files set no trainer.* or model key).
hmpo_setting() {
    local key=$1 value file
    value=$(hmpo_last "$key" ${HMPO_OVERRIDES[@]+"${HMPO_OVERRIDES[@]}"}) || value=''
    for file in $(hmpo_split_file) "$RECIPES_DIR/size/$SIZE.yaml" "$RECIPES_DIR/$TASK.yaml"; do
        [[ -n "$value" || ! -f "$file" ]] || value=$(hmpo_yaml_value "$file" "$key")
    done
    echo "${value//\$\{oc.env:HOME\}/$HOME}"
}

# GPUs a node gives the run: the trainer's trainer.n_gpus_per_node, plus for ASYNC the rollout pool's
# (one_step_off: rollout.n_gpus_per_node, separate_async: actor_rollout_ref.rollout.n_gpus_per_node).
hmpo_node_gpus() {
    local trainer pool=0
    trainer=$(hmpo_setting trainer.n_gpus_per_node)
    case "${ASYNC:-none}" in
        one_step_off) pool=$(hmpo_setting rollout.n_gpus_per_node) ;;
        separate_async) pool=$(hmpo_setting actor_rollout_ref.rollout.n_gpus_per_node) ;;
    esac
    [[ "$trainer" =~ ^[0-9]+$ && "${pool:-0}" =~ ^[0-9]+$ ]] ||
        hmpo_die "trainer.n_gpus_per_node=$trainer, rollout pool n_gpus_per_node=$pool: whole numbers, please"
    echo $((trainer + ${pool:-0}))
}

# hmpo_files KEY DEFAULT: the files the run gets for data.train_files / data.val_files -- the last override (the
# user's own data.train_files=... after the launcher's word), a Hydra list ['a','b'] / [a, b] or one path, else
# DEFAULT (TRAIN_FILES / VAL_FILES, the launcher's word) -- as "a,b" (quotes and blanks around each path stripped,
# ~/ written out).
hmpo_files() {
    local value item items out=()
    value=$(hmpo_last "$1" ${HMPO_OVERRIDES[@]+"${HMPO_OVERRIDES[@]}"}) || value=$2
    value=${value#[}
    value=${value%]}
    IFS=, read -r -a items <<< "$value"
    for item in "${items[@]}"; do
        item=$(sed -E "s/^[[:space:]]*['\"]?//; s/['\"]?[[:space:]]*\$//" <<< "$item")
        [[ -z "$item" ]] || out+=("$item")
    done
    local IFS=,
    hmpo_home "${out[*]}"
}

# The run's settings the preflight checks: its files, model, checkpoint directory and schedule (disk), its task
# (the data's prompts), and the cluster it joins.
hmpo_preflight_run_args() {
    local nnodes
    nnodes=$(hmpo_setting trainer.nnodes)
    printf '%s\n' --ckpt-dir "$CKPT_DIR" --files "$(hmpo_files data.train_files "$TRAIN_FILES"),$(hmpo_files data.val_files "$VAL_FILES")" \
        --task "$TASK" \
        --model "$(hmpo_setting actor_rollout_ref.model.path)" \
        --keep "$(hmpo_setting trainer.max_actor_ckpt_to_keep)" --save-freq "$(hmpo_setting trainer.save_freq)" \
        --total-steps "$(hmpo_setting trainer.total_training_steps)" \
        --prompt-length "$(hmpo_setting data.max_prompt_length)" \
        --response-length "$(hmpo_setting data.max_response_length)" --nnodes "${nnodes:-1}" \
        --generation-config "$(hmpo_setting actor_rollout_ref.rollout.engine_kwargs.vllm.generation_config)"
    # joining a running cluster: the same checks on every node of it, through Ray; several nodes without
    # RAY_ADDRESS: verl's ray.init() joins the cluster this node runs (ray start), so the preflight checks that one
    if [[ -n "${RAY_ADDRESS:-}" ]]; then
        printf '%s\n' --ray-address "$RAY_ADDRESS"
    elif [[ "${nnodes:-1}" != 1 ]]; then
        printf '%s\n' --ray-address auto
    fi
    [[ -z "${MIN_GPU_GIB:-}" ]] || printf '%s\n' --min-gpu-gib "$MIN_GPU_GIB"
}

hmpo_preflight() {
    local run=()
    mapfile -t run < <(hmpo_preflight_run_args)
    if hmpo_cpu_size; then
        "$PYTHON" "$RECIPES_DIR/lib/preflight.py" --cpu "${run[@]}" ||
            { echo "$(basename -- "$0"): preflight failed; nothing launched (PREFLIGHT=0 skips the check)" >&2; exit 3; }
        return 0
    fi
    local engine=fsdp
    if grep -Eq '^[[:space:]]*-[[:space:]]*override /model_engine:[[:space:]]*megatron' "$RECIPES_DIR/size/$SIZE.yaml"; then
        engine=megatron
    fi
    local gpus
    gpus=$(hmpo_node_gpus)
    "$PYTHON" "$RECIPES_DIR/lib/preflight.py" --engine "$engine" --gpus "$gpus" "${run[@]}" ||
        { echo "$(basename -- "$0"): preflight failed; nothing launched (PREFLIGHT=0 skips the check)" >&2; exit 3; }
}

# The settings that define a run: hmpo_verl.guards.run_settings.RUN_SETTINGS (what each checkpoint records and a
# resume compares), less the run's length (trainer.total_epochs / total_training_steps: a relaunch with more steps
# keeps the name, and the resume check asks for +hmpo.resume_accept=[...]). A test keeps the two lists equal.
HMPO_NAMED_PREFIXES=(actor_rollout_ref.model.path actor_rollout_ref.actor.policy_loss actor_rollout_ref.actor.optim
    actor_rollout_ref.actor.clip_ratio actor_rollout_ref.actor.clip_ratio_low
    actor_rollout_ref.actor.clip_ratio_high actor_rollout_ref.actor.clip_ratio_c actor_rollout_ref.actor.grad_clip
    actor_rollout_ref.actor.loss_agg_mode actor_rollout_ref.actor.entropy_coeff actor_rollout_ref.actor.use_kl_loss
    actor_rollout_ref.actor.kl_loss_coef actor_rollout_ref.actor.kl_loss_type actor_rollout_ref.actor.ppo_epochs
    actor_rollout_ref.actor.ppo_mini_batch_size actor_rollout_ref.actor.shuffle
    actor_rollout_ref.actor.data_loader_seed actor_rollout_ref.rollout.n actor_rollout_ref.rollout.temperature
    actor_rollout_ref.rollout.top_p actor_rollout_ref.rollout.top_k actor_rollout_ref.rollout.seed algorithm
    data.train_files data.train_batch_size data.max_prompt_length data.max_response_length data.shuffle data.seed
    critic.model.path critic.optim trainer.nnodes trainer.n_gpus_per_node
    actor_rollout_ref.model.custom_chat_template actor_rollout_ref.actor.checkpoint.load_contents
    actor_rollout_ref.actor.loss_scale_factor data.train_max_samples data.filter_overlong_prompts data.prompt_key
    data.reward_fn_key data.truncation data.custom_cls data.apply_chat_template_kwargs
    reward.custom_reward_function reward.reward_manager.source reward.reward_manager.name
    reward.reward_manager.module reward.reward_model.enable reward.reward_model.model_path custom_reward_function
    reward_model.enable reward_model.model.path trainer.balance_batch trainer.use_v1 trainer.v1.trainer_mode
    async_training trainer.v1.sync trainer.v1.colocate_async trainer.v1.separate_async trainer.v1.sampler
    actor_rollout_ref.rollout.prompt_length actor_rollout_ref.rollout.response_length
    actor_rollout_ref.rollout.do_sample actor_rollout_ref.rollout.ignore_eos actor_rollout_ref.rollout.over_sample_rate
    actor_rollout_ref.rollout.multi_turn actor_rollout_ref.rollout.agent.default_agent_loop
    actor_rollout_ref.rollout.agent.agent_loop_config_path actor_rollout_ref.hybrid_engine data.gen_batch_size)

# hmpo_under KEY PREFIX...: KEY is one of the PREFIXes or below one.
hmpo_under() {
    local key=$1 prefix
    shift
    for prefix in "$@"; do
        [[ "$key" == "$prefix" || "$key" == "$prefix".* ]] && return 0
    done
    return 1
}

# hmpo_names_run KEY [ACCEPTED...]: does an override of KEY make another run? Yes for a recorded setting, a
# parent of one, or a config group (a key without a dot); no for what a run does not record (logging, saving,
# validation, memory and parallelism tuning: a relaunch after an out-of-memory error resumes its run) and for
# a key that +hmpo.resume_accept=[...] accepts (the relaunch continues the run it names).
hmpo_names_run() {
    local key=$1 prefix
    shift
    hmpo_under "$key" "$@" && return 1
    # timing only (hmpo_verl.guards.run_settings.NOT_COMPARED): the CPU replay buffer's polling period
    [[ "$key" == trainer.v1.sampler.sampler_kwargs.poll_interval ]] && return 1
    [[ "$key" != *.* ]] && return 0
    hmpo_under "$key" "${HMPO_NAMED_PREFIXES[@]}" && return 0
    for prefix in "${HMPO_NAMED_PREFIXES[@]}"; do
        [[ "$prefix" == "$key".* ]] && return 0
    done
    return 1
}

# The default EXPERIMENT_NAME: <TASK>-<SIZE>-<MEAN>[-<CORRECTION>][-<ASYNC>], plus -o<8 hex digits of sha1> of the
# run-defining Hydra overrides given (sorted; hmpo_names_run), so that runs with other settings get their own name
# and CKPT_DIR instead of resuming each other's checkpoints.
hmpo_default_name() {
    local name="$TASK-$SIZE-$MEAN" arg key value named=() accepted=()
    [[ -z "${CORRECTION:-}" || "$CORRECTION" == none ]] || name+="-$CORRECTION"
    [[ -z "${ASYNC:-}" || "$ASYNC" == none ]] || name+="-$ASYNC"
    for arg in "$@"; do  # +hmpo.resume_accept=[a,b]: the keys it accepts
        key=${arg%%=*}
        [[ "${key#"${key%%[!+~]*}"}" == hmpo.resume_accept && "$arg" == *=* ]] || continue
        value=${arg#*=}
        value=${value#[}
        value=${value%]}
        IFS=, read -r -a accepted <<<"${value//[\"\' ]/}"
    done
    for arg in "$@"; do
        key=${arg%%=*}
        key=${key#"${key%%[!+~]*}"}  # +key / ++key / ~key
        if hmpo_names_run "$key" ${accepted[@]+"${accepted[@]}"}; then
            named+=("${arg#"${arg%%[!+~]*}"}")
        fi
    done
    if [[ ${#named[@]} -gt 0 ]]; then
        name+="-o$(printf '%s\n' "${named[@]}" | LC_ALL=C sort | sha1sum | cut -c1-8)"
    fi
    echo "$name"
}

# verl's entry point for the trainer ASYNC selects: its one-step-off-policy trainer has its own main_ppo
# (verl/experimental/one_step_off_policy/main_ppo.py); V1 sync and separate_async are verl.trainer.main_ppo.
hmpo_entry_point() {
    case "${ASYNC:-none}" in
        one_step_off) echo verl.experimental.one_step_off_policy.main_ppo ;;
        *) echo verl.trainer.main_ppo ;;
    esac
}

# Does the size file give an ASYNC run its split of the node (its defaults select recipes/split/<hw>/${async})?
hmpo_size_splits() {
    grep -Eq '^[[:space:]]*-[[:space:]]*/split/[A-Za-z0-9_]+@_global_:[[:space:]]*\$\{async\}' "$RECIPES_DIR/size/$SIZE.yaml"
}

# hmpo_flag NAME MEANING: the switch NAME is unset, 0 or 1 (DRY_RUN=true launched a real run, PREFLIGHT=true
# skipped the check).
hmpo_flag() {
    [[ "${!1:-0}" =~ ^[01]$ ]] || hmpo_die "$1=${!1}: 0 or 1, please ($2)"
}

# hmpo_home PATHS: a path, or comma-separated paths, with a leading ~/ written out as $HOME/ (a quoted
# MODEL_PATH='~/models/x' reaches verl as typed, and verl does not expand it).
hmpo_home() {
    local value=${1/#\~\//$HOME/}
    printf '%s\n' "${value//,\~\//,$HOME/}"
}

hmpo_launch() {
    local dry_run=${DRY_RUN:-0} arg key overrides=() cmd=() ckpt_from=CKPT_DIR
    hmpo_flag DRY_RUN "1: print the command, run nothing"
    hmpo_flag PREFLIGHT "1: check the software, data, model and disk before launching; 0: skip the check"
    for arg in "$@"; do
        key=${arg%%=*}
        key=${key#"${key%%[!+]*}"}  # +key / ++key
        case "$arg" in
            --dry-run) dry_run=1 ;;
            -h | --help)
                sed -n '2,/^set -euo pipefail/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
                exit 0
                ;;
            *=*)
                case "$key" in
                    async)
                        hmpo_die "$arg: set ASYNC=${arg#*=} instead (run.sh launches verl's entry point for the trainer it selects)"
                        ;;
                    size | mean | correction)
                        hmpo_die "$arg: set ${key^^}=${arg#*=} instead (run.sh's checks, its preflight and the default EXPERIMENT_NAME and CKPT_DIR follow ${key^^}; the override would change the run under them)"
                        ;;
                    # the launcher's own words carry them (last wins, as in Hydra), so that CKPT_DIR follows the
                    # name and its checks (absolute, the preflight's disk) see the directory verl gets
                    trainer.experiment_name) EXPERIMENT_NAME=$(hmpo_last "$key" "$arg") ;;
                    trainer.default_local_dir) CKPT_DIR=$(hmpo_last "$key" "$arg") ckpt_from=$key ;;
                    *) overrides+=("$arg") ;;
                esac
                ;;
            *) overrides+=("$arg") ;;
        esac
    done

    EXPERIMENT_NAME=${EXPERIMENT_NAME:-$(hmpo_default_name ${overrides[@]+"${overrides[@]}"})}
    CKPT_DIR=$(hmpo_home "${CKPT_DIR:-$HOME/checkpoints/hmpo_verl/$EXPERIMENT_NAME}")
    MODEL_PATH=$(hmpo_home "$MODEL_PATH")
    TRAIN_FILES=$(hmpo_home "$TRAIN_FILES")
    VAL_FILES=$(hmpo_home "$VAL_FILES")
    [[ -f "$RECIPES_DIR/$TASK.yaml" ]] || hmpo_die "no task config recipes/$TASK.yaml"
    [[ -f "$RECIPES_DIR/mean/$MEAN.yaml" ]] ||
        hmpo_die "MEAN=$MEAN: no recipes/mean/$MEAN.yaml; choose one of: $(hmpo_choices mean)"
    [[ -f "$RECIPES_DIR/size/$SIZE.yaml" ]] ||
        hmpo_die "SIZE=$SIZE: no recipes/size/$SIZE.yaml; choose one of: $(hmpo_choices size)"
    if [[ -n "${CORRECTION:-}" ]]; then
        [[ -f "$RECIPES_DIR/correction/$CORRECTION.yaml" ]] ||
            hmpo_die "CORRECTION=$CORRECTION: no recipes/correction/$CORRECTION.yaml; choose one of: $(hmpo_choices correction)"
    fi
    if [[ -n "${ASYNC:-}" ]]; then
        [[ -f "$RECIPES_DIR/async/$ASYNC.yaml" ]] ||
            hmpo_die "ASYNC=$ASYNC: no recipes/async/$ASYNC.yaml; choose one of: $(hmpo_choices async)"
        if [[ "$ASYNC" != none ]] && ! hmpo_size_splits; then
            local splitting=() f
            for f in "$RECIPES_DIR"/size/*.yaml; do
                SIZE=$(basename -- "$f" .yaml) hmpo_size_splits && splitting+=("$(basename -- "$f" .yaml)")
            done
            hmpo_die "ASYNC=$ASYNC: SIZE=$SIZE has no split of its node for a separate rollout pool (recipes/split/); ASYNC runs with SIZE=$(IFS=,; echo "${splitting[*]}")"
        fi
        [[ "$ASYNC" == none || -z "$NGPUS_PER_NODE" ]] ||
            hmpo_die "NGPUS_PER_NODE=$NGPUS_PER_NODE with ASYNC=$ASYNC: recipes/split/ gives the trainer and the rollout pool their share of each node; override trainer.n_gpus_per_node= and the pool's n_gpus_per_node= (one_step_off: rollout.*, separate_async: actor_rollout_ref.rollout.*) instead"
    fi
    [[ -z "$NNODES" || "$NNODES" =~ ^[1-9][0-9]*$ ]] || hmpo_die "NNODES=$NNODES: a positive integer, please"
    [[ -z "$NGPUS_PER_NODE" || "$NGPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] ||
        hmpo_die "NGPUS_PER_NODE=$NGPUS_PER_NODE: a positive integer, please"
    [[ -n "$TRAIN_FILES" && -n "$VAL_FILES" ]] || hmpo_die "TRAIN_FILES and VAL_FILES must not be empty"
    [[ "$CKPT_DIR" == /* ]] ||
        hmpo_die "$ckpt_from=$CKPT_DIR: an absolute path, please (a relative one lands under each process's working directory, and a resume would silently start from step 0)"
    local tracker trackers
    IFS=, read -r -a trackers <<< "$LOGGER"
    [[ ${#trackers[@]} -gt 0 ]] || hmpo_die "LOGGER is empty; choose from: $(IFS=,; echo "${HMPO_TRACKERS[*]}")"
    for tracker in "${trackers[@]}"; do
        [[ " ${HMPO_TRACKERS[*]} " == *" $tracker "* ]] ||
            hmpo_die "LOGGER=$LOGGER: no tracker '$tracker' in verl; choose from: $(IFS=,; echo "${HMPO_TRACKERS[*]}")"
    done
    for arg in "$TRAIN_FILES" "$VAL_FILES" "$EXPERIMENT_NAME" "$MODEL_PATH" "$CKPT_DIR"; do
        [[ "$arg" != *"'"* ]] || hmpo_die "a value holding a single quote is not supported: $arg"
    done

    [[ -z "${RAY_ADDRESS:-}" || "${HMPO_NODES_SHARE_ENV:-0}" == 1 ]] || hmpo_warn_unsent_env
    local ray_submit=''
    local config_dir=("--config-path=$RECIPES_DIR")
    case "${RAY_ADDRESS:-}" in
        http://* | https://*)
            ray_submit=1
            cmd+=(ray job submit "--address=$RAY_ADDRESS" "--working-dir=$RECIPES_DIR" --)
            if hmpo_cpu_size; then
                # the job's driver needs verl_cpu's platform too (its workers get it from the size file's
                # ray_init runtime_env; Ray refuses a job runtime env that sets the same variable)
                cmd+=(env VERL_PLATFORM=cpu)
            fi
            config_dir=(--config-dir=.)  # the job runs in the shipped working directory
            ;;
    esac
    cmd+=(
        "$PYTHON" -m "$(hmpo_entry_point)"
        "${config_dir[@]}"
        "--config-name=$TASK"
        "mean=$MEAN"
        "size=$SIZE"
    )
    if [[ -n "${CORRECTION:-}" ]]; then
        cmd+=("correction=$CORRECTION")
    fi
    if [[ -n "${ASYNC:-}" ]]; then
        cmd+=("async=$ASYNC")
    fi
    if [[ -n "$NNODES" ]]; then
        cmd+=("trainer.nnodes=$NNODES")
    fi
    if [[ -n "$NGPUS_PER_NODE" ]]; then
        cmd+=("trainer.n_gpus_per_node=$NGPUS_PER_NODE")
    fi
    cmd+=(
        "data.train_files=$(hmpo_hydra_list "$TRAIN_FILES")"
        "data.val_files=$(hmpo_hydra_list "$VAL_FILES")"
        "trainer.experiment_name=$(hmpo_hydra_str "$EXPERIMENT_NAME")"
        "trainer.default_local_dir=$(hmpo_hydra_str "$CKPT_DIR")"
        "trainer.logger=$(hmpo_hydra_list "$LOGGER")"
    )
    if [[ -n "$MODEL_PATH" ]]; then
        cmd+=("actor_rollout_ref.model.path=$(hmpo_hydra_str "$MODEL_PATH")")
    fi
    if [[ -n "${RAY_ADDRESS:-}" ]] && hmpo_cpu_size; then
        # joining a running cluster (recipes/lib/cluster.sh), directly or as a job: its nodes declare their
        # CPUs and GPU slots, and Ray refuses num_cpus / num_gpus from a driver that connects
        cmd+=("ray_kwargs.ray_init.num_cpus=null" "ray_kwargs.ray_init.num_gpus=null")
    fi
    cmd+=(${overrides[@]+"${overrides[@]}"})

    if [[ "$dry_run" == 1 ]]; then
        local words=()
        for arg in "${cmd[@]}"; do
            words+=("$(hmpo_shell_word "$arg")")
        done
        echo "${words[*]}"
        return 0
    fi
    if [[ "${PREFLIGHT:-0}" == 1 && -z "${ray_submit:-}" ]]; then
        HMPO_OVERRIDES=("${cmd[@]}")
        hmpo_preflight
    elif [[ "${PREFLIGHT:-0}" == 1 ]]; then
        echo "$(basename -- "$0"): preflight skipped for ray job submit: the job runs on the cluster's software," \
            "which this machine cannot see; to check every node first, run on a cluster node:" \
            "python3 recipes/lib/preflight.py --ray-address <head>:<GCS port> (recipes/README.md, Install on a GPU node)" >&2
    fi
    if hmpo_cpu_size; then
        export VERL_PLATFORM=cpu  # verl_cpu's platform, FSDP engines on gloo and hf rollout server
    fi
    exec "${cmd[@]}"
}
