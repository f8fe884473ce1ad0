"""The study's lean loop calls verl's own pieces; the study and fidelity commands run end to end."""

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from hmpo_verl.lab import lean


def _batch(B=6, T=9, P=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    prompt_lens = torch.randint(2, P + 1, (B,), generator=g)
    prompt_mask = torch.arange(P)[None] >= (P - prompt_lens)[:, None]  # left-padded
    old = torch.where(mask, -torch.rand(B, T, generator=g) * 2, 0.0)
    log_prob = torch.where(mask, old + 0.3 * torch.randn(B, T, generator=g), 0.0)
    adv = (torch.randn(B, 1, generator=g) * mask).float()
    return old, log_prob, adv, mask, prompt_mask


def _verl_ppo_loss(config, old, log_prob, adv, mask, prompt_mask, weights=None):
    """verl.workers.utils.losses.ppo_loss on the same batch, its log-probs in verl's packed (no-padding) layout."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    B, T = mask.shape
    pieces = []
    for b in range(B):  # a sequence's packed output: position j holds log p(token j+1)
        p, r = int(prompt_mask[b].sum()), int(mask[b].sum())
        pieces += [torch.zeros(p - 1), log_prob[b, :r], torch.zeros(1)]
    fields = {"prompts": torch.zeros(prompt_mask.shape, dtype=torch.long), "responses": torch.zeros(B, T, dtype=torch.long),
              "attention_mask": torch.cat([prompt_mask, mask], 1).long(), "response_mask": mask.long(),
              "old_log_probs": old, "advantages": adv}
    if weights is not None:
        fields["rollout_is_weights"] = weights
    data = TensorDict(fields, batch_size=[B])
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=B)
    loss, _ = ppo_loss(config, {"log_probs": torch.cat(pieces)}, data)
    return loss


@pytest.mark.parametrize("method", ["vanilla", "gspo", "geo_mean", "sapo", "dppo_tv", "cispo", "vanilla_rc", "hmpo",
                                    "pm_p-2", "pm_p0", "agm", "adaptive", "apmpo"])
def test_lean_loss_is_verls_ppo_loss(method):
    """Loss and gradient of the lean loop's call equal verl's own ppo_loss on the same batch."""
    from hmpo_verl.reward_adaptive import REWARD_FEEDBACK, RewardStats

    REWARD_FEEDBACK.set(RewardStats.of(torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])))  # apmpo reads the batch's rewards
    m = lean.METHODS_BY_NAME[method]
    settings = lean.LoopSettings()
    old, log_prob, adv, mask, prompt_mask = _batch()
    weights = lean.rollout_is_weights(m, old, old - 0.2 * torch.randn_like(old), mask)
    a = log_prob.clone().requires_grad_(True)
    b = log_prob.clone().requires_grad_(True)
    ours, _ = lean.policy_loss(lean.actor_config(m, settings), old, a, adv, mask, weights)
    ref = _verl_ppo_loss(lean.actor_config(m, settings), old, b, adv, mask, prompt_mask, weights)
    ours.backward()
    ref.backward()
    REWARD_FEEDBACK.clear()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-9)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)


def test_method_settings_reach_verls_config():
    s = lean.LoopSettings()
    gspo = lean.actor_config(lean.METHODS_BY_NAME["gspo"], s)
    assert (gspo.clip_ratio_low, gspo.clip_ratio_high, gspo.loss_agg_mode) == (3e-4, 4e-4, "seq-mean-token-mean")
    assert lean.actor_config(lean.METHODS_BY_NAME["cispo"], s).clip_ratio_low == 10.0
    assert lean.actor_config(lean.METHODS_BY_NAME["dppo_tv"], s).clip_ratio_c == 10000.0
    assert lean.actor_config(lean.METHODS_BY_NAME["pm_p0.5"], s).policy_loss.power == 0.5
    assert lean.algo_config(lean.METHODS_BY_NAME["pm_adv"], s).risk_beta == 2.0


def test_regimes_reach_verls_trainer_as_the_lean_loop_runs_them():
    """The confirmation runs a regime on verl's trainer through these overrides and server variables:
    the same mini-batches, epochs and bypass mode; the rollout server samples in the regime's precision
    and adds its noise (the server's variables, read by ``verl_cpu.rollout.server``)."""
    from verl_cpu.rollout import server

    s = lean.LoopSettings()
    stressed = lean.REGIMES_BY_NAME["stressed"]
    assert stressed.trainer_overrides(s) == [
        "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.actor.ppo_epochs=1",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=32", "algorithm.rollout_correction.bypass_mode=true"]
    assert stressed.trainer_env() == {server.DTYPE_ENV: "bfloat16", server.NOISE_ENV: "0.02",
                                      server.SPIKE_STD_ENV: "0.5", server.SPIKE_RATE_ENV: "0.02"}
    on_policy = lean.REGIMES_BY_NAME["on_policy"]
    assert on_policy.trainer_env() == {server.DTYPE_ENV: "float32"}
    assert on_policy.trainer_overrides(s)[0] == "actor_rollout_ref.actor.ppo_mini_batch_size=8"
    assert on_policy.trainer_overrides(s)[-1] == "algorithm.rollout_correction.bypass_mode=false"


@pytest.mark.parametrize("regime,module", [("async_0", "verl.trainer.main_ppo"),
                                           ("async_1", "verl.experimental.one_step_off_policy.main_ppo")])
def test_confirmation_runs_compose_on_the_regimes_verl_trainer(tmp_path, regime, module):
    """``--confirm`` / ``--confirm-async``: the trainer command of a confirmation run is the regime's verl
    trainer with a config Hydra composes, carrying the lean loop's settings (every override names a real key)."""
    from hydra import compose, initialize_config_dir

    from hmpo_verl.lab.study import run as study_run
    from hmpo_verl.lab.study.plan import Run

    settings = lean.LoopSettings(max_response_length=48, eval_prompts=32)
    cmd, env = study_run.trainer_invocation(Run("confirm", regime, "hmpo", 3e-4, 2), "fibonacci", None, 7, settings,
                                            tmp_path)
    assert cmd[1:3] == ["-m", module] and env["VERL_PLATFORM"] == "cpu"
    config_dir, config_name = cmd[cmd.index("--config-path") + 1], cmd[cmd.index("--config-name") + 1]
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose(config_name=config_name, overrides=cmd[cmd.index("--config-name") + 2:])
    actor = config.actor_rollout_ref.actor
    assert (actor.policy_loss.loss_mode, actor.optim.lr, actor.ppo_mini_batch_size) == ("hmpo", 3e-4, 2)  # 4 updates
    assert config.algorithm.rollout_correction.bypass_mode is True and config.trainer.total_training_steps == 7
    assert (config.data.seed, config.actor_rollout_ref.rollout.n, config.data.train_batch_size) == (2, 8, 8)
    train = pd.read_parquet(config.data.train_files)["prompt"].map(lambda m: m[0]["content"])
    held = pd.read_parquet(config.data.val_files)["prompt"].map(lambda m: m[0]["content"])
    assert len(train) > 0 and not set(train) & set(held)


def test_advantages_are_verls_estimators():
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, get_adv_estimator_fn

    mask = torch.ones(8, 5, dtype=torch.bool)
    mask[3, 2:] = False
    scores = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 0])
    uids = np.array(["a"] * 4 + ["b"] * 4, dtype=object)
    s = lean.LoopSettings()
    tlr = torch.zeros(8, 5)
    tlr[torch.arange(8), mask.sum(-1) - 1] = scores
    grpo = lean.advantages(lean.METHODS_BY_NAME["vanilla"], s, scores, mask, uids)
    torch.testing.assert_close(grpo, compute_grpo_outcome_advantage(tlr, mask.float(), uids)[0])
    pm = lean.METHODS_BY_NAME["pm_adv"]
    algo = lean.algo_config(pm, s)
    torch.testing.assert_close(lean.advantages(pm, s, scores, mask, uids, algo),
                               get_adv_estimator_fn("power_mean")(tlr, mask.float(), config=algo, index=uids)[0])


def test_contaminated_noise_shape():
    noise = lean.Noise("contaminated", sd=0.02, spike_sd=0.5, rate=0.02).sample((200_000,), torch.Generator().manual_seed(0))
    spikes = (noise.abs() > 0.1).float().mean().item()  # bulk N(0, 0.02^2) essentially never exceeds 0.1
    assert 0.02 * 0.8 < spikes < 0.02 * 1.0
    with pytest.raises(ValueError, match="Noise.kind"):
        lean.Noise("cauchy", sd=1.0).sample((3,), torch.Generator())


def test_kernel_cosines_equal_direct_autograd(tmp_path):
    """The fidelity benchmark's kernel inner products equal those of gradients taken through the model."""
    from hmpo_verl.lab.fidelity import gram, token_kernel

    task = lean.load_task("addition", log=None)  # the demo's assets, built once
    model = lean.load_model(task.model_path, "eager")
    prompts = [task.train[j][0] for j in range(3) for _ in range(2)]
    rollout = lean.sample(model, prompts, 4, task.tokenizer.eos_token_id, task.tokenizer.pad_token_id,
                          torch.Generator().manual_seed(0))
    kernel = token_kernel(model, rollout)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(2, *rollout.response_mask.shape, generator=g) * rollout.response_mask
    log_prob = lean.token_log_probs(model, rollout)
    flat = []
    for k in range(2):
        grads = torch.autograd.grad(log_prob, list(model.parameters()), v[k], retain_graph=True)
        flat.append(torch.cat([x.reshape(-1) for x in grads]).double())
    direct = torch.stack(flat) @ torch.stack(flat).T
    torch.testing.assert_close(gram(v.reshape(2, -1), kernel), direct, rtol=1e-4, atol=1e-8)


def test_fidelity_iw_reference_is_the_unclipped_importance_weighted_loss():
    """The `iw` reference's cotangent is the gradient of verl's vanilla loss with its clips out of reach
    (ratio clip [1 - 1, 1 + 1e9], dual clip 1e9): the importance-weighted policy gradient."""
    from dataclasses import replace

    from hmpo_verl.lab.fidelity import iw_cotangent

    old, log_prob, adv, mask, _ = _batch()
    settings = lean.LoopSettings()
    vanilla = replace(lean.METHODS_BY_NAME["vanilla"], actor=(("clip_ratio_low", 1.0), ("clip_ratio_high", 1e9),
                                                               ("clip_ratio_c", 1e9)))
    leaf = log_prob.clone().requires_grad_(True)
    loss, _ = lean.policy_loss(lean.actor_config(vanilla, settings), old, leaf, adv, mask)
    (grad,) = torch.autograd.grad(loss, leaf)
    torch.testing.assert_close(iw_cotangent(log_prob, old, adv, mask), grad, rtol=1e-5, atol=1e-8)


def test_expected_reward_is_the_answers_probability_and_agrees_with_sampling():
    """The study's exact evaluation: per prompt, prod_t pi(y*_t | x, y*_<t) over the answer and EOS, computed
    unpadded one prompt at a time here; its mean agrees with the sampled exact-match reward within 4 s.e."""
    task = lean.load_task("addition", log=None)
    model = lean.load_model(task.model_path)
    exact = lean.expected_reward(model, task, task.test[:8])
    eos, pad = task.tokenizer.eos_token_id, task.tokenizer.pad_token_id
    direct = []
    with torch.no_grad():
        for prompt, truth in task.test[:8]:
            answer = task.tokenizer(truth, add_special_tokens=False)["input_ids"] + [eos]
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, len(prompt) - 1: -1].double()
            direct.append(float(torch.log_softmax(logits, -1)[torch.arange(len(answer)), answer].sum().exp()))
    assert exact == pytest.approx(np.mean(direct), rel=1e-5, abs=1e-7)
    assert 0.05 < exact < 0.95  # a check that could fail either way
    samples = 400
    prompts = [p for p, _ in task.test[:8] for _ in range(samples)]
    truths = [t for _, t in task.test[:8] for _ in range(samples)]
    rollout = lean.sample(model, prompts, task.max_response_length, eos, pad, torch.Generator().manual_seed(0))
    rewards = np.array([task.reward(task.decode(lean._valid(rollout, i)), truths[i]) for i in range(len(prompts))])
    assert abs(rewards.mean() - exact) < 4 * rewards.std() / math.sqrt(len(rewards))


