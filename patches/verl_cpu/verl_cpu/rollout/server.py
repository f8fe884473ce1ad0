"""An HF-transformers token-in/token-out rollout server (one Ray actor per replica).

It plays the part vLLM's ``vLLMHttpServer`` plays in verl: verl's
``LLMServerClient`` calls :meth:`HFRolloutServer.generate` with prompt token ids and
sampling parameters and gets a ``TokenOutput`` (response token ids + log-probs) back;
the trainer's weight sync calls :meth:`HFRolloutServer.update_weights_from_tensors`.

Concurrency: the agent loop sends one request per sample, concurrently. Requests are
queued; a batcher task takes them until none arrived for ``batch_wait_s`` (up to
``max_batch_size``), groups them by sampling parameters and runs each group as **one**
batched, KV-cached decode in a worker thread, so requests are batched rather than served
one after another.

Weight updates are atomic with respect to decoding: the buckets of one update are staged
and copied into the model together, under the lock every decode holds from its first to
its last token, so no decode ever mixes two weight versions; each response reports the
version (``global_steps``) it was decoded with.

Partial rollout (verl's fully-async trainer), as verl's vLLM server: :meth:`abort_all_requests`
closes the gate and stops the running decode after its next token; its unfinished responses
return what they have with ``stop_reason="aborted"`` (verl's ``FullyAsyncLLMServerClient``
resends prompt + partial response after the weight sync). Requests still queued have no
token yet and are not aborted: like those that arrive while the gate is closed, they wait for
:meth:`resume_generation` and run on the new weights (with ``reject_request=True`` new ones
return ``aborted`` at once).

Diagnostics: :meth:`stats` reports request and batch counts, timers (seconds decoding,
the requests' summed wait for their decode, decode steps, seconds loading weights, the
wall-clock times of the last arrival and of the last result: ``bench --rollout`` splits a
rollout with them), the weight version (``global_steps``) and a weight checksum; with
``VERL_CPU_ROLLOUT_TRACE=<file>`` every weight load and every decoded batch is appended
there as a JSON line (used by tests). ``VERL_CPU_ROLLOUT_THREADS=<n>`` sets the server's
torch threads (Ray gives an actor without CPUs one).

Training-inference mismatch, real and simulated:

* ``VERL_CPU_ROLLOUT_DTYPE=bfloat16`` (default ``float32``) keeps the server's copy of the
  weights in bf16, so it samples and reports log-probs (log-softmax of its bf16 logits, in
  fp32) as a bf16 engine does while the FSDP trainer computes in fp32;
* ``VERL_CPU_LOGPROB_NOISE_STD=<sd>``: the *reported* log-probs (not the sampling) carry
  independent N(0, sd^2) noise, drawn from their own stream seeded with rollout.seed (sd of
  the log-ratio ~ 0.05 between vLLM and a bf16 trainer for Qwen2.5-0.5B);
  ``VERL_CPU_LOGPROB_NOISE_SPIKE_STD=<s>`` with ``VERL_CPU_LOGPROB_NOISE_SPIKE_RATE=<q>``
  make it Tukey's contaminated normal: each token's noise is N(0, s^2) with probability q
  instead (most tokens tiny, a few large);
* ``VERL_CPU_LOGPROB_NAN_AT_VERSION=<k>`` (fault injection): the reported log-prob of the first
  token of every response generated with the weights of ``global_steps`` k is NaN -- the
  poisoned batch of a broken engine (used by ``hmpo_verl.lab.crash``).

Reproducible sampling: with verl's ``rollout.full_determinism=true`` each request draws from
its own stream, seeded with rollout.seed, the replica, the weight version (``global_steps``),
the request id (verl's ``det-<priority>``: the prompt's position in its batch, with
``verl_cpu.agent_loop``'s manager), the prompt, and how many requests with the same id and
prompt arrived before it at that version (the n samples of a group). Its tokens then depend
neither on how requests happen to be batched nor on what the server generated before, so a
run resumed from a checkpoint samples what the uninterrupted run sampled. Which of a group's
n requests gets which of its n streams still follows their arrival order.

With ``algorithm.rollout_correction.bypass_mode=true`` the reported log-probs become the
behaviour policy. Used by the comparative study (``hmpo_verl.lab.study``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from verl_cpu.rollout.sampling import RowStreams, SamplingParams, resolve_sampling_params, row_seed, sample_step

logger = logging.getLogger(__name__)
TRACE_ENV = "VERL_CPU_ROLLOUT_TRACE"
NOISE_ENV = "VERL_CPU_LOGPROB_NOISE_STD"
SPIKE_STD_ENV = "VERL_CPU_LOGPROB_NOISE_SPIKE_STD"
SPIKE_RATE_ENV = "VERL_CPU_LOGPROB_NOISE_SPIKE_RATE"
DTYPE_ENV = "VERL_CPU_ROLLOUT_DTYPE"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
THREADS_ENV = "VERL_CPU_ROLLOUT_THREADS"
NAN_AT_VERSION_ENV = "VERL_CPU_LOGPROB_NAN_AT_VERSION"


ABORTED, COMPLETED = "aborted", "completed"


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    future: asyncio.Future = field(repr=False)
    request_id: str = ""
    seed: Optional[int] = None  # its own sampling stream (rollout.full_determinism)
    queued_at: float = field(default_factory=time.time)  # wall clock: comparable across processes


@dataclass(frozen=True)
class _Result:
    """One response: tokens, their log-probs, why it stopped, and the weight version that decoded it."""

    token_ids: list[int]
    log_probs: list[float]
    stop_reason: str = COMPLETED
    global_steps: Optional[int] = None


def weights_checksum(model: torch.nn.Module) -> float:
    """A cheap fingerprint of the weights: sum over parameters of sum(|w|) (float64)."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum().item() for p in model.parameters()))


