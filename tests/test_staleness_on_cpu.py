"""Each sample's lag reaches the loss; per-lag metrics are exact; bypass mode cannot swap our loss.

``hmpo_verl.staleness`` (pure) and ``hmpo_verl.offpolicy`` (the verl wrappers), checked
against direct float64 computations and through verl's real ``ppo_loss`` and
``apply_bypass_mode``.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_verl_integration_on_cpu import _actor_from_hydra, _ppo_loss_inputs
from verl import DataProto
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.workers.utils.losses import ppo_loss

from hmpo_verl.offpolicy import batch_versions, trainer_lags, with_sample_lags
from hmpo_verl.staleness import (
    BUCKETS,
    LAG_KEY,
    RAW_PREFIX,
    lag_distribution,
    per_lag_sums,
    sample_lag_scope,
    sample_lags,
    staged_means,
)


def test_sample_lags_are_trainer_version_minus_sample_version():
    assert sample_lags([3, 5, 5, 0], 5).tolist() == [2, 0, 0, 5]
    assert sample_lags([3, None], 5) is None and sample_lags([], 5) is None
    with pytest.raises(ValueError, match="newer than the trainer"):
        sample_lags([6], 5)


def test_lag_distribution_counts_each_bucket_and_caps_the_last():
    stats = lag_distribution(torch.tensor([0, 0, 1, 2, 3, 7, 1, 0]))
    assert stats["training/lag/mean"] == pytest.approx(14 / 8) and stats["training/lag/max"] == 7
    shares = [stats[f"training/lag/share_{b}"] for b in BUCKETS]
    assert shares == pytest.approx([3 / 8, 2 / 8, 1 / 8, 2 / 8]) and sum(shares) == pytest.approx(1)


def _direct_per_lag(lags, rows, values, clipped, tokens):
    """Per-bucket means straight from the whole batch (float64)."""
    out = {}
    bucket = np.minimum(lags, len(BUCKETS) - 1)
    for k, name in enumerate(BUCKETS):
        sel = rows & (bucket == k)
        if sel.any():
            for q, v in values.items():
                out[f"actor/pm/lag{name}/{q}"] = v[sel].mean()
            if tokens[sel].sum() > 0:
                out[f"actor/pm/lag{name}/pg_clipfrac"] = clipped[sel].sum() / tokens[sel].sum()
    return out


@settings(max_examples=60, deadline=None)
@given(
    lags=st.lists(st.integers(0, 6), min_size=1, max_size=24),
    cuts=st.lists(st.integers(1, 23), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_per_lag_means_are_exact_whatever_the_micro_batching(lags, cuts, seed):
    """verl averages each metric over micro-batches; the per-lag means come out as if from the whole batch."""
    rng = np.random.default_rng(seed)
    n = len(lags)
    lags = np.array(lags)
    tokens = rng.integers(0, 6, n)
    rows = tokens > 0
    clipped = np.minimum(rng.integers(0, 4, n), tokens)
    values = {"log_ah_gap": rng.random(n), "ess_frac": rng.random(n)}
    bounds = sorted({0, n, *[c for c in cuts if c < n]})
    micro = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        sums = per_lag_sums(torch.tensor(lags[lo:hi]), torch.tensor(rows[lo:hi]),
                            {q: torch.tensor(v[lo:hi]) for q, v in values.items()},
                            torch.tensor(clipped[lo:hi]), torch.tensor(tokens[lo:hi]))
        micro.append({k: v.item() for k, v in sums.items()})
    assert all(m.keys() == micro[0].keys() for m in micro)  # same keys in every micro-batch (dp ranks too)
    averaged = {k: sum(m[k] for m in micro) / len(micro) for k in micro[0]}
    got = staged_means(averaged)
    expected = _direct_per_lag(lags, rows, values, clipped, tokens)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_per_lag_sums_refuse_a_lag_tensor_of_the_wrong_size():
    with pytest.raises(ValueError, match=LAG_KEY):
        per_lag_sums(torch.zeros(3), torch.ones(4, dtype=torch.bool), {}, torch.zeros(4), torch.ones(4))


def _log_ah_gap_float64(old, new, mask):
    d = (new - old).double()
    out = []
    for row, m in zip(d, mask, strict=True):
        r = row[m].exp()
        out.append((r.mean().log() - (1 / (1 / r).mean()).log()).item())
    return np.array(out)


def test_the_registered_loss_reports_per_lag_metrics_only_when_lags_are_given():
    config = _actor_from_hydra(["actor_rollout_ref.actor.policy_loss.loss_mode=hmpo",
                                "actor_rollout_ref.actor.clip_ratio_low=0.05",
                                "actor_rollout_ref.actor.clip_ratio_high=0.05"])
    data, lp, mask, _, _ = _ppo_loss_inputs()
    config.global_batch_info.update(dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=mask.shape[0])
    args = (data["old_log_probs"], lp, data["advantages"], mask, config.loss_agg_mode, config, None)
    loss_fn = get_policy_loss_fn("hmpo")
    _, plain = loss_fn(*args)
    assert not any(k.startswith(RAW_PREFIX) for k in plain)
    lags = torch.tensor([0.0, 1.0, 1.0, 4.0])
    with sample_lag_scope(lags):
        loss, metrics = loss_fn(*args)
    torch.testing.assert_close(loss, loss_fn(*args)[0])  # the lag changes metrics, never the loss
    assert {k: v for k, v in metrics.items() if not k.startswith(RAW_PREFIX)} == plain
    means = staged_means(metrics)
    gap = _log_ah_gap_float64(data["old_log_probs"], lp, mask)
    assert means["actor/pm/lag0/log_ah_gap"] == pytest.approx(gap[0], abs=1e-6)
    assert means["actor/pm/lag1/log_ah_gap"] == pytest.approx(gap[1:3].mean(), abs=1e-6)
    assert means["actor/pm/lag3plus/log_ah_gap"] == pytest.approx(gap[3], abs=1e-6)
    assert "actor/pm/lag2/log_ah_gap" not in means
    clipped = sum(metrics[f"{RAW_PREFIX}{b}/clipped_tokens"] for b in BUCKETS)
    assert clipped / mask.sum().item() == pytest.approx(plain["actor/pg_clipfrac"])
    assert 0 < plain["actor/pg_clipfrac"] < 1  # the clip split is exercised


def test_verls_ppo_loss_hands_each_micro_batch_its_lags():
    """Through verl's own ppo_loss (wrapped by the plugin): LAG_KEY in the micro-batch reaches the loss."""
    config = _actor_from_hydra(["actor_rollout_ref.actor.policy_loss.loss_mode=hmpo"])
    data, lp, mask, positions, total = _ppo_loss_inputs()
    data[LAG_KEY] = torch.tensor([2.0, 0.0, 0.0, 1.0])
    packed = torch.zeros(total).index_put((positions,), lp[mask])
    _, metrics = ppo_loss(config, {"log_probs": packed}, data)
    assert [metrics[f"{RAW_PREFIX}{b}/seqs"].aggregate() for b in BUCKETS] == [2.0, 1.0, 1.0, 0.0]
    del data[LAG_KEY]
    _, metrics = ppo_loss(config, {"log_probs": packed}, data)
    assert not any(k.startswith(RAW_PREFIX) for k in metrics)


