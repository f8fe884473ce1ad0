"""verl's actor engine without Ray: an hmpo step at world size 2 (torchrun, gloo, FSDP2) equals world size 1.

Both runs feed the same global batch (each rank its contiguous half at world size 2) to
``ActorRolloutRefWorker(role="actor")`` and take one optimizer step through verl's
``ppo_loss`` and our registered ``hmpo`` loss; see ``tests/cpu_engine_step_worker.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from cpu_assets import REPO_ROOT, tiny_assets

WORKER = REPO_ROOT / "tests" / "cpu_engine_step_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, out) -> None:
    env = {
        **os.environ,
        "VERL_PLATFORM": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={_free_port()}", str(WORKER), "--model", str(tiny_assets().model), "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {n: tmp_path_factory.mktemp(f"ws{n}") for n in (1, 2)}
    for n, path in out.items():
        _torchrun(n, path)
    return out


def _params(path, rank):
    return torch.load(path / f"params_rank{rank}.pt")


def test_both_ranks_end_with_identical_parameters(runs):
    rank0, rank1 = _params(runs[2], 0), _params(runs[2], 1)
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0, msg=name)


def test_world_size_2_equals_world_size_1_on_the_same_global_batch(runs):
    from safetensors.torch import load_file

    ws1, ws2 = _params(runs[1], 0), _params(runs[2], 0)
    initial = load_file(tiny_assets().model / "model.safetensors")
    moved = max((ws1[k] - initial[k]).abs().max().item() for k in ws1)
    assert moved > 1e-4, "the optimizer step did not change the weights"
    for name in ws1:
        torch.testing.assert_close(ws2[name], ws1[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_step_went_through_the_hmpo_loss_with_the_same_metrics(runs):
    from hmpo_verl.maths.staleness import staged_means, staged_totals

    def logged(run):  # what the trainer logs: the engine's metrics, our staged sums turned into means
        metrics = json.loads((run / "metrics_rank0.json").read_text())["metrics"]
        return {**metrics, **{k: [v] for k, v in staged_means(staged_totals(metrics)).items()}}

    m1, m2 = logged(runs[1]), logged(runs[2])
    assert m1["actor/pm/power"] == [-1.0]
    assert 0 < m1["actor/pm/ess_frac"][0] < 1, "ratios should differ from 1 (old_log_probs are perturbed)"
    for key in ("actor/pg_loss", "actor/pm/ess_frac", "actor/pm/seq_ratio_mean", "actor/pg_clipfrac", "grad_norm"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key
