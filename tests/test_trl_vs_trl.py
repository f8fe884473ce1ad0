"""PowerMeanGRPOTrainer's loss against TRL's own GRPOTrainer._compute_loss, where they coincide.

Both `_compute_loss` methods run on one stub trainer (TRL's attributes set by hand, the
model's log-probs a float64 leaf), on the same inputs:
  * power=0, clip_level="sequence"  ==  TRL importance_sampling_level="sequence" (GSPO);
  * power=1, clip_level="token"     ==  TRL importance_sampling_level="token" (GRPO's clip),
for every loss_type we support, in train (gradient accumulation) and eval mode, with KL,
TRL's delta, the off-policy mask, sequence-level vLLM IS ratios, tool_mask, the entropy
mask (token level) and old log-probs None; values and gradients to float64 rounding. TRL's
conventions where verl's differ (issue 22): no clamp of log s at sequence level, delta below
1 + epsilon_high, (B, T) advantages in the off-policy mask.
Where the two differ by design (token-level vLLM IS ratios), the test pins the difference.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl = pytest.importorskip("trl")

from trl import GRPOTrainer  # noqa: E402

from hmpo_verl.trl import LOSS_TYPES, PowerMeanGRPOConfig, PowerMeanGRPOTrainer  # noqa: E402

B, T = 6, 7
TIGHT = dict(rtol=1e-12, atol=1e-14)


class _OneProcess:
    """accelerate.Accelerator's collective ops for a single process."""

    num_processes = 1

    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def pad_across_processes(x, dim=0, pad_index=0):
        return x


def _args(tmp_path, **kw) -> PowerMeanGRPOConfig:
    return PowerMeanGRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False,
                               per_device_train_batch_size=B, num_generations=2, max_completion_length=T, **kw)


def _inputs(seed=0, empty_row=False, old_none=False, noise=0.15, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    if empty_row:
        lengths[3] = 0
    mask = (torch.arange(T) < lengths.unsqueeze(1)).long()
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.1
    old = logps + noise * torch.randn(B, T, generator=g, dtype=torch.float64) - shift  # delta ~ shift
    # masked positions hold finite garbage (TRL multiplies by the mask, so NaN would poison it)
    logps = torch.where(mask.bool(), logps, 37.0)
    old = torch.where(mask.bool(), old, -55.0)
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    advantages[1] = 0.0
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": None if old_none else old,
        "ref_per_token_logps": logps.detach() + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64),
        "sampling_per_token_logps": old - 0.3 * torch.rand(B, T, generator=g, dtype=torch.float64),
        "num_items_in_batch": mask.sum().double() * 1.5,  # a generation batch larger than this micro-batch
    }
    entropies = torch.rand(B, T, generator=g, dtype=torch.float64)
    return logps, entropies, inputs


def _stub(args, logps, entropies, level, training=True):
    stub = object.__new__(PowerMeanGRPOTrainer)
    stub.__dict__.update(
        args=args, beta=args.beta, loss_type=args.loss_type, importance_sampling_level=level,
        epsilon_low=args.epsilon, epsilon_high=args.epsilon if args.epsilon_high is None else args.epsilon_high,
        top_entropy_quantile=args.top_entropy_quantile, off_policy_mask_threshold=args.off_policy_mask_threshold,
        use_vllm=args.use_vllm, vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
        model=SimpleNamespace(training=training), current_gradient_accumulation_steps=3,
        max_completion_length=T, accelerator=_OneProcess(), _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, state=SimpleNamespace(global_step=0),
    )
    stub._get_per_token_logps_and_entropies = lambda *a, **k: (logps, entropies, None)
    return stub


def _loss_and_grad(compute_loss, args, level, seed=0, training=True, extra=None, **input_kw):
    base, entropies, inputs = _inputs(seed, **input_kw)
    inputs.update(extra or {})
    logps = base.clone().requires_grad_(True)
    stub = _stub(args, logps, entropies, level, training)
    loss = compute_loss(stub, None, inputs)
    (grad,) = torch.autograd.grad(loss, logps)
    return loss.detach(), grad, stub._metrics["train" if training else "eval"]