# ----------------------------------------------------------------------------- trainer side


class _Trainer:
    """The two version counters verl's trainers keep; `_update_actor` is the wrapped stub below."""

    def __init__(self, global_steps, current_param_version=None):
        self.global_steps = global_steps
        if current_param_version is not None:
            self.current_param_version = current_param_version
        self.seen = None

    def _update_actor(self, batch):  # what the workers would return: the loss's per-lag sums
        self.seen = batch.batch[LAG_KEY].clone()
        metrics = {"actor/pg_loss": [0.1]}
        for k, name in enumerate(BUCKETS):
            sel = self.seen.long().clamp(max=3) == k
            metrics[f"{RAW_PREFIX}{name}/seqs"] = [float(sel.sum())]
            metrics[f"{RAW_PREFIX}{name}/log_ah_gap"] = [float(sel.sum()) * 0.01 * (k + 1)]
            metrics[f"{RAW_PREFIX}{name}/ess_frac"] = [float(sel.sum())]
            metrics[f"{RAW_PREFIX}{name}/clipped_tokens"] = [float(sel.sum())]
            metrics[f"{RAW_PREFIX}{name}/tokens"] = [4 * float(sel.sum())]
        return DataProto.from_single_dict(data={}, meta_info={"metrics": metrics})


_Trainer._update_actor = with_sample_lags(_Trainer._update_actor)


