"""hmpo_verl.openrlhf.PowerMeanPolicyLoss against OpenRLHF 0.11.2's own PolicyLoss, where they coincide.

OpenRLHF's `openrlhf/models/loss.py` is loaded from the installed openrlhf distribution (installed
without its dependencies by recipes/cpu_tiny/setup_and_run.sh: it pins CUDA-only packages) without
running `openrlhf/models/__init__.py`, which imports flash-attn; its `openrlhf/models/utils.py` imports
DeepSpeed, used there only by the ZeRO-3 helpers, so an empty placeholder stands in when DeepSpeed is
not installed. Everything else is OpenRLHF's code as shipped:
  * power=0, clip_level="sequence" == OpenRLHF's gspo (which forces the per-sample mean);
  * power=1, clip_level="token"    == OpenRLHF's ppo, both aggregations, with and without dual clip,
    with OpenRLHF's global normalisers (dp_size, batch_num_tokens, global_batch_size), and with each of its
    train/rollout importance-sampling corrections (TIS, ICEPOP, seq-mask-tis, binary-KL and TV gates);
loss, gradient and the returned clip_ratio / ppo_kl in float64, random inputs with ragged masks, an
empty row and garbage at masked positions. The differences by design are pinned below, and so is where ours
is right or loud and OpenRLHF's is not: NaN / inf log-probs under its IS correction.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from hmpo_verl.guards.finite import NonFiniteInputError
from hmpo_verl.host_loss import LossOptions
from hmpo_verl.openrlhf import PowerMeanPolicyLoss

B, T = 7, 9
TIGHT = dict(rtol=1e-12, atol=1e-14)


@pytest.fixture(scope="module")
def openrlhf_loss():
    """OpenRLHF's own `openrlhf.models.loss` module (see the module docstring for how it is loaded)."""
    spec = importlib.util.find_spec("openrlhf")
    if spec is None:
        pytest.skip("openrlhf is not installed (recipes/cpu_tiny/setup_and_run.sh installs it)")
    models_dir = Path(spec.submodule_search_locations[0]) / "models"
    package = types.ModuleType("_openrlhf_src")
    package.__path__ = [str(models_dir)]
    saved = {name: sys.modules.get(name) for name in ("_openrlhf_src", "deepspeed")}
    sys.modules["_openrlhf_src"] = package
    if importlib.util.find_spec("deepspeed") is None:
        sys.modules["deepspeed"] = types.ModuleType("deepspeed")
    try:
        module = importlib.import_module("_openrlhf_src.loss")
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    assert Path(module.__file__).parent == models_dir
    return module


def batch(seed=0, noise=0.2, shift=0.0, token_adv=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[2] = 0  # an empty response
    mask = torch.arange(T) < lengths.unsqueeze(1)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.05
    logp = old + noise * torch.randn(B, T, generator=g, dtype=torch.float64) + shift
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) if token_adv else \
        torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    adv[1] = 0.0
    # finite garbage at masked positions (OpenRLHF multiplies by the mask, so NaN would poison its loss)
    return torch.where(mask, logp, 7.0), torch.where(mask, old, -30.0), adv, mask


