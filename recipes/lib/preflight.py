"""Preflight of a GPU node: is the software the recipes need installed, before Ray starts?

    python3 recipes/lib/preflight.py --engine fsdp --gpus 8        # what run.sh runs (PREFLIGHT=1)
    python3 recipes/lib/preflight.py --engine megatron --gpus 8
    python3 recipes/lib/preflight.py --cpu                         # what run.sh runs for SIZE=cpu

Checks, reporting every problem at once (exit 3) or printing one `preflight: ok` line (exit 0):
- each `name==version` pin of recipes/requirements-gpu.txt (and -megatron.txt for --engine
  megatron) is installed at that version, and each unpinned name there is importable;
- torch sees CUDA and at least --gpus devices (a CPU-only torch build and a CUDA build that sees
  no device -- no driver, or one too old for the build's CUDA -- are told apart);
- hmpo-verl is installed with its `verl.plugins` entry point (verl imports the plugin in every
  worker through it; without it our loss modes are "Unsupported" in the workers).
--cpu (the CPU size, recipes/size/cpu.yaml) checks the pins that are not GPU builds (lines of
requirements-gpu.txt without a `# gpu-only` comment), hmpo-verl's entry point, and the CPU
backend's (patches/verl_cpu); no CUDA.
With the run's settings (run.sh passes them: --ckpt-dir, --model, --files, --keep, --save-freq,
--total-steps, --task, --prompt-length, --response-length, --nnodes) it also checks
- the disk: one save of verl's checkpoint is BYTES_PER_PARAM[engine] x the model's parameter count (read from
  its config.json, counted on torch's meta device: no weights are loaded or downloaded); verl keeps up to
  max(keep, 2) saves at once (see saves_at_peak); the checkpoint filesystem must have room for them;
- the data files and the model path are there; a task with a system prompt (GSM8K: recipes/gsm8k/prepare_extra.py)
  has it in every row of each file; prompt + response fit the model's max_position_embeddings (check_context);
- the GPU extensions really import (a subprocess imports flash_attn, and Transformer Engine's PyTorch
  extension with --engine megatron: `find_spec` finds a flash-attn built for another torch, which then fails
  at load with an undefined symbol);
- the installed versions equal the lock files (requirements-gpu*.lock.txt, written by resolve_gpu.py --lock).
With --ray-address <host:port> the same checks run on every node of that Ray cluster (one task pinned to each
node), the nodes' Ray / verl / hmpo-verl / torch / Python versions are compared with this process's, the cluster
must have --nnodes live nodes (`auto`: the cluster this node runs), and one report names each node and its problems.

    python3 recipes/lib/preflight.py --measure <CKPT_DIR>/global_step_<n>   # bytes/parameter of a checkpoint

Nothing here imports verl, vLLM or Megatron in this process (a missing or broken one is exactly what it
reports); torch is imported for CUDA, transformers to count parameters, ray for --ray-address. Standard library
otherwise, so the package checks run on a bare Python.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1]
REQUIREMENTS = {"fsdp": ["requirements-gpu.txt"],
                "megatron": ["requirements-gpu.txt", "requirements-gpu-megatron.txt", "requirements-gpu-megatron-nodeps.txt"]}

# distribution name (as pinned) -> module it provides, where the two differ
MODULES = {
    "flash-attn": "flash_attn",
    "TransferQueue": "transfer_queue",
    "megatron-core": "megatron.core",
    "megatron-bridge": "megatron.bridge",
    "transformer-engine": "transformer_engine",
    "nvidia-modelopt": "modelopt",
    "cupy-cuda13x": "cupy",
    "nvidia-mathdx": "nvmath",
}
# distribution -> a further module it must provide: PyPI's transformer-engine meta-package installs the core
# without the PyTorch extension, which the wheel the recipes pin carries
EXTRA_MODULES = {"transformer-engine": "transformer_engine_torch"}
# CUDA major version of a torch build -> the NVIDIA driver branch it needs (CUDA's release notes,
# "minimum required driver version" for the toolkit's major version on Linux).
MIN_DRIVER = {"12": "R525", "13": "R580"}
GPU_ONLY = "# gpu-only"
# entry point name -> the distribution a user installs, for the message
PLUGINS = {"hmpo_verl": "hmpo-verl (`pip install -e .` from the repository root)",
           "verl_cpu": "the CPU backend (`pip install -e patches/verl_cpu`)"}
# Bytes per parameter of one save of verl's checkpoint (the model and optimizer shards its checkpoint manager
# writes; config, tokenizer and data-loader state add a few MB). FSDP: fp32 weights (4) + AdamW's two fp32
# moments (8) = 12, measured on the CPU size's real checkpoints (tests/test_recipes_cpu_size.py, `--measure`:
# 12.002 B of tensors a parameter, the 0.002 AdamW's step counters). Megatron with the distributed optimizer:
# bf16 weights (2) + fp32 main weights and two moments (12) = 14, computed (not run here).
BYTES_PER_PARAM = {"fsdp": 12, "megatron": 14}
# Modules that load a compiled GPU extension when imported, per engine (really imported, in a subprocess).
EXTENSIONS = {"fsdp": ["flash_attn"], "megatron": ["flash_attn", "transformer_engine.pytorch"]}
# "80 GB class" of the size files: torch reports an 80 GB H100 as 79.1 GiB; a 40 / 48 GB card is far below.
MIN_GPU_GIB = 75
# Versions every node must share with the driver (Ray refuses a node of another Ray version only when it joins).
SHARED_VERSIONS = ("ray", "verl", "hmpo-verl", "torch")
_LINE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(==\s*(?P<version>[^\s;#]+))?"
                   r"(\s*@\s*(?P<url>\S+))?")
_WHEEL_VERSION = re.compile(r"/[^/-]+-(?P<version>[^-/]+)-[^/]+\.whl$")


def requirements(engine: str, cpu: bool = False) -> dict[str, str | None]:
    """{distribution: pinned version or None} from the engine's requirements files (last wins).

    With ``cpu``, only the lines without a ``# gpu-only`` comment (the pins a CPU install shares).
    """
    pins: dict[str, str | None] = {}
    for name in REQUIREMENTS[engine]:
        for raw in (RECIPES / name).read_text().splitlines():
            if cpu and GPU_ONLY in raw:
                continue
            line = raw.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue  # comments, pip options, -r includes (listed in REQUIREMENTS)
            match = _LINE.match(line)
            if match is None:
                raise SystemExit(f"{name}: cannot read requirement {raw!r}")
            version = match["version"]
            if match["url"]:  # a wheel URL: its file name carries the version
                wheel = _WHEEL_VERSION.search(match["url"])
                version = wheel["version"] if wheel else None
            pins[match["name"]] = version
    return pins


def _installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def check_packages(pins: dict[str, str | None]) -> list[str]:
    problems = []
    for dist, pinned in pins.items():
        version = _installed_version(dist)
        module = MODULES.get(dist, dist.replace("-", "_"))
        if version is None and not _importable(module):
            problems.append(f"{dist}{'==' + pinned if pinned else ''} is not installed (no module {module!r})")
        elif pinned is not None and version is not None and version.split("+")[0] != pinned:
            problems.append(f"{dist}=={version} is installed; the recipes pin {dist}=={pinned}")
        elif dist in EXTRA_MODULES and not _importable(EXTRA_MODULES[dist]):
            problems.append(f"{dist} is installed without module {EXTRA_MODULES[dist]!r} (its PyTorch extension): "
                            "install the wheel the recipes pin")
    return problems


def check_cuda(gpus: int, min_gib: float = MIN_GPU_GIB) -> list[str]:
    try:
        import torch
    except ImportError:
        return []  # reported with the pins
    cuda = torch.version.cuda
    if cuda is None:
        return [f"torch {torch.__version__} is a CPU-only build: install the CUDA build the recipes pin "
                "(requirements-gpu.txt: torch 2.11.0 for CUDA 13, NVIDIA driver R580 or newer)"]
    if not torch.cuda.is_available():
        driver = MIN_DRIVER.get(cuda.split(".")[0], f"one for CUDA {cuda}")
        return [f"torch {torch.__version__} (built for CUDA {cuda}) sees no CUDA device: no NVIDIA driver, or a driver "
                f"older than CUDA {cuda} needs ({driver} or newer; `nvidia-smi` prints the driver's version and the "
                "highest CUDA it supports)"]
    count = torch.cuda.device_count()
    if count < gpus:
        return [f"torch sees {count} CUDA device(s); NGPUS_PER_NODE={gpus}"]
    small = {i: torch.cuda.get_device_properties(i) for i in range(count)}
    small = {i: p for i, p in small.items() if p.total_memory / 2**30 < min_gib}
    return [f"GPU {i} ({p.name}) has {p.total_memory / 2**30:.1f} GiB; the size files are for 80 GB GPUs "
            f"(at least {min_gib} GiB). To run a smaller size (e.g. SIZE=qwen2_5_0_5b) or one with more offload on "
            f"this card, lower the bound: MIN_GPU_GIB={int(p.total_memory / 2**30)} bash recipes/<task>/run.sh "
            f"(--min-gpu-gib here)" for i, p in small.items()]


def check_plugins(names: tuple[str, ...] = ("hmpo_verl",)) -> list[str]:
    """Each package in ``names`` has a ``verl.plugins`` entry point whose module can be found.

    An entry point's value is ``module`` or ``module:attr`` (hmpo-verl's: ``hmpo_verl.verl_plugin``);
    it belongs to the package named by the value's first dotted component.
    """
    found = {}
    for ep in metadata.entry_points(group="verl.plugins"):
        module = ep.value.split(":")[0].strip()
        found.setdefault(module.split(".")[0], module)
    problems = []
    for name in names:
        module = found.get(name)
        if module is None:
            problems.append(f"{PLUGINS.get(name, name)} is not installed with its verl.plugins entry point, on every node")
        elif not _importable(module):
            problems.append(f"the verl.plugins entry point of {name} names module {module!r}, which cannot be found: "
                            f"reinstall {PLUGINS.get(name, name)}")
    return problems


def check_imports(modules: list[str], python: str = sys.executable, timeout: float = 300) -> list[str]:
    """Each module really imports, in a fresh interpreter (a broken extension may crash it, not us).

    `find_spec` only finds a module; a flash-attn or Transformer Engine built for another torch / CUDA is found
    and then fails at load (``undefined symbol``, ``libcudart.so.X: cannot open``)."""
    if not modules:
        return []
    probe = ("import importlib, json, sys\nout = {}\nfor m in sys.argv[1:]:\n    try:\n        importlib.import_module(m)\n"
             "        out[m] = None\n    except BaseException as e:\n        out[m] = f'{type(e).__name__}: {e}'\n"
             "print(json.dumps(out))")
    try:
        run = subprocess.run([python, "-c", probe, *modules], capture_output=True, text=True, timeout=timeout)
        errors = json.loads(run.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, IndexError, ValueError):
        return [f"importing {', '.join(modules)} did not finish in {timeout:.0f} s or crashed the interpreter"]
    return [f"{m} is installed but fails to import: {str(err).splitlines()[0][:300]}" if _importable(m)
            else f"{m} cannot be imported: {str(err).splitlines()[0][:300]}" for m, err in errors.items() if err]


def lock_pins(engine: str) -> tuple[dict[str, str], list[str]]:
    """({distribution: version} of the engine's lock files, the lock files missing) -- resolve_gpu.py --lock."""
    pins, missing = {}, []
    for name in REQUIREMENTS[engine]:
        lock = RECIPES / name.replace(".txt", ".lock.txt")
        if not lock.is_file():
            missing.append(lock.name)
            continue
        for line in lock.read_text().splitlines():
            match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s#]+)", line)
            if match:
                pins[match[1]] = match[2]
    return pins, missing


def check_lock(engine: str, skip: set[str] = frozenset()) -> list[str]:
    """Every package of the lock files installed at the locked version (those in ``skip`` are checked as pins)."""
    pins, missing = lock_pins(engine)
    problems = [f"no lock file recipes/{name}: run `python3 recipes/lib/resolve_gpu.py --lock`" for name in missing]
    wrong = []
    for dist, locked in pins.items():
        if _normal(dist) in skip:
            continue
        version = _installed_version(dist)
        if version is None or version.split("+")[0] != locked:
            wrong.append(f"{dist} {version or 'missing'} (lock: {locked})")
    if wrong:
        problems.append(f"{len(wrong)} package(s) differ from the lock files (install with `-c recipes/<file>.lock.txt`): "
                        + ", ".join(wrong[:20]) + (" ..." if len(wrong) > 20 else ""))
    return problems


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ----------------------------------------------------------------------------- the checkpoint and its disk


def model_file(model: str, name: str) -> dict | None:
    """A JSON file of the model: from a local directory, else the hub's file alone (huggingface_hub, its cache);
    None if the model has none."""
    local = Path(model).expanduser()
    if local.is_dir():
        path = local / name
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(model, name)).read_text())
    except EntryNotFoundError:
        return None