def _batch(min_versions, global_steps=None):
    n = len(min_versions)
    non_tensor = {"min_global_steps": np.array(min_versions, dtype=object),
                  "global_steps": np.array(global_steps if global_steps is not None else [None] * n, dtype=object)}
    return DataProto.from_dict(tensors={"responses": torch.zeros(n, 2)}, non_tensors=non_tensor)


def test_the_trainer_attaches_lags_and_reports_per_lag_means():
    trainer = _Trainer(global_steps=9, current_param_version=4)  # fully-async: the version counts syncs
    batch = _batch([4, 3, 3, 0])
    metrics = trainer._update_actor(batch).meta_info["metrics"]
    assert trainer.seen.tolist() == [0.0, 1.0, 1.0, 4.0]
    assert LAG_KEY not in batch.batch.keys()  # the caller's batch is left as it was
    assert not any(k.startswith(RAW_PREFIX) for k in metrics)
    assert metrics["actor/pm/lag1/log_ah_gap"] == pytest.approx(0.02)
    assert metrics["actor/pm/lag3plus/pg_clipfrac"] == pytest.approx(0.25)
    assert metrics["training/lag/max"] == 4 and metrics["training/lag/share_1"] == pytest.approx(0.5)


def test_without_versions_the_update_is_untouched():
    trainer = _Trainer(global_steps=3)
    batch = DataProto.from_dict(tensors={"responses": torch.zeros(2, 2)},
                                non_tensors={"min_global_steps": np.array([None, None], dtype=object)})
    with pytest.raises(KeyError):  # the stub needs LAG_KEY: the wrapper did not add one
        trainer._update_actor(batch)


def test_versions_fall_back_to_global_steps_and_the_trainer_counts_steps_or_syncs():
    assert batch_versions({"min_global_steps": np.array([None], dtype=object),
                           "global_steps": np.array([2], dtype=object)}) == [2]
    assert trainer_lags(_Trainer(global_steps=7), [6]).tolist() == [0]  # labelled after the update: 7 - 1 - 6
    assert trainer_lags(_Trainer(global_steps=7, current_param_version=2), [1]).tolist() == [1]  # syncs


# ----------------------------------------------------------------------------- bypass mode


def _bypass_inputs(loss_mode):
    from omegaconf import OmegaConf

    batch = DataProto.from_dict(tensors={"rollout_log_probs": -torch.rand(2, 3), "old_log_probs": torch.zeros(2, 3)})
    policy_loss = OmegaConf.create({"loss_mode": loss_mode})
    OmegaConf.set_struct(policy_loss, True)
    return batch, OmegaConf.create({"bypass_mode": True}), policy_loss


def test_bypass_mode_keeps_our_loss_and_says_so(caplog):
    from verl.trainer.ppo.rollout_corr_helper import apply_bypass_mode

    batch, corr, policy_loss = _bypass_inputs("hmpo")
    with caplog.at_level(logging.WARNING, logger="hmpo_verl"):
        apply_bypass_mode(batch=batch, rollout_corr_config=corr, policy_loss_config=policy_loss)
    assert policy_loss.loss_mode == "hmpo"
    assert torch.equal(batch.batch["old_log_probs"], batch.batch["rollout_log_probs"])  # bypass semantics
    assert "bypass_mode=true" in caplog.text and "loss_mode='bypass_mode'" in caplog.text and "'hmpo'" in caplog.text
    batch, corr, policy_loss = _bypass_inputs("vanilla")  # verl's own losses: verl's behaviour
    apply_bypass_mode(batch=batch, rollout_corr_config=corr, policy_loss_config=policy_loss)
    assert policy_loss.loss_mode == "bypass_mode"


def test_rollout_is_with_bypass_mode_and_our_loss_is_refused_before_ray():
    from hydra import compose, initialize_config_dir
    from test_verl_integration_on_cpu import VERL_CONFIG_DIR

    from hmpo_verl.registry import check_options

    overrides = ["actor_rollout_ref.actor.policy_loss.loss_mode=hmpo", "algorithm.rollout_correction.rollout_is=token"]
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        bypass = compose(config_name="ppo_trainer", overrides=[*overrides, "algorithm.rollout_correction.bypass_mode=true"])
        decoupled = compose(config_name="ppo_trainer", overrides=overrides)
    with pytest.raises(ValueError, match="rollout_is=token with algorithm.rollout_correction.bypass_mode=true"):
        check_options(bypass)
    check_options(decoupled)
