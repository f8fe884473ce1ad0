"""The lag-fidelity section of v3's report, docs/study_v3.md (hmpo_verl.lab.lag_fidelity): its share measure against direct
per-response gradients, the training loop's observer, and the section regenerated from its committed data."""

import shutil
from pathlib import Path

import pytest
import torch

from hmpo_verl.lab import lag_fidelity, lean
from hmpo_verl.lab.study import report

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "study_v3_data" / lag_fidelity.DATA_NAME


def _rollout(responses=6, max_tokens=5):
    task = lean.load_task("addition", log=None)  # the demo's assets, built once
    model = lean.load_model(task.model_path, "eager")
    prompts = [task.train[j][0] for j in range(responses // 2) for _ in range(2)]
    rollout = lean.sample(model, prompts, max_tokens, task.tokenizer.eos_token_id, task.tokenizer.pad_token_id,
                          torch.Generator().manual_seed(0))
    return task, model, rollout


def test_off_policy_top_ranks_by_the_mean_absolute_log_ratio_per_token():
    """Response 0 has the largest sum of |delta| but a smaller mean than response 1 (longer): the mean ranks."""
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    delta = torch.tensor([[0.5, -0.5, 0.5, -0.5], [-0.9, 9.0, 9.0, 9.0], [0.1, 0.1, 5.0, 5.0], [0.0, 0, 0, 0]])
    assert lag_fidelity.off_policy_top(delta, mask, 0.25).tolist() == [False, True, False, False]
    assert lag_fidelity.off_policy_top(delta, mask, 0.5).tolist() == [True, True, False, False]


def test_top_share_equals_the_share_of_direct_per_response_gradients():
    """<g_S, g> / ||g||^2 from the token Jacobian equals the same from each response's gradient taken through the model
    by autograd; the shares of a partition sum to 1."""
    from hmpo_verl.lab.fidelity import token_jacobian

    _, model, rollout = _rollout()
    mask = rollout.response_mask
    v = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1)) * mask
    log_prob = lean.token_log_probs(model, rollout)
    per_response = []
    for i in range(len(mask)):
        grads = torch.autograd.grad(log_prob[i], list(model.parameters()), v[i], retain_graph=True, allow_unused=True)
        per_response.append(torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1)
                                       for x, p in zip(grads, model.parameters())]).double())
    per_response = torch.stack(per_response)
    g = per_response.sum(0)
    top = torch.tensor([True, False, True, False, False, False])
    direct = float(per_response[top].sum(0) @ g / (g @ g))
    jac = token_jacobian(model, rollout)
    assert lag_fidelity.top_share(v, top, jac) == pytest.approx(direct, rel=1e-4, abs=1e-6)
    assert lag_fidelity.top_share(v, top, jac) + lag_fidelity.top_share(v, ~top, jac) == pytest.approx(1, abs=1e-5)
    assert abs(direct - top.float().mean().item()) > 1e-3  # not trivially the responses' count share


@pytest.mark.parametrize("regime", ["async_0", "async_1"])
def test_the_observer_sees_each_update_and_on_policy_updates_match_iw(regime):
    """lean.train calls ``observe`` before each of a step's 4 mini-batch updates with the trainer's state; at the
    first update of a synchronous step the data are on-policy (ratio 1), so vanilla's update is the iw gradient
    (cosine 1, norm ratio 1); in async_1, whose sampler is a step old, the ratios are off 1 (log A - log H > 0),
    and vanilla's update differs from iw where its clip binds -- not in every mini-batch: with no token clipped,
    PPO's gradient ratio * A * grad log p is iw's exactly (cosine 1 at a step-4 update on one machine's
    arithmetic, 8 tokens with a non-zero advantage, |log ratio| up to 1.97, none clipped)."""
    task = lean.load_task("addition", log=None)
    settings = lean.LoopSettings(max_response_length=task.max_response_length, prompts_per_step=8, n=4, eval_prompts=4)
    seen, rows = [], []
    eager = lean.load_model(task.model_path, "eager")
    methods = [lean.METHODS_BY_NAME["vanilla"]]

    def observe(step, update, **state):
        seen.append((step, update, len(state["rows"])))
        if step >= 2 and update == 0:
            rows.extend(lag_fidelity.measure_update(state, methods, settings, eager))

    lean.train(task, methods[0], lean.REGIMES_BY_NAME[regime], 1, 4, settings, observe=observe)
    assert seen == [(t, u, 8) for t in (1, 2, 3, 4) for u in range(4)]  # 32 responses in 4 mini-batches
    finite = [r for r in rows if r["cosine"] == r["cosine"]]  # all-equal rewards in both groups: no update (NaN)
    assert finite
    if regime == "async_0":
        assert all(r["cosine"] == pytest.approx(1, abs=1e-4) and r["norm_ratio"] == pytest.approx(1, abs=1e-3)
                   and r["log_ah_gap"] < 1e-6 for r in finite)
    else:
        assert all(r["log_ah_gap"] > 1e-6 for r in finite) and any(r["cosine"] < 0.9999 for r in finite)


def _block(text: str) -> list[str]:
    start, end = text.index(report.LAG_START), text.index(report.LAG_END)
    return text[start + len(report.LAG_START): end].strip("\n").split("\n")


def test_the_section_in_study_md_is_regenerated_from_its_committed_data(tmp_path):
    """docs/study_v3.md's lag-fidelity block is exactly what its committed data render to (table, reading, the
    command), its figure is redrawn from them, and one changed measurement changes the section."""
    data = tmp_path / "study_v3_data" / lag_fidelity.DATA_NAME
    data.parent.mkdir()
    shutil.copy(DATA, data)
    lines = lag_fidelity.render(data, tmp_path / "study_v3.md", tmp_path / "study_v3_figures")
    assert lines == _block((ROOT / "docs" / "study_v3.md").read_text())
    assert (tmp_path / "study_v3_figures" / lag_fidelity.FIGURE_NAME).stat().st_size > 10_000
    assert (ROOT / "docs" / "study_v3_figures" / lag_fidelity.FIGURE_NAME).exists()
    frame, meta = lag_fidelity.read_data(data)
    assert meta["command"].startswith("python -m hmpo_verl.lab.lag_fidelity")
    assert set(frame["regime"]) == set(lag_fidelity.LAGS)
    frame.loc[(frame["method"] == "hmpo") & (frame["regime"] == "async_2"), "cosine"] -= 0.2
    lag_fidelity.write_data(data, frame.to_dict("records"), meta)
    assert lag_fidelity.render(data, tmp_path / "study_v3.md", tmp_path / "study_v3_figures") != lines


def test_from_data_without_the_data_stops_with_the_command_to_make_them(tmp_path):
    with pytest.raises(SystemExit, match="python -m hmpo_verl.lab.lag_fidelity"):
        lag_fidelity.main(["--from-data", "--docs", str(tmp_path / "study.md")])


def test_the_section_block_is_replaced_in_place_and_its_absence_is_loud(tmp_path):
    docs = tmp_path / "study.md"
    docs.write_text(f"head\n{report.LAG_START}\nold\n{report.LAG_END}\ntail\n")
    lag_fidelity.update_docs(docs, ["new"])
    assert docs.read_text() == f"head\n{report.LAG_START}\nnew\n{report.LAG_END}\ntail\n"
    docs.write_text("no block\n")
    with pytest.raises(SystemExit, match="no <!-- lag-fidelity:start -->"):
        lag_fidelity.update_docs(docs, ["new"])
