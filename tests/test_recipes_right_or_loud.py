"""What a user gives recipes/<task>/run.sh is honoured or refused before Ray starts, naming the way on: the
launcher's settings given as Hydra overrides, its 0/1 switches, paths with ~, the GPUs and nodes the preflight
checks, the data's prompts and the model's context (recipes/lib/launch.sh, recipes/lib/preflight.py), and the
SLURM script's ASYNC runs. Dry runs, stand-in executables and the preflight's functions: no Python trainer, no Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_recipes_scripts import RECIPES, _run, dry_run, parse_launch

sys.path.insert(0, str(RECIPES / "lib"))
import preflight  # noqa: E402

GSM8K = RECIPES / "gsm8k" / "run.sh"


def words(*overrides: str, **env: str) -> dict[str, list[str]]:
    """{key: [value, ...]} of the Hydra overrides of a dry run's command, a quoted string's quotes stripped."""
    found: dict[str, list[str]] = {}
    for arg in parse_launch(dry_run(GSM8K, *overrides, **env))[2]:
        key, _, value = arg.partition("=")
        found.setdefault(key, []).append(value[1:-1] if value[:1] == "'" == value[-1:] else value)
    return found


def test_an_experiment_name_override_names_the_checkpoint_directory_too(tmp_path):
    """It renamed the logged run only: `run.sh trainer.experiment_name=repeat2` resumed the default run's checkpoints."""
    given = words("trainer.experiment_name=repeat2", HOME=str(tmp_path))
    assert given["trainer.experiment_name"] == ["repeat2"]
    assert given["trainer.default_local_dir"] == [f"{tmp_path}/checkpoints/hmpo_verl/repeat2"]
    # the override wins over EXPERIMENT_NAME, as Hydra's last word does; a CKPT_DIR given still wins
    assert words("+trainer.experiment_name=r3", EXPERIMENT_NAME="mine", HOME=str(tmp_path))[
        "trainer.default_local_dir"] == [f"{tmp_path}/checkpoints/hmpo_verl/r3"]
    assert words("trainer.experiment_name=r3", CKPT_DIR="/ck/x")["trainer.default_local_dir"] == ["/ck/x"]


def test_a_checkpoint_directory_override_is_checked_as_ckpt_dir_is():
    relative = _run(GSM8K, "--dry-run", "trainer.default_local_dir=ckpt/run1")
    assert relative.returncode == 2 and relative.stdout == ""
    assert "trainer.default_local_dir=ckpt/run1: an absolute path, please" in relative.stderr
    assert words("trainer.default_local_dir=/shared/run1")["trainer.default_local_dir"] == ["/shared/run1"]


@pytest.mark.parametrize("override, variable", [("size=qwen2_5_math_7b", "SIZE"), ("+mean=grpo", "MEAN"),
                                                ("++correction=token_tis", "CORRECTION"), ("async=one_step_off", "ASYNC")])
def test_the_launchers_own_groups_are_refused_as_overrides(override, variable):
    """Hydra's last word changed the model or loss while the preflight and the run's name followed the environment."""
    result = _run(GSM8K, "--dry-run", override)
    assert result.returncode == 2 and result.stdout == ""
    assert f"{override}: set {variable}={override.split('=', 1)[1]} instead" in result.stderr


@pytest.fixture()
def stand_in(tmp_path):
    """A `python3` that records the preflight's arguments and a launch, one file each, and exits 0."""
    python = tmp_path / "python3"
    python.write_text(f'#!/bin/sh\ncase "$1" in\n  *preflight.py) shift; printf "%s\\n" "$@" > "{tmp_path}/preflight";;\n'
                      f'  -m) echo "$@" > "{tmp_path}/launched";;\nesac\nexit 0\n')
    python.chmod(0o755)

    def run(*overrides: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str] | None, bool]:
        for name in ("preflight", "launched"):
            (tmp_path / name).unlink(missing_ok=True)
        result = _run(GSM8K, *overrides, PYTHON=str(python), **env)
        checked = tmp_path / "preflight"
        return result, checked.read_text().splitlines() if checked.exists() else None, (tmp_path / "launched").exists()

    return run