def model_config(model: str) -> dict:
    """The model's config.json (:func:`model_file`); FileNotFoundError where it has none."""
    config = model_file(model, "config.json")
    if config is None:
        raise FileNotFoundError(f"no config.json in {model}")
    return config


def parameter_count(config: dict) -> int:
    """Parameters of the model a config.json describes: transformers builds it on torch's meta device (no memory,
    no weights) and its parameters are counted once each (tied embeddings once)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map")}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **fields))
    return sum(p.numel() for p in model.parameters())


def saves_at_peak(keep: int | None, total_steps: int | None, save_freq: int) -> int:
    """How many saves of a run verl holds on disk at once.

    verl 0.9.1 (utils/checkpoint/checkpoint_manager.py): before a save, ensure_checkpoint_capacity prunes to
    keep - 1 when keep >= 2; after it, register_checkpoint prunes to keep. So keep >= 2 holds keep saves, keep = 1
    holds 2 while the new one is written, and keep null / 0 keeps every save: one per save_freq steps and the
    last step's. Saves made before a restart are not in verl's list and are never pruned (they already take
    their space). ``total_steps`` None: unknown (bounded by ``keep`` only)."""
    if save_freq <= 0:
        return 0
    made = math.ceil(total_steps / save_freq) if total_steps else math.inf
    held = made if not keep or keep <= 0 else min(made, max(keep, 2))
    if held == math.inf:
        raise ValueError("trainer.max_actor_ckpt_to_keep is null and the step count unknown: every save is kept")
    return int(held)


def check_disk(ckpt_dir: str, save_bytes: int, saves: int, engine: str, params: int) -> list[str]:
    """Room on CKPT_DIR's filesystem for ``saves`` saves of ``save_bytes`` each (the nearest existing parent's)."""
    if saves == 0:
        return []
    where = Path(ckpt_dir)
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    needed = saves * save_bytes
    if free >= needed:
        return []
    return [f"CKPT_DIR={ckpt_dir}: {saves} saves x {save_bytes / 1e9:.1f} GB ({params / 1e9:.2f}e9 params x "
            f"{BYTES_PER_PARAM[engine]} B, {engine}) = {needed / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free on the "
            f"filesystem of {where}. Go on with CKPT_DIR=<a larger filesystem every node sees>, fewer saves held "
            "(trainer.max_actor_ckpt_to_keep=1 holds 2 while writing), or trainer.save_freq=<more steps> / -1 (none)"]


def measure(step_dir: Path) -> dict:
    """What one verl FSDP save ``<CKPT_DIR>/global_step_<n>`` holds per parameter of its model.

    The actor's model and optimizer shards are loaded (torch.load, CPU) and their tensors' bytes summed (a
    DTensor's local shard): ``bytes_per_param`` = those bytes / the parameter count of the model in its
    huggingface/config.json. ``file_overhead_per_tensor``: the shard files' bytes beyond their tensors (pickle
    and DTensor metadata), per tensor; the rest of the save (config, tokenizer, data-loader state) is
    ``other_bytes``."""
    import torch

    actor = step_dir / "actor"
    shards = [f for f in actor.glob("*.pt") if f.name.startswith(("model_world_size_", "optim_world_size_"))]
    if not shards:
        raise SystemExit(f"{actor}: no model_world_size_* / optim_world_size_* shards (an FSDP checkpoint?)")
    tensors = []
    for shard in shards:
        _tensors(torch.load(shard, map_location="cpu", weights_only=False), tensors)
    params = parameter_count(json.loads((actor / "huggingface" / "config.json").read_text()))
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors)
    shard_bytes = sum(f.stat().st_size for f in shards)
    total = sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file())
    return {"params": params, "tensors": len(tensors), "tensor_bytes": tensor_bytes, "shard_bytes": shard_bytes,
            "other_bytes": total - shard_bytes, "bytes_per_param": tensor_bytes / params,
            "file_overhead_per_tensor": (shard_bytes - tensor_bytes) / len(tensors)}


def _tensors(obj, out: list) -> None:
    """Every tensor in a nested state dict, a DTensor as its local shard."""
    if hasattr(obj, "to_local"):
        out.append(obj.to_local())
    elif hasattr(obj, "element_size") and hasattr(obj, "numel"):
        out.append(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            _tensors(value, out)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _tensors(value, out)


def safetensors_count(folder: Path) -> int | None:
    """Parameters stored in a local model's ``*.safetensors`` files, from their JSON headers (no tensor is read);
    None without such files. A tied lm_head is stored once, as ``parameters()`` counts it."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    count = 0
    for file in files:
        with file.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        count += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return count


