"""Pieces every CPU task shares: tokenizer, model, verl-schema parquet, warm start, caching.

A task (see :mod:`hmpo_verl.lab.tasks`) is a set of text problems ``(prompt, answer)``;
everything else is built here, on this machine, deterministically from a seed:

* **tokenizer** -- a character-level ``Qwen2Tokenizer`` (the task's characters plus the
  letters of the chat roles and a newline; one token per character) with Qwen's ChatML
  special tokens and a ChatML chat template, so verl's Qwen "continuous token" builder
  handles it like a real Qwen.
* **model** -- a small ``Qwen2ForCausalLM`` (fp32, sdpa attention), seeded.
* **data** -- verl-schema parquet rows: ``prompt`` (chat messages), ``data_source``,
  ``ability``, ``reward_model.ground_truth``, ``extra_info``.
* **warm start** -- a supervised fit on correct answers (loss on the answer tokens and
  ``<|im_end|>`` only), after which the output layer is scaled by a factor < 1: the model
  keeps its ranking of tokens but samples as if at temperature 1/factor, which leaves
  RL room to raise the reward by making the policy confident where it is right.
* **caching** -- :func:`prepare` builds the assets under a folder once and rebuilds only
  when the stored ``spec.json`` differs from the requested spec.
"""

from __future__ import annotations

import json
import os
import random
import warnings
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# the chat template needs the letters of "user", "assistant", "system" and a newline
ROLE_CHARACTERS = "\n" + "".join(sorted(set("userassistantsystem")))

# Set (to the reason, said in the error) while a study whose runs were made from the assets already built builds
# what it needs: a built folder whose spec differs from the code's then stops loud instead of being rebuilt under
# those runs (``hmpo_verl.lab.study.run.keep_built``).
KEEP_BUILT: ContextVar[str | None] = ContextVar("keep_built", default=None)

Problem = tuple[str, str]  # (user message, correct answer text)


# ----------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class TaskPaths:
    """Where a task's assets live (tokenizer files sit with each model)."""

    root: Path

    @property
    def base_model(self) -> Path:
        """The randomly initialised model, before the warm start."""
        return self.root / "model_random_init"

    @property
    def model(self) -> Path:
        """The warm-started model verl trains."""
        return self.root / "model"

    @property
    def tokenizer(self) -> Path:
        return self.model

    @property
    def train_parquet(self) -> Path:
        return self.root / "data" / "train.parquet"

    @property
    def test_parquet(self) -> Path:
        return self.root / "data" / "test.parquet"

    @property
    def spec(self) -> Path:
        return self.root / "spec.json"

    @property
    def warm_start_report(self) -> Path:
        return self.root / "warm_start.json"

    @property
    def done_marker(self) -> Path:
        return self.root / "READY"


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(characters: str):
    """A character-level ``Qwen2Tokenizer`` over ``characters`` + :data:`ROLE_CHARACTERS`.

    It is a real Qwen2 (byte-level BPE) tokenizer whose vocabulary holds only these
    characters and which has *no merges*, so every character is one token; ids follow
    the order of first appearance. (transformers 5 loads any tokenizer saved next to a
    ``qwen2`` config as ``Qwen2Tokenizer``, so a different class would not survive a reload.)
    """
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_unicode = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for ch in characters + ROLE_CHARACTERS:
        vocab.setdefault("".join(byte_to_unicode[b] for b in ch.encode()), len(vocab))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def prompt_ids(tokenizer, content: str) -> list[int]:
    """Token ids of the chat prompt for one user message, ending in ``<|im_start|>assistant\\n``."""
    messages = [{"role": "user", "content": content}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the small Qwen2 model."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 64


@dataclass(frozen=True)
class MoeModelSpec(ModelSpec):
    """A small Qwen3-MoE instead: every MLP is ``num_experts`` experts of width ``moe_intermediate_size``,
    each token routed to the top ``experts_per_token`` by a softmax router (weights renormalised over them)."""

    num_experts: int = 8
    experts_per_token: int = 2
    moe_intermediate_size: int = 64


def build_model(spec: ModelSpec, tokenizer, seed: int):
    """A randomly initialised small causal LM (fp32), seeded by ``seed``: Qwen2, or Qwen3-MoE for a
    :class:`MoeModelSpec`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if isinstance(spec, MoeModelSpec):
        config = Qwen3MoeConfig(**shape, head_dim=spec.hidden_size // spec.num_heads, num_experts=spec.num_experts,
                                num_experts_per_tok=spec.experts_per_token,
                                moe_intermediate_size=spec.moe_intermediate_size, norm_topk_prob=True)
        config._attn_implementation = "sdpa"
        model = Qwen3MoeForCausalLM(config)
    else:
        config = Qwen2Config(**shape)
        config._attn_implementation = "sdpa"
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# ----------------------------------------------------------------------------- data


def verl_row(data_source: str, ability: str, problem: Problem, split: str, index: int,
             extra: dict | None = None) -> dict:
    """One row of verl's RL parquet schema for ``problem = (user message, answer)``."""
    content, answer = problem
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": content}],
        "ability": ability,
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": split, "index": index, **(extra or {})},
    }


