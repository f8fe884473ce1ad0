"""recipes/lib/preflight.py's run checks: the checkpoint's size and its disk, the model's parameter count, GPU
extensions that fail at load, the lock files; and resolve_gpu.py's lock, offline.

The disk check is fed a fake filesystem (shutil.disk_usage) and a model whose safetensors header declares
1e9 parameters (no data); the number of saves verl holds is checked against verl's own checkpoint manager
pruning real directories. The parameter count is checked against transformers' model built for real.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
sys.path.insert(0, str(RECIPES / "lib"))
import preflight  # noqa: E402
import resolve_gpu  # noqa: E402

# The published models' config.json fields that decide the parameter count (hub: Qwen/Qwen2.5-Math-1.5B,
# Qwen/Qwen2.5-Math-7B, Qwen/Qwen3-30B-A3B-Base), as transcribed; the hub is not reachable from here.
PUBLISHED = {
    "qwen2_5_math_1_5b": ({"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
                           "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                           "vocab_size": 151936, "tie_word_embeddings": True}, 1_543_714_304),
    "qwen2_5_math_7b": ({"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                         "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                         "vocab_size": 152064, "tie_word_embeddings": False}, 7_615_616_512),
    "qwen3_30b_a3b_megatron": ({"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                                "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
                                "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                                "num_experts_per_tok": 8, "vocab_size": 151936, "tie_word_embeddings": False},
                               30_532_122_624),
}


def fake_model(folder: Path, params: int) -> Path:
    """A model directory whose one safetensors file declares ``params`` fp32 parameters (header only)."""
    folder.mkdir(parents=True, exist_ok=True)
    header = json.dumps({"w": {"dtype": "F32", "shape": [params], "data_offsets": [0, 4 * params]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return folder


# ---------------------------------------------------------------------------------------------
# the parameter count


def test_the_count_from_safetensors_headers_equals_the_model_built_from_its_config(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    real = sum(p.numel() for p in model.parameters())
    assert preflight.safetensors_count(tmp_path) == real  # the tied lm_head once
    assert preflight.parameter_count(json.loads((tmp_path / "config.json").read_text())) == real
    assert preflight.model_parameters(str(tmp_path)) == real
    del torch


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_the_sizes_parameter_counts(size):
    """The counts recipes/README.md's checkpoint table is computed from (published: 1.54B, 7.62B, 30.5B)."""
    config, expected = PUBLISHED[size]
    assert preflight.parameter_count(config) == expected


# ---------------------------------------------------------------------------------------------
# how many saves verl holds: against verl's own checkpoint manager


def _verl_peak(tmp: Path, keep, total_steps: int, save_freq: int) -> int:
    """verl 0.9.1's BaseCheckpointManager pruning real directories, one save per save step and the last step."""
    from verl.utils.checkpoint.checkpoint_manager import BaseCheckpointManager

    manager = types.SimpleNamespace(previous_saved_paths=[])
    manager.remove_previous_save_local_path = lambda p: BaseCheckpointManager.remove_previous_save_local_path(manager, p)
    peak = 0
    for step in range(1, total_steps + 1):
        if step % save_freq and step != total_steps:
            continue
        BaseCheckpointManager.ensure_checkpoint_capacity(manager, keep)
        (tmp / f"global_step_{step}").mkdir()
        peak = max(peak, len(list(tmp.iterdir())))
        BaseCheckpointManager.register_checkpoint(manager, str(tmp / f"global_step_{step}"), keep)
    return peak


@pytest.mark.parametrize("keep", [None, 0, 1, 2, 3, 5])
@pytest.mark.parametrize("total_steps,save_freq", [(500, 50), (7, 3), (2, 50)])
def test_saves_at_peak_is_what_verls_checkpoint_manager_holds(tmp_path, keep, total_steps, save_freq):
    assert preflight.saves_at_peak(keep, total_steps, save_freq) == _verl_peak(tmp_path, keep, total_steps, save_freq)