@pytest.mark.parametrize("variable, value", [("DRY_RUN", "true"), ("PREFLIGHT", "true"), ("PREFLIGHT", "yes")])
def test_switches_take_0_or_1_and_nothing_else(stand_in, variable, value):
    """DRY_RUN=true launched a real run; PREFLIGHT=true skipped the check."""
    result, checked, launched = stand_in(**{variable: value})
    assert result.returncode == 2 and checked is None and not launched
    assert f"{variable}={value}: 0 or 1, please" in result.stderr


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_the_preflight_checks_the_settings_the_run_gets(stand_in, tmp_path):
    """The effective values, overrides included: the checkpoint directory, the model, the GPUs of an ASYNC split
    (what the NGPUS_PER_NODE refusal tells the user to override), the task and lengths, the cluster."""
    _, args, launched = stand_in("trainer.default_local_dir=/shared/run1", "actor_rollout_ref.model.path=/m/other",
                                 MODEL_PATH="/m/env")
    assert launched and option(args, "--ckpt-dir") == "/shared/run1" and option(args, "--model") == "/m/other"
    assert (option(args, "--task"), option(args, "--prompt-length"), option(args, "--response-length")) == \
        ("gsm8k", "512", "1024")
    assert option(stand_in(NGPUS_PER_NODE="4")[1], "--gpus") == "4"
    assert option(stand_in(ASYNC="separate_async")[1], "--gpus") == "8"  # recipes/split/node8: 4 trainer + 4 rollout
    _, args, _ = stand_in("trainer.n_gpus_per_node=2", "actor_rollout_ref.rollout.n_gpus_per_node=2",
                          ASYNC="separate_async")
    assert option(args, "--gpus") == "4"
    _, args, _ = stand_in("trainer.n_gpus_per_node=2", "rollout.n_gpus_per_node=1", ASYNC="one_step_off")
    assert option(args, "--gpus") == "3"
    # several nodes on the head of a local cluster (verl's ray.init joins it): the preflight checks that cluster
    _, args, _ = stand_in(NNODES="2")
    assert option(args, "--ray-address") == "auto" and option(args, "--nnodes") == "2"
    _, args, _ = stand_in(NNODES="2", RAY_ADDRESS="10.0.0.1:6379")
    assert option(args, "--ray-address") == "10.0.0.1:6379"
    assert "--ray-address" not in stand_in()[1]


@pytest.mark.parametrize("override, files", [
    ("data.train_files=['/d/a.parquet','/d/b.parquet']", "/d/a.parquet,/d/b.parquet,/env/val.parquet"),
    ("data.train_files=[/d/a.parquet, /d/b.parquet]", "/d/a.parquet,/d/b.parquet,/env/val.parquet"),
    ("data.train_files=/d/a.parquet", "/d/a.parquet,/env/val.parquet"),
    ("++data.val_files='~/v.parquet'", "/env/train.parquet,{home}/v.parquet"),
])
def test_the_preflight_checks_the_data_files_of_an_override(stand_in, tmp_path, override, files):
    """A verl user's data.train_files=... wins over TRAIN_FILES (the last override); the preflight checked
    TRAIN_FILES, so a missing file of the override reached verl."""
    _, args, launched = stand_in(override, TRAIN_FILES="/env/train.parquet", VAL_FILES="/env/val.parquet",
                                 HOME=str(tmp_path))
    assert launched and option(args, "--files") == files.format(home=tmp_path)
    assert option(stand_in(TRAIN_FILES="/env/train.parquet", VAL_FILES="/env/val.parquet")[1], "--files") == \
        "/env/train.parquet,/env/val.parquet"


