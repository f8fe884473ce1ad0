"""hmpo_verl.skyrl's registered losses against SkyRL 0.4.0's own `gspo` and `regular`, and its registration.

SkyRL's own code (`skyrl.backends.skyrl_train.utils.ppo_utils`, its `PolicyLossRegistry`, its
`apply_loss_reduction_to_advantages_minibatch`, `apply_off_policy_correction`, `AlgorithmConfig`) is
imported as installed (without its dependencies, by recipes/cpu_tiny/setup_and_run.sh). SkyRL needs
Python >= 3.12; on 3.11 only `skyrl/backends/__init__.py` is not run (it imports the Tinker API
backend, whose pydantic models need 3.12): the `skyrl.backends` package is entered without it.
  * power=0, clip_level="sequence" == SkyRL's gspo (GSPO-token, log s clamped at 10): float64 rounding;
  * power=1, clip_level="token"    == SkyRL's regular: to float32 rounding, since SkyRL computes the token
    ratio in float32 (`safe_exp_delta`), which also clamps log r at +-20 (not reached here);
for SkyRL's loss reductions (advantages pre-scaled as SkyRL does) and with its token TIS correction.
Also: bad options and clip epsilons are named; NaN / inf log-probs under SkyRL's off-policy correction
raise at valid positions and do not matter at masked ones (SkyRL's own correction is not right or loud).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import os
import re
import subprocess
import sys
import types

import pytest
import torch

if importlib.util.find_spec("skyrl") is None:
    pytest.skip("skyrl is not installed (recipes/cpu_tiny/setup_and_run.sh installs it)", allow_module_level=True)
if sys.version_info < (3, 12) and "skyrl.backends" not in sys.modules:
    _root = importlib.util.find_spec("skyrl").submodule_search_locations[0]
    _backends = types.ModuleType("skyrl.backends")
    _backends.__path__ = [os.path.join(_root, "backends")]
    _backends.__spec__ = importlib.machinery.ModuleSpec("skyrl.backends", None, is_package=True)
    sys.modules["skyrl.backends"] = _backends

from skyrl.backends.skyrl_train.utils import ppo_utils  # noqa: E402
from skyrl.train.config import AlgorithmConfig, OffPolicyCorrectionConfig  # noqa: E402

from hmpo_verl.guards.finite import NonFiniteInputError  # noqa: E402
from hmpo_verl.host_loss import LossOptions  # noqa: E402
from hmpo_verl.skyrl import policy_loss, register, split_overrides  # noqa: E402

B, T = 7, 9
TIGHT = dict(rtol=1e-12, atol=1e-15)
FLOAT32 = dict(rtol=2e-6, atol=1e-9)
REDUCTIONS = ["token_mean", "sequence_mean", "seq_mean_token_sum_norm"]


def batch(reduction, seed=0, noise=0.2, token_adv=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[2] = 0
    mask = (torch.arange(T) < lengths.unsqueeze(1)).double()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.05
    logp = old + noise * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) if token_adv else \
        torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    adv = ppo_utils.apply_loss_reduction_to_advantages_minibatch(adv * mask, mask, reduction, B, T)
    rollout = old - 0.1 * torch.rand(B, T, generator=g, dtype=torch.float64)
    bad = mask == 0  # finite garbage at masked positions (SkyRL multiplies by the mask)
    return torch.where(bad, 7.0, logp), torch.where(bad, -30.0, old), adv, mask, rollout


def run(fn, config, logp, old, adv, mask, rollout=None):
    logp = logp.clone().requires_grad_(True)
    loss, metrics = fn(logp, old, adv, config, mask, rollout)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, metrics


def config(loss_type, reduction, **kw):
    return AlgorithmConfig(policy_loss_type=loss_type, loss_reduction=reduction, eps_clip_low=kw.pop("low", 0.03),
                           eps_clip_high=kw.pop("high", 0.04), **kw)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_geometric_sequence_clip_is_skyrl_gspo(reduction, seed):
    inputs = batch(reduction, seed, token_adv=seed == 1)[:4]
    ours = run(policy_loss(LossOptions("power_mean", power=0.0, clip_level="sequence")),
               config("power_mean", reduction), *inputs)
    theirs = run(ppo_utils.PolicyLossRegistry.get("gspo"), config("gspo", reduction), *inputs)
    torch.testing.assert_close(ours[0], theirs[0], **TIGHT)
    torch.testing.assert_close(ours[1], theirs[1], **TIGHT)
    assert ours[2]["clip_ratio"] == pytest.approx(theirs[2]["clip_ratio"], rel=1e-12)
    assert 0 < ours[2]["clip_ratio"] < 1 and ours[1].abs().sum() > 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("tis", [False, True])
def test_arithmetic_token_clip_is_skyrl_regular(reduction, tis):
    kw = dict(low=0.1, high=0.15)
    if tis:  # SkyRL's token TIS: the loss times min(pi_old / pi_rollout, cap), applied by SkyRL's own code
        kw["off_policy_correction"] = OffPolicyCorrectionConfig(tis_ratio_type="token", token_tis_ratio_clip_high=1.05)
    logp, old, adv, mask, rollout = batch(reduction, noise=0.4, token_adv=True)
    inputs = (logp, old, adv, mask, rollout if tis else None)
    ours = run(policy_loss(LossOptions("power_mean", power=1.0)), config("power_mean", reduction, **kw), *inputs)
    theirs = run(ppo_utils.PolicyLossRegistry.get("regular"), config("regular", reduction, **kw), *inputs)
    torch.testing.assert_close(ours[0], theirs[0], **FLOAT32)
    torch.testing.assert_close(ours[1], theirs[1], **FLOAT32)
    assert ours[2]["clip_ratio"] == pytest.approx(theirs[2]["clip_ratio"], rel=1e-9)
    assert 0 < ours[2]["clip_ratio"] < 1
    assert {k for k in theirs[2]} <= set(ours[2])  # SkyRL's metrics, the correction's included
    if tis:
        plain = run(policy_loss(LossOptions("power_mean", power=1.0)), config("power_mean", reduction, low=0.1,
                                                                               high=0.15), *inputs[:4])
        assert not torch.allclose(ours[1], plain[1])  # the correction acted


def test_registered_by_name_through_the_entry_points_overrides():
    argv = ["trainer.override_entrypoint=hmpo_verl.skyrl", "trainer.algorithm.policy_loss_type=power_mean",
            "hmpo.power=0.5", "hmpo.clip_level=sequence", "trainer.epochs=1"]
    options, rest = split_overrides(argv)
    assert options == LossOptions("power_mean", power=0.5, clip_level="sequence", prefix="hmpo")
    assert rest == ["trainer.algorithm.policy_loss_type=power_mean", "trainer.epochs=1"]
    name = "hmpo_test_power_mean"
    register(name, options)
    try:
        assert name in ppo_utils.PolicyLossRegistry.list_available()
        # SkyRL ships a registered loss to its workers through its registry actor with cloudpickle
        shipped = ppo_utils.cloudpickle.loads(ppo_utils.cloudpickle.dumps(ppo_utils.PolicyLossRegistry.get(name)))
        inputs = batch("sequence_mean")[:4]
        got = run(shipped, config(name, "sequence_mean"), *inputs)
        want = run(policy_loss(options), config(name, "sequence_mean"), *inputs)
        torch.testing.assert_close(got[0], want[0], **TIGHT)
    finally:
        ppo_utils.PolicyLossRegistry.unregister(name)


@pytest.mark.parametrize("first, last", [("gspo", "power_mean"), ("power_mean", "gspo")])
def test_a_key_given_twice_takes_its_last_value_as_skyrl_does(first, last):
    """SkyRL reads its overrides with OmegaConf.from_cli, where the last of a key wins: so does the adapter."""
    from omegaconf import OmegaConf

    argv = [f"trainer.algorithm.policy_loss_type={first}", "hmpo.power=2", "hmpo.power=0.5",
            f"trainer.algorithm.policy_loss_type={last}"]
    assert OmegaConf.from_cli(argv[:1] + argv[3:]).trainer.algorithm.policy_loss_type == last
    if last == "gspo":  # not ours: our options are refused, naming the loss SkyRL would run
        with pytest.raises(ValueError, match=re.escape("hmpo.power is invalid with trainer.algorithm.policy_loss_type=gspo")):
            split_overrides(argv)
    else:
        options, rest = split_overrides(argv)
        assert options == LossOptions("power_mean", power=0.5, prefix="hmpo")
        assert rest == [argv[0], argv[3]]


@pytest.mark.parametrize("argv, message", [
    (["trainer.algorithm.policy_loss_type=hmpo", "hmpo.power=2"], "hmpo.power=2.0 conflicts with loss_mode='hmpo'"),
    (["trainer.algorithm.policy_loss_type=power_mean", "hmpo.clip_level=seq"],
     "hmpo.clip_level='seq' is invalid; allowed: token, sequence"),
    (["trainer.algorithm.policy_loss_type=gspo", "hmpo.power=0"], "hmpo.power is invalid with"),
    (["trainer.algorithm.policy_loss_type=hmpo", "hmpo.pwer=0"], "hmpo.pwer is not an option"),
    (["trainer.algorithm.policy_loss_type=agm", "hmpo.agm_iters=3.0"],
     "hmpo.agm_iters='3.0' is invalid; allowed: null (exact limit sqrt(A*H)) or an integer in [0, 1000]"),
    # as the verl adapter: power_mean has no default p (hmpo is p = -1)
    (["trainer.algorithm.policy_loss_type=power_mean"], "power_mean needs a power p: set hmpo.power=<p>"),
    (["trainer.algorithm.policy_loss_type=power_mean", "+hmpo.power=0.5"],
     "'+hmpo.power=0.5' is invalid; allowed: hmpo.power=<value>"),
    (["trainer.algorithm.policy_loss_type=adaptive_power_mean", "hmpo.clip_level=sequence"],
     "hmpo.clip_level='sequence' is invalid with adapt='ess', which adapts p to each trajectory's token clip "
     "fraction; allowed: token"),
])
def test_bad_options_are_named(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        split_overrides(argv)
    assert "adapt='schedule'" not in str(err.value)  # refused on SkyRL: not suggested


@pytest.mark.parametrize("low, high", [(-0.1, 0.2), (0.2, -0.5), (1.5, 0.2), (float("nan"), 0.2)])
def test_bad_clip_epsilons_are_named(low, high):
    fn = policy_loss(LossOptions("power_mean", power=1.0))
    with pytest.raises(ValueError, match=rf"^trainer.algorithm.eps_clip_low={low}, trainer.algorithm.eps_clip_high="
                                         rf"{high} are invalid for clip_space='ratio'"):
        run(fn, config("power_mean", "token_mean", low=low, high=high), *batch("token_mean")[:4])


def test_seq_ratio_metric_is_clamped_as_the_other_adapters():
    """log s = 95 in float32: the loss is finite (clipped), the metric is e^20 (log s clamped to +-20, as the verl
    and TRL adapters' pm/seq_ratio_mean), not inf."""
    logp = torch.full((1, 3), 95.0)
    fn = policy_loss(LossOptions("power_mean", power=-1.0, clip_level="sequence"))
    inputs = (logp, torch.zeros_like(logp), torch.ones_like(logp), torch.ones_like(logp))  # logp, old, adv, mask
    loss, grad, metrics = run(fn, config("power_mean", "token_mean"), *inputs)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert metrics["pm/seq_ratio_mean"] == pytest.approx(math.exp(20.0), rel=1e-12)


CORRECTIONS = {  # SkyRL's token and sequence TIS, its geometric sequence mask
    "token-tis": dict(tis_ratio_type="token", token_tis_ratio_clip_high=1.05),
    "seq-tis": dict(tis_ratio_type="sequence", sequence_tis_ratio_clip_high=1.5),
    "geo-mask": dict(sequence_mask_metric="geometric", geo_mask_low=0.97, geo_mask_high=1.03),
}
NON_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("correction", CORRECTIONS)
@pytest.mark.parametrize("value", NON_FINITE)
def test_non_finite_log_probs_at_masked_positions_do_not_matter(correction, value):
    """Reference: SkyRL's own regular on the same batch with finite garbage at the masked positions."""
    kw = dict(low=0.1, high=0.15, off_policy_correction=OffPolicyCorrectionConfig(**CORRECTIONS[correction]))
    logp, old, adv, mask, rollout = batch("token_mean", noise=0.4, token_adv=True)
    masked = mask == 0
    ours = run(policy_loss(LossOptions("power_mean", power=1.0)), config("power_mean", "token_mean", **kw),
               logp.masked_fill(masked, value), old.masked_fill(masked, value), adv, mask,
               rollout.masked_fill(masked, value))
    theirs = run(ppo_utils.PolicyLossRegistry.get("regular"), config("regular", "token_mean", **kw),
                 logp, old, adv, mask, rollout.masked_fill(masked, 0.0))
    torch.testing.assert_close(ours[0], theirs[0], **FLOAT32)
    torch.testing.assert_close(ours[1], theirs[1], **FLOAT32)
    assert {k: ours[2][k] for k in theirs[2]} == pytest.approx(theirs[2], rel=1e-9)
    assert ours[1].abs().sum() > 0


@pytest.mark.parametrize("correction", CORRECTIONS)
@pytest.mark.parametrize("field", ["old_log_probs", "rollout_logprobs"])
@pytest.mark.parametrize("value", NON_FINITE)
def test_non_finite_log_probs_at_a_valid_position_are_named(correction, field, value):
    kw = dict(off_policy_correction=OffPolicyCorrectionConfig(**CORRECTIONS[correction]))
    logp, old, adv, mask, rollout = batch("token_mean")
    inputs = {"old_log_probs": old, "rollout_logprobs": rollout}
    assert mask[0, 0] == 1
    inputs[field] = inputs[field].clone()
    inputs[field][0, 0] = value
    with pytest.raises(NonFiniteInputError, match=f"^{field} has 1 non-finite value"):
        run(policy_loss(LossOptions("power_mean", power=1.0)), config("power_mean", "token_mean", **kw),
            logp, inputs["old_log_probs"], adv, mask, inputs["rollout_logprobs"])


def test_the_adapter_imports_neither_verl_trl_nor_openrlhf():
    code = ("import sys, importlib.machinery, importlib.util, os, types\n"
            "if sys.version_info < (3, 12):  # as above: skyrl/backends/__init__.py needs 3.12\n"
            "    root = importlib.util.find_spec('skyrl').submodule_search_locations[0]\n"
            "    m = types.ModuleType('skyrl.backends'); m.__path__ = [os.path.join(root, 'backends')]\n"
            "    m.__spec__ = importlib.machinery.ModuleSpec('skyrl.backends', None, is_package=True)\n"
            "    sys.modules['skyrl.backends'] = m\n"
            "import hmpo_verl.skyrl\n"
            "print(sorted(m for m in ('verl', 'trl', 'openrlhf', 'skyrl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['skyrl']"
