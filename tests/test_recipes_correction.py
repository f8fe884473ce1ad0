"""recipes/correction/: rollout correction as an opt-in layer over every mean file.

Each correction file composes with each mean file (Hydra, no unknown key, verl's validate_config),
its section builds verl's RolloutCorrectionConfig, and verl's own
`compute_rollout_correction_and_add_to_batch` -- what the v1 trainer runs once per batch -- turns a
batch's rollout / old log-probs into the `rollout_is_weights` and response mask our loss receives.
Then: the weights reach every mean file's loss (the loss is linear in them, and changes with them);
with them geometric_seq still equals verl's gspo, arithmetic keeps vanilla's gradient (not its
loss value), and geometric_token weights tokens where verl's geo_mean weights sequences; tokens the
masking mode rejects get no gradient.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from verl import DataProto
from verl.trainer.config.algorithm import RolloutCorrectionConfig
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch
from verl.utils.config import omega_conf_to_dataclass

from test_recipes_config import (MEAN_FILES, RECIPES, _flat_keys, _mean_actor, compose_recipe, driver_validate,
                                 unknown_keys)

CORRECTIONS = sorted(p.stem for p in (RECIPES / "correction").glob("*.yaml"))
ACTIVE = [c for c in CORRECTIONS if c != "none"]


def test_correction_files_found_and_set_the_same_keys():
    assert {"none", "token_tis", "token_mask"} <= set(CORRECTIONS)
    keys = {c: _flat_keys(RECIPES / "correction" / f"{c}.yaml") for c in CORRECTIONS}
    assert all(k == keys["none"] for k in keys.values()), keys  # `diff none.yaml x.yaml` shows all


def _correction(correction: str) -> RolloutCorrectionConfig:
    cfg = compose_recipe(RECIPES, "gsm8k", (f"correction={correction}",))
    return omega_conf_to_dataclass(cfg.algorithm.rollout_correction, RolloutCorrectionConfig)


def _with_correction(cfg, correction: str):
    """`cfg` with a correction file merged in, as Hydra's defaults list merges it (the layers set
    disjoint keys -- test_layers_set_disjoint_keys -- so the merge order decides nothing)."""
    layer = OmegaConf.load(RECIPES / "correction" / f"{correction}.yaml")
    return OmegaConf.merge(cfg, layer)


@pytest.mark.parametrize("correction", ACTIVE)
def test_merging_a_correction_file_is_what_hydra_composes(correction):
    """The cheap merge below gives exactly Hydra's composition (checked on the default mean)."""
    hydra = compose_recipe(RECIPES, "gsm8k", (f"correction={correction}",))
    merged = _with_correction(compose_recipe(RECIPES, "gsm8k"), correction)
    assert OmegaConf.to_container(merged) == OmegaConf.to_container(hydra)


@pytest.mark.parametrize("correction", ACTIVE)
@pytest.mark.parametrize("mean", MEAN_FILES)
def test_every_correction_composes_with_every_mean(mean, correction):
    cfg = _with_correction(compose_recipe(RECIPES, "gsm8k", (f"mean={mean}",)), correction)
    assert unknown_keys(cfg) == []
    driver_validate(cfg)  # verl's validate_config
    rc = omega_conf_to_dataclass(cfg.algorithm.rollout_correction, RolloutCorrectionConfig)
    assert rc.bypass_mode is False  # decoupled: our loss stays the loss (bypass swaps in verl's)
    assert rc.rollout_is or rc.rollout_rs
    # verl computes the correction only when the batch holds vLLM's log-probs
    assert cfg.actor_rollout_ref.rollout.calculate_log_probs is True
    # the mean file's loss is untouched
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert actor == _mean_actor(mean)


