"""Power-mean (free-energy) and AGM group advantages: reference, limits, edge cases, derivation."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, get_adv_estimator_fn
from verl.workers.config import ActorConfig  # noqa: F401  (verl import registers our plugin)

from hmpo_verl.advantages import agm_advantage, group_ids, power_mean_advantage

# the textbook reference cancels catastrophically for |beta| << 1e-3; the limit is tested separately
BETAS = [-5.0, -2.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 1.0, 2.0, 5.0]


def _reference_power_mean(rewards: list[float], beta: float) -> list[float]:
    """Textbook (1/beta)(exp(beta R_i) / mean_j exp(beta R_j) - 1), float64 (moderate beta R only)."""
    r = np.asarray(rewards, dtype=np.float64)
    if beta == 0:
        return list(r - r.mean())
    u = np.exp(beta * r)
    return list((u / u.mean() - 1.0) / beta)


def _groups(seed=0, n_groups=5):
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 2, 4, 5, 8][:n_groups]
    index, scores = [], []
    for k, size in enumerate(sizes):
        index += [f"uid-{k}"] * size
        scores += (torch.randint(0, 3, (size,), generator=g).double() * 0.5 - 0.3).tolist()
    order = torch.randperm(len(index), generator=g).tolist()  # groups interleaved, as in a batch
    return [index[i] for i in order], torch.tensor([scores[i] for i in order], dtype=torch.float64)


@pytest.mark.parametrize("beta", BETAS)
def test_power_mean_advantage_matches_the_formula(beta):
    index, scores = _groups()
    ids, uids = group_ids(index)
    adv = power_mean_advantage(scores, ids, beta, len(uids))
    for uid in set(index):
        members = [i for i, u in enumerate(index) if u == uid]
        rewards = scores[members].tolist()
        expected = [0.0] * len(members) if len(set(rewards)) == 1 else _reference_power_mean(rewards, beta)
        torch.testing.assert_close(adv[members], torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("beta", BETAS)
def test_agm_advantage_is_the_average_of_both_risks(beta):
    index, scores = _groups(seed=1)
    ids, uids = group_ids(index)
    adv = agm_advantage(scores, ids, beta, len(uids))
    for uid in set(index):
        members = [i for i, u in enumerate(index) if u == uid]
        rewards = scores[members].tolist()
        if len(set(rewards)) == 1:
            expected = [0.0] * len(members)
        else:
            plus, minus = _reference_power_mean(rewards, beta), _reference_power_mean(rewards, -beta)
            expected = [(a + b) / 2 for a, b in zip(plus, minus)]
        torch.testing.assert_close(adv[members], torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("fn", [power_mean_advantage, agm_advantage])
def test_conservation_and_stability_for_huge_beta_r(fn):
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(64, generator=g, dtype=torch.float64) * 200  # |beta R| in the hundreds and beyond
    ids = torch.arange(64) // 8
    for beta in (-3.0, -0.7, 0.7, 3.0):
        adv = fn(scores, ids, beta, 8)
        assert torch.isfinite(adv).all()
        sums = torch.zeros(8, dtype=torch.float64).index_add_(0, ids, adv)
        assert sums.abs().max() < 1e-9 * adv.abs().max().clamp(min=1)
        # bounded as the formula implies: expm1(.) lies in (-1, n - 1] with n = 8
        if fn is power_mean_advantage:
            lo, hi = sorted([-1 / beta, 7 / beta])
            assert (adv >= lo - 1e-9).all() and (adv <= hi + 1e-9).all()


def test_rewards_of_a_million():
    scores = torch.tensor([1e6, -1e6, 1e6, 0.0], dtype=torch.float64)
    ids = torch.zeros(4, dtype=torch.long)
    for beta in (-1.0, 0.0, 1.0):
        adv = power_mean_advantage(scores, ids, beta, 1)
        assert torch.isfinite(adv).all() and abs(adv.sum().item()) < 1e-6 * max(1.0, adv.abs().max().item())
    torch.testing.assert_close(power_mean_advantage(scores, ids, 0.0, 1), scores - scores.mean())


def test_zero_beta_limit_is_continuous():
    index, scores = _groups(seed=3)
    ids, uids = group_ids(index)
    exact = power_mean_advantage(scores, ids, 0.0, len(uids))
    for beta in (1e-4, -1e-4, 1e-8):
        torch.testing.assert_close(power_mean_advantage(scores, ids, beta, len(uids)), exact, rtol=0, atol=1e-3 * 10 * abs(beta) / 1e-4)



@pytest.mark.parametrize("beta", [1e-300, 1e-320, 5e-324, -5e-324])
@pytest.mark.parametrize("fn", [power_mean_advantage, agm_advantage])
def test_a_subnormal_beta_is_the_beta_zero_limit_not_an_underflow(fn, beta):
    """beta * (R - F) underflows into subnormals for such beta; the advantage is R - mean R to rounding."""
    scores = torch.tensor([0.5, 0.25, 0.125, 1.0, 0.0], dtype=torch.float64)
    ids = torch.zeros(5, dtype=torch.long)
    adv = fn(scores, ids, beta, 1)
    torch.testing.assert_close(adv, scores - scores.mean(), rtol=0, atol=1e-15)
    assert abs(adv.sum().item()) < 1e-15

def _verl_call(name, rewards, mask, index, **algo):
    from omegaconf import OmegaConf

    config = OmegaConf.create({"adv_estimator": name, **algo})
    return get_adv_estimator_fn(name)(token_level_rewards=rewards, response_mask=mask, config=config, index=index)


def _token_batch(seed=4):
    index, scores = _groups(seed=seed)
    B, T = len(index), 6
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lengths.unsqueeze(1)).float()
    rewards = torch.zeros(B, T)
    # the outcome reward split over two response tokens (verl's token rewards: 0 elsewhere)
    rewards[torch.arange(B), lengths - 1] = scores.float() * 0.25
    rewards[torch.arange(B), 0] += scores.float() * 0.75
    return np.array(index, dtype=object), rewards, mask, scores


@pytest.mark.parametrize("name", ["power_mean", "agm"])
def test_beta_zero_equals_verl_grpo_without_std(name):
    index, rewards, mask, _ = _token_batch()
    ours, returns = _verl_call(name, rewards, mask, index, risk_beta=0.0)
    grpo, _ = compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=False)
    # verl's GRPO gives a singleton group its raw reward (mean 0, std 1); ours gives it 0
    singleton = np.array([list(index).count(u) == 1 for u in index])
    torch.testing.assert_close(ours[~singleton], grpo[~singleton], rtol=1e-6, atol=1e-6)
    assert torch.all(ours[singleton] == 0)
    torch.testing.assert_close(returns, ours)


def _outcome_batch(index, scores):
    """(index, token rewards, mask): each score on the last of 3 response tokens."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    rewards = torch.zeros(len(scores), 3)
    rewards[:, -1] = scores
    return index, rewards, torch.ones(len(scores), 3)