def model_parameters(model: str, config: dict | None = None) -> int:
    """The parameter count of MODEL_PATH: a local copy's safetensors headers, else its config.json (local or the
    hub's file alone, unless given) built on the meta device."""
    local = Path(model).expanduser()
    counted = safetensors_count(local) if local.is_dir() else None
    return counted if counted is not None else parameter_count(config or model_config(model))


def check_context(model: str, config: dict, prompt: int | None, response: int | None) -> list[str]:
    """Prompt + response fit the model's context. verl 0.9.1's rollout servers (vLLM, SGLang, TensorRT-LLM) take
    the model's max_position_embeddings as max_model_len (rollout/utils.py, get_max_position_embeddings: rope_scaling
    does not enter it) and cut every response at max_model_len - its prompt's length, silently."""
    limit = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    if not (limit and prompt and response) or prompt + response <= limit:
        return []
    return [f"data.max_prompt_length={prompt} + data.max_response_length={response} = {prompt + response} tokens, "
            f"beyond the context of model {model} (max_position_embeddings={limit} in its config.json): verl's rollout "
            f"would cut responses at {limit} tokens less their prompt's, silently. Set data.max_response_length="
            f"{limit - prompt} (or less), or give the model a longer context (its config.json's max_position_embeddings, "
            "with rope_scaling, as verl's DAPO 7B recipe does)"]