def _compare(args, trl_level, **kw):
    ours = _loss_and_grad(PowerMeanGRPOTrainer._compute_loss, args, trl_level, **kw)
    theirs = _loss_and_grad(GRPOTrainer._compute_loss, args, trl_level, **kw)
    torch.testing.assert_close(ours[0], theirs[0], **TIGHT)
    torch.testing.assert_close(ours[1], theirs[1], **TIGHT)
    assert ours[1].abs().sum() > 0
    return ours, theirs


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("training", [True, False])
def test_geometric_sequence_clip_is_trls_sequence_level(tmp_path, loss_type, training):
    args = _args(tmp_path, power=0.0, clip_level="sequence", loss_type=loss_type, epsilon=0.03, epsilon_high=0.04)
    (ours, theirs) = _compare(args, "sequence", training=training, empty_row=True)
    assert 0 < ours[2]["clip_ratio/region_mean"][0] < 1  # the clip is active on some sequences, not all


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("training", [True, False])
def test_arithmetic_token_clip_is_trls_token_level(tmp_path, loss_type, training):
    args = _args(tmp_path, power=1.0, clip_level="token", loss_type=loss_type, epsilon=0.1, epsilon_high=0.15)
    ours, theirs = _compare(args, "token", training=training)
    for key in ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "clip_ratio/low_min", "clip_ratio/high_max"):
        assert ours[2][key] == pytest.approx(theirs[2][key], rel=1e-6, abs=1e-9), key
    assert 0 < ours[2]["clip_ratio/region_mean"][0] < 1


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_kl_bias_correction_delta_tool_mask_and_entropy_mask(tmp_path, loss_type):
    """Token level p=1 with every TRL option that acts per token."""
    args = _args(tmp_path, power=1.0, loss_type=loss_type, epsilon=0.1, epsilon_high=0.12, delta=1.2, beta=0.04,
                 use_bias_correction_kl=True, top_entropy_quantile=0.5)
    tool_mask = (torch.rand(B, T, generator=torch.Generator().manual_seed(5)) > 0.2).long()
    ours, theirs = _compare(args, "token", extra={"tool_mask": tool_mask}, noise=0.3)
    assert ours[2]["kl"] == pytest.approx(theirs[2]["kl"], rel=1e-9)
    assert ours[2]["pm/dual_clip_mean"][0] > 0  # delta is active on some tokens


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_sequence_level_with_kl_off_policy_mask_and_sequence_is_ratio(tmp_path, loss_type):
    args = _args(tmp_path, power=0.0, clip_level="sequence", loss_type=loss_type, epsilon=0.03, epsilon_high=0.04,
                 beta=0.02, use_bias_correction_kl=False, off_policy_mask_threshold=0.1)
    args.use_vllm = args.vllm_importance_sampling_correction = True  # set after validation: no vLLM here
    is_ratio = 0.5 + torch.rand(B, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _compare(args, "sequence", extra={"importance_sampling_ratio": is_ratio})


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_old_log_probs_none_is_on_policy(tmp_path, level):
    power = 0.0 if level == "sequence" else 1.0
    args = _args(tmp_path, power=power, clip_level=level)
    _compare(args, level, old_none=True)


def test_token_level_is_ratio_weights_each_tokens_own_gradient(tmp_path):
    """By design (as verl's rollout_is_weights): a per-token vLLM IS ratio c_t multiplies token t's own
    gradient term. At p=0 / sequence clip TRL instead multiplies the whole sequence's gradient by
    sum_t c_t / T; the values agree, the gradients differ as pinned here."""
    args = _args(tmp_path, power=0.0, clip_level="sequence", epsilon=0.99, epsilon_high=10.0)
    args.use_vllm = args.vllm_importance_sampling_correction = True
    c = 0.5 + torch.rand(B, T, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    kw = dict(extra={"importance_sampling_ratio": c})
    ours = _loss_and_grad(PowerMeanGRPOTrainer._compute_loss, args, "sequence", **kw)
    theirs = _loss_and_grad(GRPOTrainer._compute_loss, args, "sequence", **kw)
    torch.testing.assert_close(ours[0], theirs[0], **TIGHT)
    # independent formula, loss_type grpo, no clip active (bounds [0.01, 11]):
    # d loss / d logp_it = -A_i s_i c_it / (n_i B accumulation)
    logps, _, inputs = _inputs()
    m = inputs["completion_mask"].double()
    n = m.sum(-1, keepdim=True)
    s = torch.exp(((logps - inputs["old_per_token_logps"]) * m).sum(-1, keepdim=True) / n)
    A = inputs["advantages"].unsqueeze(1)
    expected = -A * s * c * m / (n * B * 3)
    torch.testing.assert_close(ours[1], expected, **TIGHT)
    trl_expected = -A * s * (c * m).sum(-1, keepdim=True) / n * m / (n * B * 3)
    torch.testing.assert_close(theirs[1], trl_expected, **TIGHT)
    assert not torch.allclose(ours[1], theirs[1])


def test_kl_bias_correction_uses_the_token_ratio_at_sequence_clip_too(tmp_path):
    """By design: with use_bias_correction_kl (TRL's default) the k3 KL is multiplied by the token ratio
    pi/pi_old, which makes its gradient the unbiased reverse-KL gradient (TRL's help says this holds at
    token level). TRL's sequence level broadcasts the sequence ratio instead. So our KL term at sequence
    clip equals TRL's token-level KL term."""

    def kl_term(compute_loss, level, **kw):
        on = _loss_and_grad(compute_loss, _args(tmp_path, beta=0.05, **kw), level)
        off = _loss_and_grad(compute_loss, _args(tmp_path, beta=0.0, **kw), level)
        return on[0] - off[0], on[1] - off[1]

    ours = kl_term(PowerMeanGRPOTrainer._compute_loss, "sequence", power=0.0, clip_level="sequence")
    trl_token = kl_term(GRPOTrainer._compute_loss, "token", power=1.0)
    trl_sequence = kl_term(GRPOTrainer._compute_loss, "sequence", power=0.0, clip_level="sequence")
    torch.testing.assert_close(ours[0], trl_token[0], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ours[1], trl_token[1], rtol=1e-10, atol=1e-14)
    assert not torch.allclose(ours[1], trl_sequence[1])


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_masked_positions_may_hold_anything(tmp_path, level):
    """NaN / inf off the mask change nothing (TRL itself would turn them into NaN losses)."""
    args = _args(tmp_path, power=-1.0, clip_level=level, beta=0.05, off_policy_mask_threshold=0.1, loss_type="dapo")
    finite = _loss_and_grad(PowerMeanGRPOTrainer._compute_loss, args, "token")
    base, entropies, inputs = _inputs()
    off = ~inputs["completion_mask"].bool()
    poison = torch.tensor([math.nan, math.inf, -math.inf]).repeat(B * T)[: B * T].view(B, T).double()
    extra = {key: torch.where(off, poison, inputs[key])
             for key in ("old_per_token_logps", "ref_per_token_logps", "sampling_per_token_logps")}
    logps = torch.where(off, poison, base).requires_grad_(True)
    stub = _stub(args, logps, torch.where(off, poison, entropies), "token")
    loss = PowerMeanGRPOTrainer._compute_loss(stub, None, {**inputs, **extra})
    (grad,) = torch.autograd.grad(loss, logps)
    torch.testing.assert_close(loss.detach(), finite[0], **TIGHT)
    torch.testing.assert_close(grad, finite[1], **TIGHT)
    assert all(math.isfinite(v[0]) for v in stub._metrics["train"].values())


def test_a_non_finite_value_on_the_mask_is_an_error(tmp_path):
    args = _args(tmp_path)
    base, entropies, inputs = _inputs()
    inputs["advantages"][0] = math.nan
    stub = _stub(args, base.clone().requires_grad_(True), entropies, "token")
    valid = int(inputs["completion_mask"][0].sum())  # the NaN advantage fills row 0's valid positions
    with pytest.raises(ValueError, match=f"advantages has {valid} non-finite value\\(s\\) at valid \\(completion_mask\\)"):
        PowerMeanGRPOTrainer._compute_loss(stub, None, inputs)


# Issue 22: three behaviours that used to differ from TRL without being documented now match it.


def test_sequence_level_does_not_clamp_log_s_as_trl(tmp_path):
    """verl's gspo clamps log s_i at 10; TRL does not, and neither does the adapter (it used to: with mean
    delta ~11 and A < 0 the loss differed by thousands, and the clamped sequences got no gradient)."""
    args = _args(tmp_path, power=0.0, clip_level="sequence", epsilon=0.03, epsilon_high=0.04)
    _compare(args, "sequence", shift=11.0, extra={"advantages": -torch.rand(B, dtype=torch.float64)})
    logps, _, inputs = _inputs(shift=11.0)
    m = inputs["completion_mask"].double()
    mean_delta = ((logps - inputs["old_per_token_logps"]) * m).sum(-1) / m.sum(-1)
    assert (mean_delta > 10.5).all()  # verl's clamp would bind on every sequence


def test_delta_below_one_plus_epsilon_high_caps_positive_advantages_as_trl(tmp_path):
    """TRL clamps the ratio at delta before PPO's min: with delta < 1 + epsilon_high that caps A > 0 tokens
    at delta, and A < 0 tokens at 1 + epsilon_high rather than delta (max(min(r, delta), clip(r))). The
    adapter used to cap only A < 0 tokens, at delta, as verl's dual clip. TRL's clip metrics count neither
    (its high clip compares the capped ratio with 1 + epsilon_high); ours count both as dual clips."""
    args = _args(tmp_path, power=1.0, epsilon=0.2, epsilon_high=0.28, delta=1.1)
    ours, theirs = _compare(args, "token", noise=0.3)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "clip_ratio/low_min", "clip_ratio/high_max"):
        assert ours[2][key] == pytest.approx(theirs[2][key], rel=1e-6, abs=1e-9), key
    logps, _, inputs = _inputs(noise=0.3)
    on = inputs["completion_mask"].bool()
    ratio = torch.exp(logps - inputs["old_per_token_logps"])
    adv = inputs["advantages"].unsqueeze(1)
    capped = on & (((adv > 0) & (ratio > 1.1)) | ((adv < 0) & (ratio > 1.28)))
    assert (capped & (adv > 0)).any() and (capped & (adv < 0)).any()  # both cases are exercised
    assert ours[2]["pm/dual_clip_mean"][0] == pytest.approx(capped.sum().item() / on.sum().item())


def test_off_policy_mask_uses_each_tokens_own_advantage_as_trl(tmp_path):
    """With (B, T) advantages TRL's off-policy mask keeps a token of a far-off-policy sequence iff its own
    A_t >= 0; the adapter used to judge every token by the row's first advantage."""
    g = torch.Generator().manual_seed(7)
    token_adv = torch.randn(B, T, generator=g, dtype=torch.float64)  # signs vary along each row
    logps, _, inputs = _inputs()
    m = inputs["completion_mask"].double()
    kl = ((inputs["sampling_per_token_logps"] - logps) * m).sum(-1) / m.sum(-1)
    threshold = kl.median().item()  # half the sequences are "far" off-policy
    far_on = (kl > threshold).unsqueeze(1) & m.bool()
    assert ((token_adv < 0) & far_on).any() and ((token_adv >= 0) & far_on).any()  # tokens dropped and kept
    args = _args(tmp_path, power=1.0, off_policy_mask_threshold=threshold)
    _compare(args, "token", extra={"advantages": token_adv})


# Issue 27: F2 and F7 on TRL's side (verl's: tests/test_loss_edges_on_cpu.py).


def _float32_case(tmp_path, advantage, **kw):
    """float32 inputs whose every valid log-ratio is 95, one advantage for all rows."""
    args = _args(tmp_path, **kw)
    base, entropies, inputs = _inputs()
    mask = inputs["completion_mask"].bool()
    logps = torch.where(mask, 95.0, 0.0).float().requires_grad_(True)
    inputs.update(old_per_token_logps=torch.zeros(B, T), advantages=torch.full((B,), advantage),
                  ref_per_token_logps=logps.detach().clone(), sampling_per_token_logps=torch.zeros(B, T))
    return args, _stub(args, logps, entropies.float(), kw.get("clip_level", "token")), inputs, logps


def test_float32_overflow_is_refused_as_verl_does(tmp_path):
    """F7: float32, log-ratio 95, A < 0, no delta: e^95 is beyond float32. The adapter returned a NaN loss
    without an error (it checked its inputs only); it now raises verl's adapter's error."""
    from hmpo_verl.finite import NonFiniteInputError

    _, stub, inputs, _ = _float32_case(tmp_path, -1.0, power=1.0)
    with pytest.raises(NonFiniteInputError, match="overflowed in torch.float32.*TRL's delta"):
        PowerMeanGRPOTrainer._compute_loss(stub, None, inputs)


def test_seq_ratio_metric_is_finite_where_the_loss_is(tmp_path):
    """F2: sequence clip (no clamp of log s, as TRL), float32, log-ratio 95, A > 0: the loss is finite
    (s clipped at 1 + epsilon_high); pm/seq_ratio_mean is exp(20), log s clamped as verl's ratio metrics
    (it was inf)."""
    _, stub, inputs, logps = _float32_case(tmp_path, 1.0, power=0.0, clip_level="sequence")
    loss = PowerMeanGRPOTrainer._compute_loss(stub, None, inputs)
    assert torch.isfinite(loss)
    assert stub._metrics["train"]["pm/seq_ratio_mean"][0] == pytest.approx(math.exp(20.0), rel=1e-6)


# Issue 27, F6: the TRL differences, each computed on both sides.


def test_sequence_clip_metrics_count_empty_rows_as_trl(tmp_path):
    """TRL's sequence-level clip_ratio/* are means over every row, a fully masked one included (as not
    clipped); the adapter's were over non-empty rows only (0.5 against TRL's 0.333 with one empty row)."""
    args = _args(tmp_path, power=0.0, clip_level="sequence", epsilon=0.03, epsilon_high=0.04)
    ours, theirs = _compare(args, "sequence", empty_row=True, noise=0.3)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "clip_ratio/low_min", "clip_ratio/high_max"):
        assert ours[2][key] == pytest.approx(theirs[2][key], rel=1e-6, abs=1e-9), key  # TRL's are float32
    assert 0 < theirs[2]["clip_ratio/region_mean"][0] < 1


