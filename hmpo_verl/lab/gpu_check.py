"""GPU check of the pure maths: our surrogate against verl's `gspo` formula, timed on one device.

    python -m hmpo_verl.lab.gpu_check                                  # cuda: 8x32768 and 256x4096, fp32 and bf16
    python -m hmpo_verl.lab.gpu_check --device cpu --shapes 4x64 --repeats 1   # a smoke run anywhere

Needs torch and hmpo_verl's pure modules only (hmpo_verl.means, hmpo_verl.surrogate): a GPU
machine may have torch but not verl, so verl's `gspo` loss is written out below in plain torch,
term for term as verl 0.9.1's `compute_policy_loss_gspo` (core_algos.py). Every case is
forward + backward of one (B, T) batch: log-ratios ~ N(0, 0.05^2) (the vLLM / bf16-trainer
mismatch, DESIGN.md section 3), ragged lengths T/4..T, one advantage per response, aggregated
seq-mean-token-mean by the same plain-torch function for every case.

Printed per shape and dtype: the median wall time over --repeats (after 2 warm-up calls; CUDA
synchronised), its ratio to gspo's in the same run, and on CUDA the peak memory allocated during
forward + backward over gspo's. Before timing, our p = 0 sequence-clip case is checked against the
gspo formula (loss and gradient, float64 on the same device): it must be the same computation.
Ratios are what to compare across machines; absolute times depend on the GPU and its clocks.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from hmpo_verl.means import agm_weights_and_shares, mean_weights_and_shares
from hmpo_verl.surrogate import TrustRegion, surrogate_loss_matrix, surrogate_terms

GSPO_EPS = (3e-4, 4e-4)  # GSPO's / verl's gspo_trainer clip range (sequence level)
GMPO_LOG_EPS = 0.4  # GMPO's log-space token clip (recipes' harmonic / geometric_token / agm files)


def seq_mean_token_mean(loss_mat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's `agg_loss` mode seq-mean-token-mean on one rank: mean over rows of each row's token mean."""
    per_row = (loss_mat * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_row.mean()


def gspo_loss(old_log_prob, log_prob, advantages, mask, eps=GSPO_EPS):
    """verl 0.9.1's compute_policy_loss_gspo, in plain torch (no rollout IS weights)."""
    negative_approx_kl = log_prob - old_log_prob
    seq_lengths = torch.sum(mask, dim=-1).clamp(min=1)
    negative_approx_kl_seq = torch.sum(negative_approx_kl * mask, dim=-1) / seq_lengths
    log_seq_ratio = log_prob - log_prob.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
    seq_ratio = torch.exp(torch.clamp(log_seq_ratio, max=10.0))
    losses1 = -advantages * seq_ratio
    losses2 = -advantages * torch.clamp(seq_ratio, 1 - eps[0], 1 + eps[1])
    return seq_mean_token_mean(torch.maximum(losses1, losses2), mask)


def ours(aggregate: Callable, region: TrustRegion):
    """Our registered losses' maths without verl: surrogate_terms -> loss matrix -> aggregation."""

    def loss(old_log_prob, log_prob, advantages, mask):
        terms = surrogate_terms(log_prob, old_log_prob, advantages, mask, aggregate, region)
        return seq_mean_token_mean(surrogate_loss_matrix(log_prob, terms), mask)

    return loss


def _power(p: float) -> Callable:
    return lambda delta, rows, clipped: mean_weights_and_shares(delta, p, rows)


def _agm(delta, rows, clipped):
    return agm_weights_and_shares(delta, rows, None)


TOKEN_LOG = TrustRegion.from_eps("token", "log", GMPO_LOG_EPS, GMPO_LOG_EPS)
CASES: dict[str, Callable] = {
    "verl gspo (plain torch)": gspo_loss,
    "p=0, sequence clip (= gspo)": ours(_power(0.0), TrustRegion.from_eps("sequence", "ratio", *GSPO_EPS)),
    "p=0, token log-clip (GMPO)": ours(_power(0.0), TOKEN_LOG),
    "p=-1, token log-clip (HMPO)": ours(_power(-1.0), TOKEN_LOG),
    "p=-2, token log-clip": ours(_power(-2.0), TOKEN_LOG),
    "AGM sqrt(A*H), token log-clip": ours(_agm, TOKEN_LOG),
}
BASELINE = "verl gspo (plain torch)"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


@dataclass
class Inputs:
    old: torch.Tensor
    new: torch.Tensor
    adv: torch.Tensor
    mask: torch.Tensor


def make_inputs(batch: int, length: int, dtype: torch.dtype, device: str, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=g) * 3
    new = old + 0.05 * torch.randn(batch, length, generator=g)
    lengths = torch.randint(max(1, length // 4), length + 1, (batch,), generator=g)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    adv = torch.randn(batch, 1, generator=g).expand(batch, length).contiguous()
    return Inputs(old.to(device, dtype), new.to(device, dtype), adv.to(device, dtype), mask.to(device))


def forward_backward(loss_fn: Callable, x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    log_prob = x.new.clone().requires_grad_()
    loss = loss_fn(x.old, log_prob, x.adv, x.mask)
    loss.backward()
    return loss.detach(), log_prob.grad


def check_equivalence(device: str) -> float:
    """Largest |difference| of loss and gradient between our p = 0 sequence clip and gspo (float64)."""
    x = make_inputs(16, 256, torch.float64, device, seed=1)
    ref_loss, ref_grad = forward_backward(gspo_loss, x)
    loss, grad = forward_backward(CASES["p=0, sequence clip (= gspo)"], x)
    return max(float((loss - ref_loss).abs()), float((grad - ref_grad).abs().max()))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_case(loss_fn: Callable, x: Inputs, repeats: int, device: str) -> tuple[float, int | None]:
    """(median seconds of forward + backward, peak bytes allocated on CUDA or None)."""
    for _ in range(2):
        forward_backward(loss_fn, x)
    _sync(device)
    peak = None
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        forward_backward(loss_fn, x)
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        forward_backward(loss_fn, x)
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak


def run(shapes, dtypes, repeats: int, device: str) -> list[str]:
    """The report as markdown lines (also printed as it goes)."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu"
    lines = [
        f"command: python -m hmpo_verl.lab.gpu_check {' '.join(sys.argv[1:])}".rstrip(),
        f"device: {device} ({name}); torch {torch.__version__}; repeats {repeats} (median)",
    ]
    diff = check_equivalence(device)
    lines.append(f"check: p=0 sequence clip vs verl gspo formula, float64, max |diff| of loss and grad = {diff:.2e}")
    if not diff < 1e-10:
        raise SystemExit("\n".join(lines) + "\nour p=0 sequence-clip loss does not match the gspo formula")
    print("\n".join(lines), flush=True)
    for batch, length in shapes:
        for dtype_name in dtypes:
            x = make_inputs(batch, length, DTYPES[dtype_name], device)
            block = ["", f"### {batch} x {length}, {dtype_name}", "",
                     "| case | median ms | x gspo | peak MiB over gspo |", "|---|---|---|---|"]
            results = {label: time_case(fn, x, repeats, device) for label, fn in CASES.items()}
            base_t, base_peak = results[BASELINE]
            for label, (t, peak) in results.items():
                extra = "n/a" if peak is None else f"{(peak - base_peak) / 2**20:+.1f}"
                block.append(f"| {label} | {t * 1e3:.2f} | {t / base_t:.2f} | {extra} |")
            print("\n".join(block), flush=True)
            lines += block
            del x
    return lines


def _shape(text: str) -> tuple[int, int]:
    batch, length = text.lower().split("x")
    return int(batch), int(length)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--shapes", default="8x32768,256x4096", help="comma-separated BxT")
    parser.add_argument("--dtypes", default="bf16,fp32", help=f"comma-separated, of {sorted(DTYPES)}")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", help="also write the report (markdown) to this file")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device (use --device cpu)")
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"--dtypes {unknown}: allowed {sorted(DTYPES)}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    lines = run([_shape(s) for s in args.shapes.split(",")], dtypes, args.repeats, args.device)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