IM_END = "<|im_end|>"  # ChatML's end of turn (Qwen: 151645)


def check_stop_tokens(model: str, generation_config: str | None = None) -> list[str]:
    """A chat model whose template ends each turn with <|im_end|> stops there in vLLM only if <|im_end|> is its
    tokenizer's EOS or an ``eos_token_id`` of the generation config vLLM reads (the model's, or the one
    ``actor_rollout_ref.rollout.engine_kwargs.vllm.generation_config`` names): verl 0.9.1 sends no stop tokens
    (recipes/README.md, "Stop tokens"). Otherwise every response runs past its turn into the reward, silently."""
    tokenizer = model_file(model, "tokenizer_config.json") or {}
    if IM_END not in str(tokenizer.get("chat_template", "")):
        return []
    ids = [int(i) for i, token in (tokenizer.get("added_tokens_decoder") or {}).items() if token.get("content") == IM_END]
    eos = tokenizer.get("eos_token")
    if not ids or (eos.get("content") if isinstance(eos, dict) else eos) == IM_END:
        return []
    source = model if generation_config in (None, "", "auto", "vllm") else generation_config  # vllm: the model's
    generation = model_file(source, "generation_config.json")
    if generation is None:  # vLLM builds one from config.json (GenerationConfig.from_model_config)
        generation = model_file(source, "config.json") or {}
    stops = generation.get("eos_token_id")
    stops = stops if isinstance(stops, list) else [] if stops is None else [stops]
    if ids[0] in stops:
        return []
    return [f"model {model}: its chat template ends each turn with {IM_END} ({ids[0]}), which is neither its "
            f"tokenizer's EOS ({eos!r}) nor an eos_token_id of the generation config vLLM reads ({source}: {stops}); "
            "verl sends vLLM no stop tokens, so every response would run past its turn until EOS or "
            f"max_response_length, and the reward would read what follows. Add {ids[0]} to eos_token_id in "
            f"{source}/generation_config.json, or set +actor_rollout_ref.rollout.engine_kwargs.vllm.generation_config="
            f"<a directory whose generation_config.json lists it> (recipes/README.md, \"Stop tokens\")"]