def test_paths_with_a_tilde_are_written_out(tmp_path):
    """MODEL_PATH='~/models/x' (quoted: the shell leaves it) passed the preflight and reached verl as typed."""
    given = words(MODEL_PATH="~/models/x", TRAIN_FILES="~/d/a.parquet,~/d/b.parquet", VAL_FILES="~/d/v.parquet",
                  CKPT_DIR="~/ckpt", HOME=str(tmp_path))
    assert given["actor_rollout_ref.model.path"] == [f"{tmp_path}/models/x"]
    assert given["data.train_files"] == [f"['{tmp_path}/d/a.parquet','{tmp_path}/d/b.parquet']"]
    assert given["data.val_files"] == [f"['{tmp_path}/d/v.parquet']"]
    assert given["trainer.default_local_dir"] == [f"{tmp_path}/ckpt"]
    (problem,) = preflight.check_run({"model": "~/models/x"}, "fsdp")  # an override of the model path
    assert "verl reads a path as written, without expanding ~" in problem


# ---------------------------------------------------------------------------------------------------- preflight


def test_gsm8k_data_without_the_recipes_system_prompt_is_refused_and_the_named_command_fixes_it(tmp_path):
    """verl's own examples/data_preprocess/gsm8k.py writes ~/data/gsm8k/*.parquet too, without our system prompt."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "train.parquet"
    row = {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "1+1? Answer after ####."}],
           "reward_model": {"style": "rule", "ground_truth": "2"}}
    pq.write_table(pa.Table.from_pylist([row, row]), data)
    (problem,) = preflight.check_run({"files": [str(data)], "task": "gsm8k"}, "fsdp")
    command = f"python3 {RECIPES}/gsm8k/prepare_extra.py system {data}"
    assert f"data file {data} lacks the gsm8k recipe's system prompt" in problem and f"`{command}`" in problem
    subprocess.run([sys.executable, *command.split()[1:]], cwd=tmp_path, check=True, capture_output=True)  # anywhere
    assert preflight.check_run({"files": [str(data)], "task": "gsm8k"}, "fsdp") == []
    assert preflight.check_run({"files": [str(data)], "task": "math"}, "fsdp") == []  # MATH has none


def test_a_data_file_is_checked_in_every_row_not_its_first(tmp_path):
    """A file merged from prepared rows and verl's own (first row prepared) passed: the first row was checked."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    wanted = preflight.system_prompt("gsm8k")
    user = {"role": "user", "content": "1+1? Answer after ####."}
    prepared = {"prompt": [{"role": "system", "content": wanted}, user]}
    rows = [prepared] * 5000 + [{"prompt": [user]}] * 3  # past the first read batch of 4096 rows
    data = tmp_path / "merged.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    (problem,) = preflight.check_prompts("gsm8k", [str(data)])
    assert f"data file {data} lacks the gsm8k recipe's system prompt ({wanted!r}) in 3 of its 5003 rows" in problem
    pq.write_table(pa.Table.from_pylist([prepared] * 3), data)
    assert preflight.check_prompts("gsm8k", [str(data)]) == []


