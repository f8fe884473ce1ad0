"""The lab's tasks: exact data and rewards, deterministic builds, recipes that match the registry."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pandas as pd
import pytest
from cpu_assets import REPO_ROOT, task_assets
from hypothesis import given
from hypothesis import strategies as st

from hmpo_verl.lab import cpu_demo
from hmpo_verl.lab.tasks import TASKS, addition, common, fibonacci, get_task
from hmpo_verl.lab.tasks.common import PairTaskSpec, WarmStartSpec, build_tokenizer, pair_dataset_rows, prompt_ids
from hmpo_verl.lab.tasks.rewards import correct_prefix_fraction, exact_match

ANSWER_37 = "0774156178538190998752796516730336954932"  # worked out by hand from 3, 7
digits = st.integers(min_value=0, max_value=9)


# ----------------------------------------------------------------------------- the Fibonacci sequence


def test_sequence_by_hand():
    assert fibonacci.sequence(3, 7, 10) == "0774156178"  # 3+7=10, 7+0, 0+7, 7+7=14, 7+4=11, 4+1, 1+5, 5+6=11, 6+1, 1+7
    assert fibonacci.problem(3, 7) == ("37", ANSWER_37)
    assert fibonacci.sequence(0, 0, 40) == "0" * 40
    assert fibonacci.sequence(9, 9, 3) == "875"  # 9+9=18, 9+8=17, 8+7=15


def test_sequence_is_fibonacci_numbers_mod_10():
    """Seeds (0, 1) give F(2), F(3), ... mod 10, computed here with exact integers."""
    fib = [0, 1]
    while len(fib) < 42:
        fib.append(fib[-1] + fib[-2])
    assert fibonacci.sequence(0, 1, 40) == "".join(str(f % 10) for f in fib[2:42])


@given(digits, digits, digits, digits)
def test_sequence_is_linear_mod_10(a, b, c, d):
    """x -> x_{k+1} = x_k + x_{k-1} is linear: the sum of two runs is the run of the summed seeds."""
    left, right = fibonacci.sequence(a, b, 40), fibonacci.sequence(c, d, 40)
    summed = fibonacci.sequence((a + c) % 10, (b + d) % 10, 40)
    assert summed == "".join(str((int(x) + int(y)) % 10) for x, y in zip(left, right))


@given(digits, digits)
def test_sequence_has_the_pisano_period_of_10(a, b):
    """The sequence mod 10 repeats with period 60: terms 59 and 60 are the seeds again."""
    s = fibonacci.sequence(a, b, 62)
    assert (s[58], s[59]) == (str(a), str(b))


@pytest.mark.parametrize("args", [(10, 0, 5), (0, -1, 5), (1, 2, 0)])
def test_sequence_rejects_bad_seeds(args):
    with pytest.raises(ValueError, match="seeds must be digits"):
        fibonacci.sequence(*args)


# ----------------------------------------------------------------------------- rewards


@pytest.mark.parametrize(
    ("response", "score"),
    [
        (ANSWER_37, 1.0),
        (f"  {ANSWER_37}\n", 1.0),  # surrounding whitespace is ignored
        (ANSWER_37[:-1] + "3", 0.0),  # last digit wrong
        ("1" + ANSWER_37[1:], 0.0),  # first digit wrong
        (ANSWER_37[:20] + "9" + ANSWER_37[21:], 0.0),  # one digit in the middle
        (ANSWER_37[:-1], 0.0),  # one digit short
        (ANSWER_37 + "2", 0.0),  # one digit too many
        (ANSWER_37[:20] + " " + ANSWER_37[20:], 0.0),  # a space inside
        (ANSWER_37 + "<|im_end|>", 0.0),  # verl strips special tokens; a literal one is wrong
        ("", 0.0),
        ("assistant", 0.0),
        ("37", 0.0),  # echoing the prompt
    ],
)
def test_exact_match_on_fibonacci_answers(response, score):
    assert exact_match("fib_mod10", response, ANSWER_37) == score


def test_exact_match_on_addition_answers():
    assert exact_match("tiny_add", "7", "7") == 1.0
    assert exact_match("tiny_add", " 12 ", "12") == 1.0
    assert exact_match("tiny_add", "12", 12) == 1.0  # ground truth given as a number
    for wrong, truth in (("1", "12"), ("21", "12"), ("1 2", "12"), ("07", "7"), ("3+4", "7"), ("", "7"), ("7.0", "7")):
        assert exact_match("tiny_add", wrong, truth) == 0.0, wrong


@pytest.mark.parametrize(
    ("response", "score"),
    [
        (ANSWER_37, 1.0),
        ("1" + ANSWER_37[1:], 0.0),
        (ANSWER_37[:30] + "x" + ANSWER_37[31:], 30 / 40),
        (ANSWER_37[:10], 10 / 40),  # stopped early
        (ANSWER_37 + "123", 40 / 43),  # ran on: extra characters cost like missing ones
        ("", 0.0),
        ("abc", 0.0),
    ],
)
def test_correct_prefix_fraction(response, score):
    assert correct_prefix_fraction("fib_mod10", response, ANSWER_37) == pytest.approx(score, abs=1e-12)


@given(st.text(alphabet="0123456789 x", max_size=50))
def test_partial_credit_is_one_exactly_when_exact_match(response):
    partial = correct_prefix_fraction("fib_mod10", response, ANSWER_37)
    assert 0.0 <= partial <= 1.0
    assert (partial == 1.0) == (exact_match("fib_mod10", response, ANSWER_37) == 1.0)


# ----------------------------------------------------------------------------- tokenizer and data


def test_one_token_per_character_and_the_chat_prompt():
    tokenizer = build_tokenizer(fibonacci.CHARACTERS)
    ids = tokenizer(ANSWER_37, add_special_tokens=False)["input_ids"]
    assert len(ids) == 40 and tokenizer.decode(ids) == ANSWER_37
    prompt = prompt_ids(tokenizer, "37")
    assert tokenizer.decode(prompt) == "<|im_start|>user\n37<|im_end|>\n<|im_start|>assistant\n"
    assert len(prompt) == 21  # 2 digits + 19 tokens of template
    recipe = _compose(get_task("fibonacci"))
    assert recipe.data.max_prompt_length >= len(prompt)
    assert recipe.data.max_response_length >= 40 + 1  # the digits and <|im_end|>


@pytest.mark.parametrize("name", list(TASKS))
def test_dataset_rows_are_verl_schema_and_exact(name):
    module = {"addition": addition, "fibonacci": fibonacci}[name]
    spec = fibonacci.FibonacciSpec() if name == "fibonacci" else PairTaskSpec()
    train, test = pair_dataset_rows(module.problem, module.DATA_SOURCE, spec.seed, spec.train_repeats, spec.test_size)
    assert len(train) == 100 * spec.train_repeats and len(test) == spec.test_size
    pairs = [(r["extra_info"]["a"], r["extra_info"]["b"]) for r in train]
    assert all(pairs.count((a, b)) == spec.train_repeats for a in range(10) for b in range(10))
    assert len({(r["extra_info"]["a"], r["extra_info"]["b"]) for r in test}) == spec.test_size
    for split, rows in (("train", train), ("test", test)):
        for i, row in enumerate(rows):
            a, b = row["extra_info"]["a"], row["extra_info"]["b"]
            content, answer = module.problem(a, b)
            assert row["prompt"] == [{"role": "user", "content": content}]
            assert row["reward_model"] == {"style": "rule", "ground_truth": answer}
            assert row["data_source"] == module.DATA_SOURCE
            assert row["extra_info"]["split"] == split and row["extra_info"]["index"] == i
    if name == "addition":
        assert all(r["reward_model"]["ground_truth"] == str(r["extra_info"]["a"] + r["extra_info"]["b"]) for r in train)
    else:
        assert all(len(r["reward_model"]["ground_truth"]) == 40 for r in train)


# ----------------------------------------------------------------------------- builds


SMALL = fibonacci.FibonacciSpec(terms=24, warm_start=WarmStartSpec(steps=3, lr=3e-3, batch_size=8, soften_lm_head=0.56))


def _files(root):
    """{relative path as str: bytes} of every file under ``root``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_building_is_deterministic(tmp_path):
    """Same spec -> byte-identical parquet files and weights; another seed -> other data and weights."""
    first = fibonacci.prepare_assets(tmp_path / "a", SMALL, log=None)
    second = fibonacci.prepare_assets(tmp_path / "b", SMALL, log=None)
    other = fibonacci.prepare_assets(tmp_path / "c", dataclasses.replace(SMALL, seed=1), log=None)
    files_a, files_b, files_c = _files(first.root), _files(second.root), _files(other.root)
    assert files_a.keys() == files_b.keys()
    for name in ("data/train.parquet", "data/test.parquet", "model/model.safetensors",
                 "model_random_init/model.safetensors", "warm_start.json", "spec.json"):
        assert files_a[name] == files_b[name], name
    for name in ("data/train.parquet", "model/model.safetensors"):
        assert files_a[name] != files_c[name], name
    train = pd.read_parquet(first.train_parquet)
    assert train["reward_model"].map(lambda r: len(r["ground_truth"])).eq(24).all()