def run(loss_fn, logp, old, adv, mask, **kw):
    logp = logp.clone().requires_grad_(True)
    loss, clip_ratio, ppo_kl, vllm_kl, is_filter = loss_fn(logp, old, adv, action_mask=mask, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad, clip_ratio, ppo_kl, vllm_kl, is_filter


def compare(ours, theirs, *inputs, is_checked=False, **kw):
    a, b = run(ours, *inputs, **kw), run(theirs, *inputs, **kw)
    torch.testing.assert_close(a[0], b[0], **TIGHT)
    torch.testing.assert_close(a[1], b[1], **TIGHT)
    torch.testing.assert_close(a[2], b[2], rtol=1e-6, atol=0)  # float32 in both
    torch.testing.assert_close(a[3], b[3], **TIGHT)
    assert is_checked or (a[4] is None and b[4] is None and a[5] is None and b[5] is None)
    assert a[1].abs().sum() > 0
    return a, b


NORMALISERS = [{}, dict(dp_size=2, batch_num_tokens=30.0, global_batch_size=5.0)]


@pytest.mark.parametrize("global_norm", NORMALISERS, ids=["local", "global"])
@pytest.mark.parametrize("seed", [0, 1])
def test_geometric_sequence_clip_is_openrlhf_gspo(openrlhf_loss, global_norm, seed):
    clip = dict(clip_eps_low=0.03, clip_eps_high=0.04)
    theirs = openrlhf_loss.PolicyLoss(**clip, policy_loss_type="gspo")
    ours = PowerMeanPolicyLoss(**clip, token_level_loss=False, policy_loss_type="power_mean",
                               options=LossOptions("power_mean", power=0.0, clip_level="sequence"))
    a, _ = compare(ours, theirs, *batch(seed), **global_norm)
    assert 0 < a[2] < 1  # the clip is active on some sequences, not all


@pytest.mark.parametrize("token_level_loss", [True, False])
@pytest.mark.parametrize("dual_clip", [None, 1.3])
@pytest.mark.parametrize("global_norm", NORMALISERS, ids=["local", "global"])
def test_arithmetic_token_clip_is_openrlhf_ppo(openrlhf_loss, token_level_loss, dual_clip, global_norm):
    clip = dict(clip_eps_low=0.1, clip_eps_high=0.15, dual_clip=dual_clip, token_level_loss=token_level_loss)
    theirs = openrlhf_loss.PolicyLoss(**clip, policy_loss_type="ppo")
    ours = PowerMeanPolicyLoss(**clip, policy_loss_type="power_mean", options=LossOptions("power_mean", power=1.0))
    inputs = batch(noise=0.4, token_adv=True)
    a, _ = compare(ours, theirs, *inputs, **global_norm)
    assert 0 < a[2] < 1
    logp, old, adv, mask = inputs
    if dual_clip:  # the dual clip binds on some A < 0 tokens
        assert (mask & (adv < 0) & (logp - old > math.log(dual_clip))).any()


# OpenRLHF's named schemes: TIS (token clip), ICEPOP (token mask), seq-mask-tis, FlashREINFORCE (seq binary-KL mask)
IS_SCHEMES = {
    "tis": dict(is_correction_level="token", is_correction_mode="clip", is_correction_threshold=(0.9, 1.05)),
    "icepop": dict(is_correction_level="token", is_correction_mode="mask", is_correction_threshold=(0.9, 1.1)),
    "seq-mask-tis": dict(is_correction_level="seq", is_correction_mode="mask", is_correction_threshold=(0.97, 1.03)),
    "binary-kl": dict(is_correction_level="seq", is_correction_gating="binary_kl", is_correction_threshold=(0.0, 0.004)),
    "tv": dict(is_correction_level="token", is_correction_gating="tv", is_correction_threshold=(0.0, 0.03)),
}


@pytest.mark.parametrize("scheme", IS_SCHEMES)
def test_arithmetic_token_clip_with_is_correction_is_openrlhf_ppo(openrlhf_loss, scheme):
    """The gate's coefficient multiplies each token's loss term as in OpenRLHF's ppo; vllm_kl and
    is_filter_ratio are OpenRLHF's."""
    kw = dict(clip_eps_low=0.1, clip_eps_high=0.15, token_level_loss=False, **IS_SCHEMES[scheme])
    theirs = openrlhf_loss.PolicyLoss(**kw, policy_loss_type="ppo")
    ours = PowerMeanPolicyLoss(**kw, policy_loss_type="power_mean", options=LossOptions("power_mean", power=1.0))
    logp, old, adv, mask = batch(noise=0.3, token_adv=True)
    rollout = old + 0.1 * torch.randn(B, T, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    a, b = compare(ours, theirs, logp, old, adv, mask, rollout_log_probs=rollout, is_checked=True)
    torch.testing.assert_close(a[4], b[4], **TIGHT)  # vllm_kl
    torch.testing.assert_close(a[5], b[5], rtol=1e-6, atol=0)  # is_filter_ratio (float32 in both)
    assert 0 < a[5] < 1  # the gate acts on some units, not all


def test_action_mask_none_is_every_token(openrlhf_loss):
    logp, old, adv, mask = batch()
    logp, old = torch.where(mask, logp, -1.0), torch.where(mask, old, -1.1)  # every position is valid here
    theirs = openrlhf_loss.PolicyLoss(policy_loss_type="ppo")
    ours = PowerMeanPolicyLoss(policy_loss_type="power_mean", options=LossOptions("power_mean", power=1.0))
    compare(ours, theirs, logp, old, adv, None)


def test_token_log_ratio_beyond_20_is_not_clamped(openrlhf_loss):
    """By design: OpenRLHF's ppo clamps log r at +-20 (a clamped token has no gradient, and an A < 0 token's
    ratio stops at e^20); ours does not (as verl's vanilla does not for A < 0)."""
    logp, old, adv, mask = batch()
    logp = torch.where(mask & (adv < 0), old + 21.0, logp)
    theirs = openrlhf_loss.PolicyLoss(policy_loss_type="ppo")
    ours = PowerMeanPolicyLoss(policy_loss_type="power_mean", options=LossOptions("power_mean", power=1.0))
    a, b = run(ours, logp, old, adv, mask), run(theirs, logp, old, adv, mask)
    hit = mask & (adv < 0)
    expected = adv * torch.exp(logp - old) / mask.sum()  # d(-A r / N)/d logp = -A r / N, negated above
    torch.testing.assert_close(a[1][hit], -expected[hit], **TIGHT)
    assert (b[1][hit] == 0).all()


def test_per_token_advantages_at_sequence_clip_are_gspo_token(openrlhf_loss):
    """By design (GSPO-token, as verl's and SkyRL's gspo): with advantages varying along a response each token's
    gradient carries its own A_t, d loss / d logp_it = -A_it s_i / (n_i B'); OpenRLHF's gspo weights every
    token of a response by the response's mean advantage. The values agree."""
    logp, old, adv, mask = batch(token_adv=True)
    kw = dict(clip_eps_low=0.99, clip_eps_high=10.0)  # no clip active
    theirs = openrlhf_loss.PolicyLoss(**kw, policy_loss_type="gspo")
    ours = PowerMeanPolicyLoss(**kw, token_level_loss=False, policy_loss_type="power_mean",
                               options=LossOptions("power_mean", power=0.0, clip_level="sequence"))
    a, b = run(ours, logp, old, adv, mask), run(theirs, logp, old, adv, mask)
    torch.testing.assert_close(a[0], b[0], **TIGHT)
    m = mask.double()
    n = m.sum(-1, keepdim=True)
    s = torch.exp(((logp - old) * m).sum(-1, keepdim=True) / n.clamp(min=1))
    rows = (n > 0).sum()
    torch.testing.assert_close(a[1], -adv * s * m / (n.clamp(min=1) * rows), **TIGHT)
    assert not torch.allclose(a[1], b[1])


def test_every_loss_mode_runs_and_bad_options_are_named():
    logp, old, adv, mask = batch()
    for options in (LossOptions(), LossOptions("agm"), LossOptions("power_mean", power=-3.0, clip_space="log"),
                    LossOptions("adaptive_power_mean")):
        out = run(PowerMeanPolicyLoss(policy_loss_type=options.loss_mode, options=options), logp, old, adv, mask)
        assert torch.isfinite(out[0]) and torch.isfinite(out[1]).all() and out[1].abs().sum() > 0
    with pytest.raises(ValueError, match="is_correction_level='tok' is invalid; allowed: off, token, seq"):
        PowerMeanPolicyLoss(is_correction_level="tok")
    with pytest.raises(ValueError, match="is_correction_mode='clip' is invalid with is_correction_level='seq'"):
        PowerMeanPolicyLoss(is_correction_level="seq", is_correction_mode="clip")
    with pytest.raises(ValueError, match="dual_clip=2.0 is invalid with clip_level='sequence'"):
        PowerMeanPolicyLoss(dual_clip=2.0, policy_loss_type="power_mean",
                            options=LossOptions("power_mean", power=0.0, clip_level="sequence"))
    with pytest.raises(ValueError, match="policy_loss.adapt='schedule' is invalid here; allowed: ess"):
        LossOptions("adaptive_power_mean", adapt="schedule")
    with pytest.raises(ValueError, match="loss_mode='ppo' is invalid; allowed: hmpo, power_mean"):
        PowerMeanPolicyLoss(policy_loss_type="ppo")


def test_is_correction_at_sequence_clip_gates_as_ppo_does(openrlhf_loss):
    """By design: with IS correction on, each token's term is weighted by the gate's coefficient c_t (here TIS:
    clamp(pi_old / pi_rollout, 0.9, 1.05)), the sequence ratio staying pi / pi_old; OpenRLHF's gspo instead takes
    the sequence ratio against the rollout policy, ungated. No clip active, per-sample mean: loss =
    mean_i mean_t(-A_i s_i c_it), d loss / d logp_it = -A_i s_i c_it / (n_i B')."""
    kw = dict(clip_eps_low=0.99, clip_eps_high=10.0, **IS_SCHEMES["tis"])
    logp, old, adv, mask = batch()
    rollout = old + 0.1 * torch.randn(B, T, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ours = PowerMeanPolicyLoss(**kw, token_level_loss=False, policy_loss_type="power_mean",
                               options=LossOptions("power_mean", power=0.0, clip_level="sequence"))
    theirs = openrlhf_loss.PolicyLoss(**kw, policy_loss_type="gspo")
    a = run(ours, logp, old, adv, mask, rollout_log_probs=rollout)
    b = run(theirs, logp, old, adv, mask, rollout_log_probs=rollout)
    m = mask.double()
    n = m.sum(-1, keepdim=True)
    s = torch.exp(((logp - old) * m).sum(-1, keepdim=True) / n.clamp(min=1))
    c = torch.exp(old - rollout).clamp(0.9, 1.05) * m
    rows = (n > 0).squeeze(-1)
    expected = (-adv * s * c).sum(-1, keepdim=True)[rows] / n[rows]
    torch.testing.assert_close(a[0], expected.mean(), **TIGHT)
    torch.testing.assert_close(a[1], -adv * s * c / (n.clamp(min=1) * rows.sum()), **TIGHT)
    assert not torch.allclose(a[0], b[0])


# right or loud where OpenRLHF's own gate is not: NaN / inf log-probs at a valid position raise (OpenRLHF's gate
# drops the token or row silently); at a masked position they do not matter (OpenRLHF's masked_mean makes them NaN)
NON_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("scheme", IS_SCHEMES)
@pytest.mark.parametrize("field", ["old_log_probs", "rollout_log_probs"])
@pytest.mark.parametrize("value", NON_FINITE)
def test_non_finite_log_probs_at_a_valid_position_are_named(scheme, field, value):
    logp, old, adv, mask = batch()
    inputs = {"old_log_probs": old.clone(), "rollout_log_probs": old - 0.01}
    inputs[field][0, 1] = value  # row 0 has at least one valid token: position 1 is valid by the seed
    assert mask[0, 1]
    ours = PowerMeanPolicyLoss(**IS_SCHEMES[scheme])
    with pytest.raises(NonFiniteInputError, match=f"^{field} has 1 non-finite value"):
        ours(logp, inputs["old_log_probs"], adv, mask, inputs["rollout_log_probs"])


@pytest.mark.parametrize("scheme", IS_SCHEMES)
@pytest.mark.parametrize("value", NON_FINITE)
def test_non_finite_log_probs_at_masked_positions_do_not_matter(openrlhf_loss, scheme, value):
    """Reference: OpenRLHF's own ppo on the same batch with finite garbage at the masked positions."""
    kw = dict(clip_eps_low=0.1, clip_eps_high=0.15, token_level_loss=False, **IS_SCHEMES[scheme])
    theirs = openrlhf_loss.PolicyLoss(**kw, policy_loss_type="ppo")
    ours = PowerMeanPolicyLoss(**kw, policy_loss_type="power_mean", options=LossOptions("power_mean", power=1.0))
    logp, old, adv, mask = batch(noise=0.3, token_adv=True)
    rollout = old + 0.1 * torch.randn(B, T, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    a = run(ours, torch.where(mask, logp, value), torch.where(mask, old, value), adv, mask,
            rollout_log_probs=torch.where(mask, rollout, value))
    b = run(theirs, logp, old, adv, mask, rollout_log_probs=torch.where(mask, rollout, 0.0))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6 if x.dtype == torch.float32 else 1e-12, atol=1e-14)


def test_power_mean_without_a_power_is_refused():
    """As the verl adapter: power_mean has no default p (hmpo is p = -1)."""
    with pytest.raises(ValueError, match=r"policy_loss_type='power_mean' needs a power p: set options="):
        PowerMeanPolicyLoss(policy_loss_type="power_mean")
