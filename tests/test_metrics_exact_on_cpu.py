"""``actor/pm/*`` are exact means over the step's valid rows through verl 0.9.1's own metric reduction.

A step is driven as verl drives it: the loss per micro-batch under the plugin's ``ppo_loss``
wrapper (``config.global_batch_info`` as ``ppo_loss`` sets it), ``Metric.from_dict`` (MEAN),
``append_to_dict`` over micro-batches, ``Metric.aggregate_dp`` over ranks, one value per
mini-batch update, ``rename_dict``; then V0's ``_update_actor`` + ``reduce_metrics``, or V1's
``_update_actor`` (``reduce_metrics``) per ``parameter_sync_step`` iteration and
``MetricsAggregator`` over them. Each expectation is computed from one call over all valid rows.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from _helpers import actor_config, random_batch
from verl import DataProto
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.trainer.ppo.v1.utils import MetricsAggregator
from verl.utils.metric import AggregationType, Metric, reduce_metrics
from verl.utils.py_functional import append_to_dict, rename_dict

from hmpo_verl.hosts.verl.estimators import PENDING_METRICS, compute_power_mean_outcome_advantage
from hmpo_verl.offpolicy import (exposing_sample_lag, totalling_staged, with_lag_metrics_v1, with_sample_lags,
                                 with_sample_lags_v1)
from hmpo_verl.staleness import LAG_KEY, RAW_ROOT, per_lag_sums, sample_lag_scope, staged_means


def _ppo_loss(loss_mode):
    """verl's ppo_loss around our loss (metrics as Metric MEAN), wrapped as the plugin wraps it."""
    fn = get_policy_loss_fn(loss_mode)

    def ppo_loss(config, model_output, data, dp_group=None):
        loss, metrics = fn(*data["args"], "token-mean", config, None)
        return loss, Metric.from_dict(metrics, aggregation=AggregationType.MEAN)

    return exposing_sample_lag(ppo_loss)


def _worker_metrics(loss_mode, batch, updates, lags=None, **fields):
    """verl's worker output: ``updates`` is a list of mini-batches, each a list of dp ranks, each a list of
    micro-batches (row indices); the ranks of a mini-batch have the same micro-batch count (verl's rule)."""
    old, lp, adv, mask = batch
    ppo_loss, out = _ppo_loss(loss_mode), {}
    for ranks in updates:
        config = actor_config(loss_mode, **fields)
        rows = [i for micro in sum(ranks, []) for i in micro]
        config.global_batch_info.update(dp_size=len(ranks), batch_num_tokens=int(mask[rows].sum()),
                                        global_batch_size=len(rows), loss_scale_factor=None)
        per_rank = []
        for micros in ranks:
            agg = {}
            for micro in micros:
                idx = torch.tensor(micro)
                data = {"args": (old[idx], lp[idx], adv[idx], mask[idx])}
                if lags is not None:
                    data[LAG_KEY] = lags[idx]
                append_to_dict(agg, ppo_loss(config, None, data)[1])
            per_rank.append(agg)
        append_to_dict(out, {k: Metric.aggregate_dp([r[k] for r in per_rank]) for k in per_rank[0]})
    return rename_dict(out, "actor/")


class _V0:
    global_steps = 3

    def _update_actor(self, batch):
        return DataProto.from_single_dict(data={}, meta_info={"metrics": self.worker_metrics})


_V0._update_actor = with_sample_lags(_V0._update_actor)


def _v0_step(worker_metrics):
    trainer = _V0()
    trainer.worker_metrics = worker_metrics
    batch = DataProto.from_dict(tensors={"responses": torch.zeros(1, 1)},  # versions: the trainer's lag path
                                non_tensors={"min_global_steps": np.array([2], dtype=object)})
    return reduce_metrics(trainer._update_actor(batch).meta_info["metrics"])


class _V1:
    """verl's V1 ``step``: one ``_update_actor`` (its ``reduce_metrics`` as patched) per iteration,
    ``MetricsAggregator`` over the iterations weighted by their sample counts."""

    global_steps, tags = 3, [{}]

    def _update_actor(self, batch, metrics):
        metrics.update(totalling_staged(reduce_metrics)(self.iterations[self.i]))
        return batch

    def step(self, metrics, timing_raw):
        aggregator = MetricsAggregator()
        for self.i, count in enumerate(self.counts):
            iter_metrics = {}
            self._update_actor(_V1Batch(), iter_metrics)
            aggregator.add_step_metrics(iter_metrics, sample_count=count)
        metrics.update(aggregator.get_aggregated_metrics())
        return _V1Batch()