def test_assets_are_rebuilt_only_when_the_spec_changes(tmp_path):
    paths = fibonacci.prepare_assets(tmp_path, SMALL, log=None)
    stamp = paths.model.joinpath("model.safetensors").stat().st_mtime_ns
    assert fibonacci.prepare_assets(tmp_path, SMALL, log=None) == paths
    assert paths.model.joinpath("model.safetensors").stat().st_mtime_ns == stamp
    changed = dataclasses.replace(SMALL, terms=25)
    fibonacci.prepare_assets(tmp_path, changed, log=None)
    assert json.loads(paths.spec.read_text())["terms"] == 25


def test_a_warm_start_that_has_not_fit_its_task_says_so(tmp_path, monkeypatch):
    """A fit that stops short (here 3 steps; the addition task's 200 on the AMD EPYC of 2026-12-07: greedy 76 %)
    was said only in warm_start.json and a print a quiet build (log=None) drops."""
    with pytest.warns(UserWarning, match=r"fibonacci task: the warm start's greedy answer is right for 0% of the "
                                         r"100 problems \(< 90%\): its supervised fit \(3 steps.*warm_start\.steps"):
        fibonacci.prepare_assets(tmp_path / "short", SMALL, log=None)
    monkeypatch.setattr(common, "accuracy", lambda *args, **kwargs: 0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fibonacci.prepare_assets(tmp_path / "fit", SMALL, log=None)


def test_the_default_warm_start_leaves_headroom():
    """The demo's Fibonacci model samples the exact answer 15-45 % of the time; greedy, almost always."""
    report = json.loads(task_assets("fibonacci").warm_start_report.read_text())
    assert 0.15 <= report["sampled_accuracy"] <= 0.45, report
    assert report["greedy_accuracy"] >= 0.9, report


# ----------------------------------------------------------------------------- registry, recipes, demo


def test_get_task_names_the_known_tasks():
    assert get_task("fibonacci") is TASKS["fibonacci"]
    with pytest.raises(ValueError, match="unknown task 'fib'; known tasks: addition, fibonacci"):
        get_task("fib")


def _compose(task):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(task.recipe_dir), version_base=None):
        return compose(config_name=task.recipe_name)