def system_prompt(task: str | None) -> str | None:
    """The system prompt recipes/<task>/prepare_extra.py puts first in every row (SYSTEM_PROMPT), if it has one."""
    extra = RECIPES / str(task) / "prepare_extra.py"
    if not task or not extra.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"_prepare_extra_{task}", extra)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, "SYSTEM_PROMPT", None)


def check_prompts(task: str | None, files: list[str]) -> list[str]:
    """Every row of each data file opens with the task's system prompt (GSM8K: recipes/gsm8k/prepare_extra.py;
    the first row alone passed a file merged from one with and one without it).
    verl's own examples/data_preprocess/gsm8k.py writes its parquet to the same ~/data/gsm8k without one, and
    Qwen2.5-Math's chat template then asks for \\boxed{} while verl's reward scores only "####"."""
    wanted = system_prompt(task)
    if wanted is None or not files:
        return []
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return []  # no pyarrow, no datasets: verl's missing dependencies are named with the pins
    def opens_with_it(row: dict) -> bool:
        first = (row["prompt"] or [{}])[0]
        return first.get("role") == "system" and first.get("content") == wanted

    problems = []
    for file in files:
        try:
            lacking = total = 0
            for batch in pq.ParquetFile(file).iter_batches(batch_size=4096, columns=["prompt"]):
                rows = batch.to_pylist()
                lacking, total = lacking + sum(not opens_with_it(row) for row in rows), total + len(rows)
        except Exception as error:  # noqa: BLE001 -- a file verl cannot read either
            problems.append(f"data file {file}: cannot read its 'prompt' column ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:200]})")
            continue
        if lacking:
            some = "" if lacking == total else f" in {lacking} of its {total} rows"
            problems.append(f"data file {file} lacks the {task} recipe's system prompt ({wanted!r}){some}, as verl's "
                            f"own examples/data_preprocess/{task}.py writes it: add it with `python3 {RECIPES}/{task}/"
                            f"prepare_extra.py system {file}` (in place), or rerun bash {RECIPES}/{task}/prepare_data.sh")
    return problems