@pytest.mark.slow
def test_smoke_run_of_the_study_command(tmp_path):
    """Both phases of the real command (addition task, one off-policy regime, two methods, two learning rates,
    one tuning and two evaluation seeds, five steps) through to the report; then a resume runs nothing."""
    out, docs = tmp_path / "study", tmp_path / "docs" / "study.md"
    cmd = [sys.executable, "-m", "hmpo_verl.lab.study", "--task", "addition", "--methods", "vanilla", "hmpo",
           "--regimes", "async_2", "--lr-grid", "3e-4", "1e-3", "--tuning-seeds", "1", "--eval-seeds", "2",
           "--steps", "5", "--parallel", "1", "--out", str(out), "--docs", str(docs)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    tuned = sorted(p.relative_to(out / "runs").as_posix() for p in (out / "runs" / "tune").rglob("*.json"))
    assert tuned == [f"tune/async_2/{m}/lr{lr}/seed1001.json" for m in ("hmpo", "vanilla") for lr in ("0.0003", "0.001")]
    settings = pd.read_csv(docs.parent / "study_data" / "settings.csv")
    chosen = dict(zip(settings["method"], settings["lr"]))
    run = json.loads((out / "runs" / "eval" / "async_2" / "hmpo" / f"lr{chosen['hmpo']:g}" / "seed2.json").read_text())
    assert len(run["metrics"]) == 5 and all(0 <= m["eval_heldout"] <= 1 and 0 <= m["eval_train"] <= 1
                                            for m in run["metrics"])
    assert run["settings"]["lr"] == chosen["hmpo"]
    runs = pd.read_csv(docs.parent / "study_data" / "runs.csv")
    assert len(runs) == 4 + 4 and set(runs["phase"]) == {"tune", "eval"}
    report = docs.read_text()
    assert "| Q1/async_2 (hmpo − vanilla) | 2 |" in report and "| Q2/" not in report  # the questions it can answer
    assert "## Pre-registration" in report and "| async_2 | hmpo | 2 |" in report
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert json.loads((out / "runs" / "eval" / "async_2" / "hmpo" / f"lr{chosen['hmpo']:g}" / "seed2.json").read_text()) == run


@pytest.mark.slow
def test_smoke_run_of_the_fidelity_command(tmp_path):
    docs = tmp_path / "fidelity.md"
    cmd = [sys.executable, "-m", "hmpo_verl.lab.bench", "--fidelity", "--quick", "--methods", "vanilla", "hmpo",
           "--regimes", "mismatch", "--docs", str(docs), "--task", "addition", "--out", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = pd.read_csv(tmp_path / "fidelity_data" / "fidelity.csv")
    assert set(rows["method"]) == {"vanilla", "hmpo"} and rows["cosine"].between(-1.0001, 1.0001).all()
    assert "| hmpo |" in docs.read_text()


@pytest.mark.slow
def test_smoke_run_of_the_v4_study_command_and_its_relaunches(tmp_path):
    """`--v4 --quick` (the README's smoke command, on the task's default assets, which the CPU tests share) through
    every stage (pilot, warm starts, tuning with the edge rule, evaluation, report) in spawned workers; a relaunch
    runs nothing and changes no record; --report-only on the same runs reports them; --report-only without --quick
    (another plan's settings) stops loud instead of reporting the runs as not run."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hmpo_verl.lab.study", "--v4", "--quick", "--parallel", "2", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = {p: p.read_text() for p in sorted((out / "runs").rglob("*.json"))}
    assert {p.relative_to(out / "runs").parts[0] for p in records} == {"pilot", "tune", "eval"}
    assert all(json.loads(text)["definitions"]["regime"]["lag"] == 2 for text in records.values())  # async_2's
    assert json.loads((out / "order.json").read_text()) == ["async_2"]
    assert sorted(json.loads((out / "inputs.json").read_text())) == ["data", "dense/ws0", "dense/ws1"]
    report = (out / "study_v4.md").read_text()
    evaluated = sum(p.relative_to(out / "runs").parts[0] == "eval" for p in records)
    assert f"Runs: {evaluated} of {evaluated} evaluation runs finished." in report
    assert "| Q2/async_2 (hmpo − gspo) | 2 |" in report and "| Q1/async_2" not in report  # v3 decided Q1 there

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "run again" not in again.stdout
    assert {p: p.read_text() for p in sorted((out / "runs").rglob("*.json"))} == records
    only = subprocess.run([*cmd, "--report-only"], capture_output=True, text=True, timeout=300)
    assert only.returncode == 0, only.stdout[-3000:] + only.stderr[-3000:]
    assert f"Runs: {evaluated} of {evaluated} evaluation runs finished." in (out / "study_v4.md").read_text()
    full = subprocess.run([sys.executable, "-m", "hmpo_verl.lab.study", "--v4", "--report-only", "--out", str(out),
                           "--docs", str(tmp_path / "full.md")],
                          capture_output=True, text=True, timeout=300)
    assert full.returncode != 0 and "were made with other settings" in full.stderr
    assert not (tmp_path / "full.md").exists()