class _V1Batch:
    tags, keys, partition_id = [{}], ["k"], "train"


_V1._update_actor = with_sample_lags_v1(_V1._update_actor)
_V1.step = with_lag_metrics_v1(_V1.step)


def _v1_step(iterations, counts):
    trainer, metrics = _V1(), {}
    trainer.iterations, trainer.counts = iterations, counts
    trainer.step(metrics, {})
    return metrics


def _truth(loss_mode, batch, rows, **fields):
    """The row means of one call over ``rows`` (every valid row of the step, once)."""
    old, lp, adv, mask = batch
    idx = torch.tensor(rows)
    _, m = get_policy_loss_fn(loss_mode)(old[idx], lp[idx], adv[idx], mask[idx], "token-mean",
                                         actor_config(loss_mode, **fields), None)
    return {k: v for k, v in m.items() if k.startswith("actor/pm/") and not k.startswith(RAW_ROOT)}


def _padded_batch():
    batch = random_batch(B=8, T=12, scale=0.3, empty_row=False)
    batch[3][6:] = False  # V1's padding rows (verl's padding_utils: response_mask zeros), at the end
    return batch


PM_KEYS = ("actor/pm/seq_ratio_mean", "actor/pm/log_ah_gap", "actor/pm/ess_frac", "actor/pm/power")


@pytest.mark.parametrize("updates", [
    [[[list(range(8))]]],  # one micro-batch
    [[[[0, 1], [2, 3], [4, 5], [6, 7]]]],  # micro-batch size 2: the last one is all padding
    [[[[0], [1], [2]], [[3], [4], [5]]], [[[6], [7], [0]], [[1], [2], [3]]]],  # 2 ranks, 2 updates (rows reused)
])
def test_row_means_are_over_the_valid_rows_whatever_the_micro_batching_and_padding(updates):
    batch = _padded_batch()
    rows = [i for ranks in updates for micros in ranks for micro in micros for i in micro if i < 6]
    expected = _truth("hmpo", batch, rows)
    got = _v0_step(_worker_metrics("hmpo", batch, updates))
    assert not any(k.startswith(RAW_ROOT) for k in got)
    for key in PM_KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-12), key
    assert got["actor/pm/power"] == -1.0 and got["actor/pm/power_std"] == 0.0


def test_row_means_weight_rows_not_micro_batches_under_dynamic_batch_sizes():
    batch = random_batch(B=8, T=16, scale=0.4, seed=3, empty_row=False)
    fields = {"adapt": "ess"}
    expected = _truth("adaptive_power_mean", batch, list(range(8)), **fields)
    got = _v0_step(_worker_metrics("adaptive_power_mean", batch, [[[[0, 1, 2, 3, 4, 5], [6, 7]]]], **fields))
    for key in PM_KEYS + ("actor/pm/ess_target",):
        assert got[key] == pytest.approx(expected[key], rel=1e-12), key


def test_power_std_is_the_std_of_p_over_the_rows_and_no_false_extremes_are_logged():
    batch = random_batch(B=8, T=16, scale=0.4, seed=3, empty_row=False)
    old, lp, adv, mask = batch
    fields = {"adapt": "ess"}
    fn = get_policy_loss_fn("adaptive_power_mean")
    p = torch.cat([torch.tensor([fn(old[i:i + 1], lp[i:i + 1], adv[i:i + 1], mask[i:i + 1], "token-mean",
                                    actor_config("adaptive_power_mean", **fields), None)[1]["actor/pm/power"]])
                   for i in range(8)]).double()
    assert p.std(unbiased=False) > 0.05  # the rows' p differ
    for updates in ([[[[i] for i in range(8)]]], [[[[0, 1, 2, 3], [4, 5, 6, 7]]]], [[[[i] for i in range(4)]],
                                                                                  [[[i] for i in range(4, 8)]]]):
        got = _v0_step(_worker_metrics("adaptive_power_mean", batch, updates, **fields))
        assert got["actor/pm/power_std"] == pytest.approx(p.std(unbiased=False).item(), rel=1e-9)
        assert got["actor/pm/power"] == pytest.approx(p.mean().item(), rel=1e-12)
        assert not any("power_min" in k or "power_max" in k for k in got)