def _trainer_batch(seed: int = 0):
    """A batch as the trainer holds it after the old-log-prob pass: vLLM's and the trainer's
    log-probs of 6 responses (1..9 tokens) whose mismatch puts some token ratios outside [0.5, 2]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 7, 5, 3, 8, 1])
    B, T = len(lengths), int(lengths.max())
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) - 0.05
    rollout = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    rollout[0, 2], rollout[1, 0] = old[0, 2] - 1.5, old[1, 0] + 1.5  # ratios e^1.5 and e^-1.5
    data = DataProto.from_dict(tensors={"old_log_probs": old, "rollout_log_probs": rollout, "response_mask": mask})
    return data, lengths


def _corrected(correction: str):
    """verl's correction of _trainer_batch with the layer's config: (old, weights or None, mask)."""
    rc = _correction(correction)
    data, _ = _trainer_batch()
    data, metrics = compute_rollout_correction_and_add_to_batch(data, OmegaConf.structured(rc))
    assert any(k.startswith("rollout_corr/") for k in metrics)
    weights = data.batch["rollout_is_weights"] if "rollout_is_weights" in data.batch.keys() else None
    return data.batch["old_log_probs"], weights, data.batch["response_mask"]


def _loss(actor, old, mask, weights, loss_mode=None, seed: int = 1):
    """Our (or verl's) registered loss as ppo_loss calls it: (loss, d loss / d log_prob)."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from hmpo_verl.steps import STEP_COUNTER

    g = torch.Generator().manual_seed(seed)
    B, T = old.shape
    log_prob = (old + 0.2 * torch.randn(B, T, generator=g, dtype=old.dtype)).requires_grad_()
    adv = torch.randn(B, 1, generator=g, dtype=old.dtype).expand(B, T).clone()
    valid = mask.bool()
    actor.global_batch_info.update(dp_size=1, batch_num_tokens=int(valid.sum()), global_batch_size=B,
                                   loss_scale_factor=actor.loss_scale_factor)
    saved = {k: v for k, v in vars(STEP_COUNTER).items() if k != "_handle"}
    try:
        fn = get_policy_loss_fn(loss_mode or actor.policy_loss.loss_mode)
        loss, _ = fn(old, log_prob, adv, valid, actor.loss_agg_mode, actor, weights)
        loss.backward()
    finally:
        vars(STEP_COUNTER).update(saved)
    return loss.detach(), log_prob.grad


def test_token_tis_weights_are_verls_truncated_ratios():
    old, weights, mask = _corrected("token_tis")
    data, _ = _trainer_batch()
    expected = torch.exp(old - data.batch["rollout_log_probs"]).clamp(max=2.0) * mask
    torch.testing.assert_close(weights, expected.to(weights.dtype))
    assert weights.max() == 2.0 and torch.equal(mask, data.batch["response_mask"])  # truncated, nothing masked


@pytest.mark.parametrize("mean", MEAN_FILES)
def test_token_tis_weights_reach_every_mean_files_loss(mean):
    actor = _mean_actor(mean)
    old, weights, mask = _corrected("token_tis")
    plain, plain_grad = _loss(actor, old, mask, None)
    loss, grad = _loss(actor, old, mask, weights)
    double, double_grad = _loss(actor, old, mask, 2 * weights)
    assert not torch.allclose(loss, plain) and not torch.allclose(grad, plain_grad)
    # the weights multiply each token's term: loss and gradient are linear in them
    torch.testing.assert_close(double, 2 * loss)
    torch.testing.assert_close(double_grad, 2 * grad)


@pytest.mark.parametrize("mean, verl_loss", [("arithmetic", "vanilla"), ("geometric_seq", "gspo")])
def test_with_token_tis_the_mean_still_equals_verls_loss(mean, verl_loss):
    """With token IS weights, arithmetic still equals vanilla (each token reports its own share of
    s_i, at p = 1 its clipped ratio, so both weight -A r_t w_t) and geometric_seq still equals gspo:
    loss and gradient."""
    actor = _mean_actor(mean)
    old, weights, mask = _corrected("token_tis")
    loss, grad = _loss(actor, old, mask, weights)
    ref_loss, ref_grad = _loss(actor, old, mask, weights, loss_mode=verl_loss)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def test_with_token_tis_geometric_token_weights_tokens_where_geo_mean_weights_sequences():
    """verl's geo_mean multiplies each sequence's loss by the geometric mean of its token weights;
    ours multiplies each token's term by its own weight. With those per-sequence weights given to
    ours, the two agree again -- and with the token weights they do not."""
    actor = _mean_actor("geometric_token")
    old, weights, mask = _corrected("token_tis")
    ref_loss, ref_grad = _loss(actor, old, mask, weights, loss_mode="geo_mean")
    valid = mask.bool()
    log_w = torch.where(valid, weights.clamp(min=1e-30).log(), 0.0)
    seq_w = torch.exp(log_w.sum(-1) / valid.sum(-1).clamp(min=1)).unsqueeze(-1) * mask
    loss, grad = _loss(actor, old, mask, seq_w)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    _, token_grad = _loss(actor, old, mask, weights)
    assert not torch.allclose(token_grad, ref_grad)


@pytest.mark.parametrize("mean", MEAN_FILES)
def test_token_mask_removes_the_outlying_tokens_from_every_mean_files_loss(mean):
    actor = _mean_actor(mean)
    old, weights, mask = _corrected("token_mask")
    data, _ = _trainer_batch()
    before = data.batch["response_mask"].bool()
    ratio = torch.exp(old - data.batch["rollout_log_probs"])
    rejected = before & ((ratio < 0.5) | (ratio > 2.0))
    assert weights is None and rejected[0, 2] and rejected[1, 0]
    assert torch.equal(mask.bool(), before & ~rejected)  # exactly the tokens outside [0.5, 2]
    _, grad = _loss(actor, old, mask, None)
    _, grad_unmasked = _loss(actor, old, before.to(mask.dtype), None)
    assert (grad[rejected] == 0).all() and (grad_unmasked[rejected] != 0).any()