def _sequence_objective(logps, old, adv, completion, in_mean, in_loss, eps_low, eps_high):
    """float64 direct formula, loss_type grpo, eval (no accumulation scale): s_i = exp(mean of delta over the
    `in_mean` tokens); each `in_loss` token's term -min(s A, clip(s) A); per-sequence mean over `completion`."""
    delta = torch.where(in_mean, logps - old, 0.0)
    s = torch.exp(delta.sum(-1) / in_mean.sum(-1).clamp(min=1)).unsqueeze(-1)
    a = adv.unsqueeze(-1)
    term = -torch.minimum(s * a, torch.clamp(s, 1 - eps_low, 1 + eps_high) * a) * in_loss
    return ((term * completion).sum(-1) / completion.sum(-1).clamp(min=1)).mean()


def test_entropy_mask_at_sequence_clip_leaves_low_entropy_tokens_out_of_s_where_trl_keeps_them(tmp_path):
    """Stated difference (README, TRL section): with top_entropy_quantile < 1 the adapter takes s_i over the
    high-entropy tokens (they alone enter the mean, as TRL's GMPO trainer), TRL's GRPOTrainer over every
    completion token, zeroing the low-entropy tokens' terms only. Each loss is checked against its formula."""
    args = _args(tmp_path, power=0.0, clip_level="sequence", epsilon=0.2, epsilon_high=0.2, top_entropy_quantile=0.5)
    ours = _loss_and_grad(PowerMeanGRPOTrainer._compute_loss, args, "sequence", training=False, noise=0.5)
    theirs = _loss_and_grad(GRPOTrainer._compute_loss, args, "sequence", training=False, noise=0.5)
    logps, entropies, inputs = _inputs(noise=0.5)
    completion = inputs["completion_mask"].bool()
    stub = _stub(args, logps, entropies, "sequence")
    high = stub.get_high_entropy_mask(entropies, inputs["completion_mask"], 0.5).bool()
    old, adv = inputs["old_per_token_logps"], inputs["advantages"]
    for loss, in_mean in ((ours[0], high), (theirs[0], completion)):
        expected = _sequence_objective(logps, old, adv, completion, in_mean, high, 0.2, 0.2)
        torch.testing.assert_close(loss, expected, **TIGHT)
    assert abs(ours[0] - theirs[0]) > 0.05 * abs(theirs[0])


