# shellcheck shell=bash
# Shared by recipes/<task>/prepare_data.sh (sourced, not run): verl's preprocessing of one dataset.
#
#   hmpo_preprocess <gsm8k|math> <save_dir> [<local copy of the hub dataset>]
#
# writes <save_dir>/{train,test}.parquet in verl's RL row format. With VERL_REPO=<a verl checkout>
# it runs verl's own examples/data_preprocess/{gsm8k,math_dataset}.py (they live in verl's
# repository, not in its pip package); without, recipes/lib/preprocess.py, which takes the same
# arguments and writes the same rows (tests/test_recipes_cpu_size.py compares the two where a
# checkout is given). Nothing is cloned: verl has no v0.9.1 tag to clone (its 0.9.x preprocessing
# scripts are those of v0.9.0), and a node without GitHub access can still prepare its data.
# The caller sets RECIPES_DIR and PYTHON.

hmpo_preprocess() {
    local task=$1 save_dir=$2 local_copy=${3:-} args=()
    local -A verl_script=([gsm8k]=gsm8k.py [math]=math_dataset.py)
    args=(--local_save_dir "$save_dir")
    if [[ -n "$local_copy" ]]; then
        [[ -d "$local_copy" ]] || { echo "no local dataset copy at $local_copy" >&2; exit 2; }
        args+=(--local_dataset_path "$local_copy")
    fi
    mkdir -p "$save_dir"
    if [[ -n "${VERL_REPO:-}" ]]; then
        [[ -f "$VERL_REPO/examples/data_preprocess/${verl_script[$task]}" ]] ||
            { echo "VERL_REPO=$VERL_REPO has no examples/data_preprocess/${verl_script[$task]}" >&2; exit 2; }
        "$PYTHON" "$VERL_REPO/examples/data_preprocess/${verl_script[$task]}" "${args[@]}"
    else
        "$PYTHON" "$RECIPES_DIR/lib/preprocess.py" "$task" "${args[@]}"
    fi
}
