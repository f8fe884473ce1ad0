"""Prompt, system prompt and reward agree (GSM8K, MATH), and every task's validation files share one
schema (verl joins them with datasets.concatenate_datasets).

QWEN25_MATH_CHAT_TEMPLATE is the `chat_template` of Qwen2.5-Math's tokenizer_config.json
(Qwen/Qwen2.5-Math-1.5B and -7B). The hub is not reachable here, so it was transcribed from a public
repository that reproduces it verbatim (found through this project's code index, as a Python
constant named `qwen_2_5_math`), not compared byte for byte with the hub file. A second, independent
public source agrees on what matters: Qwen2.5-Math's evaluation prompt "qwen25-math-cot",
"<|im_start|>system\\nPlease reason step by step, and put your final answer within \\\\boxed{}.<|im_end|>\\n
<|im_start|>user\\n{input}<|im_end|>\\n<|im_start|>assistant\\n", is exactly what the template renders
for one user message (test_the_template_adds_a_boxed_system_prompt). The rendering goes through
transformers' apply_chat_template, as verl's RLHFDataset does.
"""

from __future__ import annotations

import importlib.util

import datasets
import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer
from verl.utils.reward_score import default_compute_score

from test_recipes_config import RECIPES, compose_recipe, stub_model  # noqa: F401 - stub_model is a fixture


