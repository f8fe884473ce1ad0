"""Smoke run of the loss benchmark `python -m hmpo_verl.lab.bench` (its figures are in the README, measured
by hand: timings belong in a script, not in a test) and the two kinds of inputs it times."""

import torch

from hmpo_verl.lab import bench


def test_bench_prints_every_loss_for_both_kinds_of_inputs(capsys):
    bench.main(["--shapes", "4x32", "--repeats", "1", "--dtypes", "float32"])
    out = capsys.readouterr().out
    for kind in bench.INPUTS:
        assert f"4x32 float32 {kind}" in out
    for case in bench.CASES:
        assert out.count(f"  {case.label} ") == len(bench.INPUTS)
    assert "cpu x gspo" in out and ("all targets met" in out or "some targets MISSED" in out)


def test_ragged_inputs_are_issue_22s_case():
    """Lengths uniform in [1, T] (about half the batch is padding), old log-probs N(-2, 1), delta sd 0.05."""
    old, lp, adv, mask = bench.make_inputs(512, 256, torch.float32, "cpu", kind="ragged")
    lengths = mask.sum(-1)
    assert lengths.min() >= 1 and lengths.max() <= 256 and abs(lengths.float().mean().item() / 256 - 0.5) < 0.05
    assert abs(old.mean().item() + 2) < 0.01 and abs(old.std().item() - 1) < 0.01
    assert abs((lp - old).std().item() - 0.05) < 0.001
    assert (adv == adv[:, :1]).all()  # one advantage per response
