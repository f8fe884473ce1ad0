"""A tiny, locally built RL task for running verl's real trainer on a CPU.

Everything is made on this machine, deterministically from a seed, with no model
or dataset hub:

* **tokenizer** -- a character-level ``Qwen2Tokenizer`` (digits, ``+``, a few letters,
  newline; one token per character) plus Qwen's ChatML special tokens and a ChatML
  chat template, so verl's Qwen "continuous token" builder handles it like a real Qwen.
* **model** -- a small ``Qwen2ForCausalLM`` (hidden 64, 2 layers, ~0.1 M parameters).
* **data** -- verl-schema parquet files: ``prompt`` (chat messages), ``data_source``,
  ``ability``, ``reward_model.ground_truth``, ``extra_info``.
* **task** -- single-digit addition: the prompt ``"3+4"`` must be answered ``"7"``.
  The reward (``hmpo_verl.lab.tiny_reward.compute_score``) is 1 for the exact sum, else 0.
* **warm start** -- a brief supervised fit (plain torch, 200 AdamW steps of 64 random
  problems with their correct answers, loss on the answer tokens only), after which the
  output layer is scaled by ``soften_lm_head`` (0.5): the model keeps its ranking of
  answers but becomes under-confident, as if sampled at temperature 2. It samples the
  right sum about a third of the time, so RL has clear room to raise the mean reward by
  making the policy confident where it is right (greedy accuracy starts much higher).

``prepare_assets(out_dir)`` builds whatever is missing and returns the paths.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

DATA_SOURCE = "tiny_add"
# Characters the tokenizer knows; the chat template needs the letters of "user",
# "assistant", "system" and a newline.
CHARACTERS = list("0123456789+=? \n") + sorted(set("userassistantsystem"))
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyTaskSpec:
    """Every knob of the tiny task; stored next to the assets as ``spec.json``."""

    seed: int = 0
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 64
    # all 100 ordered pairs (a, b) with a, b in 0..9, each repeated this many times
    train_repeats: int = 4
    test_size: int = 32
    warm_start_steps: int = 200
    soften_lm_head: float = 0.5
    warm_start_lr: float = 3e-3
    warm_start_batch_size: int = 64


@dataclass(frozen=True)
class TinyTaskPaths:
    """Where the assets live."""

    root: Path

    @property
    def tokenizer(self) -> Path:
        return self.root / "model"  # tokenizer files sit with the model

    @property
    def base_model(self) -> Path:
        return self.root / "model_random_init"

    @property
    def model(self) -> Path:
        return self.root / "model"

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
    def done_marker(self) -> Path:
        return self.root / "READY"


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer():
    """A character-level ``Qwen2Tokenizer`` with ChatML special tokens and template.

    It is a real Qwen2 (byte-level BPE) tokenizer whose vocabulary holds only the
    characters of the task and which has *no merges*, so every character is one token.
    (transformers 5 loads any tokenizer saved next to a ``qwen2`` config as
    ``Qwen2Tokenizer``, so a different tokenizer class would not survive a reload.)
    """
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_unicode = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for ch in CHARACTERS:
        vocab.setdefault("".join(byte_to_unicode[b] for b in ch.encode()), len(vocab))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ----------------------------------------------------------------------------- model


def build_model(spec: TinyTaskSpec, tokenizer):
    """A randomly initialised small Qwen2 causal LM (fp32), seeded."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(spec.seed)
    config = Qwen2Config(
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
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# ----------------------------------------------------------------------------- data


def _problems(rng: random.Random, repeats: int) -> list[tuple[int, int]]:
    pairs = [(a, b) for a in range(10) for b in range(10)] * repeats
    rng.shuffle(pairs)
    return pairs


def _row(a: int, b: int, split: str, index: int) -> dict:
    """One verl-schema row."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": f"{a}+{b}"}],
        "ability": "arithmetic",
        "reward_model": {"style": "rule", "ground_truth": str(a + b)},
        "extra_info": {"split": split, "index": index, "a": a, "b": b},
    }


def build_datasets(spec: TinyTaskSpec, paths: TinyTaskPaths) -> None:
    """Write train/test parquet files in verl's RL schema."""
    import pandas as pd

    rng = random.Random(spec.seed)
    train = [_row(a, b, "train", i) for i, (a, b) in enumerate(_problems(rng, spec.train_repeats))]
    test_pairs = _problems(rng, 1)[: spec.test_size]
    test = [_row(a, b, "test", i) for i, (a, b) in enumerate(test_pairs)]
    paths.train_parquet.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(train).to_parquet(paths.train_parquet)
    pd.DataFrame(test).to_parquet(paths.test_parquet)


# ----------------------------------------------------------------------------- warm start


def warm_start(model, tokenizer, spec: TinyTaskSpec, log=print) -> dict:
    """Brief supervised fit on correct answers (loss on the answer tokens only).

    Returns a small report: the final loss and the greedy/sampled accuracy.
    """
    import torch

    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.warm_start_lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(spec.warm_start_steps):
        batch = [(rng.randrange(10), rng.randrange(10)) for _ in range(spec.warm_start_batch_size)]
        ids, labels = _sft_batch(tokenizer, batch)
        out = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long())
        logits = out.logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if log and (step + 1) % 25 == 0:
            log(f"  warm start step {step + 1}/{spec.warm_start_steps}: loss {loss.item():.3f}")
    model.eval()
    report = {"final_loss": float(loss.item()), "sampled_accuracy_before_soften": sampled_accuracy(model, tokenizer, spec.seed)}
    with torch.no_grad():
        model.lm_head.weight.mul_(spec.soften_lm_head)
    report["sampled_accuracy"] = sampled_accuracy(model, tokenizer, spec.seed)
    report["greedy_accuracy"] = sampled_accuracy(model, tokenizer, spec.seed, greedy=True, samples_per_pair=1)
    return report