def check_run(run: dict, engine: str) -> list[str]:
    """The run's files, model and disk: ``run`` holds ckpt_dir, model, files, keep, save_freq, total_steps, task,
    prompt_length, response_length (any None)."""
    files = run.get("files") or []
    problems = [f"data file {f} is not there" for f in files if not Path(f).is_file()]
    problems += check_prompts(run.get("task"), [f for f in files if Path(f).is_file()])
    model = run.get("model")
    if not model:
        return problems
    if model.startswith("~"):
        return problems + [f"model path {model}: verl reads a path as written, without expanding ~; write it out "
                           f"(actor_rollout_ref.model.path={os.path.expanduser(model)})"]
    try:
        config = model_config(model) if run.get("prompt_length") and run.get("response_length") else None
        params = model_parameters(model, config) if run.get("ckpt_dir") else 0
    except Exception as error:  # noqa: BLE001 -- any failure to read the model is the message
        return problems + [f"model {model}: cannot read its config.json ({type(error).__name__}: "
                           f"{str(error).splitlines()[0][:200]}); MODEL_PATH=<a local copy> on every node"]
    if config is not None:
        problems += check_context(model, config, run["prompt_length"], run["response_length"])
    if not run.get("ckpt_dir"):
        return problems
    try:
        saves = saves_at_peak(run.get("keep"), run.get("total_steps"), run.get("save_freq") or 0)
    except ValueError as error:
        return problems + [f"{error}: set trainer.max_actor_ckpt_to_keep or trainer.total_training_steps"]
    return problems + check_disk(run["ckpt_dir"], params * BYTES_PER_PARAM[engine], saves, engine, params)