def write_parquet(rows: Sequence[dict], path: Path) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(list(rows)).to_parquet(path)


# ----------------------------------------------------------------------------- warm start


@dataclass(frozen=True)
class WarmStartSpec:
    """Supervised fit (AdamW, ``steps`` batches of ``batch_size`` fresh problems), then lm_head x ``soften_lm_head``."""

    steps: int = 200
    lr: float = 3e-3
    batch_size: int = 64
    soften_lm_head: float = 0.5


def sft_batch(tokenizer, problems: Sequence[Problem]):
    """Right-padded ``(input_ids, labels)``, each ``(batch, width)``; labels only on the answer and ``<|im_end|>``."""
    import torch

    rows, label_rows = [], []
    for content, answer in problems:
        prompt = prompt_ids(tokenizer, content)
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer_ids)
        label_rows.append([-100] * len(prompt) + answer_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])
    return ids, labels


def supervised_fit(
    model,
    tokenizer,
    sample: Callable[[random.Random, int], list[Problem]],
    spec: WarmStartSpec,
    seed: int,
    log=print,
) -> float:
    """``spec.steps`` AdamW steps of next-token cross-entropy on fresh problems from ``sample(rng, n)``.

    Returns the last batch's loss.
    """
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(0.0)
    every = max(1, spec.steps // 8)
    for step in range(spec.steps):
        ids, labels = sft_batch(tokenizer, sample(rng, spec.batch_size))
        logits = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if log and (step + 1) % every == 0:
            log(f"  warm start step {step + 1}/{spec.steps}: loss {loss.item():.3f}")
    model.eval()
    return float(loss.item())


def soften(model, factor: float) -> None:
    """Scale the output layer by ``factor``: logits x factor, i.e. sampling at temperature 1/factor."""
    import torch

    with torch.no_grad():
        model.lm_head.weight.mul_(factor)


def sample_answers(model, tokenizer, contents: Sequence[str], max_new_tokens: int, seed: int,
                   greedy: bool = False) -> list[str]:
    """The model's answers to ``contents`` (temperature 1 and no top-k/top-p, as the recipes sample, or greedy).

    Prompts of equal token length are generated together (no padding needed). Each answer
    is the decoded text before the first ``<|im_end|>``.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    encoded = [prompt_ids(tokenizer, c) for c in contents]
    answers: list[str] = [""] * len(contents)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    with torch.no_grad():
        for length, members in sorted(by_length.items()):
            ids = torch.tensor([encoded[i] for i in members])
            past, step_input = None, ids
            for _ in range(max_new_tokens):
                out = model(input_ids=step_input, past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[:, -1]
                if greedy:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
                ids = torch.cat([ids, nxt], dim=1)
                step_input = nxt
            for i, row in zip(members, ids[:, length:], strict=True):
                answers[i] = tokenizer.decode(row, skip_special_tokens=False).split(tokenizer.eos_token)[0]
    return answers


def accuracy(model, tokenizer, problems: Sequence[Problem], max_new_tokens: int, seed: int,
             greedy: bool = False) -> float:
    """Fraction of ``problems`` answered exactly (one sample each)."""
    answers = sample_answers(model, tokenizer, [c for c, _ in problems], max_new_tokens, seed, greedy)
    return sum(a == answer for a, (_, answer) in zip(answers, problems, strict=True)) / len(problems)


# ----------------------------------------------------------------------------- tasks on a pair of digits


def all_pairs() -> list[tuple[int, int]]:
    """The 100 ordered pairs of digits."""
    return [(a, b) for a in range(10) for b in range(10)]


def pair_dataset_rows(problem: Callable[[int, int], Problem], data_source: str, seed: int, train_repeats: int,
                      test_size: int) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows) for a task posed on a pair of digits (a, b).

    Train: all 100 pairs, each ``train_repeats`` times, shuffled with ``random.Random(seed)``;
    test: the first ``test_size`` pairs of a second shuffle of the 100 pairs.
    """
    rng = random.Random(seed)
    train_pairs = all_pairs() * train_repeats
    rng.shuffle(train_pairs)
    test_pairs = all_pairs()
    rng.shuffle(test_pairs)

    def rows(pairs, split):
        return [verl_row(data_source, "arithmetic", problem(a, b), split, i, {"a": a, "b": b})
                for i, (a, b) in enumerate(pairs)]

    return rows(train_pairs, "train"), rows(test_pairs[:test_size], "test")


FIT_MIN_GREEDY = 0.9  # a warm start whose greedy answers are right less often than this has not fit its task


@dataclass(frozen=True)
class PairTaskSpec:
    """Every knob of a task posed on a pair of digits; stored next to the assets as ``spec.json``.

    A task with settings of its own subclasses it (e.g. the Fibonacci task's ``terms``).
    """

    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    train_repeats: int = 4  # all 100 ordered pairs (a, b), each repeated this many times
    test_size: int = 32
    warm_start: WarmStartSpec = field(default_factory=WarmStartSpec)


def prepare_pair_task(name: str, out_dir: str | os.PathLike, spec: PairTaskSpec, characters: str, data_source: str,
                      problem: Callable[[int, int], Problem], answer_tokens: int, log=print) -> TaskPaths:
    """Build a pair-of-digits task's assets under ``out_dir`` unless they are there for ``spec``.

    Tokenizer over ``characters``; random-init model (saved as ``model_random_init``);
    parquet from :func:`pair_dataset_rows`; warm start: :func:`supervised_fit` on
    ``problem(a, b)`` for random digits, then :func:`soften`. ``answer_tokens`` (the longest
    answer plus ``<|im_end|>``) bounds the sampled answers of the accuracy report.
    """

    def sample_problems(rng: random.Random, n: int) -> list[Problem]:
        return [problem(rng.randrange(10), rng.randrange(10)) for _ in range(n)]

    def build(paths: TaskPaths) -> dict:
        tokenizer = build_tokenizer(characters)
        model = build_model(spec.model, tokenizer, spec.seed)
        save_pretrained(model, tokenizer, paths.base_model)
        train, test = pair_dataset_rows(problem, data_source, spec.seed, spec.train_repeats, spec.test_size)
        write_parquet(train, paths.train_parquet)
        write_parquet(test, paths.test_parquet)
        ws = spec.warm_start
        if log:
            log(f"{name} task: warm start ({ws.steps} supervised steps, then lm_head x {ws.soften_lm_head})")
        report = {"final_loss": supervised_fit(model, tokenizer, sample_problems, ws, spec.seed, log)}
        every_pair = [problem(a, b) for a, b in all_pairs()] * 4
        report["sampled_accuracy_before_soften"] = accuracy(model, tokenizer, every_pair, answer_tokens, spec.seed)
        soften(model, ws.soften_lm_head)
        report["sampled_accuracy"] = accuracy(model, tokenizer, every_pair, answer_tokens, spec.seed)
        report["greedy_accuracy"] = accuracy(model, tokenizer, every_pair[:100], answer_tokens, spec.seed, greedy=True)
        save_pretrained(model, tokenizer, paths.model)
        if log:
            log(f"{name} task: the warm-started model samples the exact answer {report['sampled_accuracy']:.2f} "
                f"of the time (greedy: {report['greedy_accuracy']:.2f})")
        if report["greedy_accuracy"] < FIT_MIN_GREEDY:
            warnings.warn(f"{name} task: the warm start's greedy answer is right for {report['greedy_accuracy']:.0%} "
                          f"of the 100 problems (< {FIT_MIN_GREEDY:.0%}): its supervised fit ({ws.steps} steps, final "
                          f"loss {report['final_loss']:.3f}) stopped short of the task's rule on this machine, so RL "
                          f"starts from a model that has not learnt it and the task's documented figures do not hold "
                          f"here; more steps (warm_start.steps of the task's Spec) fit it further "
                          f"({paths.warm_start_report})", stacklevel=2)
        return report

    return prepare(name, out_dir, spec, build, log)


# ----------------------------------------------------------------------------- caching


def prepare(name: str, out_dir: str | os.PathLike, spec, build: Callable[[TaskPaths], dict], log=print) -> TaskPaths:
    """Run ``build(paths)`` under ``out_dir`` unless assets for the same ``spec`` (a dataclass) are there.

    ``build`` writes the model(s) and parquet files and returns the warm-start report,
    stored as ``warm_start.json``. Rebuilds everything when ``spec.json`` differs from ``spec``.
    Processes that ask for the same ``out_dir`` at once (two demos, parallel test workers) take
    turns on ``<out_dir>.lock``: one builds, the others then find the assets there.
    """
    from filelock import FileLock  # (a dependency of torch)

    root = Path(out_dir).resolve()
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        return _prepare_unlocked(name, root, spec, build, log)


def _prepare_unlocked(name: str, root: Path, spec, build: Callable[[TaskPaths], dict], log) -> TaskPaths:
    import torch

    log = log or (lambda *args, **kwargs: None)
    paths = TaskPaths(root)
    if paths.done_marker.exists() and paths.spec.exists():
        if json.loads(paths.spec.read_text()) == asdict(spec):
            return paths
        if reason := KEEP_BUILT.get():
            raise SystemExit(f"{name} task: the assets in {paths.root} were built from another spec than the code's "
                             f"({paths.spec}); {reason}")
        log(f"{name} task: spec changed, rebuilding assets in {paths.root}")
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.done_marker.unlink(missing_ok=True)
    log(f"{name} task: building tokenizer, model and data in {paths.root}")
    # One thread: these models are so small that a second thread only adds synchronisation
    # (16x slower forward/backward measured on a busy 2-core machine), and a fixed thread
    # count keeps the float reductions, hence the weights, reproducible.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = build(paths)
    finally:
        torch.set_num_threads(threads)
    paths.warm_start_report.write_text(json.dumps(report, indent=2))
    paths.spec.write_text(json.dumps(asdict(spec), indent=2))
    paths.done_marker.write_text("ok\n")
    return paths


def save_pretrained(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
