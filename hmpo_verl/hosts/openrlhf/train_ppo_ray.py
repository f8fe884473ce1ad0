"""OpenRLHF's `openrlhf.cli.train_ppo_ray` with the power-mean losses installed in every Ray worker.

    python -m hmpo_verl.openrlhf.train_ppo_ray <OpenRLHF's arguments> --actor.policy_loss_type hmpo
    python -m hmpo_verl.openrlhf.train_ppo_ray <...> --actor.policy_loss_type power_mean --pm.power 0.5 \\
        --pm.clip_level sequence --actor.loss_agg_mode seq-mean-token-mean

With `--actor.policy_loss_type` one of ours (hmpo, power_mean, agm, adaptive_power_mean) and the
`--pm.*` options (below), this validates the options (an error names the flag, before Ray starts),
starts Ray with `runtime_env={"worker_process_setup_hook": "hmpo_verl.openrlhf.install", "env_vars":
{HMPO_OPENRLHF_LOSS: <options>, OpenRLHF's own defaults}}` -- so every worker process, OpenRLHF's
policy actors included, replaces OpenRLHF's `PolicyLoss` by `hmpo_verl.openrlhf.PowerMeanPolicyLoss`
before it imports it -- and runs OpenRLHF's entry point with the rest of the arguments (OpenRLHF's
parser sees `--actor.policy_loss_type ppo`, a type it knows; `ppo` has no other effect in OpenRLHF
0.11.2 than choosing its loss). With OpenRLHF's own loss types it runs OpenRLHF unchanged.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from dataclasses import fields

from hmpo_verl.hosts.host_loss import LOSS_MODES, LossOptions
from hmpo_verl.hosts.openrlhf import OPTIONS_ENV, install
from hmpo_verl.maths.options import power_needed

ENTRY_POINT = "openrlhf.cli.train_ppo_ray"
HOOK = "hmpo_verl.openrlhf.install"
LOSS_FLAG = "--actor.policy_loss_type"
# OpenRLHF's train() starts Ray with these when it is not started yet (same defaults)
OPENRLHF_ENV_DEFAULTS = {"TOKENIZERS_PARALLELISM": "true", "NCCL_DEBUG": "WARN", "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1"}
PM_FIELDS = ("power", "clip_level", "clip_space", "agm_iters", "p_min", "p_max", "sign_rule", "ess_target_min")


def parser() -> argparse.ArgumentParser:
    """Our flags only (OpenRLHF's pass through): the loss type and the power-mean options."""
    types = {f.name: f.type for f in fields(LossOptions)}
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument(LOSS_FLAG, dest="loss_type", default="ppo")
    for name in PM_FIELDS:
        kind = {"float": float, "str": str, "Optional[int]": int}[types[name]]
        p.add_argument(f"--pm.{name}", dest=name, type=kind, default=None)
    return p


def split_argv(argv: list[str]) -> tuple[LossOptions | None, list[str]]:
    """(our loss options or None, the arguments for OpenRLHF's parser). Raises ValueError naming the flag."""
    ours, rest = parser().parse_known_args(argv)
    unknown = [arg.split("=", 1)[0] for arg in rest if arg.startswith("--pm.")]
    if unknown:  # OpenRLHF's parser would refuse it only once Ray has started
        raise ValueError(f"{unknown[0]} is not a flag of this launcher; allowed: "
                         f"{', '.join(f'--pm.{name}' for name in PM_FIELDS)} (adaptive_power_mean runs adapt='ess' "
                         "here: OpenRLHF hands its loss neither the optimizer step nor the rewards)")
    given = {name: getattr(ours, name) for name in PM_FIELDS if getattr(ours, name) is not None}
    if ours.loss_type not in LOSS_MODES:
        if given:
            raise ValueError(f"--pm.{next(iter(given))} is invalid with {LOSS_FLAG}={ours.loss_type!r}; allowed: "
                             f"{LOSS_FLAG} one of {', '.join(LOSS_MODES)}")
        return None, list(argv)
    options = LossOptions(loss_mode=ours.loss_type, prefix="--pm", **given)
    if ours.loss_type == "power_mean" and "power" not in given:  # as every host: power_mean has no default p
        raise power_needed(f"{LOSS_FLAG}=power_mean", "--pm.power <p>", f"{LOSS_FLAG} hmpo")
    return options, [*rest, LOSS_FLAG, "ppo"]


def runtime_env(options: LossOptions) -> dict:
    """Ray's job runtime_env: the setup hook that installs the loss, its options, OpenRLHF's defaults."""
    env = {k: os.environ.get(k, v) for k, v in OPENRLHF_ENV_DEFAULTS.items()}
    return {"worker_process_setup_hook": HOOK, "env_vars": {**env, OPTIONS_ENV: options.to_json()}}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        options, rest = split_argv(argv)
    except ValueError as err:
        sys.exit(f"hmpo_verl.openrlhf.train_ppo_ray: {err}")
    if options is not None:
        import ray

        os.environ[OPTIONS_ENV] = options.to_json()
        install()  # this process too (the driver)
        ray.init(runtime_env=runtime_env(options))  # before OpenRLHF's train(), which then keeps this Ray
        print(f"hmpo_verl.openrlhf: {options.loss_mode} installed in OpenRLHF's actors: {options}", flush=True)
    sys.argv = [ENTRY_POINT, *rest]
    runpy.run_module(ENTRY_POINT, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