def _load(task: str):
    spec = importlib.util.spec_from_file_location(f"prepare_extra_{task}", RECIPES / task / "prepare_extra.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GSM8K, MATH = _load("gsm8k"), _load("math")

QWEN25_MATH_CHAT_TEMPLATE = """
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'Please reason step by step, and put your final answer within \\\\boxed{}.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within \\\\boxed{}.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

BOXED_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
# verl's examples/data_preprocess/gsm8k.py: one user message, the question + this instruction
VERL_GSM8K_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
# DAPO's AIME-2024 parquet: the user message wraps the question in this
DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_SUFFIX = "\n\nRemember to put your answer on its own line after \"Answer:\"."


@pytest.fixture(scope="module")
def render(stub_model):
    tokenizer = AutoTokenizer.from_pretrained(stub_model)
    tokenizer.chat_template = QWEN25_MATH_CHAT_TEMPLATE
    return lambda messages: tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


def _verl_gsm8k_row(i: int = 0, answer: str = "72") -> dict:
    question = f"Natalia sold clips to {i + 48} of her friends in April. How many clips did she sell?"
    return {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": question + " " + VERL_GSM8K_INSTRUCTION}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": "test", "index": i, "answer": f"... #### {answer}", "question": question},
    }


def test_the_template_adds_a_boxed_system_prompt(render):
    assert render([{"role": "user", "content": "Q"}]) == (
        f"<|im_start|>system\n{BOXED_SYSTEM}<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n")


def test_gsm8k_prompts_ask_for_what_verls_reward_scores(render):
    row = _verl_gsm8k_row()
    truth = row["reward_model"]["ground_truth"]
    reward = lambda text: default_compute_score(row["data_source"], text, truth)  # noqa: E731
    assert reward("48 / 2 = 24, 48 + 24 = 72.\n#### 72") == 1.0
    assert reward("48 / 2 = 24, 48 + 24 = 72. The answer is \\boxed{72}.") == 0.0  # strict: "####" only

    raw = render(row["prompt"])  # verl's row alone: the template's system prompt contradicts the user's
    assert BOXED_SYSTEM in raw and "####" in raw

    fixed = render(GSM8K.with_system_prompt(row)["prompt"])
    assert fixed.startswith(f"<|im_start|>system\n{GSM8K.SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")
    assert "boxed" not in fixed and fixed.count("####") == 2  # system and user ask for the same form


def test_gsm8k_system_prompt_step_rewrites_verls_parquet(tmp_path):
    path = tmp_path / "test.parquet"
    rows = [_verl_gsm8k_row(i) for i in range(3)]
    datasets.Dataset.from_list(rows).to_parquet(path)
    assert GSM8K.set_system_prompt(str(path), str(path)) == 3  # in place, as prepare_data.sh runs it
    assert GSM8K.set_system_prompt(str(path), str(path)) == 3  # and again: idempotent
    out = datasets.Dataset.from_parquet(str(path))
    for before, after in zip(rows, out):
        assert after["prompt"] == [{"role": "system", "content": GSM8K.SYSTEM_PROMPT}, *before["prompt"]]
        assert {k: after[k] for k in ("data_source", "reward_model", "extra_info")} == {
            k: before[k] for k in ("data_source", "reward_model", "extra_info")}


def test_math_prompts_agree_with_the_template_and_the_rewards(render):
    """MATH / MATH-500 ask for \\boxed{} like the template's system prompt, and math_reward scores it;
    DAPO's AIME prompt asks for "Answer:", and its reward (math_dapo) scores that or \\boxed{}."""
    math500 = MATH.math500_row({"problem": "What is 6 * 7?", "solution": "\\boxed{42}"}, 0)
    text = render(math500["prompt"])
    assert BOXED_SYSTEM in text and MATH.INSTRUCTION in text
    assert default_compute_score(math500["data_source"], "6 * 7 = \\boxed{42}", "42") == 1.0

    aime = MATH.aime_row(_dapo_aime_row(0), 0)
    assert BOXED_SYSTEM in render(aime["prompt"])
    for answer in ("6 * 7 = 42.\nAnswer: 42", "6 * 7 = \\boxed{42}"):
        assert default_compute_score(aime["data_source"], answer, "42")["score"] == 1.0
    assert default_compute_score(aime["data_source"], "Answer: 41", "42")["score"] == -1.0


# ---------------------------------------------------------------------------------------------
# validation files: one schema per task


def _dapo_aime_row(i: int, index=None) -> dict:
    """A row of DAPO's AIME-2024 parquet: its `extra_info.index` a string (as reported for DAPO's
    file; not verifiable offline) unless given."""
    return {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": DAPO_PREFIX + f"What is {i} + 42 - {i}?" + DAPO_SUFFIX}],
        "ability": "MATH",
        "reward_model": {"ground_truth": "42", "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": f"aime-2024-{i}" if index is None else index},
    }


def _math500_file(path):
    examples = [{"problem": f"What is {i} + 1?", "solution": f"\\boxed{{{i + 1}}}", "unique_id": f"test/{i}.json"}
                for i in range(3)]
    MATH.write_val([MATH.math500_row(e, i) for i, e in enumerate(examples)], str(path))


def _aime_file(path, index=None):
    raw = path.with_suffix(".dapo.parquet")
    datasets.Dataset.from_list([_dapo_aime_row(i, index) for i in range(4)]).to_parquet(raw)
    MATH.convert_aime(str(raw), str(path))


def _gsm8k_file(path):
    rows = [GSM8K.with_system_prompt(_verl_gsm8k_row(i)) for i in range(3)]
    datasets.Dataset.from_list(rows).to_parquet(path)


# How each validation file the tasks name is produced (relative to DATA_DIR). A task whose YAML
# names a file missing here fails test_validation_files_of_each_task_concatenate.
PRODUCERS = {
    "gsm8k/test.parquet": _gsm8k_file,
    "math500/test.parquet": _math500_file,
    "aime-2024.parquet": _aime_file,
}
TASKS = ["gsm8k", "math"]


def _val_files(task: str) -> list[str]:
    cfg = compose_recipe(RECIPES, task)
    home = OmegaConf.create({"d": "${oc.env:HOME}"}).d + "/data/"
    files = cfg.data.val_files
    files = [files] if isinstance(files, str) else list(files)
    assert all(f.startswith(home) for f in files), files
    return [f[len(home):] for f in files]


def _verl_reads(paths) -> datasets.Dataset:
    """verl's RLHFDataset._read_files_and_tokenize: each parquet, then concatenate_datasets."""
    return datasets.concatenate_datasets(
        [datasets.load_dataset("parquet", data_files=str(p))["train"] for p in paths])


@pytest.mark.parametrize("task", TASKS)
def test_validation_files_of_each_task_concatenate(task, tmp_path):
    paths = []
    for rel in _val_files(task):
        assert rel in PRODUCERS, f"{task}: no schema test for validation file {rel}"
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        PRODUCERS[rel](path)
        paths.append(path)
    joined = _verl_reads(paths)
    assert len(joined) == sum(len(datasets.Dataset.from_parquet(str(p))) for p in paths)


@pytest.mark.parametrize("index", [None, 7], ids=["string_index", "int_index"])
def test_aime_conversion_gives_the_math500_schema(index, tmp_path):
    _math500_file(tmp_path / "math500.parquet")
    _aime_file(tmp_path / "aime.parquet", index)
    math500 = datasets.Dataset.from_parquet(str(tmp_path / "math500.parquet"))
    aime = datasets.Dataset.from_parquet(str(tmp_path / "aime.parquet"))
    assert aime.features == math500.features == MATH.val_features()
    row = aime[1]
    assert row["extra_info"] == {"split": "test", "index": 1, "unique_id": "aime-2024-1" if index is None else "7"}
    assert row["prompt"] == _dapo_aime_row(1)["prompt"] and row["data_source"] == "math_dapo"
    assert row["reward_model"]["ground_truth"] == "42"


def test_the_unconverted_aime_file_would_stop_the_run(tmp_path):
    """Why the conversion exists: MATH-500's integer extra_info.index against DAPO's string one."""
    _math500_file(tmp_path / "math500.parquet")
    datasets.Dataset.from_list([_dapo_aime_row(i) for i in range(2)]).to_parquet(tmp_path / "aime.parquet")
    with pytest.raises(ValueError):
        _verl_reads([tmp_path / "math500.parquet", tmp_path / "aime.parquet"])