def _assert_grouped_as_verl_grpo(index, scores):
    """Ours at beta = 0 (with and without std normalisation) equals verl's GRPO on every response of a
    group of two or more; singleton groups get 0 from us (verl: the raw reward)."""
    index, rewards, mask = _outcome_batch(index, scores)
    group_size = [sum(1 for v in index if {v: 0}.get(u, None) == 0) for u in index]  # dict semantics, as verl
    shared = torch.tensor([size > 1 for size in group_size])
    for norm in (False, True):
        ours, _ = _verl_call("power_mean", rewards, mask, index, risk_beta=0.0, norm_adv_by_std=norm)
        grpo, _ = compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=norm)
        torch.testing.assert_close(ours[shared], grpo[shared], rtol=1e-5, atol=1e-5)
        assert torch.all(ours[~shared] == 0)


@pytest.mark.parametrize("container", [list, lambda v: np.array(v, dtype=object)])
def test_mixed_type_uids_are_grouped_by_value_as_verl(container):
    """Issue 10: uids [1, 1, "1", "1"] are two groups in verl's grpo; string grouping made them one."""
    index = container([1, 1, "1", "1"])
    _, rewards, mask = _outcome_batch(index, [1.0, 0.0, 5.0, 3.0])
    ours, _ = _verl_call("power_mean", rewards, mask, index, risk_beta=0.0)
    torch.testing.assert_close(ours[:, 0], torch.tensor([0.5, -0.5, 1.0, -1.0]))
    ids, uids = group_ids(index)
    assert ids.tolist() == [0, 0, 1, 1] and len(uids) == 2
    _assert_grouped_as_verl_grpo(index, [1.0, 0.0, 5.0, 3.0])