def _eos_token_ids(model_config, model) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model_config, "generation_config", None)):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    tokenizer = getattr(model_config, "tokenizer", None)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class HFRolloutServer:
    """Token-in/token-out generation with a Hugging Face causal LM on CPU.

    Args:
        config: verl ``RolloutConfig`` (dataclass or DictConfig).
        model_config: verl ``HFModelConfig`` (dataclass or DictConfig) of the actor model.
        replica_rank: index of the rollout replica this server belongs to.
        max_batch_size: most requests decoded together (defaults to ``config.max_num_seqs``).
        batch_wait_s: a batch is closed when no further request arrived for this long (seconds).
    """

    def __init__(
        self,
        config,
        model_config,
        replica_rank: int = 0,
        max_batch_size: Optional[int] = None,
        batch_wait_s: float = 0.02,
    ):
        from transformers import AutoModelForCausalLM
        from verl.utils.config import omega_conf_to_dataclass

        self.config = omega_conf_to_dataclass(config)
        self.model_config = omega_conf_to_dataclass(model_config)
        self.replica_rank = replica_rank
        self.max_batch_size = int(max_batch_size or self.config.max_num_seqs)
        self.batch_wait_s = batch_wait_s
        if os.environ.get(THREADS_ENV):
            torch.set_num_threads(int(os.environ[THREADS_ENV]))
        dtype = os.environ.get(DTYPE_ENV) or "float32"
        if dtype not in DTYPES:
            raise ValueError(f"{DTYPE_ENV}={dtype!r} is invalid; allowed: {', '.join(DTYPES)}")
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_config.local_path,
            dtype=DTYPES[dtype],
            attn_implementation="sdpa",
            trust_remote_code=self.model_config.trust_remote_code,
        ).eval()
        self.pad_token_id = self._pad_token_id()
        self.eos_token_ids = _eos_token_ids(self.model_config, self.model)
        self._eos_tensor = torch.tensor(sorted(self.eos_token_ids), dtype=torch.long)
        self.global_steps: Optional[int] = None
        self.asleep = False
        # one sampling stream per server, seeded with rollout.seed; which request gets which
        # draws still depends on how concurrent requests happen to be batched
        self._generator = torch.Generator().manual_seed(int(self.config.seed) + replica_rank)
        self._noise_std = float(os.environ.get(NOISE_ENV) or 0.0)
        self._spike_std = float(os.environ.get(SPIKE_STD_ENV) or 0.0)
        self._spike_rate = float(os.environ.get(SPIKE_RATE_ENV) or 0.0)
        if not 0.0 <= self._spike_rate <= 1.0 or self._noise_std < 0 or self._spike_std < 0:
            raise ValueError(f"{NOISE_ENV} and {SPIKE_STD_ENV} must be >= 0 and {SPIKE_RATE_ENV} in [0, 1]; got "
                             f"{self._noise_std}, {self._spike_std}, {self._spike_rate}")
        self._noise_generator = torch.Generator().manual_seed(10_000 + int(self.config.seed) + replica_rank)
        nan_at = os.environ.get(NAN_AT_VERSION_ENV) or None
        self._nan_at_version = int(nan_at) if nan_at is not None else None
        self._arrivals: Counter = Counter()  # (weight version, request id, prompt) -> requests (full_determinism)
        self._loop: Optional[asyncio.AbstractEventLoop] = None  # queue, lock, event and batcher belong to it
        self._request_counter = itertools.count()
        self._queue: Optional[asyncio.Queue] = None
        self._batcher: Optional[asyncio.Task] = None
        self._lock: Optional[asyncio.Lock] = None  # held by a decode from first to last token, and by a weight load
        self._resume: Optional[asyncio.Event] = None  # set while the gate is open
        self._staged: dict[str, torch.Tensor] = {}  # buckets of the weight update under way
        self._stop_decoding = threading.Event()  # abort: the running decode stops at its next token
        self._paused = False  # the gate, closed by abort_all_requests until resume_generation
        self._rejecting = False
        self._in_flight: set[str] = set()  # requests received and not yet answered
        self._decoding = 0  # decodes running in the worker thread
        self._aborted_ids: list[str] = []  # requests the running decode returned as aborted
        self._stats = {
            "requests": 0,
            "batches": 0,
            "max_batch": 0,
            "weight_loads": 0,
            "aborted": 0,  # responses returned with stop_reason="aborted"
            "decode_s": 0.0,  # wall time inside batched decodes
            "queue_s": 0.0,  # summed over requests: enqueue -> start of their decode
            "new_tokens": 0,  # decode steps summed over batches
            "weight_load_s": 0.0,
            "last_arrival": None,  # time.time() of the latest request's arrival
            "last_done": None,  # time.time() when the latest batch's results were handed back
        }
        self._trace_path = os.environ.get(TRACE_ENV) or None
        self._trace("server_started", checksum=weights_checksum(self.model))

    # ------------------------------------------------------------------ generation

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Optional[list[Any]] = None,
        video_data: Optional[list[Any]] = None,
        audio_data: Optional[list[Any]] = None,
        mm_processor_kwargs: Optional[dict[str, Any]] = None,
        priority: int = 0,
        **kwargs,
    ):
        """Generate one response; the signature matches verl's vLLM server."""
        from verl.utils import normalize_token_ids

        if image_data or video_data or audio_data:
            raise NotImplementedError("verl_cpu's hf rollout is text-only")
        prompt_ids = normalize_token_ids(prompt_ids)
        params = resolve_sampling_params(
            sampling_params,
            prompt_len=len(prompt_ids),
            prompt_length=self.config.prompt_length,
            response_length=self.config.response_length,
            ignore_eos=self.config.ignore_eos,
        )
        self._bind_loop()
        if self._paused and self._rejecting:
            return self._token_output(_Result([], [], ABORTED, self.global_steps), params)
        await self._resume.wait()  # parked while a weight sync has the gate closed
        seed = (self._request_seed(request_id, prompt_ids)
                if params.seed is None and self.config.full_determinism else None)
        key = f"{request_id}#{next(self._request_counter)}"  # verl reuses a request id when it resumes one
        request = _Request(prompt_ids, params, asyncio.get_running_loop().create_future(), request_id=key, seed=seed)
        self._stats["last_arrival"] = request.queued_at
        self._in_flight.add(key)
        try:
            await self._queue.put(request)
            result = await request.future
        finally:
            self._in_flight.discard(key)
        return self._token_output(result, params)

    @staticmethod
    def _token_output(result: _Result, params: SamplingParams):
        """verl's ``TokenOutput``; ``min/max_global_steps`` as verl's fully-async client reports them."""
        from verl.workers.rollout.replica import TokenOutput

        version = result.global_steps
        return TokenOutput(
            token_ids=result.token_ids,
            log_probs=result.log_probs if params.return_logprobs else None,
            stop_reason=result.stop_reason,
            num_preempted=0,
            extra_fields={"global_steps": version, "min_global_steps": version, "max_global_steps": version},
        )

    def _request_seed(self, request_id: str, prompt_ids: list[int]) -> int:
        """The seed of a request's own sampling stream (see the module doc: reproducible sampling)."""
        key = (self.global_steps, request_id, tuple(prompt_ids))
        self._arrivals[key] += 1
        return row_seed(self.config.seed, self.replica_rank, *key, self._arrivals[key])

    def _set_weight_version(self, global_steps: Optional[int]) -> None:
        if global_steps != self.global_steps:
            self._arrivals.clear()
        self.global_steps = global_steps

    def _bind_loop(self) -> None:
        """Create the queue, lock and batcher task on the running event loop (once per loop).

        Inside Ray there is one loop for the actor's lifetime; rebinding keeps the server
        usable from plain ``asyncio.run`` calls too (tests).
        """
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._queue = asyncio.Queue()
            self._lock = asyncio.Lock()
            self._resume = asyncio.Event()
            if not self._paused:
                self._resume.set()
            self._batcher = None
        if self._batcher is None or self._batcher.done():
            self._batcher = loop.create_task(self._batch_loop())

    async def _next_batch(self) -> list[_Request]:
        """Wait for a request, then keep taking requests until none arrived for ``batch_wait_s``.

        verl's agent loop sends a step's requests one per sample, a few milliseconds apart:
        a batch closed a fixed time after its first request would hold only the first few,
        and the rest would wait for its whole decode before their own. Waiting for a quiet
        gap instead takes a step's burst in one batch (at most ``max_batch_size`` requests).
        The gap is timed from the latest arrival, so a batch closes ``batch_wait_s`` after its
        last request (a poll every ``batch_wait_s`` would close it 1-2 gaps after).
        """
        batch = [await self._queue.get()]
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            try:  # (a get cancelled by the timeout leaves its request in the queue)
                batch.append(await asyncio.wait_for(self._queue.get(), self.batch_wait_s))
            except asyncio.TimeoutError:
                break
        return batch

    async def _batch_loop(self) -> None:
        while True:
            batch = await self._next_batch()
            groups: dict[SamplingParams, list[_Request]] = {}
            for request in batch:
                groups.setdefault(request.params, []).append(request)
            for params, requests in groups.items():
                try:
                    results = await self._decode_when_open(requests, params)
                except Exception as exc:  # hand the error to every waiting caller
                    for request in requests:
                        if not request.future.done():
                            request.future.set_exception(exc)
                    continue
                self._stats["aborted"] += sum(r.stop_reason == ABORTED for r in results)
                for request, result in zip(requests, results, strict=True):
                    if not request.future.done():
                        request.future.set_result(result)
                self._stats["last_done"] = time.time()

    async def _decode_when_open(self, requests: list[_Request], params: SamplingParams) -> list[_Result]:
        """Decode the group once the gate is open, with the lock held.

        Requests that an abort finds still queued have no token yet: they are not aborted but
        wait for :meth:`resume_generation` and are decoded on the new weights (as if they
        had arrived after the sync), so no response is ever aborted empty.
        """
        while True:
            await self._resume.wait()
            async with self._lock:
                if not self._paused:  # (the gate may have closed again while we waited for the lock)
                    return await self._decode_locked(requests, params)

    async def _decode_locked(self, requests: list[_Request], params: SamplingParams) -> list[_Result]:
        """One batched decode with the lock held: one weight version, stoppable by an abort."""
        started = time.time()
        self._stats["queue_s"] += sum(started - r.queued_at for r in requests)
        version = self.global_steps
        self._decoding += 1
        try:
            rows = await asyncio.to_thread(
                self._decode, [r.prompt_ids for r in requests], params, [r.seed for r in requests]
            )
            results = [_Result(ids, lps, reason, version) for ids, lps, reason in rows]
            self._aborted_ids += [r.request_id for r, res in zip(requests, results, strict=True)
                                  if res.stop_reason == ABORTED]
            return results
        finally:
            self._decoding -= 1

    @torch.inference_mode()
    def _decode(
        self, prompts: list[list[int]], params: SamplingParams, seeds: Optional[list[Optional[int]]] = None
    ) -> list[tuple[list[int], list[float], str]]:
        """Batched, KV-cached decoding of left-padded prompts. Runs in a worker thread.

        ``seeds``: one per prompt, each row then samples from its own stream (all set or all None).
        Returns ``(token_ids, log_probs, stop_reason)`` per prompt; when an abort stops the
        decode, the rows not finished yet end with ``stop_reason="aborted"``.
        """
        from transformers import DynamicCache

        start = time.perf_counter()
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + p for p in prompts])
        prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        # the mask of the whole decode, allocated once; step t attends to its first width + t columns
        full_mask = torch.cat([prompt_mask, prompt_mask.new_ones(len(prompts), params.max_tokens)], 1)
        if seeds and seeds[0] is not None:
            generator = RowStreams([torch.Generator().manual_seed(seed) for seed in seeds], params.max_tokens)
        else:
            generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else self._generator

        cache = DynamicCache()
        step_ids, step_pos = input_ids, position_ids
        finished = torch.zeros(len(prompts), dtype=torch.bool)
        tokens, log_probs = [], []
        aborted = False
        for step in range(params.max_tokens):
            if step > 0 and self._stop_decoding.is_set():  # every aborted response has a token at least
                aborted = True
                break
            logits = self.model(
                input_ids=step_ids,
                attention_mask=full_mask[:, : width + step],
                position_ids=step_pos,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,  # the prefill needs the last position's logits only
            ).logits[:, -1]
            token, log_prob = sample_step(logits, params, generator)
            if self._noise_std > 0 or self._spike_rate > 0:  # nothing added on the decode path otherwise
                log_prob = log_prob + self._noise(log_prob.shape)
            if step == 0 and self._nan_at_version is not None and self.global_steps == self._nan_at_version:
                log_prob = torch.full_like(log_prob, float("nan"))  # fault injection: a poisoned batch
            token = torch.where(finished, torch.full_like(token, self.pad_token_id), token)
            tokens.append(token)
            log_probs.append(log_prob)
            if not params.ignore_eos:
                finished |= torch.isin(token, self._eos_tensor)
            if bool(finished.all()):
                break
            step_ids = token[:, None]
            step_pos = step_pos[:, -1:] + 1

        steps = len(tokens)
        token_rows = torch.stack(tokens, 1).tolist() if steps else [[] for _ in prompts]  # one conversion
        log_prob_rows = torch.stack(log_probs, 1).tolist() if steps else [[] for _ in prompts]
        reasons = [ABORTED if aborted and not done else COMPLETED for done in finished.tolist()]
        results = [
            (*self._trim(ids, lps, params.ignore_eos), reason)
            for ids, lps, reason in zip(token_rows, log_prob_rows, reasons, strict=True)
        ]
        seconds = time.perf_counter() - start
        self._stats["requests"] += len(prompts)
        self._stats["batches"] += 1
        self._stats["max_batch"] = max(self._stats["max_batch"], len(prompts))
        self._stats["decode_s"] += seconds
        self._stats["new_tokens"] += steps
        self._trace(
            "generate",
            batch_size=len(prompts),
            new_tokens=steps,
            aborted=aborted,
            seconds=round(seconds, 4),
            temperature=params.temperature,
        )
        return results

    def _noise(self, shape) -> torch.Tensor:
        """The simulated mismatch added to reported log-probs (call only when some is set)."""
        noise = torch.zeros(shape)
        if self._noise_std > 0:
            noise = self._noise_std * torch.randn(shape, generator=self._noise_generator)
        if self._spike_rate > 0:
            spike = self._spike_std * torch.randn(shape, generator=self._noise_generator)
            hit = torch.rand(shape, generator=self._noise_generator) < self._spike_rate
            noise = torch.where(hit, spike, noise)
        return noise

    def _trim(self, token_ids: list[int], log_probs: list[float], ignore_eos: bool):
        """One row's tokens up to and including its first EOS (all of them with ``ignore_eos``, like vLLM)."""
        if not ignore_eos:
            end = next((i + 1 for i, t in enumerate(token_ids) if t in self.eos_token_ids), len(token_ids))
            token_ids, log_probs = token_ids[:end], log_probs[:end]
        return token_ids, log_probs

    def _pad_token_id(self) -> int:
        tokenizer = getattr(self.model_config, "tokenizer", None)
        for candidate in (
            getattr(tokenizer, "pad_token_id", None),
            getattr(self.model.config, "pad_token_id", None),
            getattr(tokenizer, "eos_token_id", None),
        ):
            if candidate is not None:
                return int(candidate)
        return 0

    # ------------------------------------------------------------------ weights

    async def update_weights_from_tensors(
        self, named_tensors: list[tuple[str, torch.Tensor]], last: bool = True, global_steps: Optional[int] = None
    ) -> dict[str, Any]:
        """Receive trainer weights (HF names, full tensors) in buckets; load them all at the last.

        Buckets are staged; ``last=True`` checks that every parameter of the model was
        received, then copies them into the model in one step under the decoding lock (a
        decode never sees half an update) and records the new weight version.
        """
        self._bind_loop()
        state = self.model.state_dict()
        unknown = [name for name, _ in named_tensors if name not in state]
        if unknown:
            self._staged = {}
            raise KeyError(f"hf rollout: weights not in the rollout model: {unknown[:5]}")
        self._staged.update((name, tensor) for name, tensor in named_tensors)
        if not last:
            return {}
        staged, self._staged = self._staged, {}
        missing = self._missing_after_tying(set(dict(self.model.named_parameters()).keys()) - set(staged))
        if missing:
            raise KeyError(f"hf rollout: weight update did not include {sorted(missing)[:5]}")
        async with self._lock:
            start = time.perf_counter()
            with torch.no_grad():
                for name, tensor in staged.items():
                    state[name].copy_(tensor.to(state[name].dtype))
            self._set_weight_version(global_steps)
            self._stats["weight_load_s"] += time.perf_counter() - start
        self._stats["weight_loads"] += 1
        checksum = weights_checksum(self.model)
        self._trace("update_weights", checksum=checksum)
        return {"checksum": checksum, "global_steps": global_steps}

    def _missing_after_tying(self, missing: set[str]) -> set[str]:
        """Parameters shared with another (e.g. tied lm_head) count as received."""
        if not missing:
            return missing
        tied = set()
        params = dict(self.model.named_parameters(remove_duplicate=False))
        by_storage: dict[int, list[str]] = {}
        for name, param in params.items():
            by_storage.setdefault(param.data_ptr(), []).append(name)
        for names in by_storage.values():
            if len(names) > 1 and not set(names) <= missing:
                tied.update(names)
        return missing - tied

    # ------------------------------------------------------------------ verl's server protocol

    async def wake_up(self, tags: Optional[list[str]] = None):
        self.asleep = False

    async def sleep(self):
        # Weights stay in host memory: there is no device memory to give back.
        self.asleep = True

    async def clear_kv_cache(self):
        return None  # the KV cache lives only for one decode call

    async def release_kv_cache(self):
        return None

    async def resume_kv_cache(self):
        return None

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False):
        """Close the gate and stop the running decode: its unfinished responses return what they
        have with ``stop_reason="aborted"``.

        Returns when that decode has stopped and its callers have their answers, with the ids
        of the requests it aborted. Requests still queued have no token yet: they wait for
        :meth:`resume_generation` and are then decoded on the weights loaded meanwhile; so do
        new ones, or with ``reject_request`` they return ``aborted`` (empty) at once.
        """
        self._bind_loop()
        self._paused, self._rejecting = True, reject_request
        self._resume.clear()
        self._stop_decoding.set()
        self._aborted_ids = []
        while self._decoding:
            await asyncio.sleep(0.005)
        request_ids, self._aborted_ids = self._aborted_ids, []
        while any(key in self._in_flight for key in request_ids):  # until their callers have the answers
            await asyncio.sleep(0.005)
        self._trace("abort", aborted_count=len(request_ids))
        return {"aborted_count": len(request_ids), "request_ids": request_ids}

    async def resume_generation(self):
        """Open the gate closed by :meth:`abort_all_requests`: parked and new requests are decoded again."""
        self._bind_loop()
        self._stop_decoding.clear()
        self._paused = self._rejecting = False
        self._resume.set()

    async def wait_for_requests_to_drain(self):
        """Return when every request received so far has its result (queued, batching or decoding)."""
        while self._in_flight or self._decoding:
            await asyncio.sleep(0.01)

    async def set_global_steps(self, global_steps: int):
        self._set_weight_version(global_steps)

    async def start_profile(self, **kwargs):
        return None

    async def stop_profile(self):
        return None

    def get_rollout_config(self):
        return self.config

    async def stats(self) -> dict[str, Any]:
        """Counters, weight version and checksum (for tests and debugging)."""
        return {
            **self._stats,
            "global_steps": self.global_steps,
            "checksum": weights_checksum(self.model),
            "torch_threads": torch.get_num_threads(),
        }

    # ------------------------------------------------------------------ trace

    def _trace(self, event: str, **data) -> None:
        if not self._trace_path:
            return
        record = {
            "event": event,
            "time": time.time(),
            "replica": self.replica_rank,
            "global_steps": self.global_steps,
            **data,
        }
        with open(self._trace_path, "a") as f:
            f.write(json.dumps(record) + "\n")