def test_saves_at_peak_edge_cases():
    assert preflight.saves_at_peak(2, 500, -1) == 0  # save_freq -1: no checkpoint
    assert preflight.saves_at_peak(2, None, 50) == 2
    with pytest.raises(ValueError, match="every save is kept"):
        preflight.saves_at_peak(None, None, 50)


# ---------------------------------------------------------------------------------------------
# the disk


def _run_args(tmp_path: Path, params: int, keep: int = 2) -> list[str]:
    data = tmp_path / "train.parquet"
    data.write_text("")
    return ["--cpu", "--ckpt-dir", str(tmp_path / "ckpt" / "run1"), "--model", str(fake_model(tmp_path / "m", params)),
            "--files", str(data), "--keep", str(keep), "--save-freq", "50", "--total-steps", "500"]


def _free(monkeypatch, gb: float) -> list[Path]:
    asked = []

    def disk_usage(path):
        asked.append(Path(path))
        return types.SimpleNamespace(total=10 ** 13, used=0, free=int(gb * 1e9))

    monkeypatch.setattr(preflight.shutil, "disk_usage", disk_usage)
    return asked


def test_a_filesystem_too_small_for_the_saves_is_refused_with_the_numbers(tmp_path, monkeypatch, capsys):
    asked = _free(monkeypatch, 20.0)  # 1e9 params x 12 B = 12 GB a save, 2 held: 24 GB
    assert preflight.main(_run_args(tmp_path, 10 ** 9)) == 3
    err = capsys.readouterr().err
    assert f"CKPT_DIR={tmp_path}/ckpt/run1: 2 saves x 12.0 GB (1.00e9 params x 12 B, fsdp) = 24.0 GB needed, " \
           f"20.0 GB free on the filesystem of {tmp_path}" in err
    for way_on in ("CKPT_DIR=<a larger filesystem", "trainer.max_actor_ckpt_to_keep=1", "trainer.save_freq="):
        assert way_on in err
    assert asked == [tmp_path]  # the nearest existing parent of a CKPT_DIR not made yet


def test_it_passes_when_the_saves_fit(tmp_path, monkeypatch, capsys):
    _free(monkeypatch, 24.1)
    assert preflight.main(_run_args(tmp_path, 10 ** 9)) == 0
    assert capsys.readouterr().out.strip() == "preflight: ok (cpu)"


def test_megatron_saves_are_14_bytes_a_parameter(tmp_path, monkeypatch):
    _free(monkeypatch, 27.9)
    (problem,) = preflight.check_disk(str(tmp_path), 10 ** 9 * preflight.BYTES_PER_PARAM["megatron"], 2, "megatron",
                                      10 ** 9)
    assert "2 saves x 14.0 GB" in problem and "= 28.0 GB needed" in problem


def test_missing_data_and_an_unreadable_model_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    found = preflight.check_run({"files": [str(tmp_path / "no.parquet")], "model": "no-org/no-model",
                                 "ckpt_dir": str(tmp_path), "save_freq": 50, "keep": 2, "total_steps": 10}, "fsdp")
    assert found[0] == f"data file {tmp_path}/no.parquet is not there"
    assert found[1].startswith("model no-org/no-model: cannot read its config.json") and "MODEL_PATH=" in found[1]


# ---------------------------------------------------------------------------------------------
# GPU extensions: found is not importable


def test_an_extension_that_fails_at_load_is_caught_where_find_spec_is_not(tmp_path, monkeypatch):
    shadow = tmp_path / "shadow"
    (shadow / "fake_flash_ext").mkdir(parents=True)
    (shadow / "fake_flash_ext" / "__init__.py").write_text(
        "raise ImportError('fake_flash_ext_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n")
    monkeypatch.syspath_prepend(str(shadow))
    monkeypatch.setenv("PYTHONPATH", f"{shadow}:{__import__('os').environ.get('PYTHONPATH', '')}")
    assert importlib.util.find_spec("fake_flash_ext") is not None  # what the old check looked at
    (problem,) = preflight.check_imports(["fake_flash_ext", "json"])
    assert problem == ("fake_flash_ext is installed but fails to import: ImportError: fake_flash_ext_2_cuda.so: "
                       "undefined symbol: _ZN3c104cuda9SetDeviceEi")
    assert preflight.check_imports(["no_such_module_x"]) == [
        "no_such_module_x cannot be imported: ModuleNotFoundError: No module named 'no_such_module_x'"]


