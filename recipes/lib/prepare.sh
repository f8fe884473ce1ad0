# shellcheck shell=bash
# Shared by recipes/<task>/prepare_data.sh (sourced, not run): find verl's data-preprocessing
# scripts. They live in verl's repository (examples/data_preprocess/), not in the pip package,
# so use a checkout: $VERL_REPO if set, else a shallow clone of $VERL_REF (default v0.9.1, the
# verl version hmpo-verl is built against) into a temporary directory removed on exit.

hmpo_verl_repo() {
    if [[ -n "${VERL_REPO:-}" ]]; then
        [[ -d "$VERL_REPO/examples/data_preprocess" ]] ||
            { echo "VERL_REPO=$VERL_REPO has no examples/data_preprocess/" >&2; exit 2; }
        return 0
    fi
    HMPO_TMP_CLONE=$(mktemp -d)
    trap 'rm -rf -- "$HMPO_TMP_CLONE"' EXIT
    git clone --quiet --depth 1 --branch "${VERL_REF:-v0.9.1}" \
        https://github.com/verl-project/verl.git "$HMPO_TMP_CLONE/verl" >&2
    VERL_REPO=$HMPO_TMP_CLONE/verl
}
