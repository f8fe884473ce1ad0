"""Speed and memory of our losses against verl's built-ins, measured in the same run.

    python -m hmpo_verl.lab.bench                      # 256x4096 and 32x32768, fp32 and bf16, long and ragged
    python -m hmpo_verl.lab.bench --shapes 64x1024 --repeats 5 --device cuda --inputs ragged
    python -m hmpo_verl.lab.bench --rollout [--task NAME] [--repeats N]   # rollout cost: hmpo_verl.lab.rollout_bench
    python -m hmpo_verl.lab.bench --fidelity [--resamples N]            # gradient fidelity: hmpo_verl.lab.fidelity

For each shape, dtype and kind of inputs, every loss runs forward + backward on identical
tensors (log-ratios ~ N(0, 0.05^2) as measured between vLLM and a bf16 trainer, DESIGN.md
section 3; one advantage per response), of two kinds: "long" (response lengths uniform in
[T/4, T], old log-probs -U(0, 3)) and "ragged" (lengths uniform in [1, T], old log-probs
N(-2, 1): issue 22's case, half the batch padding). Reported per loss: the median wall time
over repeats, its ratio to verl's `gspo` measured in the same run, the same ratio of the
median process CPU time (less sensitive to other work on a shared machine: time spent waiting
for a core is not counted), the peak memory allocated during forward + backward (CUDA:
`max_memory_allocated`; CPU: torch's MemTracker), and the peak in excess of gspo's, in units
of one (B, T) float32 tensor. Targets: hmpo / power_mean <= 1.0x gspo time, agm <= 1.2x, adaptive_power_mean
(ESS rule) <= 1.5x; at most one extra (B, T) float tensor of peak memory. The ESS rule is
timed twice: with its default bounds (on these log-ratios most trajectories stop at the
bound p_min = -2 or p_max = 1 after one exact ESS evaluation) and with bounds +-20 ("adaptive (+-20)"), where
every trajectory's p is solved inside the bounds (|p| ~ 2).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.workers.config import ActorConfig, PolicyLossConfig

import hmpo_verl.verl_plugin  # noqa: F401  (registers the losses)
from hmpo_verl.config import AdaptivePowerMeanLossConfig, PowerMeanLossConfig


@dataclass(frozen=True)
class Case:
    label: str
    loss_mode: str
    policy_loss: PolicyLossConfig


CASES = [
    Case("gspo", "gspo", PolicyLossConfig(loss_mode="gspo")),
    Case("geo_mean", "geo_mean", PolicyLossConfig(loss_mode="geo_mean")),
    Case("vanilla", "vanilla", PolicyLossConfig(loss_mode="vanilla")),
    Case("hmpo", "hmpo", PolicyLossConfig(loss_mode="hmpo")),
    Case("power_mean p=0.5", "power_mean", PowerMeanLossConfig(power=0.5)),
    Case("power_mean p=-2", "power_mean", PowerMeanLossConfig(power=-2.0)),
    Case("agm", "agm", PowerMeanLossConfig(loss_mode="agm")),
    Case("adaptive (ess)", "adaptive_power_mean", AdaptivePowerMeanLossConfig()),
    Case("adaptive (+-20)", "adaptive_power_mean", AdaptivePowerMeanLossConfig(p_min=-20.0, p_max=20.0)),
]
TIME_TARGETS = {"hmpo": 1.0, "power_mean p=0.5": 1.0, "power_mean p=-2": 1.0, "agm": 1.2, "adaptive (ess)": 1.5,
                "adaptive (+-20)": 1.5}


INPUTS = ("long", "ragged")


def make_inputs(batch: int, length: int, dtype: torch.dtype, device: str, seed: int = 0, kind: str = "long"):
    """(old_log_prob, log_prob, advantages, mask) of one `kind` of batch (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "long":
        old = -torch.rand(batch, length, generator=g) * 3
        lengths = torch.randint(length // 4, length + 1, (batch,), generator=g)
    elif kind == "ragged":
        old = -2.0 + torch.randn(batch, length, generator=g)
        lengths = torch.randint(1, length + 1, (batch,), generator=g)
    else:
        raise ValueError(f"inputs={kind!r}; allowed: {', '.join(INPUTS)}")
    log_prob = old + 0.05 * torch.randn(batch, length, generator=g)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    adv = torch.randn(batch, 1, generator=g).expand(batch, length).contiguous()
    return old.to(device, dtype), log_prob.to(device, dtype), adv.to(device, dtype), mask.to(device)


def _actor_config(policy_loss: PolicyLossConfig) -> ActorConfig:
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, policy_loss=policy_loss)


def _step(case: Case, config: ActorConfig, inputs, agg: str):
    old, log_prob, adv, mask = inputs
    leaf = log_prob.detach().requires_grad_()
    loss, _ = get_policy_loss_fn(case.loss_mode)(old, leaf, adv, mask, agg, config, None)
    loss.backward()
    return leaf


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_cases(cases, inputs, agg: str, repeats: int, device: str) -> tuple[list[float], list[float]]:
    """Median fwd+bwd wall time and process CPU time per case; repeats are interleaved round-robin
    across cases so that background load on the machine affects every case alike."""
    configs = [_actor_config(case.policy_loss) for case in cases]
    for case, config in zip(cases, configs):
        for _ in range(2):
            _step(case, config, inputs, agg)
    wall, cpu = [[] for _ in cases], [[] for _ in cases]
    for _ in range(repeats):
        for i, (case, config) in enumerate(zip(cases, configs)):
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            _step(case, config, inputs, agg)
            _sync(device)
            wall[i].append(time.perf_counter() - start)
            cpu[i].append(time.process_time() - start_cpu)
    return [statistics.median(t) for t in wall], [statistics.median(t) for t in cpu]


def peak_bytes(case: Case, inputs, agg: str, device: str) -> int:
    """Peak bytes allocated by forward + backward, beyond the inputs."""
    config = _actor_config(case.policy_loss)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(case, config, inputs, agg)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    with tracker:
        _step(case, config, inputs, agg)
    return tracker.get_tracker_snapshot("peak")[torch.device(device)]["Total"]


def run(shapes, dtypes, repeats: int, device: str, agg: str, kinds=INPUTS) -> bool:
    torch.manual_seed(0)
    all_met = True
    print(f"device={device} threads={torch.get_num_threads()} agg={agg} repeats={repeats} torch={torch.__version__}")
    for batch, length in shapes:
        for kind in kinds:
            for dtype in dtypes:
                inputs = make_inputs(batch, length, dtype, device, kind=kind)
                bt_bytes = batch * length * 4
                times, cpu = time_cases(CASES, inputs, agg, repeats, device)
                peaks = [peak_bytes(case, inputs, agg, device) for case in CASES]
                base_t, base_c, base_m = times[0], cpu[0], peaks[0]
                print(f"\n{batch}x{length} {str(dtype).replace('torch.', '')} {kind}")
                print(f"  {'loss':<18}{'time ms':>10}{'x gspo':>9}{'cpu x gspo':>12}{'peak MiB':>11}"
                      f"{'extra (B,T) f32':>17}  target")
                for case, t, c, m in zip(CASES, times, cpu, peaks):
                    target = TIME_TARGETS.get(case.label)
                    extra = (m - base_m) / bt_bytes
                    met = target is None or (t / base_t <= target and extra <= 1.0)
                    all_met &= met
                    flag = "" if target is None else (f"<= {target:.1f}x, <= 1  " + ("ok" if met else "MISSED"))
                    print(f"  {case.label:<18}{t * 1e3:>10.2f}{t / base_t:>9.2f}{c / base_c:>12.2f}"
                          f"{m / 2**20:>11.1f}{extra:>17.2f}  {flag}")
    return all_met


def _shape(text: str):
    b, t = text.lower().split("x")
    return int(b), int(t)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own = argv[: argv.index("--")] if "--" in argv else argv
    # two other benchmarks, each with its own options
    if "--rollout" in own:
        from hmpo_verl.lab import rollout_bench

        argv.remove("--rollout")
        return rollout_bench.main(argv)
    if "--fidelity" in own:
        from hmpo_verl.lab import fidelity

        argv.remove("--fidelity")
        return fidelity.main(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollout", action="store_true", help="rollout vs model.generate instead (see rollout_bench --help)")
    parser.add_argument("--fidelity", action="store_true", help="the gradient-fidelity benchmark instead (see --fidelity --help)")
    parser.add_argument("--shapes", nargs="+", type=_shape, default=[(256, 4096), (32, 32768)])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=INPUTS,
                        help="long: lengths T/4..T; ragged: lengths 1..T, old log-probs N(-2, 1) (issue 22)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--agg", default="token-mean")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    met = run(args.shapes, [getattr(torch, d) for d in args.dtypes], args.repeats, args.device, args.agg, args.inputs)
    print("\nall targets met" if met else "\nsome targets MISSED")


if __name__ == "__main__":
    sys.exit(main())