def test_the_gpu_modes_import_the_engines_extensions():
    assert preflight.EXTENSIONS["fsdp"] == ["flash_attn"]
    assert "transformer_engine.pytorch" in preflight.EXTENSIONS["megatron"]


# ---------------------------------------------------------------------------------------------
# the lock


def test_every_install_step_has_a_lock_that_agrees_with_its_pins():
    for step, no_deps in resolve_gpu.STEPS:
        lock = resolve_gpu.lock_path(step)
        assert lock.is_file(), f"run python3 recipes/lib/resolve_gpu.py --lock ({lock.name})"
        text = lock.read_text()
        assert f"pip install {'--no-deps ' if no_deps else ''}-r recipes/{step} -c recipes/{lock.name}" in text
    for engine in preflight.REQUIREMENTS:
        locked, missing = preflight.lock_pins(engine)
        assert missing == []
        for dist, pinned in preflight.requirements(engine).items():
            assert locked.get(dist) == pinned or pinned is None, (engine, dist, locked.get(dist), pinned)


def test_the_install_commands_use_the_locks():
    readme = (RECIPES / "README.md").read_text()
    for step, no_deps in resolve_gpu.STEPS:
        command = f"pip install {'--no-deps ' if no_deps else ''}-r recipes/{step} -c recipes/{resolve_gpu.lock_path(step).name}"
        assert command in readme, command
        assert command in (RECIPES / step).read_text(), (step, command)


def test_preflight_names_what_differs_from_the_lock(tmp_path, monkeypatch):
    (tmp_path / "requirements-gpu.lock.txt").write_text("# header\nray==2.60.0\nnumpy==2.2.6  # note\ntorch==2.11.0\n")
    monkeypatch.setattr(preflight, "RECIPES", tmp_path)
    monkeypatch.setattr(preflight, "_installed_version",
                        {"ray": "2.59.0", "numpy": "2.2.6", "torch": "2.11.0+cu130"}.get)
    assert preflight.lock_pins("fsdp") == ({"ray": "2.60.0", "numpy": "2.2.6", "torch": "2.11.0"}, [])
    (problem,) = preflight.check_lock("fsdp")
    assert problem.startswith("1 package(s) differ from the lock files") and problem.endswith("ray 2.59.0 (lock: 2.60.0)")
    assert preflight.check_lock("fsdp", skip={"ray"}) == []  # a pin of the requirements file: reported there
    assert preflight.check_lock("megatron")[0].startswith("no lock file recipes/requirements-gpu-megatron.lock.txt")


def test_lock_lines_from_pips_report(tmp_path):
    stand_ins = tmp_path / "stand_ins"
    report = {"install": [
        {"metadata": {"name": "torch", "version": "2.11.0"}, "is_direct": False,
         "download_info": {"url": "https://files.example/torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl"}},
        {"metadata": {"name": "apex", "version": "0.1"}, "is_direct": True,
         "download_info": {"url": "https://github.example/apex-0.1-cp312-cp312-linux_x86_64.whl",
                           "archive_info": {"hashes": {"sha256": "ab12"}}}},
        {"metadata": {"name": "nvidia-cudnn-cu13", "version": "9.19.0.56"},
         "download_info": {"url": (stand_ins / "nvidia_cudnn_cu13-9.19.0.56-py3-none-any.whl").as_uri()}},
        {"metadata": {"name": "Extra", "version": "0"},
         "download_info": {"url": (stand_ins / "extra-0-py3-none-any.whl").as_uri()}},
    ]}
    url = "https://github.example/flash_attn-2.8.3-cp312-cp312-linux_x86_64.whl"
    assert resolve_gpu.lock_lines(report, stand_ins, {"flash-attn": url}) == [
        "apex==0.1  # https://github.example/apex-0.1-cp312-cp312-linux_x86_64.whl sha256=ab12",
        "# Extra: not on the index reachable here, unpinned: not locked",
        f"flash-attn==2.8.3  # {url} (not reachable from here: sha256 not recorded)",
        "nvidia-cudnn-cu13==9.19.0.56  # not on the index reachable here: the requirement's version, its dependencies "
        "not locked",
        "torch==2.11.0",
    ]


