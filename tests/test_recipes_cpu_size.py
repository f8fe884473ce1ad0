"""The GPU recipes' own path, executed on CPU: `SIZE=cpu bash recipes/<task>/run.sh` for 2 steps.

Per task, as a user would: recipes/lib/cpu_sample.py writes a local sample of the upstream datasets
(hub layouts and schemas) and the tiny model; the task's prepare_data.sh turns it into verl's rows
(no network, no verl checkout: `git` and `curl` on PATH fail if called); run.sh runs the preflight
(`--cpu`) and verl's `main_ppo` with the task YAML, a mean file and a correction file; verl's own
reward functions score the responses by data_source. One combination per task (harmonic + token_tis
on GSM8K, geometric_seq on MATH with ASYNC=separate_async: verl's V1 trainer with a separate rollout pool,
the GPU async recipe's own YAML at the CPU size); recipes/lib/cpu_matrix.py runs them all (not in CI;
`--async one_step_off` runs the other async recipe the same way).
The GSM8K run goes over two Ray nodes started by recipes/lib/cluster.sh on this machine (tests/ray_cluster.py:
NNODES=2, one rank per node), submitted with `ray job submit` (RAY_ADDRESS=http://<head>:<dashboard port>) from
a copy of recipes/ in another directory, deleted once submitted, and checks that the actor's ranks ran on both
nodes; the
MATH run is a single-node launch (run.sh's own ray.init). About 2 minutes per task on 2 idle cores, most
of it Ray and worker start-up.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import pytest
from omegaconf import OmegaConf
from ray_cluster import AUTH, LOOPBACK, actor_nodes, free_ports, two_nodes
from verl.utils.reward_score import default_compute_score

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
RUNS = {  # task -> (MEAN, CORRECTION, the p its loss logs, ASYNC)
    "gsm8k": ("harmonic", "token_tis", -1.0, "none"),
    "math": ("geometric_seq", "none", 0.0, "separate_async"),
}
TWO_NODE_TASK = "gsm8k"
PM_METRICS = ("actor/pm/seq_ratio_mean", "actor/pm/log_ah_gap", "actor/pm/ess_frac", "actor/pm/power")


def _score(source: str, text: str, truth: str) -> float:
    score = default_compute_score(source, text, truth)
    return score["score"] if isinstance(score, dict) else score


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    """recipes/lib/cpu_sample.py --out <dir>: <dir>/raw/<hub id>/ and <dir>/hmpo_cpu_model."""
    out = tmp_path_factory.mktemp("cpu_sample")
    subprocess.run([sys.executable, str(RECIPES / "lib" / "cpu_sample.py"), "--out", str(out)], check=True,
                   capture_output=True, timeout=300)
    return out


def offline_env(tmp: Path, **extra: str) -> dict:
    """This interpreter first on PATH as python3, and `git` / `curl` that fail loudly if a step calls them."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("git", "curl"):
        (bin_dir / tool).write_text(f"#!/bin/sh\necho 'offline: {tool} was called' >&2\nexit 97\n")
        (bin_dir / tool).chmod(0o755)
    keep = {k: v for k, v in os.environ.items() if k not in ("VERL_REPO", "MEAN", "SIZE", "CORRECTION", "ASYNC", "NNODES",
                                                               "NGPUS_PER_NODE", "RAY_ADDRESS", "DRY_RUN")}
    return {**keep, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHON": sys.executable, **extra}


def prepare(task: str, sample: Path, data: Path) -> subprocess.CompletedProcess:
    env = offline_env(data.parent, DATA_DIR=str(data), RAW_DATA_DIR=str(sample / "raw"))
    return subprocess.run(["bash", str(RECIPES / task / "prepare_data.sh")], env=env, capture_output=True,
                          text=True, timeout=600)


# ---------------------------------------------------------------------------------------------
# the prepare steps on the sample


@pytest.fixture(scope="module")
def prepared(sample, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("prepared") / "data"
    for task in RUNS:
        result = prepare(task, sample, data)
        assert result.returncode == 0, result.stdout + result.stderr
    return data


def test_the_prepare_steps_write_verls_rows_offline(prepared):
    gsm8k = datasets.Dataset.from_parquet(str(prepared / "gsm8k" / "train.parquet"))
    assert gsm8k.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    assert len(gsm8k) == 16 and len(datasets.Dataset.from_parquet(str(prepared / "gsm8k" / "test.parquet"))) == 8
    assert [m["role"] for m in gsm8k[0]["prompt"]] == ["system", "user"]  # prepare_extra.py's system prompt
    levels = datasets.Dataset.from_parquet(str(prepared / "math" / "train_level3to5.parquet"))
    assert sorted(set(levels["level"])) == ["Level 3", "Level 4", "Level 5"] and len(levels) == 18
    math500 = datasets.Dataset.from_parquet(str(prepared / "math500" / "test.parquet"))
    aime = datasets.Dataset.from_parquet(str(prepared / "aime-2024.parquet"))
    assert (len(math500), len(aime)) == (6, 4)  # AIME: 4 problems x 32 copies -> each once
    assert math500.features == aime.features


@pytest.mark.parametrize("path,answer_form", [
    ("gsm8k/test.parquet", "So the answer is #### {}"),
    ("math/train_level3to5.parquet", "So $x = \\boxed{{{}}}$."),
    ("math500/test.parquet", "The answer is $\\boxed{{{}}}$."),
    ("aime-2024.parquet", "Some reasoning.\nAnswer: {}"),
])
def test_verls_reward_for_each_rows_data_source_scores_its_answer(prepared, path, answer_form):
    """The ground truths the prepare steps extracted, written in each prompt's answer form, score 1 with the
    reward verl picks by data_source (gsm8k.py, math_reward.py, math_dapo.py); a wrong answer does not."""
    rows = datasets.Dataset.from_parquet(str(prepared / path))
    for row in rows:
        truth = row["reward_model"]["ground_truth"]
        assert _score(row["data_source"], answer_form.format(truth), truth) == 1.0, (path, truth)
        assert _score(row["data_source"], answer_form.format(truth + "1"), truth) <= 0.0


@pytest.mark.skipif(not os.environ.get("VERL_REPO"), reason="VERL_REPO=<a verl checkout> runs verl's own scripts")
@pytest.mark.parametrize("task,script", [("gsm8k", "gsm8k.py"), ("math", "math_dataset.py")])
def test_our_preprocessing_equals_verls_own_scripts(sample, tmp_path, task, script):
    raw = sample / "raw" / {"gsm8k": "openai/gsm8k", "math": "DigitalLearningGmbH/MATH-lighteval"}[task]
    theirs, ours = tmp_path / "verl", tmp_path / "ours"
    subprocess.run([sys.executable, f"{os.environ['VERL_REPO']}/examples/data_preprocess/{script}",
                    "--local_save_dir", str(theirs), "--local_dataset_path", str(raw)], check=True, timeout=300)
    subprocess.run([sys.executable, str(RECIPES / "lib" / "preprocess.py"), task, "--local_save_dir", str(ours),
                    "--local_dataset_path", str(raw)], check=True, timeout=300)
    for split in ("train", "test"):
        a = datasets.Dataset.from_parquet(str(theirs / f"{split}.parquet"))
        b = datasets.Dataset.from_parquet(str(ours / f"{split}.parquet"))
        assert a.features == b.features and a.to_list() == b.to_list()


def test_readme_lists_every_key_the_cpu_size_changes():
    """Only model, parallel sizes, rollout backend (and the batch / length / steps the section names) differ."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_recipes_config import compose_recipe

    def flat(cfg) -> dict:
        out = {}

        def walk(node, prefix):
            if isinstance(node, dict):
                for key, value in node.items():
                    walk(value, f"{prefix}.{key}" if prefix else key)
            else:
                out[prefix] = node

        walk(OmegaConf.to_container(cfg, resolve=False), "")
        return out

    text = (RECIPES / "README.md").read_text()
    section = text.split("## The CPU size", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`([A-Za-z_0-9.]+)`", section))
    for task in RUNS:
        gpu = flat(compose_recipe(RECIPES, task, ("size=qwen2_5_math_1_5b",)))
        cpu = flat(compose_recipe(RECIPES, task, ("size=cpu",)))
        changed = {k for k in gpu.keys() | cpu.keys() if gpu.get(k, "<unset>") != cpu.get(k, "<unset>")}
        assert changed - listed == set(), f"{task}: keys the CPU size changes that the README does not list"


# ---------------------------------------------------------------------------------------------
# run.sh, SIZE=cpu, 2 steps


def submit_from(recipes: Path, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """`bash <recipes>/<task>/run.sh` with RAY_ADDRESS=http://... (`ray job submit`, which follows the job's log
    and exits 1 if it failed), deleting `recipes` as soon as Ray says the job is submitted."""
    start = time.time()
    process = subprocess.Popen(["bash", str(recipes / TWO_NODE_TASK / "run.sh")], env=env, cwd=cwd, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "submitted successfully" in line and recipes.exists():
            shutil.rmtree(recipes.parent)
    code = process.wait(timeout=1200)
    assert not recipes.exists(), "the submission never said it was submitted"
    print(f"ray job submit {TWO_NODE_TASK}/run.sh SIZE=cpu NNODES=2: {time.time() - start:.0f} s")
    return subprocess.CompletedProcess(process.args, code, "".join(lines), "")


@pytest.fixture(scope="module", params=list(RUNS))
def run(request, sample, prepared, tmp_path_factory):
    task = request.param
    mean, correction, power, async_mode = RUNS[task]
    out = tmp_path_factory.mktemp(f"cpu_size_{task}")
    env = offline_env(out, SIZE="cpu", MEAN=mean, CORRECTION=correction, ASYNC=async_mode, DATA_DIR=str(prepared),
                      MODEL_PATH=str(sample / "hmpo_cpu_model"), CKPT_DIR=str(out / "ckpt"), LOGGER="console,file",
                      VERL_FILE_LOGGER_PATH=str(out / "metrics.jsonl"), RAY_DEDUP_LOGS="0")

    def launch(recipes: Path = RECIPES) -> subprocess.CompletedProcess:
        start = time.time()
        done = subprocess.run(["bash", str(recipes / task / "run.sh")], env=env, capture_output=True, text=True,
                              timeout=1200, cwd=out)
        print(f"SIZE=cpu MEAN={mean} CORRECTION={correction} ASYNC={async_mode} NNODES={env.get('NNODES', '-')} {task}/run.sh: "
              f"{time.time() - start:.0f} s")
        return done

    placement = None
    if task == TWO_NODE_TASK:
        # the trainer runs in the cluster's worker processes, which take the nodes' environment
        node_env = offline_env(out, VERL_PLATFORM="cpu", VERL_FILE_LOGGER_PATH=env["VERL_FILE_LOGGER_PATH"])
        dashboard = free_ports(1)[0]
        with two_nodes(node_env, out, dashboard_port=dashboard) as (address, nodes):
            # `ray job submit` through the head's dashboard, from a copy of recipes/ elsewhere that is deleted
            # once Ray has uploaded it: the job reads the YAML it shipped, not a path of the submitting side
            elsewhere = Path(tempfile.mkdtemp(prefix="hmpo_submitter_")) / "recipes"
            shutil.copytree(RECIPES, elsewhere, ignore=shutil.ignore_patterns("__pycache__"))
            env.update(NNODES="2", NGPUS_PER_NODE="1", RAY_ADDRESS=f"http://{LOOPBACK}:{dashboard}", **AUTH)
            result = submit_from(elsewhere, env, out)
            placement = (nodes, actor_nodes(address))
    else:
        result = launch()
    log = result.stdout + result.stderr
    (out / "train.log").write_text(log)
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
    metrics = {}
    for line in lines:
        record = json.loads(line)
        metrics.setdefault(record["step"], {}).update(record["data"])
    return task, power, result.returncode, log, metrics, out, placement


def test_run_sh_trains_two_steps_through_the_preflight(run):
    task, _, code, log, metrics, out, _ = run
    assert code == 0, log[-6000:]
    if task == TWO_NODE_TASK:  # submitted: the job runs on the cluster's software, which run.sh does not check
        assert "succeeded" in log and "preflight: ok" not in log
        assert "preflight skipped for ray job submit" in log  # said, not silent
    else:
        assert "preflight: ok (cpu)" in log
    assert sorted(metrics) == [0, 1, 2]  # 0: validation before training
    assert (out / "ckpt" / "global_step_2").is_dir(), "the task's save_freq saves the last step, in CKPT_DIR"
    assert (out / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_our_metrics_are_logged_with_the_mean_files_p(run):
    _, power, _, _, metrics, _, _ = run
    for step in (1, 2):
        missing = [k for k in PM_METRICS if k not in metrics[step]]
        assert not missing, (step, missing)
        assert metrics[step]["actor/pm/power"] == power
        assert metrics[step]["critic/score/mean"] == metrics[step]["critic/score/mean"]  # a number: rewards ran


def test_verls_rewards_scored_every_validation_data_source(run):
    """Validation before and after training, one key per data_source; DAPO's reward (math_dapo) scores a
    wrong answer -1, which no other reward does -- its score shows that it, and not a default, ran."""
    task, _, _, _, metrics, _, _ = run
    sources = {"gsm8k": ["openai/gsm8k"], "math": ["HuggingFaceH4/MATH-500", "math_dapo"]}[task]
    n = {"gsm8k": 1, "math": 16}[task]  # MATH validates 16 samples per problem (math.yaml val_kwargs.n)
    for step in (0, 2):
        for source in sources:
            assert f"val-core/{source}/acc/mean@{n}" in metrics[step] or f"val-core/{source}/reward/mean@{n}" in \
                metrics[step], (step, source, sorted(k for k in metrics[step] if k.startswith("val")))
    if task == "math":
        assert metrics[0]["val-aux/math_dapo/score/mean@16"] < 0


def test_the_correction_file_reached_the_trainer(run):
    task, _, _, _, metrics, _, _ = run
    if RUNS[task][1] == "token_tis":
        assert "rollout_corr/rollout_is_mean" in metrics[1]
    if RUNS[task][3] == "none":  # (bypass mode, which ASYNC sets, trains on those log-probs instead)
        assert metrics[1]["training/rollout_probs_diff_valid"] == 1  # the hf server's log-probs reached verl
    assert metrics[1]["response_length/mean"] <= 32  # the CPU size's response length


def test_the_async_run_logs_each_samples_lag_within_the_recipes_bound(run):
    """ASYNC=separate_async: per-sample lag (= verl's own trajectory_staleness_worst) within the async file's
    staleness bound (max_off_policy_threshold: 2, so lag <= 1), reaching the loss (actor/pm/lag<k>/*)."""
    task, _, code, log, metrics, _, _ = run
    if RUNS[task][3] == "none":
        pytest.skip("the sync run")
    assert code == 0, log[-3000:]
    assert "[V1SepAsync] hybrid replicas disabled" in log  # verl's separate_async trainer ran, its pool apart
    for step in (1, 2):
        data = metrics[step]
        assert data["training/lag/max"] <= 1 and data["training/lag/max"] == \
            data["training/off_policy/trajectory_staleness_worst/max"], (step, data["training/lag/max"])
        assert data["training/lag/mean"] == pytest.approx(data["training/off_policy/trajectory_staleness_worst/mean"])
        lagged = [b for b in ("0", "1") if data[f"training/lag/share_{b}"] > 0]
        assert lagged and all(f"actor/pm/lag{b}/log_ah_gap" in data for b in lagged), (step, lagged)
    assert metrics[1]["training/lag/max"] == 0  # step 1 trains samples of the initial weights


def test_verls_model_merger_exports_the_checkpoint_as_a_hugging_face_model(run, sample, tmp_path):
    """The README's export command, on the CPU run's last checkpoint: an HF model with the tiny model's weights."""
    import torch
    from transformers import AutoModelForCausalLM

    task, _, code, _, _, out, _ = run
    if task != "gsm8k":
        pytest.skip("once is enough")
    assert code == 0
    target = tmp_path / "hf_model"
    result = subprocess.run([sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp", "--local_dir",
                             str(out / "ckpt" / "global_step_2" / "actor"), "--target_dir", str(target)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(target).state_dict()
    initial = AutoModelForCausalLM.from_pretrained(sample / "hmpo_cpu_model").state_dict()
    assert merged.keys() == initial.keys()
    for name, tensor in initial.items():  # zero advantages: only AdamW's weight decay (lr 1e-6) moved them;
        # the merger writes bf16 (8 significant bits)
        torch.testing.assert_close(merged[name].float(), tensor, rtol=2 ** -7, atol=1e-6)


def test_a_save_holds_12_bytes_per_parameter(run):
    """The FSDP figure of the preflight's disk check (preflight.BYTES_PER_PARAM), measured on this run's real
    checkpoint: fp32 weights + AdamW's two fp32 moments over 2 ranks' DTensor shards, per model parameter."""
    task, _, code, _, _, out, _ = run
    if task != "math":
        pytest.skip("once is enough (the single-node run's 2 ranks)")
    assert code == 0
    result = subprocess.run([sys.executable, str(RECIPES / "lib" / "preflight.py"), "--measure",
                             str(out / "ckpt" / "global_step_2")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"preflight.py --measure global_step_2: {measured}")
    assert 12.0 <= measured["bytes_per_param"] < 12.01  # + AdamW's step counter, one 4-byte scalar per tensor
    assert measured["file_overhead_per_tensor"] < 2000  # ~1e-6 of a save of a 1.5B model's ~1000 tensors


def test_the_two_node_run_placed_one_actor_rank_on_each_node(run):
    task, _, code, log, _, _, placement = run
    if task != TWO_NODE_TASK:
        pytest.skip("the single-node launch")
    assert code == 0
    nodes, table = placement
    assert len(set(nodes)) == 2
    workers = {name: on for name, on in table.items() if name.endswith("WorkerDict")}
    assert workers, f"no trainer worker actors among {sorted(table)}"
    for name, on in workers.items():
        assert sorted(on) == sorted(nodes), (name, on, nodes)  # one rank on each node
