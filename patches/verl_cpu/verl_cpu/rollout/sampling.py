"""Sampling parameters as verl sends them, and one sampling step over a batch of logits.

verl's agent loop sends ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``,
``logprobs`` (a bool) and, from some clients, ``max_tokens``/``max_new_tokens``. The
semantics follow vLLM, which verl's configs are written for:

* ``temperature == 0`` is greedy; ``top_k <= 0`` (verl's ``-1``) disables top-k;
  ``top_p >= 1`` disables nucleus sampling;
* the returned log-probability of a sampled token is taken from the *processed*
  distribution (after temperature, top-k and top-p) -- vLLM's ``processed_logprobs``,
  verl's default ``rollout.logprobs_mode``. With ``top_k=-1, top_p=1`` this equals
  ``log_softmax(logits / temperature)``, which is what verl's actor recomputes as
  ``old_log_prob``. For greedy decoding the raw ``log_softmax(logits)`` is returned.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Resolved per-request sampling parameters (hashable: requests are batched by them)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    return_logprobs: bool = True
    ignore_eos: bool = False
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def resolve_sampling_params(
    params: dict[str, Any], *, prompt_len: int, prompt_length: int, response_length: int, ignore_eos: bool = False
) -> SamplingParams:
    """Turn verl's sampling-parameter dict into :class:`SamplingParams`.

    ``max_tokens`` defaults like vLLM's server in verl: at most ``response_length`` and at
    most what is left of ``prompt_length + response_length`` after the prompt.
    """
    params = dict(params)
    max_tokens = params.pop("max_tokens", None)
    if max_tokens is None:
        max_tokens = params.pop("max_new_tokens", None)
    if max_tokens is None:
        max_tokens = min(response_length, prompt_length + response_length - prompt_len)
    repetition_penalty = float(params.pop("repetition_penalty", 1.0) or 1.0)
    if repetition_penalty != 1.0:
        raise NotImplementedError(
            f"verl_cpu's hf rollout does not implement repetition_penalty={repetition_penalty}; leave it at 1.0"
        )
    top_k = params.pop("top_k", -1)
    return SamplingParams(
        max_tokens=max(1, int(max_tokens)),
        temperature=float(params.pop("temperature", 1.0)),
        top_p=float(params.pop("top_p", 1.0)),
        top_k=-1 if top_k is None else int(top_k),
        return_logprobs=bool(params.pop("logprobs", True)),
        ignore_eos=bool(params.pop("ignore_eos", ignore_eos)),
        seed=params.pop("seed", None),
    )


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, top-k and top-p to ``logits`` of shape ``(batch, vocab)``.

    Filtered-out entries become ``-inf``; the result is in float32.
    """
    logits = logits.float() / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass of the tokens strictly before it already reaches top_p
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def row_seed(*key: Any) -> int:
    """A 63-bit seed that is a fixed function of ``key`` (ints and int sequences), in every process.

    Unlike ``hash()``, it does not depend on ``PYTHONHASHSEED``.
    """
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class RowStreams:
    """One sampling stream per row of a decode, drawn batched.

    Row ``r`` samples exactly what ``torch.multinomial(probs[r], 1, generator=generators[r])``
    would, step after step, but without one multinomial call per row and step (their call
    overhead outweighed a small model's forward: issue 27). torch's CPU multinomial of one sample
    is ``argmax(p / q)`` with ``q ~ Exp(1)`` drawn by ``exponential_`` from the generator (ATen
    ``Distributions.cpp``, the one-sample fast path), and its exponential draws are sequential:
    so each row draws the ``q`` of ``chunk_steps`` steps in one call, and every step is one
    batched division and argmax. ``tests/test_reproducible_rollout_on_cpu.py`` checks the
    equality with the row-by-row multinomial, so a torch that changes either fails loudly.

    Args:
        generators: one per row, seeded; consumed (a decode makes its own).
        chunk_steps: steps drawn ahead per call, capped so that the buffer ``(batch,
            chunk, vocab)`` holds at most ``max_elements`` numbers.
    """

    def __init__(self, generators: Sequence[torch.Generator], chunk_steps: int = 1, max_elements: int = 1 << 22):
        self.generators = list(generators)
        self.chunk_steps = max(1, int(chunk_steps))
        self.max_elements = max_elements
        self._q: Optional[torch.Tensor] = None  # (batch, chunk, vocab) exponential draws
        self._next = 0  # the chunk's step the next draw uses

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row of ``probs`` ``(batch, vocab)`` (non-negative, finite); shape ``(batch,)``."""
        if not bool((probs.amin() >= 0) & (probs.amax() < float("inf"))):  # as torch.multinomial refuses
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        if self._q is None or self._next == self._q.shape[1]:
            self._refill(probs)
        q = self._q[:, self._next]
        self._next += 1
        return torch.argmax(probs / q, dim=-1)

    def _refill(self, probs: torch.Tensor) -> None:
        batch, vocab = probs.shape
        if batch != len(self.generators):
            raise ValueError(f"RowStreams: {batch} rows of probabilities for {len(self.generators)} streams")
        if self._q is None:
            chunk = max(1, min(self.chunk_steps, self.max_elements // (batch * vocab)))
            self._q = torch.empty(batch, chunk, vocab, dtype=probs.dtype)
        for row, generator in zip(self._q, self.generators, strict=True):
            row.exponential_(1, generator=generator)
        self._next = 0


def sample_step(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: Union[None, torch.Generator, RowStreams, Sequence[torch.Generator]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token for each row of ``logits`` ``(batch, vocab)``.

    ``generator``: one stream for the whole batch, or one stream per row (:class:`RowStreams`,
    or a sequence of generators for one step): a row's token then depends on its own stream
    only, not on the rows batched with it. Returns ``(token_ids, log_probs)``, both ``(batch,)``.
    """
    if params.greedy:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        tokens = torch.argmax(log_probs, dim=-1)
    else:
        log_probs = torch.log_softmax(process_logits(logits, params), dim=-1)
        probs = log_probs.exp()
        if isinstance(generator, Sequence):
            generator = RowStreams(generator)
        if isinstance(generator, RowStreams):
            tokens = generator.draw(probs)
        else:
            tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    return tokens, log_probs.gather(-1, tokens[:, None]).squeeze(-1)
