"""Every YAML under recipes/ composes with verl's installed config and builds what verl builds.

How a recipe is checked (`check_recipe`), in the order verl meets it:
1. Hydra compose with the recipe's directory as config dir (the `--config-path` run.sh passes)
   and the recipe's own `hydra.searchpath` (verl's installed `pkg://verl.trainer.config`).
2. No key that verl would silently ignore: every key must exist in verl's stock `ppo_trainer`
   config, be a field of the dataclass named by its node's `_target_` (e.g. our
   `PowerMeanLossConfig.power`), or sit in a free-form node (an empty dict in verl's config, or
   `ray_kwargs.ray_init`, which verl passes to `ray.init(**...)`). verl's `data` section, for
   one, is read key by key, so `data.max_promt_length` would otherwise just be dropped.
3. verl's driver check `validate_config` with the recipe's own nnodes x n_gpus_per_node.
4. The dataclasses verl builds, from the config as its workers receive it (resolved by the
   TaskRunner, pickled by Ray): actor, rollout and model (`engine_workers.ActorRolloutRefWorker.
   init_model`; HFModelConfig pointed at a tiny local stand-in checkpoint, since no hub is
   reachable here -- every other model key is the recipe's), algorithm (AlgoConfig or ours),
   trainer (its one dataclass, the v1 `hybrid_rollout` switch), and, when the run uses them as
   verl decides (`need_reference_policy` / `need_critic`), ref (keys renamed as the worker does)
   and critic (`trainer_base`), and distillation when enabled. The recipes here have no KL
   term, so `test_every_task_fits_every_size` also builds them with one switched on: the ref
   section must hold for whoever turns KL on.
Any failure raises `RecipeError` naming the section and the key.

Recipes are found, not listed: a YAML whose `defaults` include `ppo_trainer` is a recipe;
a YAML is covered if it is a recipe or an option of a config group a recipe's `defaults`
select (e.g. `mean: harmonic` -> every file of recipes/mean/), or of a group such an option selects
in its own defaults (a size file's `/split/node8@_global_: ${async}` -> every file of recipes/split/node8/).
Each recipe is composed with
its default choices, each option of a group with the first recipe that selects the group,
and every task with every size. A YAML that no recipe reaches fails
`test_every_yaml_under_recipes_is_composed`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import pickle
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pytest
import torch
import verl
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict
from verl import DataProto
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.trainer.ppo.ray_trainer import compute_advantage
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import omega_conf_to_dataclass, validate_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
VERL_CONFIG_DIR = Path(verl.__file__).resolve().parent / "trainer" / "config"

# Nodes that verl hands on as **kwargs, so any key is legitimate there: ray.init's, and the
# override_transformer_config of a Megatron engine (fields of Megatron-core's TransformerConfig;
# checked against it in tests/test_recipes_megatron.py where megatron-core is installed).
FREE_FORM_NODES = {"ray_kwargs.ray_init"} | {
    f"{role}.megatron.override_transformer_config"
    for role in ("actor_rollout_ref.actor", "actor_rollout_ref.ref", "critic")
}


def _in_free_form_node(path: str) -> bool:
    """`path` is a free-form node or inside one (ray.init's runtime_env.env_vars, say)."""
    return any(path == node or path.startswith(node + ".") for node in FREE_FORM_NODES)


class RecipeError(AssertionError):
    """A recipe that verl would reject, or whose key verl would silently ignore."""


# ---------------------------------------------------------------------------------------------
# discovery


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A primary config: `--config-path=<config_dir> --config-name=<name>`."""

    path: Path
    groups: tuple[tuple[str, str], ...]  # (group, default option) as in its defaults list
    includes: tuple[Path, ...]  # plain local configs its defaults pull in

    @property
    def config_dir(self) -> Path:
        return self.path.parent

    @property
    def name(self) -> str:
        return self.path.stem

    def option_files(self, group: str) -> list[Path]:
        return sorted((self.config_dir / group).glob("*.yaml"))

    def other_options(self, group: str) -> list[tuple[str, ...]]:
        default = dict(self.groups)[group]
        return [(f"{group}={f.stem}",) for f in self.option_files(group) if f.stem != default]

    def files(self) -> set[Path]:
        out = {self.path, *self.includes}
        for group, _ in self.groups:
            for option in self.option_files(group):
                out.add(option)
                for nested in _nested_groups(option):
                    out.update((self.config_dir / nested).glob("*.yaml"))
        return out


def _defaults_entries(path: Path) -> list:
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return list(raw.get("defaults", []) or []) if isinstance(raw, dict) else []


def _nested_groups(path: Path) -> list[str]:
    """The config groups (absolute: `/split/node8@_global_: ...`) a group option's own defaults select."""
    return [key.split("@")[0].lstrip("/") for entry in _defaults_entries(path) if isinstance(entry, dict)
            for key in entry if key.startswith("/")]


def _is_recipe(path: Path) -> bool:
    return any(isinstance(e, str) and e.lstrip("/") == "ppo_trainer" for e in _defaults_entries(path))


def _recipe(path: Path) -> Recipe:
    groups, includes = [], []
    for entry in _defaults_entries(path):
        if isinstance(entry, dict):
            for key, option in entry.items():
                group = key.replace("override ", "").strip().split("@")[0].lstrip("/")
                if (path.parent / group).is_dir():
                    groups.append((group, str(option)))
        elif isinstance(entry, str) and entry not in ("_self_",):
            local = path.parent / f"{entry.lstrip('/')}.yaml"
            if local.is_file():
                includes.append(local)
    return Recipe(path, tuple(groups), tuple(includes))


def all_yaml_files(root: Path = RECIPES) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def discover(root: Path = RECIPES) -> list[Recipe]:
    return [_recipe(p) for p in all_yaml_files(root) if _is_recipe(p)]


def compositions(recipes: list[Recipe]) -> list[tuple[Recipe, tuple[str, ...]]]:
    """Each recipe with its default choices; each other option of a config group with the first
    recipe that selects the group (the layers are disjoint -- test_layers_set_disjoint_keys -- so
    an option composes the same way under any task; task x size is swept in full separately)."""
    runs, swept = [], set()
    for recipe in recipes:
        runs.append((recipe, ()))
        for group, _ in recipe.groups:
            if (recipe.config_dir, group) not in swept:
                swept.add((recipe.config_dir, group))
                runs += [(recipe, ov) for ov in recipe.other_options(group)]
    return runs


RECIPE_LIST = discover()
COMPOSITIONS = compositions(RECIPE_LIST)
TASK_X_SIZE = [(r, ov) for r in RECIPE_LIST if "size" in dict(r.groups) for ov in [(), *r.other_options("size")]]


def _id(recipe: Recipe, overrides: tuple[str, ...]) -> str:
    rel = recipe.path.relative_to(RECIPES).with_suffix("")
    return ":".join([str(rel), *overrides])


# ---------------------------------------------------------------------------------------------
# composing and checking


@functools.lru_cache(maxsize=None)
def _compose_cached(config_dir: str, name: str, overrides: tuple[str, ...]) -> DictConfig:
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def compose_recipe(config_dir, name: str, overrides=()) -> DictConfig:
    """What `python3 -m verl.trainer.main_ppo --config-path=<dir> --config-name=<name> <overrides>`
    hands to main(): Hydra compose over the same config dir with the same overrides."""
    return copy.deepcopy(_compose_cached(str(config_dir), name, tuple(overrides)))


def stock_config(model_engine: str = "dp") -> DictConfig:
    """verl's own ppo_trainer with the given `model_engine` choice (dp: FSDP; megatron), untouched."""
    return compose_recipe(VERL_CONFIG_DIR, "ppo_trainer", () if model_engine == "dp" else (f"model_engine={model_engine}",))


# verl's off-policy trainers read ppo_trainer plus the keys of their own YAML (which sets a Hydra search
# path, so it is read here as a plain file): a recipe with `async_training` is fully-async's, one with a
# top-level `rollout` pool one-step-off-policy's (recipes/cpu_fibonacci/{fully_async,one_step_off}.yaml)
OFF_POLICY_YAMLS = {
    "async_training": VERL_CONFIG_DIR.parents[1] / "experimental/fully_async_policy/config/fully_async_ppo_trainer.yaml",
    "rollout": VERL_CONFIG_DIR.parents[1] / "experimental/one_step_off_policy/config/one_step_off_ppo_trainer.yaml",
}


def off_policy_trainer(cfg: DictConfig) -> Optional[str]:
    """The top-level key that marks `cfg` as one of verl's off-policy trainers' configs, or None."""
    return next((key for key in OFF_POLICY_YAMLS if key in cfg), None)


def reference_config(cfg: DictConfig) -> DictConfig:
    """What verl's trainer for `cfg` declares: ppo_trainer, plus an off-policy trainer's own keys."""
    stock = stock_config(cfg.get("model_engine", "dp"))
    trainer = off_policy_trainer(cfg)
    if trainer is None:
        return stock
    own = OmegaConf.load(OFF_POLICY_YAMLS[trainer])
    for key in ("hydra", "defaults"):
        own.pop(key, None)
    OmegaConf.set_struct(stock, False)
    return OmegaConf.merge(stock, own)


@functools.lru_cache(maxsize=None)
def _fields(target: str) -> frozenset:
    try:
        cls = get_class(target)
    except Exception as err:  # noqa: BLE001 - name the bad _target_
        raise RecipeError(f"_target_ {target!r} cannot be imported: {err}") from err
    return frozenset(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else frozenset()


def unknown_keys(cfg: DictConfig) -> list[str]:
    """Dotted keys of `cfg` that verl's config (with the same model_engine) does not declare and no
    dataclass accepts."""
    bad: list[str] = []

    def walk(node: dict, ref: Any, path: str) -> None:
        target = node.get("_target_")
        for key, value in node.items():
            dotted = f"{path}.{key}" if path else str(key)
            if isinstance(ref, dict) and key in ref:
                if isinstance(value, dict) and isinstance(ref[key], dict):
                    walk(value, ref[key], dotted)
                continue
            if _in_free_form_node(path) or ref == {}:
                continue  # free-form node: verl passes its keys on as they are
            if isinstance(target, str) and key in _fields(target):
                continue  # a field of the dataclass this node instantiates: checked when built
            bad.append(dotted)

    stock = reference_config(cfg)
    walk(OmegaConf.to_container(cfg, resolve=False), OmegaConf.to_container(stock, resolve=False), "")
    return bad


def _worker_ref_config(ref: DictConfig, actor: DictConfig) -> DictConfig:
    """The renames verl's ActorRolloutRefWorker.init_model applies before building the ref config."""
    ref = copy.deepcopy(ref)
    with open_dict(ref):
        ref.ppo_mini_batch_size = actor.ppo_mini_batch_size
        ref.ppo_micro_batch_size = ref.pop("log_prob_micro_batch_size", None)
        ref.ppo_micro_batch_size_per_gpu = ref.pop("log_prob_micro_batch_size_per_gpu", None)
        ref.use_dynamic_bsz = ref.pop("log_prob_use_dynamic_bsz", False)
        ref.ppo_max_token_len_per_gpu = ref.pop("log_prob_max_token_len_per_gpu", None)
    return ref


def build_dataclasses(cfg: DictConfig, model_path: str) -> dict[str, Any]:
    """Every dataclass verl builds from `cfg`, built the way verl builds it."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.actor_rollout_ref.model.path = model_path
        cfg.critic.model.path = model_path
    OmegaConf.resolve(cfg)  # TaskRunnerV1.run does this before creating the workers
    worker = pickle.loads(pickle.dumps(cfg.actor_rollout_ref))  # what a Ray worker receives
    steps = {
        "actor": lambda: omega_conf_to_dataclass(worker.actor),
        "rollout": lambda: omega_conf_to_dataclass(worker.rollout),
        "model": lambda: omega_conf_to_dataclass(worker.model),
        "algorithm": lambda: omega_conf_to_dataclass(cfg.algorithm),
        "trainer": lambda: omega_conf_to_dataclass(cfg.trainer.v1.separate_async.hybrid_rollout),
    }
    # verl builds these only when the run uses them (a KL term; a value model for GAE)
    if need_reference_policy(cfg):
        steps["ref"] = lambda: omega_conf_to_dataclass(_worker_ref_config(worker.ref, worker.actor))
    if need_critic(cfg):
        steps["critic"] = lambda: omega_conf_to_dataclass(cfg.critic)
    if cfg.get("distillation", {}).get("enabled", False):
        steps["distillation"] = lambda: omega_conf_to_dataclass(cfg.distillation)
    built = {}
    for section, build in steps.items():
        try:
            built[section] = build()
        except Exception as err:  # noqa: BLE001 - re-raise naming the section
            raise RecipeError(f"verl cannot build the {section} config: {type(err).__name__}: {err}") from err
    return built


def driver_validate(cfg: DictConfig) -> None:
    """verl's main(): validate_config with the recipe's own nnodes x n_gpus_per_node."""
    cfg = copy.deepcopy(cfg)
    try:
        validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    except Exception as err:  # noqa: BLE001
        raise RecipeError(f"verl's validate_config rejects it: {type(err).__name__}: {err}") from err


def check_recipe(config_dir, name: str, overrides=(), model_path: Optional[str] = None):
    """Compose, look for ignored keys, run verl's driver check, build the dataclasses."""
    try:
        cfg = compose_recipe(config_dir, name, overrides)
    except Exception as err:  # noqa: BLE001
        raise RecipeError(f"Hydra cannot compose {name} {list(overrides)}: {type(err).__name__}: {err}") from err
    bad = unknown_keys(cfg)
    if bad:
        raise RecipeError(f"keys verl does not know (a typo?): {', '.join(bad)}")
    if off_policy_trainer(cfg) != "async_training":  # verl's fully-async entry point never calls it
        driver_validate(cfg)
    built = build_dataclasses(cfg, model_path) if model_path else {}
    return cfg, built


@pytest.fixture(scope="session")
def stub_model(tmp_path_factory) -> str:
    """A checkpoint directory HFModelConfig can load offline: a Qwen2 config and a tiny tokenizer
    with a chat template (no weights: nothing here loads them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config

    path = tmp_path_factory.mktemp("stub_qwen2")
    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["what is one plus one"], trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(path)
    Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=len(fast), max_position_embeddings=4096,
                architectures=["Qwen2ForCausalLM"]).save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# every YAML composes and builds


def test_recipes_are_found():
    names = {r.name for r in RECIPE_LIST}
    assert {"gsm8k", "math"} <= names, names
    for recipe in RECIPE_LIST:
        if recipe.name in ("gsm8k", "math"):
            assert dict(recipe.groups).keys() == {"size", "mean", "correction", "async"}


def test_every_yaml_under_recipes_is_composed():
    covered = set().union(*(r.files() for r in RECIPE_LIST))
    orphans = [str(p.relative_to(REPO)) for p in all_yaml_files() if p not in covered]
    assert not orphans, (
        f"YAML files no recipe composes (neither a config with 'ppo_trainer' in its defaults nor an option "
        f"of a config group such a config selects): {orphans}"
    )


@pytest.mark.parametrize("recipe,overrides", COMPOSITIONS, ids=[_id(r, o) for r, o in COMPOSITIONS])
def test_recipe_composes_validates_and_builds(recipe, overrides, stub_model):
    cfg, built = check_recipe(recipe.config_dir, recipe.name, overrides, model_path=stub_model)
    actor = built["actor"]
    assert isinstance(actor.policy_loss.loss_mode, str)
    get_policy_loss_fn(actor.policy_loss.loss_mode)  # registered (ours or verl's)
    assert built["rollout"].n == cfg.actor_rollout_ref.rollout.n
    assert built["model"].architectures == ["Qwen2ForCausalLM"]


@pytest.mark.parametrize("recipe,overrides", TASK_X_SIZE, ids=[_id(r, o) for r, o in TASK_X_SIZE])
def test_every_task_fits_every_size(recipe, overrides, stub_model):
    """Sizes meet tasks: validate_config and the builds hold for each pair, and one full-length
    sequence (prompt + response) fits the micro-batch token budgets and the model's context."""
    cfg, _ = check_recipe(recipe.config_dir, recipe.name, overrides, model_path=stub_model)
    if recipe is TASK_X_SIZE[0][0]:  # the ref section lives in the size files: once per size
        kl = ("actor_rollout_ref.actor.use_kl_loss=true",)
        _, with_kl = check_recipe(recipe.config_dir, recipe.name, overrides + kl, model_path=stub_model)
        assert "ref" in with_kl  # the reference policy's config builds once a KL term needs it
    longest = cfg.data.max_prompt_length + cfg.data.max_response_length
    arr = cfg.actor_rollout_ref
    assert longest <= arr.actor.ppo_max_token_len_per_gpu
    assert longest <= arr.rollout.log_prob_max_token_len_per_gpu
    if str(arr.model.path).startswith("Qwen/Qwen2.5-Math-"):
        assert longest <= 4096, "Qwen2.5-Math's max_position_embeddings is 4096"


@pytest.mark.parametrize("recipe,overrides", TASK_X_SIZE, ids=[_id(r, o) for r, o in TASK_X_SIZE])
def test_forward_only_budgets_equal_the_training_budget(recipe, overrides):
    """The old-log-prob (and a reference model's) forward passes take the training micro-batch
    token budget, as verl's GSPO / GMPO examples set them (verl's defaults interpolate it)."""
    cfg = compose_recipe(recipe.config_dir, recipe.name, overrides)
    OmegaConf.resolve(cfg)
    arr = cfg.actor_rollout_ref
    budget = arr.actor.ppo_max_token_len_per_gpu
    assert arr.rollout.log_prob_max_token_len_per_gpu == budget
    assert arr.ref.log_prob_max_token_len_per_gpu == budget
    # token budgets, or fixed micro-batches in every pass alike (routing replay needs the latter)
    dynamic = arr.actor.use_dynamic_bsz
    assert arr.rollout.log_prob_use_dynamic_bsz == dynamic and arr.ref.log_prob_use_dynamic_bsz == dynamic
    if not dynamic:
        micro = arr.actor.ppo_micro_batch_size_per_gpu
        assert arr.rollout.log_prob_micro_batch_size_per_gpu == micro == arr.ref.log_prob_micro_batch_size_per_gpu


def _flat_keys(path: Path) -> set[str]:
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    out: set[str] = set()

    def walk(node, prefix):
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict) and value:
                walk(value, dotted)
            else:
                out.add(dotted)

    walk({k: v for k, v in raw.items() if k not in ("defaults", "hydra")}, "")
    return out


CPU_SIZE_TAKES_FROM_THE_TASK = {"data.train_batch_size", "data.max_response_length",
                                "actor_rollout_ref.actor.ppo_mini_batch_size", "trainer.total_training_steps"}
# An ASYNC mode (recipes/async/, after the correction file in the defaults) turns verl's bypass mode on over
# the correction file's false: the only key it takes (recipes/README.md "Async trainers").
ASYNC_TAKES_FROM_THE_CORRECTION = {"algorithm.rollout_correction.bypass_mode"}


@pytest.mark.parametrize("recipe", RECIPE_LIST, ids=[_id(r, ()) for r in RECIPE_LIST])
def test_layers_set_disjoint_keys(recipe):
    """Task, size and mean files never set the same key, so defaults order decides nothing."""
    layers = {str(recipe.path.relative_to(RECIPES)): _flat_keys(recipe.path)}
    for group, _ in recipe.groups:
        for f in recipe.option_files(group):
            layers[str(f.relative_to(RECIPES))] = _flat_keys(f)
    names = list(layers)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if Path(a).parent == Path(b).parent and Path(a).parent != Path("."):
                continue  # two options of one group are alternatives, never composed together
            both = layers[a] & layers[b]
            if b == "size/cpu.yaml" and a == str(recipe.path.relative_to(RECIPES)):
                # the CPU size shrinks these task keys (the task file comes first in the defaults, so the
                # size wins); recipes/README.md "The CPU size" lists them (test_recipes_cpu_size.py)
                assert both == CPU_SIZE_TAKES_FROM_THE_TASK, f"{a} and {b} both set {sorted(both)}"
                continue
            if Path(a).parent == Path("correction") and Path(b).parent == Path("async") and both:
                assert both == ASYNC_TAKES_FROM_THE_CORRECTION, f"{a} and {b} both set {sorted(both)}"
                continue
            assert not both, f"{a} and {b} both set {sorted(both)}"


# The keys a split file (recipes/split/<hardware>/<ASYNC>.yaml) takes from the size files that select it: the
# trainer's share of the node, and on CPU the weight sync and Ray's logical slots (the file comes after its
# size file's own keys); anything else it sets no other layer sets.
SPLIT_TAKES_FROM_THE_SIZE = {
    "node8": {"trainer.n_gpus_per_node"},
    "cpu": {"trainer.n_gpus_per_node", "actor_rollout_ref.rollout.checkpoint_engine.backend",
            "ray_kwargs.ray_init.num_cpus", "ray_kwargs.ray_init.num_gpus"},
}
SPLITTING_SIZES = sorted(f.stem for f in (RECIPES / "size").glob("*.yaml")
                         if any(g.startswith("split/") for g in _nested_groups(f)))
ASYNC_MODES = sorted(f.stem for f in (RECIPES / "async").glob("*.yaml") if f.stem != "none")


@pytest.mark.parametrize("size", SPLITTING_SIZES)
def test_a_split_file_takes_only_the_named_keys_from_its_size_file(size):
    (group,) = [g for g in _nested_groups(RECIPES / "size" / f"{size}.yaml") if g.startswith("split/")]
    hardware = group.split("/", 1)[1]
    stems = sorted(f.stem for f in (RECIPES / group).glob("*.yaml"))
    assert stems == sorted(f.stem for f in (RECIPES / "async").glob("*.yaml")), "one split file per ASYNC value"
    size_keys = _flat_keys(RECIPES / "size" / f"{size}.yaml")
    others = set().union(*(_flat_keys(f) for layer in ("mean", "correction", "async")
                           for f in (RECIPES / layer).glob("*.yaml")), _flat_keys(RECIPES / "gsm8k.yaml"),
                         _flat_keys(RECIPES / "math.yaml"))
    for stem in stems:
        keys = _flat_keys(RECIPES / group / f"{stem}.yaml")
        assert keys & size_keys <= SPLIT_TAKES_FROM_THE_SIZE[hardware], (stem, sorted(keys & size_keys))
        assert not keys & others, (stem, sorted(keys & others))
        assert not keys if stem == "none" else keys  # none: the size file's own split


ASYNC_X_SIZE = [(task, size, mode) for task in ("gsm8k", "math") for size in SPLITTING_SIZES for mode in ASYNC_MODES]


@pytest.mark.parametrize("task,size,mode", ASYNC_X_SIZE, ids=[":".join(c) for c in ASYNC_X_SIZE])
def test_every_async_mode_splits_every_size_that_has_a_split(task, size, mode, stub_model):
    """ASYNC=<mode> SIZE=<size> composes, validates and builds; the node is split between the trainer and
    the rollout pool (never oversubscribed), the pool is synced through verl's nccl engine on GPU (verl_cpu's
    object_store on CPU), old_log_probs are the rollout's, and V1's staleness bound holds whole steps."""
    from verl_cpu.preflight import MAIN_PPO, ONE_STEP_OFF, check_ray_resources, check_trainer_settings

    cfg, _ = check_recipe(RECIPES, task, (f"size={size}", f"async={mode}"), model_path=stub_model)
    sync = compose_recipe(RECIPES, task, (f"size={size}",))
    OmegaConf.resolve(cfg)
    OmegaConf.resolve(sync)
    arr = cfg.actor_rollout_ref
    pool = cfg.rollout if mode == "one_step_off" else arr.rollout  # one-step-off's own top-level pool
    assert off_policy_trainer(cfg) == ("rollout" if mode == "one_step_off" else None)
    assert cfg.trainer.n_gpus_per_node + pool.n_gpus_per_node == sync.trainer.n_gpus_per_node  # 4 + 4 of 8; 1 + 1 of 2
    assert pool.nnodes == cfg.trainer.nnodes and pool.n_gpus_per_node % arr.rollout.tensor_model_parallel_size == 0
    assert arr.hybrid_engine is False and arr.rollout.free_cache_engine is False and arr.rollout.calculate_log_probs
    assert cfg.algorithm.rollout_correction.bypass_mode is True
    assert cfg.trainer.v1.trainer_mode == ("separate_async" if mode == "separate_async" else "sync")
    if mode == "separate_async":
        v1 = cfg.trainer.v1
        assert v1.separate_async.parameter_sync_step * arr.actor.ppo_mini_batch_size == cfg.data.train_batch_size
        assert (v1.sampler.max_off_policy_threshold, v1.sampler.max_off_policy_strategy) == (2, "drop")
    if cfg.trainer.device == "cpu":  # what verl_cpu checks before Ray starts, for this trainer
        trainer = ONE_STEP_OFF if mode == "one_step_off" else MAIN_PPO
        assert check_trainer_settings(cfg, trainer) == [] and check_ray_resources(cfg, trainer) == []
        assert arr.rollout.checkpoint_engine.backend == "object_store"
    else:
        assert arr.rollout.checkpoint_engine.backend == "nccl"
        assert (sync.trainer.n_gpus_per_node, cfg.trainer.n_gpus_per_node) == (8, 4)


def test_every_mean_file_sets_the_baseline_keys():
    """`diff mean/grpo.yaml mean/<x>.yaml` shows every loss setting that differs: each mean file
    sets at least the keys the GRPO baseline sets."""
    baseline = _flat_keys(RECIPES / "mean" / "grpo.yaml")
    assert {"algorithm.adv_estimator", "actor_rollout_ref.actor.policy_loss.loss_mode",
            "actor_rollout_ref.actor.clip_ratio_low", "actor_rollout_ref.actor.clip_ratio_high",
            "actor_rollout_ref.actor.loss_agg_mode"} <= baseline
    for f in sorted((RECIPES / "mean").glob("*.yaml")):
        missing = baseline - _flat_keys(f)
        assert not missing, f"{f.name} leaves {sorted(missing)} to the defaults"


# ---------------------------------------------------------------------------------------------
# each mean file drives its loss; the equivalences its comments claim


def _toy_batch(seed: int = 0, scale: float = 0.2):
    """(old_log_prob, log_prob leaf, advantages, mask): 6 responses of 1..9 tokens, float64,
    one advantage per response (GRPO-style)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 7, 5, 3, 8, 1])
    B, T = len(lengths), int(lengths.max())
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) - 0.05
    new = old + scale * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).clone()
    return old, new, adv, mask


def _mean_actor(mean: str, task: str = "gsm8k"):
    cfg = compose_recipe(RECIPES, task, (f"mean={mean}",))
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    return actor


def _run_loss(actor, loss_mode: Optional[str] = None, seed: int = 0, scale: float = 0.2):
    old, new, adv, mask = _toy_batch(seed, scale)
    log_prob = new.clone().requires_grad_()
    # what verl's ppo_loss fills in just before calling the policy loss (one rank, one micro-batch)
    actor.global_batch_info.update(dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=mask.shape[0],
                                   loss_scale_factor=actor.loss_scale_factor)
    fn = get_policy_loss_fn(loss_mode or actor.policy_loss.loss_mode)
    # a scheduled loss arms hmpo_verl's process-wide optimizer-step counter: leave it as found
    from hmpo_verl.steps import STEP_COUNTER

    counter_state = {k: v for k, v in vars(STEP_COUNTER).items() if k != "_handle"}
    try:
        loss, metrics = fn(old, log_prob, adv, mask, actor.loss_agg_mode, actor, None)
        loss.backward()
    finally:
        vars(STEP_COUNTER).update(counter_state)
    return loss.detach(), log_prob.grad, metrics


MEAN_FILES = sorted(p.stem for p in (RECIPES / "mean").glob("*.yaml"))


def _advantages(cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """verl's compute_advantage (what the v1 trainer calls) with the recipe's algorithm section,
    on two groups of 4 responses with 0/1 rewards on their last token."""
    lengths = torch.tensor([5, 3, 4, 1, 5, 2, 5, 4])
    mask = (torch.arange(5)[None, :] < lengths[:, None]).float()
    rewards = torch.zeros(8, 5)
    rewards[torch.arange(8), lengths - 1] = torch.tensor([1.0, 0, 1, 1, 0, 0, 1, 0])
    uid = np.array(["a"] * 4 + ["b"] * 4, dtype=object)
    data = DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask},
                               non_tensors={"uid": uid})
    algo = cfg.algorithm
    out = compute_advantage(data, adv_estimator=algo.adv_estimator, gamma=algo.gamma, lam=algo.lam,
                            num_repeat=cfg.actor_rollout_ref.rollout.n,
                            norm_adv_by_std_in_grpo=algo.get("norm_adv_by_std_in_grpo", True), config=algo)
    return out.batch["advantages"], mask, uid


@pytest.mark.parametrize("mean", MEAN_FILES)
def test_each_mean_file_drives_its_advantages_and_loss(mean):
    cfg = compose_recipe(RECIPES, "gsm8k", (f"mean={mean}",))
    adv, mask, uid = _advantages(cfg)
    assert torch.isfinite(adv).all() and (adv[mask == 0] == 0).all()
    first = adv[:, 0]
    for group in set(uid):  # group-relative: each group's advantages sum to 0
        assert abs(float(first[uid == group].sum())) < 1e-5
    assert first[0] > 0 > first[1]  # reward 1 above reward 0 within a group

    actor = _mean_actor(mean)
    for scale in (0.02, 0.5):  # mostly inside / mostly outside the trust region
        loss, grad, metrics = _run_loss(actor, scale=scale)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert "actor/pg_clipfrac" in metrics
        if actor.policy_loss.loss_mode in ("hmpo", "power_mean", "agm", "adaptive_power_mean"):
            assert "actor/pm/seq_ratio_mean" in metrics and "actor/pm/ess_frac" in metrics
    # inside the trust region the update is not zero
    _, grad, _ = _run_loss(actor, scale=1e-6)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("ours,verl_loss", [
    ("arithmetic", "vanilla"),  # mean/arithmetic.yaml: "GRPO's term for term"
    ("geometric_seq", "gspo"),  # mean/geometric_seq.yaml: "equals verl's built-in gspo"
    ("geometric_token", "geo_mean"),  # mean/geometric_token.yaml: GMPO, one micro-batch
])
def test_mean_files_reproduce_the_verl_loss_they_cite(ours, verl_loss):
    actor = _mean_actor(ours)
    for seed, scale in [(0, 0.05), (1, 0.3), (2, 1.0)]:
        loss, grad, _ = _run_loss(actor, seed=seed, scale=scale)
        ref_loss, ref_grad, _ = _run_loss(actor, loss_mode=verl_loss, seed=seed, scale=scale)
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(grad, ref_grad)


RISK_BETA_FILES = [m for m in MEAN_FILES if "algorithm.risk_beta" in _flat_keys(RECIPES / "mean" / f"{m}.yaml")]


@pytest.mark.parametrize("mean", RISK_BETA_FILES)
def test_advantage_files_give_grpo_advantages_at_beta_zero(mean):
    """mean/adv_*.yaml: "with risk_beta=0 this file gives grpo.yaml's advantages"."""
    grpo, _, _ = _advantages(compose_recipe(RECIPES, "gsm8k", ("mean=grpo",)))
    ours, _, _ = _advantages(compose_recipe(RECIPES, "gsm8k", (f"mean={mean}", "algorithm.risk_beta=0")))
    torch.testing.assert_close(ours, grpo)
    beta2, _, _ = _advantages(compose_recipe(RECIPES, "gsm8k", (f"mean={mean}",)))
    assert not torch.allclose(beta2, grpo)  # and the file's own beta does change them


SCHEDULED = [r for r in RECIPE_LIST if "mean" in dict(r.groups)
             and (r.config_dir / "mean" / "adaptive_schedule.yaml").is_file()]


@pytest.mark.parametrize("recipe", SCHEDULED, ids=[_id(r, ()) for r in SCHEDULED])
def test_scheduled_p_spans_the_run(recipe):
    """A scheduled p (adapt: schedule) must reach p_end when the run ends: schedule_steps counts
    optimizer steps = training steps x mini-batches per step x ppo_epochs."""
    cfg = compose_recipe(recipe.config_dir, recipe.name, ("mean=adaptive_schedule",))
    actor = cfg.actor_rollout_ref.actor
    per_step = cfg.data.train_batch_size // actor.ppo_mini_batch_size * actor.ppo_epochs
    assert cfg.trainer.total_training_steps is not None, "set trainer.total_training_steps"
    assert actor.policy_loss.schedule_steps == cfg.trainer.total_training_steps * per_step


def test_arithmetic_file_differs_from_grpo_only_in_the_loss_config():
    grpo, arith = _mean_actor("grpo"), _mean_actor("arithmetic")
    for field in ("clip_ratio_low", "clip_ratio_high", "clip_ratio_c", "loss_agg_mode"):
        assert getattr(grpo, field) == getattr(arith, field), field
    assert (arith.policy_loss.power, arith.policy_loss.clip_level, arith.policy_loss.clip_space) == (1.0, "token", "ratio")


# ---------------------------------------------------------------------------------------------
# the one-line change to an existing verl GRPO recipe

# The GRPO settings of verl's own examples/grpo_trainer / gmpo_trainer scripts, on verl's
# stock ppo_trainer (what `python3 -m verl.trainer.main_ppo <these>` composes).
STOCK_GRPO = [
    "algorithm.adv_estimator=grpo",
    "algorithm.use_kl_in_reward=False",
    "data.train_batch_size=1024",
    "data.max_prompt_length=1024",
    "data.max_response_length=2048",
    "actor_rollout_ref.model.use_remove_padding=True",
    "actor_rollout_ref.actor.optim.lr=1e-6",
    "actor_rollout_ref.actor.ppo_mini_batch_size=256",
    "actor_rollout_ref.actor.use_dynamic_bsz=True",
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=24576",
    "actor_rollout_ref.actor.use_kl_loss=True",
    "actor_rollout_ref.actor.kl_loss_coef=0.001",
    "actor_rollout_ref.actor.kl_loss_type=low_var_kl",
    "actor_rollout_ref.rollout.name=vllm",
    "actor_rollout_ref.rollout.tensor_model_parallel_size=2",
    "actor_rollout_ref.rollout.gpu_memory_utilization=0.6",
    "actor_rollout_ref.rollout.n=5",
    "trainer.n_gpus_per_node=8",
    "trainer.nnodes=1",
]
ONE_LINE = "actor_rollout_ref.actor.policy_loss.loss_mode=hmpo"


def _leaves(cfg: DictConfig) -> dict[str, Any]:
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict):
                walk(value, dotted)
            else:
                out[dotted] = value

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


def test_one_line_change_selects_our_loss_in_the_actor_worker(stub_model):
    before = compose_recipe(VERL_CONFIG_DIR, "ppo_trainer", STOCK_GRPO)
    after, built = check_recipe(VERL_CONFIG_DIR, "ppo_trainer", STOCK_GRPO + [ONE_LINE], model_path=stub_model)

    # the composed configs differ in that key and nothing else
    a, b = _leaves(before), _leaves(after)
    assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} == {"actor_rollout_ref.actor.policy_loss.loss_mode"}
    assert (a["actor_rollout_ref.actor.policy_loss.loss_mode"], b["actor_rollout_ref.actor.policy_loss.loss_mode"]) == (
        "vanilla", "hmpo")

    # the actor worker's config (built from the resolved, pickled actor_rollout_ref) selects our loss,
    # on verl's own PolicyLossConfig: nothing else has to change
    actor = built["actor"]
    assert type(actor.policy_loss).__module__.startswith("verl.") and actor.policy_loss.loss_mode == "hmpo"
    fn = get_policy_loss_fn(actor.policy_loss.loss_mode)  # what verl's ppo_loss looks up
    assert fn.__module__ == "hmpo_verl.hosts.verl.losses", fn
    loss, grad, metrics = _run_loss(actor)
    assert torch.isfinite(loss) and grad.abs().sum() > 0 and "actor/pm/seq_ratio_mean" in metrics


# ---------------------------------------------------------------------------------------------
# a bad recipe fails, naming the key


@pytest.fixture()
def recipes_copy(tmp_path) -> Path:
    dst = tmp_path / "recipes"
    shutil.copytree(RECIPES, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def test_typo_in_a_loss_key_names_the_key(recipes_copy, stub_model):
    _edit(recipes_copy / "mean" / "harmonic.yaml", "      clip_level: token", "      clip_levle: token")
    with pytest.raises(RecipeError, match=r"actor_rollout_ref\.actor\.policy_loss\.clip_levle"):
        check_recipe(recipes_copy, "gsm8k", ("mean=harmonic",), model_path=stub_model)
    # and verl's own dataclass build names it too, had the key check been skipped
    cfg = compose_recipe(recipes_copy, "gsm8k", ("mean=harmonic",))
    with pytest.raises(RecipeError, match="clip_levle"):
        build_dataclasses(cfg, stub_model)


def test_typo_in_a_section_verl_reads_key_by_key_names_the_key(recipes_copy):
    _edit(recipes_copy / "math.yaml", "  max_prompt_length: 1024", "  max_promt_length: 1024")
    with pytest.raises(RecipeError, match=r"data\.max_promt_length"):
        check_recipe(recipes_copy, "math")


def test_value_our_config_rejects_names_the_field(recipes_copy, stub_model):
    _edit(recipes_copy / "mean" / "geometric_token.yaml", "      clip_level: token", "      clip_level: tokens")
    with pytest.raises(RecipeError, match=r"policy_loss\.clip_level='tokens'"):
        check_recipe(recipes_copy, "gsm8k", ("mean=geometric_token",), model_path=stub_model)


def test_value_verl_rejects_is_reported(recipes_copy, stub_model):
    _edit(recipes_copy / "mean" / "grpo.yaml", "    loss_agg_mode: seq-mean-token-mean", "    loss_agg_mode: seq-mean")
    with pytest.raises(RecipeError, match="loss_agg_mode"):
        check_recipe(recipes_copy, "gsm8k", ("mean=grpo",), model_path=stub_model)


@pytest.mark.parametrize("override,named", [
    ("actor_rollout_ref.actor.policy_los.loss_mode=hmpo", "policy_los"),
    ("mean=harmonc", "harmonc"),
    ("size=qwen2_5_math_3b", "qwen2_5_math_3b"),
])
def test_bad_command_line_override_names_it(override, named):
    with pytest.raises(RecipeError, match=named):
        check_recipe(RECIPES, "gsm8k", (override,))


def test_unknown_key_check_accepts_dataclass_fields_and_free_form_nodes():
    cfg = compose_recipe(RECIPES, "gsm8k", ("mean=agm",
                                           "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
                                           "+ray_kwargs.ray_init.num_gpus=1",
                                           "+ray_kwargs.ray_init.runtime_env.env_vars.TQ_NUM_THREADS='1'",
                                           "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32"))
    assert unknown_keys(cfg) == []
    assert math.isclose(cfg.actor_rollout_ref.actor.clip_ratio_low, 0.4)
