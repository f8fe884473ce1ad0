"""The real rollout-vs-trainer mismatch of vLLM on CPU: vLLM's log-probs against the fp32 trainer's.

    python -m hmpo_verl.lab.vllm_mismatch [--task fibonacci] [--prompts 64] [--n 8] [--dtypes bfloat16,float32]

Needs vLLM's CPU build (``bash recipes/cpu_tiny/setup_and_run.sh --vllm``). For each vLLM dtype, vLLM
(the engine verl's vLLM server runs) samples ``n`` responses to each of the first ``prompts`` training
prompts of the task's vLLM variant (:func:`hmpo_verl.lab.tasks.vllm_spec`) at temperature 1, as the
recipes do, and reports each sampled token's log-prob; the fp32 HF model -- what verl's fp32 FSDP
actor computes -- recomputes them (:func:`hmpo_verl.lab.lean.token_log_probs`). Per token
``delta = log pi_trainer - log pi_vllm``; printed: sd and 99.9th percentile of ``|delta|`` over the
tokens, and the mean per-response ``log A - log H`` of the token ratios
(:func:`hmpo_verl.lab.lean.log_ratio_stats`), the quantities of the study's synthetic mismatch regimes.
``float32`` is the control: the same engine at the trainer's precision.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from hmpo_verl.lab.tasks import get_task
from hmpo_verl.lab.tasks.common import prompt_ids


def vllm_rollout(model_path: str, prompts: list[list[int]], n: int, max_tokens: int, dtype: str, seed: int):
    """``n`` responses per prompt from vLLM (temperature 1) as a :class:`hmpo_verl.lab.lean.Rollout`
    (prompts left-padded, responses right-padded), with vLLM's log-prob of each sampled token."""
    from vllm import LLM, SamplingParams

    from hmpo_verl.lab.lean import Rollout

    llm = LLM(model=model_path, dtype=dtype, enforce_eager=True, seed=seed, max_model_len=max(map(len, prompts)) + max_tokens)
    params = SamplingParams(n=n, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=max_tokens, logprobs=0, seed=seed)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    rows = [(prompt, list(c.token_ids), [c.logprobs[t][tok].logprob for t, tok in enumerate(c.token_ids)])
            for prompt, out in zip(prompts, outputs, strict=True) for c in out.outputs]
    width, length = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    pad = lambda xs, w, v, left=False: ([v] * (w - len(xs)) + xs) if left else (xs + [v] * (w - len(xs)))  # noqa: E731
    return Rollout(
        prompt_ids=torch.tensor([pad(p, width, 0, left=True) for p, _, _ in rows]),
        prompt_mask=torch.tensor([pad([1] * len(p), width, 0, left=True) for p, _, _ in rows]),
        response_ids=torch.tensor([pad(t, length, 0) for _, t, _ in rows]),
        response_mask=torch.tensor([pad([True] * len(t), length, False) for _, t, _ in rows]),
        rollout_log_probs=torch.tensor([pad(lp, length, 0.0) for _, _, lp in rows], dtype=torch.float32),
    )


def measure(task_name: str, n_prompts: int, n: int, dtype: str, seed: int = 0) -> dict:
    """delta = log pi_fp32 - log pi_vllm(dtype) on vLLM's own samples: :func:`~hmpo_verl.lab.lean.log_ratio_stats`."""
    import pandas as pd
    from transformers import AutoTokenizer

    from hmpo_verl.lab.lean import load_model, log_ratio_stats, token_log_probs

    task = get_task(task_name)
    assets = task.prepare_assets(rollout="vllm", log=None)
    tokenizer = AutoTokenizer.from_pretrained(assets.model)
    rows = pd.read_parquet(assets.train_parquet).head(n_prompts)
    prompts = [prompt_ids(tokenizer, r[0]["content"]) for r in rows["prompt"]]
    max_tokens = len(tokenizer(rows["reward_model"].iloc[0]["ground_truth"], add_special_tokens=False)["input_ids"]) + 1
    rollout = vllm_rollout(str(assets.model), prompts, n, max_tokens, dtype, seed)
    with torch.no_grad():
        trainer = token_log_probs(load_model(str(assets.model)), rollout)
    delta = torch.where(rollout.response_mask, trainer - rollout.rollout_log_probs, 0.0)
    return {"task": task_name, "vllm_dtype": dtype, "responses": int(rollout.response_mask.shape[0]),
            "tokens": int(rollout.response_mask.sum()), **log_ratio_stats(delta, rollout.response_mask)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="fibonacci")
    parser.add_argument("--prompts", type=int, default=64, help="training prompts (default 64)")
    parser.add_argument("--n", type=int, default=8, help="responses per prompt (default 8, the recipes' group)")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="vLLM dtypes, comma-separated")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    results = [measure(args.task, args.prompts, args.n, dtype) for dtype in args.dtypes.split(",")]
    print("| task | vLLM dtype | responses | tokens | delta sd | 99.9th pct abs delta | log_ah_gap |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['task']} | {r['vllm_dtype']} | {r['responses']} | {r['tokens']} | {r['delta_sd']:.3g} | "
              f"{r['delta_abs_p999']:.3g} | {r['log_ah_gap']:.3g} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":  # vLLM starts its engine in a spawned process: the guard is required
    raise SystemExit(main())