def _sft_batch(tokenizer, pairs):
    """Right-padded (input_ids, labels) with labels only on the answer and <|im_end|>."""
    import torch

    rows, label_rows = [], []
    for a, b in pairs:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{a}+{b}"}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(str(a + b), add_special_tokens=False)["input_ids"]
        answer_ids = answer_ids + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        label_rows.append([-100] * len(prompt_ids) + answer_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])
    return ids, labels


def sampled_accuracy(model, tokenizer, seed: int, samples_per_pair: int = 4, greedy: bool = False) -> float:
    """Fraction of sampled (temperature 1, or greedy) answers equal to the true sum, over all 100 pairs."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    correct = total = 0
    with torch.no_grad():
        for a in range(10):
            for b in range(10):
                prompt = tokenizer.apply_chat_template(
                    [{"role": "user", "content": f"{a}+{b}"}], add_generation_prompt=True, tokenize=False
                )
                ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]] * samples_per_pair)
                for _ in range(3):
                    logits = model(input_ids=ids).logits[:, -1]
                    if greedy:
                        nxt = logits.argmax(-1, keepdim=True)
                    else:
                        nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
                    ids = torch.cat([ids, nxt], dim=1)
                n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
                for row in ids[:, n_prompt:]:
                    text = tokenizer.decode(row, skip_special_tokens=False).split("<|im_end|>")[0]
                    correct += int(text.strip() == str(a + b))
                    total += 1
    return correct / total


# ----------------------------------------------------------------------------- entry point


def prepare_assets(out_dir: str | os.PathLike = "outputs/tiny_task", spec: TinyTaskSpec | None = None, log=print):
    """Build tokenizer, model (random init + warm start) and data under ``out_dir`` if missing.

    Rebuilds everything when the stored ``spec.json`` differs from ``spec``.
    Returns the :class:`TinyTaskPaths`.
    """
    import torch

    log = log or (lambda *args, **kwargs: None)
    spec = spec or TinyTaskSpec()
    paths = TinyTaskPaths(Path(out_dir).resolve())
    if paths.done_marker.exists() and paths.spec.exists():
        if json.loads(paths.spec.read_text()) == asdict(spec):
            return paths
        log(f"tiny task: spec changed, rebuilding assets in {paths.root}")
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.done_marker.unlink(missing_ok=True)
    log(f"tiny task: building tokenizer, model and data in {paths.root}")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    tokenizer = build_tokenizer()
    model = build_model(spec, tokenizer)
    model.save_pretrained(paths.base_model)
    tokenizer.save_pretrained(paths.base_model)
    build_datasets(spec, paths)

    log(f"tiny task: warm start ({spec.warm_start_steps} supervised steps, then lm_head x {spec.soften_lm_head})")
    report = warm_start(model, tokenizer, spec, log=log)
    model.save_pretrained(paths.model)
    tokenizer.save_pretrained(paths.model)
    (paths.root / "warm_start.json").write_text(json.dumps(report, indent=2))
    log(
        f"tiny task: warm-started model samples the right sum {report['sampled_accuracy']:.2f} of the time "
        f"(greedy: {report['greedy_accuracy']:.2f})"
    )

    paths.spec.write_text(json.dumps(asdict(spec), indent=2))
    paths.done_marker.write_text("ok\n")
    return paths


if __name__ == "__main__":  # pragma: no cover - manual use
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/tiny_task")
    args = parser.parse_args()
    print(prepare_assets(args.out).root)