@pytest.mark.parametrize(
    "index",
    [
        np.array([1, 1.0, True, np.int64(1), "1", "1", b"1", b"1", None, None, (1, "a"), (1, "a")], dtype=object),
        np.array([7, 8, 7, 8, 9, 9]),  # integer dtype: numpy scalars
        np.array(["a", "b", "a", "b", "ab", "ab"]),  # string dtype
        np.array([0.5, 0.5, 1.0, 1, 2.0, 2.0], dtype=object),
        [f"{k}" for k in (3, 1, 3, 1, 2, 2)],
    ],
    ids=["object-mixed", "int64", "str", "floats-and-ints", "list-of-str"],
)
def test_uid_containers_group_as_verl(index):
    g = torch.Generator().manual_seed(len(index))
    _assert_grouped_as_verl_grpo(index, (torch.randint(0, 5, (len(index),), generator=g) * 0.5).tolist())


UID_POOL = [0, 1, 1.0, True, False, np.int64(1), np.float64(0.0), "1", "0", "True", b"1", None, (1,), 2.5]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(UID_POOL), st.integers(-3, 3)), min_size=1, max_size=16))
def test_grouping_matches_verl_grpo_on_random_mixed_uids(pairs):
    index = np.empty(len(pairs), dtype=object)
    index[:] = [uid for uid, _ in pairs]
    _assert_grouped_as_verl_grpo(index, [float(r) for _, r in pairs])


def test_unusable_uids_are_an_error_naming_the_response():
    with pytest.raises(ValueError, match="uid of response 2 is .*nan.*not equal to itself"):
        group_ids(np.array([1.0, 2.0, float("nan")]))
    with pytest.raises(ValueError, match=r"uid of response 0 is \[1\].*unhashable"):
        group_ids([[1], [1]])


def test_norm_adv_by_std_divides_by_the_group_std():
    index, rewards, mask, scores = _token_batch(seed=5)
    plain, _ = _verl_call("power_mean", rewards, mask, index, risk_beta=1.5)
    normed, _ = _verl_call("power_mean", rewards, mask, index, risk_beta=1.5, norm_adv_by_std=True)
    for uid in set(index):
        members = [i for i, u in enumerate(index) if u == uid]
        if len(members) > 1:
            std = scores[members].std().item()
            torch.testing.assert_close(normed[members], plain[members] / (std + 1e-6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["power_mean", "agm"])
def test_estimator_output_shape_mask_and_metrics(name):
    from hmpo_verl.estimators import PENDING_METRICS

    index, rewards, mask, scores = _token_batch(seed=6)
    adv, _ = _verl_call(name, rewards, mask, index, risk_beta=2.0)
    assert adv.shape == rewards.shape and adv.dtype == rewards.dtype
    assert torch.all(adv[mask == 0] == 0)
    per_response = adv[torch.arange(len(index)), 0]
    ids, uids = group_ids(index)
    expected = (power_mean_advantage if name == "power_mean" else agm_advantage)(scores, ids, 2.0, len(uids))
    torch.testing.assert_close(per_response, expected.float(), rtol=1e-5, atol=1e-6)
    assert 0 <= PENDING_METRICS["critic/pm/adv_conservation"] < 1e-6
    assert PENDING_METRICS["critic/pm/risk_beta"] == 2.0


def test_defaults_without_our_algorithm_config():
    index, rewards, mask, scores = _token_batch(seed=7)
    adv, _ = _verl_call("power_mean", rewards, mask, index)  # no risk_beta: documented default 1
    ids, uids = group_ids(index)
    torch.testing.assert_close(adv[:, 0], power_mean_advantage(scores, ids, 1.0, len(uids)).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["power_mean", "agm"])
def test_a_reward_on_a_masked_last_token_counts_as_verls_grpo_counts_it(name):
    """verl puts a response's score on its sequence's last token; a multi-turn response that ends with a tool's
    output (masked) carries it there: verl's outcome estimators sum every position, and so do ours (a sum over the
    mask read it as 0 and flipped that response's advantage)."""
    index = np.array(["a", "a", "b", "b"], dtype=object)
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])  # row 0 ends with 1 masked tool token
    rewards = torch.zeros(4, 3)
    rewards[:, -1] = torch.tensor([1.0, 0.0, 1.0, 0.0])  # each score on the last token, masked or not
    ours, _ = _verl_call(name, rewards, mask, index, risk_beta=0.0)
    grpo, _ = compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(ours, grpo)
    assert ours[0, 0] == 0.5 and ours[1, 0] == -0.5


