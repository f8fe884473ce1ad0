#!/usr/bin/env bash
# A Ray cluster over several nodes for the recipes: the head, the workers joining it, the trainer on the head.
#
#   bash recipes/lib/cluster.sh head                     # on the head node (prints the address workers join)
#   bash recipes/lib/cluster.sh worker <head-ip>:6379    # on every other node
#   NNODES=2 RAY_ADDRESS=<head-ip>:6379 CKPT_DIR=/shared/ckpt/run1 \
#       SIZE=qwen2_5_math_7b MEAN=harmonic bash recipes/math/run.sh       # on the head node, once all joined
#   bash recipes/lib/cluster.sh stop                     # on each node, afterwards (`ray stop`: every Ray
#                                                        # process of this machine's user)
#
# run.sh with RAY_ADDRESS=<host>:<port> runs verl's main_ppo here and its ray.init() joins that cluster; the
# trainer then places trainer.nnodes x trainer.n_gpus_per_node ranks, one placement group per node.
# Every node needs the same software (recipes/README.md "Install on a GPU node") and the model, the data and
# CKPT_DIR at the same paths: CKPT_DIR (trainer.default_local_dir) must be absolute and on storage every
# node sees, so that verl's trainer.resume_mode=auto (its default) finds the latest global_step_* after a
# restart; trainer.resume_mode=disable starts afresh, resume_mode=resume_path with
# trainer.resume_from_path=<CKPT_DIR>/global_step_<n> picks a step. recipes/slurm/ray_on_slurm.slurm does
# the same under SLURM. tests/ray_cluster.py runs it with two nodes on one machine (CPU size, tests/test_recipes_cpu_size.py).
#
# Ray >= 2.5x: `ray start` turns on token authentication (the token in ~/.ray/auth_token of the head; copy it
# to every node, or set RAY_AUTH_MODE=disabled on a trusted network) and a driver that joins needs
# RAY_AUTH_MODE=token in its environment: `RAY_AUTH_MODE=token NNODES=2 RAY_ADDRESS=... bash recipes/<task>/run.sh`.
#
# `ray job submit` from another machine (RAY_ADDRESS=http://<head-ip>:8265 bash recipes/<task>/run.sh, see
# recipes/lib/launch.sh for what it ships) needs the head's dashboard, which serves Ray's job API:
#   DASHBOARD_HOST=0.0.0.0 bash recipes/lib/cluster.sh head   # listen on every interface (or the head's IP)
# Unset, the dashboard stays off (--include-dashboard=false). The job API runs any command it is sent, as
# this user: expose it only on a trusted network (token authentication, above, guards it on Ray >= 2.5x).
#
# Environment (default): DASHBOARD_HOST (unset: no dashboard) the address the dashboard listens on;
# DASHBOARD_PORT (8265) its port; RAY_PORT (6379) the head's GCS port; NGPUS_PER_NODE (Ray's own count) GPUs this node
# offers -- with the CPU size, logical GPU slots = trainer ranks on this node; NUM_CPUS (Ray's own count);
# NODE_IP (Ray's choice); RAY_TEMP_DIR (Ray's /tmp/ray) -- two nodes on one machine need two;
# RAY_START_ARGS extra `ray start` flags, e.g. "--block" (stay in the foreground, as SLURM's srun wants) or
# other ports when several clusters share a machine.
set -euo pipefail

RAY=${RAY:-ray}
RAY_PORT=${RAY_PORT:-6379}

usage() {
    sed -n '2,/^set -euo pipefail/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit "${1:-0}"
}

hmpo_ray_start_args() {
    local args=()
    [[ -n "${NGPUS_PER_NODE:-}" ]] && args+=("--num-gpus=$NGPUS_PER_NODE")
    [[ -n "${NUM_CPUS:-}" ]] && args+=("--num-cpus=$NUM_CPUS")
    [[ -n "${NODE_IP:-}" ]] && args+=("--node-ip-address=$NODE_IP")
    [[ -n "${RAY_TEMP_DIR:-}" ]] && args+=("--temp-dir=$RAY_TEMP_DIR")
    # shellcheck disable=SC2206 # RAY_START_ARGS is a list of flags, split on purpose
    args+=(${RAY_START_ARGS:-})
    # none: print nothing (printf with no arguments prints one empty line, which became an empty argument)
    [[ ${#args[@]} -eq 0 ]] || printf '%s\n' "${args[@]}"
}

main() {
    local role=${1:-} extra=()
    [[ "$role" == -h || "$role" == --help ]] && usage 0
    mapfile -t extra < <(hmpo_ray_start_args)
    case "$role" in
        head)
            local dashboard=(--include-dashboard=false)
            echo "head: workers join with: bash recipes/lib/cluster.sh worker ${NODE_IP:-<this-node-ip>}:$RAY_PORT" >&2
            if [[ -n "${DASHBOARD_HOST:-}" ]]; then
                dashboard=(--include-dashboard=true "--dashboard-host=$DASHBOARD_HOST"
                    "--dashboard-port=${DASHBOARD_PORT:-8265}")
                echo "head: jobs are submitted with: RAY_ADDRESS=http://${NODE_IP:-<this-node-ip>}:${DASHBOARD_PORT:-8265} bash recipes/<task>/run.sh" >&2
            fi
            if [[ "${RAY_AUTH_MODE:-}" == token ]]; then
                # `ray start --head` with RAY_AUTH_MODE=token reads ~/.ray/auth_token and does not make it: a new
                # home (a fresh node, a SLURM job's first run) would stop it with "no authentication token was
                # found". Make one where there is none (Ray < 2.5x has no such command, and no token auth).
                "$RAY" get-auth-token --generate >/dev/null 2>&1 || true
            fi
            exec "$RAY" start --head "--port=$RAY_PORT" "${dashboard[@]}" "${extra[@]}"
            ;;
        worker)
            [[ -n "${2:-}" ]] || { echo "cluster.sh worker: give the head's address, <ip>:<port>" >&2; exit 2; }
            exec "$RAY" start "--address=$2" "${extra[@]}"
            ;;
        stop)
            exec "$RAY" stop
            ;;
        *)
            echo "cluster.sh: head | worker <head-ip>:<port> | stop (got '${role}')" >&2
            usage 2
            ;;
    esac
}

main "$@"