def test_entropy_mask_clip_metrics_count_the_tokens_in_the_mean(tmp_path):
    """Stated difference: at token level with the entropy mask the loss is TRL's, but clip_ratio/* count the
    clipped tokens among the high-entropy ones (the tokens in the mean), TRL's among every completion token."""
    args = _args(tmp_path, power=1.0, epsilon=0.1, epsilon_high=0.1, top_entropy_quantile=0.5)
    ours, theirs = _compare(args, "token", noise=0.5)
    logps, entropies, inputs = _inputs(noise=0.5)
    completion = inputs["completion_mask"].bool()
    high = _stub(args, logps, entropies, "token").get_high_entropy_mask(entropies, inputs["completion_mask"], 0.5).bool()
    r = torch.exp(logps - inputs["old_per_token_logps"])
    a = inputs["advantages"].unsqueeze(-1)
    clipped = ((r < 0.9) & (a < 0)) | ((r > 1.1) & (a > 0))
    n = completion.sum()
    assert theirs[2]["clip_ratio/region_mean"][0] == pytest.approx(((clipped & completion).sum() / n).item())
    assert ours[2]["clip_ratio/region_mean"][0] == pytest.approx(((clipped & high).sum() / n).item())
    assert ours[2]["clip_ratio/region_mean"][0] != pytest.approx(theirs[2]["clip_ratio/region_mean"][0])