def test_nan_reward_names_the_group():
    index, rewards, mask, _ = _token_batch(seed=8)
    rewards[3, 0] = float("nan")
    with pytest.raises(ValueError, match=f"uid={index[3]!r}"):
        _verl_call("power_mean", rewards, mask, index)


def test_metrics_reach_verls_step_metrics():
    """The estimator's figures are merged into what verl's compute_data_metrics returns."""
    import importlib

    trainer_base = importlib.import_module("verl.trainer.ppo.v1.trainer_base")
    original = trainer_base.compute_data_metrics
    try:
        trainer_base.compute_data_metrics = lambda batch, use_critic=True: {"critic/score/mean": 0.5}
        index, rewards, mask, _ = _token_batch(seed=9)
        _verl_call("agm", rewards, mask, index, risk_beta=0.5)
        metrics = trainer_base.compute_data_metrics(batch=None, use_critic=False)
        assert metrics["critic/score/mean"] == 0.5
        assert metrics["critic/pm/risk_beta"] == 0.5 and metrics["critic/pm/adv_conservation"] < 1e-6
        assert "critic/pm/risk_beta" not in trainer_base.compute_data_metrics(batch=None)  # drained once used
    finally:
        trainer_base.compute_data_metrics = original


# --- the derivation: A_i is the policy gradient weight of F_beta (and of G_beta for AGM) ---------


def _free_energy(pi, rewards, beta):
    if beta == 0:
        return (pi * rewards).sum()
    return torch.log((pi * torch.exp(beta * rewards)).sum()) / beta


@pytest.mark.parametrize("probs,counts", [([0.5, 0.25, 0.25], [2, 1, 1]), ([1 / 2, 1 / 3, 1 / 6], [3, 2, 1]),
                                          ([0.1, 0.2, 0.3, 0.4], [1, 2, 3, 4])])
@pytest.mark.parametrize("beta", [-2.0, -0.5, 0.0, 0.7, 2.0])
def test_expected_advantage_score_equals_gradient_of_the_group_objective(probs, counts, beta):
    """For a softmax policy over outcomes k with rewards R_k, sum_k pi_k A_k grad log pi_k = grad F_beta(pi)
    and, for AGM, = grad (F_beta + F_-beta) / 2. A group holding each outcome in proportion to pi makes the
    group means the population means, so A_k come from our estimator functions themselves."""
    rewards = torch.tensor([1.0, -0.5, 2.0, 0.3][: len(probs)], dtype=torch.float64)
    theta = torch.log(torch.tensor(probs, dtype=torch.float64)).requires_grad_()
    pi = torch.softmax(theta, 0)
    scores = torch.cat([rewards[k].repeat(c) for k, c in enumerate(counts)])
    ids = torch.zeros(len(scores), dtype=torch.long)
    first = torch.tensor([sum(counts[:k]) for k in range(len(counts))])
    log_pi_grads = torch.stack([torch.autograd.grad(torch.log(pi[k]), theta, retain_graph=True)[0] for k in range(len(probs))])
    for fn, objective in (
        (power_mean_advantage, lambda p: _free_energy(p, rewards, beta)),
        (agm_advantage, lambda p: 0.5 * (_free_energy(p, rewards, beta) + _free_energy(p, rewards, -beta))),
    ):
        adv = fn(scores, ids, beta, 1)[first]
        expected_score = (pi.detach().unsqueeze(-1) * adv.unsqueeze(-1) * log_pi_grads).sum(0)
        (grad,) = torch.autograd.grad(objective(pi), theta, retain_graph=True)
        torch.testing.assert_close(expected_score, grad, rtol=1e-10, atol=1e-12)