@pytest.mark.parametrize("offered,installs", [("0.5.2", True), ("0.5.1", False)])
def test_pip_holds_an_install_to_the_lock(tmp_path, offered, installs):
    """pip reads the committed lock as constraints: offered only another version than the lock's, it refuses."""
    links = tmp_path / "links"
    links.mkdir()
    resolve_gpu.stand_in_wheel(links, f"megatron-bridge=={offered}")
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--find-links", str(links),
                          "--ignore-installed", "--target", str(tmp_path / "t"), "--no-deps",
                          "-c", str(resolve_gpu.lock_path("requirements-gpu-megatron-nodeps.txt")), "megatron-bridge"],
                         capture_output=True, text=True, timeout=120)
    assert (run.returncode == 0) == installs, run.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# what run.sh hands the preflight


def _run_args_of(env: dict, *overrides: str) -> list[str]:
    script = (f'set -euo pipefail; RECIPES_DIR={RECIPES}; source "$RECIPES_DIR/lib/launch.sh"; '
              'HMPO_OVERRIDES=("$@"); hmpo_preflight_run_args')
    base = {"PATH": "/usr/bin:/bin", "HOME": "/home/u", "TASK": "gsm8k", "SIZE": "qwen2_5_math_7b", "CKPT_DIR": "/ck",
            "TRAIN_FILES": "/d/train.parquet", "VAL_FILES": "/d/test.parquet", "MODEL_PATH": ""}
    out = subprocess.run(["bash", "-c", script, "bash", *overrides], env={**base, **env}, capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return out.splitlines()


def test_run_sh_hands_the_preflight_the_runs_settings():
    assert _run_args_of({}) == ["--ckpt-dir", "/ck", "--files", "/d/train.parquet,/d/test.parquet", "--task", "gsm8k",
                                "--model", "Qwen/Qwen2.5-Math-7B", "--keep", "2", "--save-freq", "50", "--total-steps",
                                "500", "--prompt-length", "512", "--response-length", "1024", "--nnodes", "1",
                                "--generation-config", ""]
    # vLLM's generation config named by an override (the stop-token check reads it)
    assert _run_args_of({}, "+actor_rollout_ref.rollout.engine_kwargs.vllm.generation_config=/g")[-2:] == [
        "--generation-config", "/g"]
    # the last override wins; the CPU size's model path and step count; a cluster to check node by node
    args = _run_args_of({"SIZE": "cpu", "RAY_ADDRESS": "127.0.0.2:6379"}, "trainer.max_actor_ckpt_to_keep=1",
                        "+trainer.save_freq=5", "trainer.max_actor_ckpt_to_keep=null")
    assert args == ["--ckpt-dir", "/ck", "--files", "/d/train.parquet,/d/test.parquet", "--task", "gsm8k", "--model",
                    "/home/u/data/hmpo_cpu_model", "--keep", "null", "--save-freq", "5", "--total-steps", "2",
                    "--prompt-length", "512", "--response-length", "32", "--nnodes", "1", "--generation-config", "",
                    "--ray-address", "127.0.0.2:6379"]
    # HMPO_OVERRIDES is the whole command: MODEL_PATH's word, then the user's override, which wins in Hydra
    assert _run_args_of({}, "actor_rollout_ref.model.path='/m'", "actor_rollout_ref.model.path='/other'")[7] == "/other"
    assert _run_args_of({}, "actor_rollout_ref.model.path='/other'")[7] == "/other"
    # the GPU-memory refusal's advice: MIN_GPU_GIB reaches the preflight
    assert _run_args_of({"MIN_GPU_GIB": "44"})[-2:] == ["--min-gpu-gib", "44"]