def problems(engine: str, gpus: int, cpu: bool = False, run: dict | None = None, imports: list[str] | None = None,
             min_gib: float = MIN_GPU_GIB) -> list[str]:
    """Every problem of this node: software, GPUs (not with ``cpu``), the lock (idem), the run's files and disk."""
    # an extension not found at all is already named by its pin
    modules = list(imports or []) + ([] if cpu else [m for m in EXTENSIONS[engine] if _importable(m)])
    if cpu:
        found = check_packages(requirements(engine, cpu=True)) + check_plugins(("hmpo_verl", "verl_cpu"))
    else:
        pins = requirements(engine)
        found = (check_packages(pins) + check_lock(engine, {_normal(d) for d in pins}) + check_cuda(gpus, min_gib)
                 + check_plugins())
    stops = [] if cpu or not (run or {}).get("model") else _readable(lambda: check_stop_tokens(run["model"],
                                                                                              run.get("generation_config")))
    return found + check_imports(modules) + check_run(run or {}, engine) + stops


def _readable(check) -> list[str]:
    """``check()``, or nothing where the model's files cannot be read (check_run names an unreadable model)."""
    try:
        return check()
    except Exception:  # noqa: BLE001
        return []


def versions() -> dict[str, str | None]:
    return {"python": platform.python_version(), **{d: _installed_version(d) for d in SHARED_VERSIONS}}


def node_report(engine: str, gpus: int, cpu: bool, run: dict, imports: list[str], min_gib: float) -> dict:
    """What one node reports through Ray: its host, its problems and its versions."""
    return {"host": socket.gethostname(), "problems": problems(engine, gpus, cpu, run, imports, min_gib),
            "versions": versions()}


def node_label(node: dict) -> str:
    """A Ray node (an entry of ray.nodes()) as a reader finds it: host, address, id, head or worker."""
    role = "head" if "node:__internal_head__" in node.get("Resources", {}) else "worker"
    return f"{node['NodeManagerHostname']} {node['NodeManagerAddress']} ({role}, node id {node['NodeID'][:12]})"