def _lag_truth(batch, lags, rows):
    old, lp, adv, mask = batch
    idx = torch.tensor(rows)
    with sample_lag_scope(lags[idx]):
        _, m = get_policy_loss_fn("hmpo")(old[idx], lp[idx], adv[idx], mask[idx], "token-mean",
                                          actor_config("hmpo"), None)
    return {k: v for k, v in staged_means(m).items() if k.startswith("actor/pm/lag")}


def test_per_lag_means_are_exact_when_updates_have_different_micro_batch_counts():
    batch = random_batch(B=8, T=16, scale=0.4, seed=5, empty_row=False)
    lags = torch.tensor([0, 0, 0, 1, 1, 1, 0, 1])
    expected = _lag_truth(batch, lags, list(range(8)))
    got = _v0_step(_worker_metrics("hmpo", batch, [[[[0, 1, 2, 3]]], [[[4, 5], [6, 7]]]], lags=lags))
    assert expected.keys() == {k for k in got if k.startswith("actor/pm/lag")}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key


def test_v1_pools_parameter_sync_iterations_by_rows_not_by_verls_sample_weights():
    batch = _padded_batch()
    lags = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0])
    iterations = [_worker_metrics("hmpo", batch, [[[[0, 1, 2, 3]]]], lags=lags),  # one micro-batch
                  _worker_metrics("hmpo", batch, [[[[4], [5], [6], [7]]]], lags=lags)]  # four, two of padding
    got = _v1_step(iterations, counts=[4, 4])
    expected = {**_truth("hmpo", batch, list(range(6))), **_lag_truth(batch, lags, list(range(6)))}
    assert not any(k.startswith(RAW_ROOT) for k in got)
    for key in PM_KEYS + tuple(k for k in expected if k.startswith("actor/pm/lag")):
        assert got[key] == pytest.approx(expected[key], rel=1e-12), key


def test_v1_per_lag_sums_pool_to_the_true_mean_with_unequal_micro_batch_counts():
    """/tmp/audit_offpolicy/v1_perlag_weighting.py: 4 lag-0 rows of gap 1 in one micro-batch, 4 of gap 0 in four."""

    def update(micro):
        out = {}
        for gaps in micro:
            n = len(gaps)
            sums = per_lag_sums(torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool),
                                {"log_ah_gap": torch.tensor(gaps), "ess_frac": torch.ones(n)}, torch.zeros(n),
                                torch.ones(n))
            append_to_dict(out, {k: float(v) for k, v in {**sums, RAW_ROOT + "share": n / 4}.items()})
        return {k: [float(np.mean(v))] for k, v in out.items()}  # one update: the mean over its micro-batches

    got = _v1_step([update([[1.0] * 4]), update([[0.0]] * 4)], counts=[4, 4])
    assert got["actor/pm/lag0/log_ah_gap"] == pytest.approx(0.5)


def test_adv_conservation_is_the_largest_over_a_steps_iterations_and_resets_per_step():
    from hmpo_verl.hosts.verl.estimators import _merge_pending_metrics

    rewards = torch.zeros(4, 3)
    rewards[:, -1] = torch.tensor([0.1, 0.7, 0.3, 0.9])
    advantage = lambda: compute_power_mean_outcome_advantage(rewards, torch.ones(4, 3), index=np.array([0, 0, 1, 1]))
    PENDING_METRICS.clear()
    PENDING_METRICS["critic/pm/adv_conservation"] = 5.0  # an earlier iteration of this step (V1 parameter_sync_step)
    advantage()
    step = _merge_pending_metrics(lambda: {})()  # verl's compute_data_metrics, once per step, drains them
    assert step["critic/pm/adv_conservation"] == 5.0
    advantage()  # the next step starts afresh
    assert PENDING_METRICS["critic/pm/adv_conservation"] < 1e-12
    PENDING_METRICS.clear()
