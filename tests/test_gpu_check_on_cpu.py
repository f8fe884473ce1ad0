"""hmpo_verl/lab/gpu_check.py: the prepared GPU timing script, smoke-run on CPU.

The GPU figures themselves need a GPU (README, recipes section: "not measured"); here: the script
runs end to end, its built-in equivalence check (our p = 0 sequence clip == verl's gspo formula)
holds and would catch a mismatch, and it imports nothing but torch, the standard library and
hmpo_verl's pure modules (a GPU machine may have torch but no verl).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hmpo_verl.lab import gpu_check

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "hmpo_verl" / "lab" / "gpu_check.py"


def test_smoke_run_on_cpu_writes_every_case(tmp_path):
    out = tmp_path / "report.md"
    assert gpu_check.main(["--device", "cpu", "--shapes", "2x16,3x8", "--dtypes", "fp32,bf16", "--repeats", "1",
                           "--out", str(out)]) == 0
    text = out.read_text()
    assert text.count("### ") == 4  # 2 shapes x 2 dtypes
    for label in gpu_check.CASES:
        assert text.count(f"| {label} |") == 4
    assert text.count(f"| {gpu_check.BASELINE} | ") == 4 and "| 1.00 | n/a |" in text
    assert "max |diff| of loss and grad" in text


def test_the_gspo_formula_is_verls(monkeypatch):
    """The plain-torch gspo equals verl's registered gspo (where verl is installed, as here)."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    from verl.workers.config import ActorConfig, PolicyLossConfig

    x = gpu_check.make_inputs(5, 12, torch.float64, "cpu", seed=3)
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=3e-4,
                         clip_ratio_high=4e-4, loss_agg_mode="seq-mean-token-mean",
                         policy_loss=PolicyLossConfig(loss_mode="gspo"))
    config.global_batch_info.update(dp_size=1, batch_num_tokens=int(x.mask.sum()), global_batch_size=5,
                                    loss_scale_factor=None)
    verl_gspo = core_algos.get_policy_loss_fn("gspo")
    ref_loss, ref_grad = gpu_check.forward_backward(
        lambda o, n, a, m: verl_gspo(o, n, a, m, "seq-mean-token-mean", config, None)[0], x)
    loss, grad = gpu_check.forward_backward(gpu_check.gspo_loss, x)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def test_equivalence_check_catches_a_wrong_case(monkeypatch):
    monkeypatch.setitem(gpu_check.CASES, "p=0, sequence clip (= gspo)", gpu_check.CASES["p=-1, token log-clip (HMPO)"])
    with pytest.raises(SystemExit, match="does not match the gspo formula"):
        gpu_check.run([(2, 8)], ["fp32"], 1, "cpu")


def test_imports_only_torch_stdlib_and_the_pure_modules():
    tree = ast.parse(SCRIPT.read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    third_party = {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names and m != "__future__"}
    assert third_party == {"torch", "hmpo_verl.means", "hmpo_verl.surrogate"}, third_party


def test_runs_where_verl_is_not_installed():
    blocked = "import sys; sys.modules['verl'] = None; "
    probe = subprocess.run([sys.executable, "-c", blocked + "import hmpo_verl.means, hmpo_verl.surrogate"],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
    assert probe.returncode == 0, probe.stderr
    run = subprocess.run([sys.executable, "-c", blocked + "from hmpo_verl.lab.gpu_check import main; "
                          "main(['--device', 'cpu', '--shapes', '2x8', '--dtypes', 'fp32', '--repeats', '1'])"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