def _flat(node, prefix=""):
    """{"a.b.c": value} of a composed config, interpolations and ??? left as written."""
    from omegaconf import OmegaConf

    if not isinstance(node, dict):
        node = OmegaConf.to_container(node, resolve=False)
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("name", list(TASKS))
def test_recipe_uses_the_tasks_reward_and_assets(name):
    task = get_task(name)
    config = _compose(task)
    assert config.reward.custom_reward_function.path == task.reward_path
    assert config.reward.custom_reward_function.name == task.reward_name
    assert config.actor_rollout_ref.model.path == f"{task.assets_dir}/model"
    assert config.data.train_files == f"{task.assets_dir}/data/train.parquet"


def test_the_fibonacci_recipe_differs_from_the_addition_recipe_only_in_task_lines():
    tiny = _flat(_compose(get_task("addition")))
    long = _flat(_compose(get_task("fibonacci")))
    differing = {k for k in tiny.keys() | long.keys() if tiny.get(k) != long.get(k)}
    recipe = (REPO_ROOT / "recipes" / "cpu_fibonacci" / "hmpo.yaml").read_text()
    task_lines = [line.split(":")[0].strip() for line in recipe.splitlines() if "# [task]" in line]
    assert {k.rsplit(".", 1)[-1] for k in differing} == set(task_lines), differing


def test_the_demo_lists_and_checks_tasks(capsys):
    with pytest.raises(SystemExit):
        cpu_demo.parse_args(["--help"])
    out = capsys.readouterr().out
    for task in TASKS.values():
        assert task.name in out and task.summary in out
    assert cpu_demo.parse_args([]).task == cpu_demo.DEFAULT_TASK
    with pytest.raises(SystemExit):
        cpu_demo.parse_args(["--task", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


def test_trainer_command_runs_the_tasks_recipe(tmp_path):
    task = get_task("fibonacci")
    paths = task.prepare_assets(tmp_path, SMALL, log=None)
    cmd = cpu_demo.trainer_command(task, paths, tmp_path / "run", 3, "hmpo", ["x=1"])
    assert cmd[cmd.index("--config-path") + 1] == str(REPO_ROOT / "recipes" / "cpu_fibonacci")
    assert f"actor_rollout_ref.model.path={paths.model}" in cmd and cmd[-1] == "x=1"


# ----------------------------------------------------------------------------- task report


def test_task_report_criterion():
    from hmpo_verl.lab.task_report import criterion

    assert criterion([0.3] * 5 + [0.4] * 50 + [0.5] * 5) == pytest.approx(
        {"start": 0.3, "end": 0.5, "rise": 0.2, "passes": True})
    assert not criterion([0.3] * 5 + [0.49] * 5)["passes"]  # rise 0.19
    assert not criterion([0.1] * 5 + [0.9] * 5)["passes"]  # starts below 0.15
    assert not criterion([0.5] * 5 + [0.9] * 5)["passes"]  # starts above 0.45


def test_task_report_runs_use_its_trainer_settings():
    from hmpo_verl.lab.task_report import ReportRun

    stressed = ReportRun("fibonacci", "stressed", "hmpo", 1, 16)
    assert stressed.overrides()[: -4] == [
        "data.train_batch_size=8", "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=64",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.actor.ppo_epochs=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16", "algorithm.rollout_correction.bypass_mode=true"]
    assert stressed.env() == {"VERL_CPU_LOGPROB_NOISE_STD": "0.05"}
    assert stressed.command(REPO_ROOT / "outputs" / "r").startswith(
        "VERL_CPU_LOGPROB_NOISE_STD=0.05 python -m hmpo_verl.lab.cpu_demo --task fibonacci --loss-mode hmpo --steps 16 "
        "--run-dir outputs/r/fibonacci/hmpo_stressed/seed1 -- ")
    recipe = ReportRun("addition", "recipe", "hmpo", 1, 16)
    assert recipe.env() == {} and recipe.overrides()[0] == "data.seed=1"