@pytest.mark.parametrize("key, value", [("ref_per_token_logps", math.nan), ("ref_per_token_logps", math.inf),
                                        ("old_per_token_logps", -math.inf)])
def test_a_non_finite_input_of_the_kl_penalty_is_an_error(tmp_path, key, value):
    """beta != 0: a NaN / inf reference (or, with use_bias_correction_kl, old) log-prob at a valid position gave a
    NaN loss and NaN gradients with no error (the surrogate's check does not read the KL term's inputs); the old
    log-prob at a valid token the entropy mask leaves out of the surrogate too."""
    args = _args(tmp_path, beta=0.1, use_bias_correction_kl=True, top_entropy_quantile=0.5)
    base, entropies, inputs = _inputs()
    valid = inputs["completion_mask"].bool()
    low = valid & (entropies <= entropies[valid].median())  # valid, left out of the surrogate by the entropy mask
    position = tuple(low.nonzero()[0].tolist()) if key == "old_per_token_logps" else (0, 0)
    inputs[key] = inputs[key].clone()
    inputs[key][position] = value
    stub = _stub(args, base.clone().requires_grad_(True), entropies, "token")
    with pytest.raises(ValueError, match=rf"^{key} has 1 non-finite value\(s\) at valid \(completion_mask\) "
                                         r"positions, which the KL penalty \(beta=0.1\) reads$"):
        PowerMeanGRPOTrainer._compute_loss(stub, None, inputs)