def test_responses_beyond_the_models_context_are_refused_naming_both_numbers(tmp_path):
    """verl's rollout server takes max_position_embeddings as max_model_len and cuts longer responses silently."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "max_position_embeddings": 4096}))
    run = {"model": str(tmp_path), "prompt_length": 1024}
    (problem,) = preflight.check_run({**run, "response_length": 4096}, "fsdp")
    assert "data.max_prompt_length=1024 + data.max_response_length=4096 = 5120 tokens" in problem
    assert "max_position_embeddings=4096" in problem and "data.max_response_length=3072" in problem
    assert preflight.check_run({**run, "response_length": 3072}, "fsdp") == []


QWEN_TOKENIZER = {"chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                                   "{% endfor %}", "eos_token": "<|endoftext|>",
                  "added_tokens_decoder": {"151643": {"content": "<|endoftext|>"}, "151645": {"content": "<|im_end|>"}}}


def test_a_chat_model_that_would_not_stop_at_the_end_of_its_turn_is_named(tmp_path):
    """verl sends vLLM no stop tokens: a ChatML model whose EOS is <|endoftext|> and whose generation config lists
    only 151643 (Qwen's base models, as the recipes' README warns) runs past <|im_end|> into the reward."""
    model, fixed = tmp_path / "base", tmp_path / "fixed"
    for folder, stops in ((model, [151643]), (fixed, [151643, 151645])):
        folder.mkdir()
        (folder / "tokenizer_config.json").write_text(json.dumps(QWEN_TOKENIZER))
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}))
    (problem,) = preflight.check_stop_tokens(str(model))
    assert problem.startswith(f"model {model}: its chat template ends each turn with <|im_end|> (151645), which is "
                              f"neither its tokenizer's EOS ('<|endoftext|>') nor an eos_token_id of the generation "
                              f"config vLLM reads ({model}: [151643])")
    assert "Add 151645 to eos_token_id" in problem and "engine_kwargs.vllm.generation_config=" in problem
    assert preflight.check_stop_tokens(str(fixed)) == []
    assert preflight.check_stop_tokens(str(model), str(fixed)) == []  # vLLM told to read the fixed one
    assert preflight.check_stop_tokens(str(model), "vllm") != []  # vLLM's 'vllm' mode reads the model's too
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": 151645}))
    assert preflight.check_stop_tokens(str(model)) == []
    (model / "generation_config.json").unlink()  # none: vLLM builds it from config.json
    (model / "config.json").write_text(json.dumps({"eos_token_id": 151645}))
    assert preflight.check_stop_tokens(str(model)) == []
    (model / "config.json").write_text(json.dumps({"eos_token_id": 151643}))
    assert preflight.check_stop_tokens(str(model)) != []
    instruct = {**QWEN_TOKENIZER, "eos_token": "<|im_end|>"}  # an instruct model: its EOS ends the turn
    (model / "tokenizer_config.json").write_text(json.dumps(instruct))
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": 151643}))
    assert preflight.check_stop_tokens(str(model)) == []
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))  # not ChatML
    assert preflight.check_stop_tokens(str(model)) == []


def test_the_cluster_must_have_the_nodes_the_run_asks_for(monkeypatch, capsys):
    monkeypatch.setattr(preflight, "every_node", lambda address, timeout, **checks: {"head": []})
    assert preflight.main(["--cpu", "--ray-address", "auto", "--nnodes", "2"]) == 3
    assert "1 live node(s), and the run asks for trainer.nnodes=2 (NNODES)" in capsys.readouterr().err
    assert preflight.main(["--cpu", "--ray-address", "auto", "--nnodes", "1"]) == 0

    def no_cluster(address, timeout, **checks):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(preflight, "every_node", no_cluster)
    assert preflight.main(["--cpu", "--ray-address", "auto", "--nnodes", "2"]) == 3
    assert "no Ray cluster at --ray-address auto" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- SLURM


@pytest.mark.parametrize("mode", ["none", "separate_async"])
def test_the_slurm_script_launches_async_runs(tmp_path, mode):
    """It exported NGPUS_PER_NODE always, which run.sh refuses with ASYNC: no ASYNC run went through SLURM.
    Stand-in srun (runs its command here), scontrol, ray and python3; run.sh prints its command (DRY_RUN=1)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {"srun": 'while [ $# -gt 0 ]; do case "$1" in -w) shift 2;; -*) shift;; *) break;; esac; done\n'
                         'exec "$@"', "scontrol": "echo node1", "ray": "exit 0", "python3": "exit 0"}
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("NGPUS_PER_NODE", "ASYNC", "SIZE", "MEAN", "NNODES")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_SUBMIT_DIR=str(RECIPES.parent), SLURM_JOB_NUM_NODES="1",
               SLURM_JOB_NODELIST="node1", SLURM_GPUS_PER_NODE="h100:8", HEAD_IP="10.0.0.1", CKPT_DIR="/shared/c",
               ASYNC=mode, DRY_RUN="1")
    result = subprocess.run(["bash", str(RECIPES / "slurm" / "ray_on_slurm.slurm")], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    _, _, overrides = parse_launch(result.stdout.split("\n")[-2].split())
    assert f"async={mode}" in overrides and "trainer.nnodes=1" in overrides
    assert ("trainer.n_gpus_per_node=8" in overrides) == (mode == "none")  # ASYNC: the split file's 4 + 4
