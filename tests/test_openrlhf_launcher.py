"""`python -m hmpo_verl.openrlhf.train_ppo_ray`: its arguments, and the loss it installs in OpenRLHF's Ray workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hmpo_verl.host_loss import LossOptions
from hmpo_verl.openrlhf import OPTIONS_ENV, PowerMeanPolicyLoss
from hmpo_verl.openrlhf.train_ppo_ray import HOOK, main, runtime_env, split_argv

REPO = Path(__file__).resolve().parents[1]
OPENRLHF_ARGS = ["--actor.model_name_or_path", "m", "--actor.loss_agg_mode", "seq-mean-token-mean"]


def test_our_loss_type_and_options_leave_openrlhf_a_type_it_knows():
    options, rest = split_argv([*OPENRLHF_ARGS, "--actor.policy_loss_type", "power_mean", "--pm.power", "0.5",
                                "--pm.clip_level=sequence"])
    assert options == LossOptions("power_mean", power=0.5, clip_level="sequence", prefix="--pm")
    assert rest == [*OPENRLHF_ARGS, "--actor.policy_loss_type", "ppo"]
    env = runtime_env(options)
    assert env["worker_process_setup_hook"] == HOOK == "hmpo_verl.openrlhf.install"
    assert LossOptions.from_json(env["env_vars"][OPTIONS_ENV]) == options
    assert env["env_vars"]["TOKENIZERS_PARALLELISM"] == os.environ.get("TOKENIZERS_PARALLELISM", "true")


def test_openrlhf_own_loss_types_run_unchanged():
    argv = [*OPENRLHF_ARGS, "--actor.policy_loss_type", "gspo"]
    assert split_argv(argv) == (None, argv)
    assert split_argv(OPENRLHF_ARGS) == (None, OPENRLHF_ARGS)


@pytest.mark.parametrize("argv, message", [
    (["--actor.policy_loss_type", "hmpo", "--pm.clip_level", "tokens"],
     "--pm.clip_level='tokens' is invalid; allowed: token, sequence"),
    (["--actor.policy_loss_type", "hmpo", "--pm.power", "0.5"], "--pm.power=0.5 conflicts with loss_mode='hmpo'"),
    (["--actor.policy_loss_type", "gspo", "--pm.power", "0.5"], "--pm.power is invalid with --actor.policy_loss_type='gspo'"),
    (["--actor.policy_loss_type", "power_mean"], "--actor.policy_loss_type=power_mean needs a power p: set --pm.power"),
    (["--actor.policy_loss_type", "agm", "--pm.power", "0.5"], "--pm.power=0.5: not read with loss_mode='agm'"),
    (["--actor.policy_loss_type", "power_mean", "--pm.power", "0.5", "--pm.p_min", "-1"],
     "--pm.p_min=-1.0: not read with loss_mode='power_mean'"),
    (["--actor.policy_loss_type", "adaptive_power_mean", "--pm.clip_level", "sequence"],
     "--pm.clip_level='sequence' is invalid with adapt='ess', which adapts p to each trajectory's token clip "
     "fraction; allowed: token"),
    # an unknown --pm.* flag went on to OpenRLHF's parser, which refused it only after ray.init; a launcher with no
    # adapt flag ran adaptive_power_mean at 'ess' whatever --pm.adapt said
    (["--actor.policy_loss_type", "adaptive_power_mean", "--pm.adapt", "schedule"],
     "--pm.adapt is not a flag of this launcher; allowed: --pm.power, --pm.clip_level"),
    (["--actor.policy_loss_type", "hmpo", "--pm.powr=-1"], "--pm.powr is not a flag of this launcher"),
    (["--actor.policy_loss_type", "ppo", "--pm.clip_levl", "token"], "--pm.clip_levl is not a flag of this launcher"),
])
def test_bad_options_stop_before_ray_with_the_flag_named(argv, message):
    with pytest.raises(SystemExit) as stop:
        main([*OPENRLHF_ARGS, *argv])
    assert message in str(stop.value)
    assert "adapt='schedule'" not in str(stop.value)  # refused on OpenRLHF (and it has no --pm.adapt): not suggested
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_adapters_import_neither_verl_trl_nor_a_host():
    code = ("import sys, hmpo_verl.openrlhf, hmpo_verl.openrlhf.train_ppo_ray, hmpo_verl.host_loss; "
            "print(sorted(m for m in ('verl', 'trl', 'openrlhf', 'skyrl', 'ray', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_ray_workers_build_our_loss_where_openrlhf_builds_its_own():
    """A fresh driver starts Ray with the launcher's runtime_env; a Ray actor imports `openrlhf.models.PolicyLoss`
    as OpenRLHF's PolicyModelActor does and builds it with ppo_actor.py's arguments (policy_loss_type='ppo', as
    OpenRLHF's parser is left): it is PowerMeanPolicyLoss with the launcher's options, and computes what
    PowerMeanPolicyLoss computes here."""
    pytest.importorskip("openrlhf")
    out = subprocess.run([sys.executable, str(REPO / "tests" / "openrlhf_worker.py"), "power_mean", "0.5", "sequence"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["hook_ran"] and result["pid"] != result["driver_pid"]
    assert result["class"] == "hmpo_verl.hosts.openrlhf.PowerMeanPolicyLoss"  # the real module behind the public hmpo_verl.openrlhf
    assert Path(result["openrlhf_loss_file"]).parts[-3:] == ("openrlhf", "models", "loss.py")
    options = LossOptions.from_json(result["options"])
    assert options == LossOptions("power_mean", power=0.5, clip_level="sequence", prefix="--pm")
    sys.path.insert(0, str(REPO / "tests"))
    from openrlhf_worker import example_inputs

    logp, old, adv, mask = example_inputs()
    ours = PowerMeanPolicyLoss(clip_eps_high=0.28, token_level_loss=False, policy_loss_type="power_mean",
                               options=options)
    loss = ours(logp, old, adv, action_mask=mask)[0]
    loss.backward()
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-12)
    assert result["grad_sum"] == pytest.approx(logp.grad.sum().item(), rel=1e-12)
    assert result["clip_eps_high"] == pytest.approx(1.28)