def test_a_kl_penalty_that_overflows_is_an_error(tmp_path):
    """float32, a token the trainer moved 100 nats above the old policy, clipped in the surrogate (finite), but
    exp(100) in use_bias_correction_kl's weight: the loss was inf with no error."""
    from hmpo_verl.finite import NonFiniteInputError

    args = _args(tmp_path, beta=0.04, use_bias_correction_kl=True, power=1.0)
    base, entropies, inputs = _inputs()
    logps = base.float()
    inputs = {**inputs, "old_per_token_logps": inputs["old_per_token_logps"].float().clone(),
              "ref_per_token_logps": inputs["ref_per_token_logps"].float(), "advantages": inputs["advantages"].abs().float()}
    inputs["old_per_token_logps"][0, 0] = logps[0, 0] - 100.0
    stub = _stub(args, logps.requires_grad_(True), entropies.float(), "token")
    with pytest.raises(NonFiniteInputError, match=r"the KL penalty \(beta=0.04\) overflowed in torch.float32"):
        PowerMeanGRPOTrainer._compute_loss(stub, None, inputs)
    finite = _stub(_args(tmp_path, beta=0.0, power=1.0), logps.detach().clone().requires_grad_(True),
                   entropies.float(), "token")
    assert torch.isfinite(PowerMeanGRPOTrainer._compute_loss(finite, None, inputs))  # the surrogate alone: finite


def test_an_evaluation_between_buffered_training_steps_keeps_their_reward_statistics(tmp_path, monkeypatch):
    """adapt='reward': TRL buffers a training generation for steps_per_generation x num_iterations steps; an
    evaluation generated in between replaced the statistics those steps read (p and the clip from the eval
    batch's rewards). Each mode's loss steps now read their own generation batch's."""
    args = _args(tmp_path, adapt="reward")
    logps, entropies, inputs = _inputs()
    stub = _stub(args, logps.clone().requires_grad_(True), entropies, "token")
    batches = iter([("train", 0.9, 0.1), ("eval", 0.1, 0.3)])

    def generate(self, given):  # TRL's generation: logs the batch's reward mean and std in its mode's metrics
        mode, mean, std = next(batches)
        self.model.training = mode == "train"
        self._metrics[mode]["reward"].append(mean)
        self._metrics[mode]["reward_std"].append(std)
        return given

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", generate)
    stub._generate_and_score_completions(inputs)  # a training generation, buffered
    stub._generate_and_score_completions(inputs)  # an evaluation
    PowerMeanGRPOTrainer._compute_loss(stub, None, inputs)  # its eval loss: the eval batch's statistics
    stub.model.training = True
    PowerMeanGRPOTrainer._compute_loss(stub, None, inputs)  # the next buffered training step
    assert stub._metrics["eval"]["pm/reward_mean"] == [0.1] and stub._metrics["train"]["pm/reward_mean"] == [0.9]
    assert stub._metrics["train"]["pm/power"][0] == pytest.approx(math.exp(-0.8 * 0.9))