def every_node(address: str, timeout: float, **checks) -> dict[str, list[str]]:
    """{node label: problems} of every live node of the Ray cluster at ``address``: :func:`node_report` runs as a
    task pinned to each node (NodeAffinitySchedulingStrategy, soft=False; no CPU reserved), and each node's
    versions of :data:`SHARED_VERSIONS` and Python are compared with this process's."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if __name__ != "__main__":  # imported (tests): ship this module's code with the task, as a script's is
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        task = ray.remote(num_cpus=0, max_retries=0)(node_report)
        refs = {node_label(n): task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(**checks) for n in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        here, report = versions(), {}
        for label, ref in refs.items():
            if ref not in ready:
                report[label] = [f"did not answer within {timeout:.0f} s"]
                continue
            try:
                answer = ray.get(ref)
            except Exception as error:  # noqa: BLE001 -- a node whose Python cannot run the check
                report[label] = [f"the check failed there: {type(error).__name__}: {str(error).splitlines()[0][:300]}"]
                continue
            report[label] = answer["problems"] + [
                f"{name} {theirs} there, {here[name]} in the driver (every node needs the same)"
                for name, theirs in answer["versions"].items() if theirs != here[name]]
        return report
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=sorted(REQUIREMENTS), default="fsdp")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node the run asks for (NGPUS_PER_NODE)")
    parser.add_argument("--cpu", action="store_true",
                        help="the CPU size: non-GPU pins and the entry points of hmpo-verl and verl_cpu, no CUDA")
    parser.add_argument("--min-gpu-gib", type=float, default=MIN_GPU_GIB, help="memory each GPU must have")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="a further module that must really import (repeatable)")
    run = parser.add_argument_group("the run (run.sh passes them)")
    run.add_argument("--ckpt-dir", help="trainer.default_local_dir (CKPT_DIR)")
    run.add_argument("--model", help="actor_rollout_ref.model.path: a local directory or a hub id")
    run.add_argument("--files", default="", help="comma-separated data files that must be there")
    run.add_argument("--keep", type=_int_or_none, help="trainer.max_actor_ckpt_to_keep (null: keep all)")
    run.add_argument("--save-freq", type=int, default=0, help="trainer.save_freq")
    run.add_argument("--total-steps", type=_int_or_none, help="trainer.total_training_steps")
    run.add_argument("--task", help="the recipe's task (gsm8k: the data's rows open with its system prompt)")
    run.add_argument("--prompt-length", type=_int_or_none, help="data.max_prompt_length")
    run.add_argument("--response-length", type=_int_or_none, help="data.max_response_length")
    run.add_argument("--nnodes", type=int, default=1, help="trainer.nnodes: the live nodes --ray-address must have")
    run.add_argument("--generation-config", help="actor_rollout_ref.rollout.engine_kwargs.vllm.generation_config")
    parser.add_argument("--ray-address", help="<host>:<port> of a running Ray cluster: check every node of it")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a node has to answer (--ray-address)")
    parser.add_argument("--measure", type=Path, metavar="GLOBAL_STEP_DIR",
                        help="print the bytes per parameter of a verl FSDP checkpoint and exit")
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    checks = {"engine": args.engine, "gpus": args.gpus, "cpu": args.cpu, "imports": args.imports,
              "min_gib": args.min_gpu_gib,
              "run": {"ckpt_dir": args.ckpt_dir, "model": args.model, "files": [f for f in args.files.split(",") if f],
                      "keep": args.keep, "save_freq": args.save_freq, "total_steps": args.total_steps,
                      "task": args.task, "prompt_length": args.prompt_length, "response_length": args.response_length,
                      "generation_config": args.generation_config}}
    where = "cpu" if args.cpu else f"{args.engine}, {args.gpus} GPUs"
    if args.ray_address:
        try:
            report = every_node(args.ray_address, args.timeout, **checks)
        except ConnectionError as error:
            print(f"preflight: no Ray cluster at --ray-address {args.ray_address} ({str(error).splitlines()[0][:200]}); "
                  f"trainer.nnodes={args.nnodes} needs one: start it (bash recipes/lib/cluster.sh head, then worker "
                  "<head-ip>:6379 on each other node) and launch with RAY_ADDRESS=<head-ip>:6379", file=sys.stderr)
            return 3
    else:
        report = {"this node": problems(**checks)}
    bad = {node: found for node, found in report.items() if found}
    if args.ray_address and len(report) < args.nnodes:
        bad["the cluster"] = [f"{len(report)} live node(s), and the run asks for trainer.nnodes={args.nnodes} "
                              "(NNODES): start the missing workers (bash recipes/lib/cluster.sh worker <head-ip>:6379) "
                              "or set NNODES to the cluster's node count"]
    if not bad:
        print(f"preflight: ok ({where}){f' on {len(report)} nodes: ' + '; '.join(report) if args.ray_address else ''}")
        return 0
    count = sum(len(found) for found in bad.values())
    nodes = f"{sum(node in report for node in bad)} of {len(report)} node(s)" if args.ray_address else "this node"
    print(f"preflight: {count} problem(s) on {nodes} ({where}):", file=sys.stderr)
    for node, found in bad.items():
        if args.ray_address:
            print(f"  {node}:", file=sys.stderr)
        for problem in found:
            print(f"  - {problem}", file=sys.stderr)
    files = " and ".join(f"recipes/{name}" for name in REQUIREMENTS[args.engine])
    print(f"Software: install what {files} pin (the commands are at the top of the file), on every node.",
          file=sys.stderr)
    return 3


def _int_or_none(text: str) -> int | None:
    return None if text in ("", "null", "None") else int(text)


if __name__ == "__main__":
    sys.exit(main())
