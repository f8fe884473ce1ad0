"""A tiny Qwen3-MoE on the Fibonacci task, and routing replay (the study's MoE regimes).

Why MoE: GSPO (arXiv 2507.18071) motivates its sequence ratio by Mixture-of-Experts RL,
where the rollout engine (bf16) and the trainer (fp32) route some tokens to different
experts -- a top-k boundary that nearly ties flips -- so a few tokens' log-probs differ a
lot between the two (a heavy-tailed mismatch), and routing replay (the trainer reusing the
rollout's expert choices; verl's ``router_replay`` R3 / ``enable_rollout_routing_replay``)
is the usual remedy. Here the same happens at small scale:

* :func:`prepare` builds the Fibonacci task with a :class:`~hmpo_verl.lab.tasks.common.MoeModelSpec`
  model (8 experts, top-2, softmax router renormalised over the chosen two: Qwen3-MoE with
  ``norm_topk_prob``), warm-started exactly as the dense model (same data, supervised fit,
  softened output layer), under ``outputs/fibonacci_moe_task`` by default;
* :class:`RouteRecorder` records, layer by layer, the experts each token was sent to in a
  forward pass (the bf16 sampler's, during KV-cached decoding);
* :class:`RouteReplay` makes the trainer's forward use recorded experts: the gate weights
  are still the trainer's own (softmax of its fp32 router logits at the replayed experts,
  renormalised), so the router keeps its gradient -- as verl's R3 replay.

Both work by forward hooks on the routers (``Qwen3MoeTopKRouter``, whose output is
``(router_logits, router_scores, router_indices)``, each over the flattened tokens).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hmpo_verl.lab.tasks.common import MoeModelSpec, TaskPaths

MOE_SPEC = MoeModelSpec(max_position_embeddings=128)
ASSETS_DIR = "outputs/fibonacci_moe_task"
# the study v4's gap regimes (lean.REGIMES ``moe16_top1``, ``moe32_top1``): top-1 of many experts, v3's width
GAP_SPECS = {f"moe{e}": MoeModelSpec(max_position_embeddings=128, num_experts=e, experts_per_token=1) for e in (16, 32)}


def prepare(out_dir: str | os.PathLike, log=print) -> TaskPaths:
    """Build (once) the Fibonacci task with the MoE model under ``out_dir``."""
    from hmpo_verl.lab.tasks import fibonacci

    return fibonacci.prepare_assets(out_dir, fibonacci.FibonacciSpec(model=MOE_SPEC), log=log)


def default_assets() -> Path:
    from hmpo_verl.lab.tasks import REPO_ROOT

    return REPO_ROOT / ASSETS_DIR


def routers(model) -> list[torch.nn.Module]:
    """The model's routers, in layer order (empty for a dense model)."""
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


class RouteRecorder:
    """Context manager: records each router's chosen experts over the forward passes inside it.

    ``batch``: the batch size of every pass (the decoder's rows). After the context,
    :meth:`routes` gives per layer a `(batch, positions, top_k)` long tensor: the passes'
    tokens concatenated in order (the prefill's positions, then one per decoding step).
    """

    def __init__(self, model, batch: int):
        self.model, self.batch = model, batch
        self._calls: list[list[torch.Tensor]] = [[] for _ in routers(model)]
        self._handles = []

    def __enter__(self):
        for layer, router in enumerate(routers(self.model)):
            self._handles.append(router.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: int):
        def hook(module, args, output):
            indices = output[2]
            self._calls[layer].append(indices.detach().reshape(self.batch, -1, indices.shape[-1]))
        return hook

    def routes(self) -> list[torch.Tensor]:
        return [torch.cat(calls, 1) for calls in self._calls]


def replayed_scores(router_logits: torch.Tensor, indices: torch.Tensor, normalise: bool) -> torch.Tensor:
    """Gate weights at given experts, as the router computes them: softmax of the logits (fp32)
    gathered at ``indices`` `(N, k)`, renormalised over the k when ``normalise``; logits' dtype."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)
    scores = probs.gather(-1, indices)
    if normalise:
        scores = scores / scores.sum(-1, keepdim=True)
    return scores.to(router_logits.dtype)


class RouteReplay:
    """Context manager: the model's routers use ``routes`` (per layer `(B, L_rec, k)`) for the first
    ``L_rec`` positions of every `(B, L)` forward inside it; later positions keep their own choice.

    The positions a recording lacks are the last response token (the decoder samples it but never
    feeds it back); its output predicts nothing the loss uses.
    """

    def __init__(self, model, routes: list[torch.Tensor]):
        self.model, self.routes = model, routes
        self._handles = []

    def __enter__(self):
        for layer, router in enumerate(routers(self.model)):
            self._handles.append(router.register_forward_hook(self._hook(layer, router.norm_topk_prob)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: int, normalise: bool):
        def hook(module, args, output):
            logits, _, indices = output
            recorded = self.routes[layer]
            B, k = recorded.shape[0], indices.shape[-1]
            chosen = indices.reshape(B, -1, k).clone()
            width = min(recorded.shape[1], chosen.shape[1])
            chosen[:, :width] = recorded[:, :width]
            chosen = chosen.reshape(-1, k)
            return logits, replayed_scores(logits, chosen, normalise), chosen
        return hook


def flip_fraction(sampler_routes: list[torch.Tensor], trainer_routes: list[torch.Tensor],
                  positions: torch.Tensor) -> float:
    """Share of (layer, token) pairs at ``positions`` `(B, L)` bool whose set of experts differs between
    the two recordings (order within the top-k ignored)."""
    flips, total = 0, 0
    for a, b in zip(sampler_routes, trainer_routes, strict=True):
        width = min(a.shape[1], b.shape[1], positions.shape[1])
        same = (a[:, :width].sort(-1).values == b[:, :width].sort(-1).values).all(-1)
        mask = positions[:, :width]
        flips += int((~same & mask).sum())
        total += int(mask.sum())
    return flips / max(total, 1)
