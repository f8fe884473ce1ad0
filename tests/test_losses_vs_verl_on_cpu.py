"""Our losses against verl's own built-in losses where they coincide (loss, gradient, metrics).

  power_mean p=0, sequence clip              == gspo      (every agg mode, +- rollout IS weights)
  power_mean p=0, token clip in log space    == geo_mean  (one micro-batch, seq-mean aggregation)
  power_mean p=1, token clip in ratio space  == vanilla   (seq-mean-token-mean, incl. dual clip)
"""

import pytest
import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn

from _helpers import AGG_MODES, actor_config, random_batch


def _run(loss_mode, config, old, log_prob, adv, mask, agg, is_weights=None):
    lp = log_prob.clone().requires_grad_()
    loss, metrics = get_policy_loss_fn(loss_mode)(
        old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, loss_agg_mode=agg, config=config,
        rollout_is_weights=is_weights,
    )
    loss.backward()
    return loss.detach(), lp.grad, metrics


def _assert_same(ours, theirs, metric_keys):
    torch.testing.assert_close(ours[0], theirs[0].to(ours[0].dtype), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-10, atol=1e-12)
    for key in metric_keys:
        assert ours[2][key] == pytest.approx(theirs[2][key], rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("with_is", [False, True])
@pytest.mark.parametrize("token_adv", [False, True])
def test_geometric_sequence_clip_is_gspo(agg, with_is, token_adv):
    old, lp, adv, mask = random_batch(B=8, T=13, scale=0.02, seed=11, token_adv=token_adv)
    is_w = torch.rand(old.shape, dtype=old.dtype, generator=torch.Generator().manual_seed(3)) + 0.5 if with_is else None
    eps = dict(eps_low=3e-4, eps_high=4e-4)  # GSPO's published range: some sequences clip, some not
    ours = _run("power_mean", actor_config("power_mean", power=0.0, clip_level="sequence", **eps), old, lp, adv, mask, agg, is_w)
    theirs = _run("gspo", actor_config("gspo", plain=True, **eps), old, lp, adv, mask, agg, is_w)
    assert 0 < ours[2]["actor/pg_clipfrac"] < 1
    _assert_same(ours, theirs, ["actor/pg_clipfrac", "actor/ppo_kl"])


def test_geometric_token_log_clip_is_geo_mean():
    old, lp, adv, mask = random_batch(B=10, T=9, scale=0.4, seed=12, empty_row=False)
    eps = dict(eps_low=0.4, eps_high=0.4)  # GMPO's log-space range
    ours = _run("power_mean", actor_config("power_mean", power=0.0, clip_space="log", **eps), old, lp, adv, mask,
                "seq-mean-token-mean")
    theirs = _run("geo_mean", actor_config("geo_mean", plain=True, **eps), old, lp, adv, mask, "seq-mean-token-mean")
    assert ours[2]["actor/pg_clipfrac"] > 0
    _assert_same(ours, theirs, ["actor/ppo_kl"])


@pytest.mark.parametrize("with_is", [False, True])
def test_arithmetic_token_clip_is_vanilla(with_is):
    old, lp, adv, mask = random_batch(B=10, T=9, scale=0.6, seed=13)
    # sequence-level IS weights (verl's default rollout_is="sequence") are constant over tokens
    is_w = (torch.rand(10, 1, dtype=old.dtype) + 0.5).expand_as(old).clone() if with_is else None
    ours = _run("power_mean", actor_config("power_mean", power=1.0), old, lp, adv, mask, "seq-mean-token-mean", is_w)
    theirs = _run("vanilla", actor_config("vanilla", plain=True), old, lp, adv, mask, "seq-mean-token-mean", is_w)
    assert ours[2]["actor/pg_clipfrac"] > 0 and ours[2]["actor/pg_clipfrac_lower"] > 0  # both clips in reach
    _assert_same(ours, theirs, ["actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"])


def test_hmpo_runs_on_plain_policy_loss_config():
    """The one-line path: verl's own PolicyLossConfig with loss_mode=hmpo."""
    old, lp, adv, mask = random_batch(seed=14)
    plain = _run("hmpo", actor_config("hmpo", plain=True), old, lp, adv, mask, "token-mean")
    ours = _run("power_mean", actor_config("power_mean", power=-1.0), old, lp, adv, mask, "token-mean")
    _assert_same(plain, ours, list(ours[2]))
    assert plain[2]["actor/pm/power"] == -1.0
