"""The study's regimes in the lean loop: held-out split, the async sampler's lag, MoE routing record/replay."""

import pytest
import torch

from hmpo_verl.lab import lean, moe
from hmpo_verl.lab.tasks.common import MoeModelSpec, ModelSpec, build_model, build_tokenizer


def test_heldout_split_removes_every_test_prompt():
    train = [([1, 2], "a"), ([3], "b"), ([1, 2], "a"), ([4, 5], "c"), ([6], "d")]
    test = [([3], "b"), ([6], "d")]
    kept, train_eval = lean.heldout_split(train, test)
    assert kept == [([1, 2], "a"), ([1, 2], "a"), ([4, 5], "c")]
    assert train_eval == [([1, 2], "a"), ([4, 5], "c")]  # distinct, at most len(test)
    task = lean.load_task("addition", log=None)
    held = {tuple(p) for p, _ in task.test}
    assert task.train and not any(tuple(p) in held for p, _ in task.train)
    assert len(task.train_eval) == len(task.test) and not any(tuple(p) in held for p, _ in task.train_eval)


def _tiny(spec=None):
    tokenizer = build_tokenizer("0123456789+")
    return build_model(spec or ModelSpec(hidden_size=32, intermediate_size=32), tokenizer, seed=0).eval(), tokenizer


def test_sampler_uses_the_parameters_lag_steps_old():
    """At step t (after t-1 updates) the sampler holds theta_{max(0, t-1-lag)}; bf16 samplers are cast."""
    model, _ = _tiny()
    sampler = lean.Sampler(model, lean.Regime("x", "", lag=2))
    first = next(model.parameters()).detach()
    seen = []
    for step in range(1, 6):
        sampler.sync(model)
        seen.append(float(next(sampler.model.parameters()).detach().flatten()[0] - first.flatten()[0]))
        with torch.no_grad():
            first.add_(1.0)  # "update": theta_t = theta_0 + t
    assert seen == [0.0, -1.0, -2.0, -2.0, -2.0]  # theta_0, theta_0, theta_0, theta_1, theta_2 relative to theta_t-1
    assert lean.Sampler(model, lean.REGIMES_BY_NAME["on_policy"]).model is model
    bf16 = lean.Sampler(model, lean.REGIMES_BY_NAME["bf16"])
    bf16.sync(model)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16


def test_async_regime_samples_with_stale_parameters_end_to_end():
    """async_1: the first step samples with the current parameters (mismatch at rounding level), the second with
    the parameters one step (4 updates) old; the loss sees the sampler's log-probs (bypass)."""
    task = lean.load_task("addition", log=None)
    settings = lean.LoopSettings(max_response_length=task.max_response_length, eval_prompts=4, lr=3e-3,
                                 prompts_per_step=4, n=4)
    result = lean.train(task, lean.METHODS_BY_NAME["vanilla"], lean.REGIMES_BY_NAME["async_1"], 1, 2, settings)
    first, second = result.steps
    assert first["mismatch/delta_sd"] < 1e-4 < second["mismatch/delta_sd"]
    assert second["update/delta_sd"] > 1e-3 and {"eval_heldout", "eval_train"} <= set(second)


def test_routing_replay_reuses_the_samplers_experts_with_the_trainers_gate_weights():
    """The bf16 sampler's recorded experts are the experts of the fp32 trainer's forward under replay (every
    recorded position), the gate weights are the trainer's softmax at them, and the router keeps its gradient;
    replaying the trainer's own routes changes nothing."""
    spec = MoeModelSpec(hidden_size=32, intermediate_size=32, num_experts=4, experts_per_token=2,
                        moe_intermediate_size=16)
    model, tokenizer = _tiny(spec)
    assert len(moe.routers(model)) == 2
    sampler = lean.Sampler(model, lean.Regime("moe", "", sample_dtype="bf16", model="moe"))
    sampler.sync(model)
    prompts = [tokenizer("1+2", add_special_tokens=False)["input_ids"]] * 3 + [tokenizer("34", add_special_tokens=False)["input_ids"]]
    rollout, routes = sampler.sample(prompts, 4, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                     torch.Generator().manual_seed(0))
    width = rollout.prompt_ids.shape[1] + rollout.response_ids.shape[1]
    assert [r.shape for r in routes] == [(4, width - 1, 2)] * 2
    with moe.RouteRecorder(model, 4) as trainer, lean._routing(model, routes):
        log_prob = lean.token_log_probs(model, rollout)
    fed = torch.cat([rollout.prompt_mask.bool(), rollout.response_mask], 1)[:, : width - 1]  # the trainer's real inputs
    for a, b in zip(routes, trainer.routes()):
        assert torch.equal(a[fed], b[:, : width - 1][fed])
    log_prob.sum().backward()
    assert moe.routers(model)[0].weight.grad.abs().sum() > 0
    with torch.no_grad(), moe.RouteRecorder(model, 4) as own:
        plain = lean.token_log_probs(model, rollout)
    with torch.no_grad(), moe.RouteReplay(model, own.routes()):
        replayed = lean.token_log_probs(model, rollout)
    torch.testing.assert_close(replayed, plain, rtol=0, atol=1e-6)


def test_replayed_scores_and_flip_fraction_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits, -1)[0]
    scores = moe.replayed_scores(logits, torch.tensor([[2, 0]]), normalise=True)
    torch.testing.assert_close(scores, torch.stack([probs[2], probs[0]])[None] / (probs[2] + probs[0]))
    a = [torch.tensor([[[0, 1], [2, 3], [1, 0]]])]
    b = [torch.tensor([[[1, 0], [2, 1], [3, 2]]])]
    positions = torch.tensor([[True, True, False]])
    assert moe.flip_fraction(a, b, positions) == pytest.approx(0.5)  # same set at 0, flipped at 1, 2 not counted
