"""The one data step of recipes/gsm8k/prepare_data.sh that verl's own gsm8k.py does not do.

    python3 prepare_extra.py system <gsm8k/train.parquet> [<out.parquet>]   # default: in place

Why: verl's examples/data_preprocess/gsm8k.py writes one user message that asks for the answer
after "####", and its reward (verl/utils/reward_score/gsm8k.py, strict) scores only the last
`#### <number>` in the last 300 characters of the response. Qwen2.5-Math's chat template, given
no system message, inserts its own: "Please reason step by step, and put your final answer within
\\boxed{}." -- the opposite format, and the one the model was trained on. A `\\boxed{42}` answer
scores 0, so early rewards would measure how fast the model learns to drop \\boxed{} for ####.

Our choice: set the system prompt, so that system prompt, user prompt and verl's reward all ask
for the same thing ("####"), and keep verl's GSM8K data, prompt and reward otherwise unchanged
(runs stay comparable with verl's published GSM8K baselines, which score "####"). The other
choice, scoring both forms, would need a custom reward function on every run and would leave the
two prompts contradicting each other. tests/test_recipes_data.py renders the rows through the
Qwen2.5-Math chat template and scores both answer forms with verl's reward.
"""

from __future__ import annotations

import sys

# Worded like Qwen2.5-Math's default system prompt, with verl's GSM8K answer format.
SYSTEM_PROMPT = 'Please reason step by step, and put your final answer after "####".'


def with_system_prompt(row: dict) -> dict:
    """A verl GSM8K row with SYSTEM_PROMPT as its first message (an existing system message is replaced)."""
    messages = [m for m in row["prompt"] if m["role"] != "system"]
    return {**row, "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, *messages]}


def set_system_prompt(src: str, dst: str) -> int:
    """Rewrite the verl GSM8K parquet `src` to `dst` (may be the same path) with SYSTEM_PROMPT; return rows."""
    import datasets

    data = datasets.Dataset.from_parquet(src)
    if "prompt" not in data.column_names:
        raise SystemExit(f"{src} has no 'prompt' column (columns: {data.column_names}); expected the output of "
                         "verl's examples/data_preprocess/gsm8k.py")
    rows = [with_system_prompt(row) for row in data]
    datasets.Dataset.from_list(rows).to_parquet(dst)
    return len(rows)


def main(argv: list[str]) -> None:
    if len(argv) in (2, 3) and argv[0] == "system":
        dst = argv[-1]
        print(f"{set_system_prompt(argv[1], dst)} rows with the GSM8K system prompt -> {dst}")
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
