"""Running the study's plan: lean-loop runs in worker processes (resumable), and the confirmation
on verl's real trainer.

Each lean run is one JSON file under ``<out>/runs/<phase>/<regime>/<method>/lr<lr>/seed<k>.json``,
written when the run ends (a run whose file holds the same task, steps and settings is not run
again), so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from hmpo_verl.lab import lean
from hmpo_verl.lab.cpu_demo import REPO_ROOT
from hmpo_verl.lab.study.plan import Run

_TASK_CACHE: dict = {}


def run_settings(base: lean.LoopSettings, run: Run) -> dict:
    """The loop settings of one run (the shared ones with the run's learning rate), as stored in its file."""
    return asdict(replace(base, lr=run.lr))


def run_definitions(run: Run) -> dict:
    """What the lean loop reads of the run's regime and method (``lean.REGIMES_BY_NAME``, ``METHODS_BY_NAME``), as
    stored in its record: their fields but the report's text (``note``) and the verl trainer's overrides, which the
    loop does not read (in JSON's types, as read back from a record)."""
    def fields(obj) -> dict:
        return {k: v for k, v in asdict(obj).items() if k not in ("name", "note", "trainer_overrides")}
    return json.loads(json.dumps({"regime": fields(lean.REGIMES_BY_NAME[run.regime]),
                                  "method": fields(lean.METHODS_BY_NAME[run.method])}))


def warm_start_model(task_name: str, assets: str | None, kind: str, warm_start: int, log=None) -> str:
    """The path of warm start ``warm_start`` of the ``kind`` model (lean.Regime.model: ``dense``, ``moe``,
    or a v4 gap model of ``moe.GAP_SPECS``), built once: warm start 0 of ``dense`` / ``moe`` is the task's own
    (v3's); the others are the same supervised fit with seed ``warm_start`` for the initial weights and the
    fit's problems, under ``<assets or outputs>/<task>_<kind>_ws<k>`` (the prompts and the held-out split
    stay the task's own: only the model is taken from there)."""
    from hmpo_verl.lab import moe as moe_lab
    from hmpo_verl.lab.tasks import fibonacci
    from hmpo_verl.lab.tasks.common import ModelSpec

    if (kind, warm_start) in (("dense", 0), ("moe", 0)):
        return lean.load_task(task_name, assets, log=log, moe=kind == "moe").model_paths[kind]
    root = warm_start_dir(task_name, assets, kind, warm_start)  # (the fibonacci task only)
    models = {"dense": ModelSpec(max_position_embeddings=128), "moe": moe_lab.MOE_SPEC, **moe_lab.GAP_SPECS}
    if kind not in models:
        raise ValueError(f"model kind {kind!r} is unknown; allowed: {sorted(models)}")
    spec = fibonacci.FibonacciSpec(seed=warm_start, model=models[kind])
    return str(fibonacci.prepare_assets(root, spec, log=log or (lambda *a, **k: None)).model)


def warm_start_dir(task_name: str, assets: str | None, kind: str, warm_start: int) -> Path:
    """The folder :func:`warm_start_model` builds warm start ``warm_start`` of the ``kind`` model in (its
    ``model/``, ``warm_start.json``, ``READY``); nothing is built here."""
    if (kind, warm_start) in (("dense", 0), ("moe", 0)):
        return Path(lean.asset_dirs(task_name, assets)[kind])
    if task_name != "fibonacci":
        raise ValueError(f"warm start {warm_start} of the {kind!r} model is built for the fibonacci task only, "
                         f"not {task_name!r}; allowed there: warm start 0 of 'dense'")
    return (Path(assets) if assets else REPO_ROOT / "outputs") / f"fibonacci_{kind}_ws{warm_start}"


def built_warm_start_report(task_name: str, assets: str | None, kind: str, warm_start: int) -> dict | None:
    """The ``warm_start.json`` of a warm start already built (its folder marked ``READY``); None if it is not."""
    from hmpo_verl.lab.tasks.common import TaskPaths

    paths = TaskPaths(warm_start_dir(task_name, assets, kind, warm_start))
    if not (paths.done_marker.exists() and paths.warm_start_report.exists()):
        return None
    return json.loads(paths.warm_start_report.read_text())


def execute(run: Run, task_name: str, assets: str | None, steps: int, base: lean.LoopSettings, out: str, queue,
            moe: bool) -> None:
    """One lean run in a worker process (1 thread); its record is written to ``run.path(out)``."""
    import torch

    torch.set_num_threads(1)
    key = (task_name, assets, base.max_response_length, moe)
    if key not in _TASK_CACHE:
        _TASK_CACHE[key] = lean.load_task(task_name, assets, base.max_response_length, log=None, moe=moe)
    task = _TASK_CACHE[key]
    kind = lean.REGIMES_BY_NAME[run.regime].model
    if run.warm_start or kind not in task.model_paths:
        task = replace(task, model_paths={**task.model_paths,
                                          kind: warm_start_model(task_name, assets, kind, run.warm_start)})
    settings = run_settings(base, run)
    start, cpu = time.time(), time.process_time()
    result = lean.train(task, lean.METHODS_BY_NAME[run.method], lean.REGIMES_BY_NAME[run.regime], run.seed, steps,
                        lean.LoopSettings(**settings), progress=(lambda s: queue.put(1)) if queue else None)
    record = {"run": asdict(run), "task": task_name, "steps": steps, "settings": settings,
              "definitions": run_definitions(run), "wall_s": time.time() - start, "cpu_s": time.process_time() - cpu,
              "first_eval": result.first_eval, "metrics": result.steps}
    path = run.path(Path(out))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)


def record_mismatch(run: Run, out: Path, task: str, steps: int, base: lean.LoopSettings) -> str | None:
    """Why the record at ``run.path(out)`` is not this run's: "no record", or the first field that differs
    (``task``, ``steps``, a setting of :func:`run_settings`, or a field of the regime's or the method's
    :func:`run_definitions`, with both values); None when it is."""
    path = run.path(out)
    if not path.exists():
        return "no record"
    data = json.loads(path.read_text())
    if data.get("task") != task:
        return f"task {data.get('task')!r} (now {task!r})"
    if data.get("steps") != steps:
        return f"steps {data.get('steps')} (now {steps})"
    if why := _first_difference("setting", data.get("settings") or {}, run_settings(base, run)):
        return why
    if "definitions" not in data:
        return "no regime or method definitions (a record from before they were stored)"
    now = run_definitions(run)
    for part, name in (("regime", run.regime), ("method", run.method)):
        if why := _first_difference(f"{part} {name}'s", data["definitions"].get(part) or {}, now[part]):
            return why
    return None


def _first_difference(what: str, old: dict, new: dict) -> str | None:
    """``"<what> <key> <old> (now <new>)"`` for the first key, in name order, whose value differs ("absent" where a
    side lacks it); None when none does."""
    for key in sorted(set(old) | set(new)):
        if old.get(key, "absent") != new.get(key, "absent"):
            return f"{what} {key} {old.get(key, 'absent')!r} (now {new.get(key, 'absent')!r})"
    return None


def is_done(run: Run, out: Path, task: str, steps: int, base: lean.LoopSettings) -> bool:
    return record_mismatch(run, out, task, steps, base) is None


def run_all(runs: list[Run], task: str, assets: str | None, steps: int, base: lean.LoopSettings, out: Path,
            parallel: int, label: str) -> None:
    """Run what is not done, ``parallel`` worker processes at a time (in this process when 1), with a progress
    bar over training steps; ``out`` is locked meanwhile (:func:`out_lock`)."""
    with out_lock(out):
        _run_all(runs, task, assets, steps, base, out, parallel, label)


_LOCKED: set[Path] = set()  # the folders this process holds out_lock on


@contextlib.contextmanager
def out_lock(out: Path):
    """Held while runs are written to ``out``: a second study process on the same folder (its runs would race the
    first's on the same files) stops loud, naming the holder's pid, instead of running beside it. Reentrant: v4
    holds it over all its stages, so a second process cannot take it between two of them."""
    if out.resolve() in _LOCKED:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise SystemExit(f"{out} is in use by another study process (pid {f.read().strip() or 'unknown'}): wait for "
                             "it to end or stop it, then run this again (it resumes from the finished runs); or point "
                             "--out at another folder") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        _LOCKED.add(out.resolve())
        try:
            yield
        finally:
            _LOCKED.discard(out.resolve())
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_all(runs: list[Run], task: str, assets: str | None, steps: int, base: lean.LoopSettings, out: Path,
             parallel: int, label: str) -> None:
    import multiprocessing as mp

    from tqdm import tqdm

    why = {r: record_mismatch(r, out, task, steps, base) for r in runs}
    todo = [r for r in runs if why[r] is not None]
    replaced = [r for r in todo if why[r] != "no record"]
    if replaced:  # a relaunch with other settings runs them again: said, with the first difference
        print(f"{label}: {len(replaced)} of {len(runs)} runs in {out} hold a record made with other settings "
              f"(e.g. {replaced[0].path(out).relative_to(out)}: {why[replaced[0]]}); they run again and their records are "
              "replaced. To keep them, point --out at another folder.", flush=True)
    moe = any(lean.REGIMES_BY_NAME[r.regime].model == "moe" for r in todo)
    with keep_built(out):
        if moe:  # build the MoE model once, before the workers need it
            lean.load_task(task, assets, base.max_response_length, moe=True)
        for kind, ws in _models(todo):
            warm_start_model(task, assets, kind, ws, log=print)  # every other warm start, built once, here
    pin_inputs(out, run_inputs(runs, task, assets))
    with tqdm(total=len(runs) * steps, initial=(len(runs) - len(todo)) * steps, desc=label, unit="step",
              dynamic_ncols=True) as bar:
        if not todo:
            return
        if parallel == 1:
            for r in todo:
                bar.set_postfix_str(f"{r.phase}/{r.regime}/{r.method}/lr{r.lr:g}/seed{r.seed}")
                execute(r, task, assets, steps, base, str(out), _BarQueue(bar), moe)
            return
        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=parallel, mp_context=ctx) as pool:
            queue = manager.Queue()
            futures = {pool.submit(execute, r, task, assets, steps, base, str(out), queue, moe): r for r in todo}
            wait_for(futures, queue, bar)


def wait_for(futures: dict, queue, bar) -> None:
    """Advance ``bar`` by the workers' ``queue`` until every future of ``futures`` (future -> Run) is done; a run
    that fails cancels the runs not started yet and its error is raised at once (the one running beside it
    finishes as the pool shuts down), not after every queued run."""
    pending = set(futures)
    while pending:
        while not queue.empty():
            queue.get()
            bar.update(1)
        finished = {f for f in pending if f.done()}
        for f in finished:
            run = futures[f]
            if f.exception() is not None:
                for other in pending:
                    other.cancel()
                raise f.exception()
            bar.set_postfix_str(f"{run.phase}/{run.regime}/{run.method}/lr{run.lr:g}/seed{run.seed}")
        pending -= finished
        time.sleep(0.5)
    while not queue.empty():
        queue.get()
        bar.update(1)


class _BarQueue:
    """The worker queue's one use in this process: a put advances the progress bar."""

    def __init__(self, bar):
        self.bar = bar

    def put(self, _):
        self.bar.update(1)


def load_records(runs: list[Run], out: Path, task: str, steps: int, base: lean.LoopSettings) -> list[dict]:
    """The stored records of the finished runs of ``runs`` (with their ``Run``)."""
    records = []
    for run in runs:
        if is_done(run, out, task, steps, base):
            records.append({**json.loads(run.path(out).read_text()), "run": run})
    return records


# ----------------------------------------------------------------------------- confirmation on verl's trainers

# regime -> the verl trainer (hmpo_verl.lab.cpu_demo.TRAINERS) that runs it as the lean loop does:
# async_0 on the synchronous trainer with 4 PPO mini-batches per step (``--confirm``); async_1 on the
# one-step-off trainer (``--confirm-async``), which samples every batch with the weights one step old
# (the first two batches with the initial ones), the lean loop's lag 1, with bypass mode (the rollout's
# log-probs are the old log-probs). verl's fully-async trainer mixes lags within a step (staleness 0.5:
# about half at lag 0, half at lag 1; README, async_report), which no single async_k regime reproduces.
CONFIRMATIONS = {"async_0": "sync", "async_1": "one_step_off"}
CONFIRM_METHODS = ("vanilla", "hmpo", "gspo")


def heldout_train_parquet(task: lean.Task, run_dir: Path) -> Path:
    """The task's training parquet without the held-out prompts (the lean loop's training set)."""
    import pandas as pd

    frame = pd.read_parquet(task.assets.train_parquet)
    held = set(pd.read_parquet(task.assets.test_parquet)["prompt"].map(lambda m: m[0]["content"]))
    path = run_dir / "train_without_heldout.parquet"
    frame[~frame["prompt"].map(lambda m: m[0]["content"]).isin(held)].to_parquet(path)
    return path


def trainer_invocation(run: Run, task_name: str, assets_root: str | None, steps: int, settings: lean.LoopSettings,
                       run_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The command and environment of ``run`` on the verl trainer of ``CONFIRMATIONS[run.regime]``, with the
    lean loop's settings: batch, group size, the method's loss and lr, the regime's mini-batches and bypass
    mode, the sampler's precision, and the training prompts without the held-out ones."""
    from types import SimpleNamespace

    from hmpo_verl.lab.cpu_demo import trainer_command, trainer_env
    from hmpo_verl.lab.tasks import get_task

    task = lean.load_task(task_name, assets_root, settings.max_response_length, log=None)
    assets = SimpleNamespace(train_parquet=heldout_train_parquet(task, run_dir), test_parquet=task.assets.test_parquet,
                             model=task.assets.model)
    method, regime = lean.METHODS_BY_NAME[run.method], lean.REGIMES_BY_NAME[run.regime]
    overrides = [
        f"data.train_batch_size={settings.prompts_per_step}", f"actor_rollout_ref.rollout.n={settings.n}",
        f"data.max_response_length={settings.max_response_length}", f"actor_rollout_ref.actor.optim.lr={run.lr}",
        f"actor_rollout_ref.actor.loss_agg_mode={settings.loss_agg_mode}",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=64",
        *regime.trainer_overrides(settings), *method.trainer_overrides,
        f"data.seed={run.seed}", f"actor_rollout_ref.rollout.seed={run.seed}", "trainer.val_before_train=false",
        "trainer.test_freq=-1", f"trainer.experiment_name={run.regime}-{run.method}-seed{run.seed}",
    ]
    cmd = trainer_command(get_task(task_name), assets, run_dir, steps, method.loss_mode, overrides,
                          trainer=CONFIRMATIONS[run.regime])
    return cmd, {**trainer_env(run_dir), **regime.trainer_env()}


def trainer_run(run: Run, task_name: str, assets_root: str | None, steps: int, settings: lean.LoopSettings,
                out: Path) -> dict:
    """The run of :func:`trainer_invocation` (CPU backend), written to
    ``<out>/trainer/<regime>/<method>/lr<lr>/seed<k>/result.json`` (a finished one is read, not run again)."""
    import subprocess

    from hmpo_verl.lab.cpu_demo import trained_steps

    run_dir = out / "trainer" / run.regime / run.method / f"lr{run.lr:g}" / f"seed{run.seed}"
    result_path = run_dir / "result.json"
    if result_path.exists():
        data = json.loads(result_path.read_text())
        if data.get("exit_code") == 0 and data.get("steps") == steps:
            return data
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "result.json", "rollout_trace.jsonl"):
        (run_dir / stale).unlink(missing_ok=True)
    cmd, env = trainer_invocation(run, task_name, assets_root, steps, settings, run_dir)
    start = time.time()
    with open(run_dir / "train.log", "w") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT).returncode
    records = trained_steps(run_dir / "metrics.jsonl")
    data = {"exit_code": code, "steps": len(records), "wall_s": time.time() - start, "command": " ".join(cmd[1:]),
            "metrics": [r["data"] for r in records],
            "loss_metrics_seen": sorted({k for r in records for k in r["data"] if k.startswith(("actor/pm/", "rollout_corr/"))})}
    result_path.write_text(json.dumps(data, indent=2))
    return data


INPUTS = "inputs.json"


def run_inputs(runs: list[Run], task: str, assets: str | None) -> dict[str, Path]:
    """What ``runs`` read besides their settings: the task's prompts (``data/``: train and held-out parquet) and
    each warm start's weights (``<kind>/ws<k>``: its model folder), by name."""
    from hmpo_verl.lab.tasks.common import TaskPaths

    inputs = {"data": TaskPaths(lean.asset_dirs(task, assets)["dense"]).root / "data"}
    for kind, ws in _models(runs):
        inputs[f"{kind}/ws{ws}"] = TaskPaths(warm_start_dir(task, assets, kind, ws)).model
    return inputs


def _models(runs: list[Run]) -> list[tuple[str, int]]:
    """The (model kind, warm start) pairs ``runs`` train, sorted."""
    return sorted({(lean.REGIMES_BY_NAME[r.regime].model, r.warm_start) for r in runs})


def fingerprint(folder: Path) -> str | None:
    """sha256 of what a folder's runs read: the content of its parquet tables (rows, not file bytes, which a
    pyarrow version changes) and the bytes of its ``*.safetensors`` weights, in name order; None when it holds
    neither (not built)."""
    import hashlib

    import pandas as pd

    files = sorted([*folder.glob("*.parquet"), *folder.glob("*.safetensors")]) if folder.is_dir() else []
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(pd.read_parquet(f).to_json(orient="records").encode() if f.suffix == ".parquet" else f.read_bytes())
    return h.hexdigest()


@contextlib.contextmanager
def keep_built(out: Path):
    """While it is held, and ``out`` holds runs (its inputs are pinned), a task asset or warm start already built
    is not rebuilt because the code's spec changed: that stops loud (the runs in ``out`` were made from it, and
    :func:`pin_inputs` could then only say so after it was gone)."""
    from hmpo_verl.lab.tasks import common

    if not (out / INPUTS).exists():
        yield
        return
    token = common.KEEP_BUILT.set(f"the runs in {out} were made from them ({out / INPUTS}), so they are not rebuilt "
                                  "under those runs. Restore the spec they were built with, or point --out (and "
                                  "--assets) at new folders to build these and start their runs apart")
    try:
        yield
    finally:
        common.KEEP_BUILT.reset(token)


def pin_inputs(out: Path, inputs: dict[str, Path], write: bool = True) -> None:
    """Each input's fingerprint, kept in ``<out>/inputs.json`` the first time it is seen: a later invocation on the
    same ``out`` that would read another one (another ``--assets``, a warm start or the task rebuilt or edited)
    stops loud, naming it, before any run: its runs would mix with runs made from the first. An input not built
    yet is pinned when it is; ``write`` False (--report-only): checked, nothing pinned."""
    path = out / INPUTS
    pinned = json.loads(path.read_text()) if path.exists() else {}
    now = {name: fp for name, folder in inputs.items() if (fp := fingerprint(folder))}
    changed = [f"{name} ({inputs[name]})" for name in now if name in pinned and pinned[name] != now[name]]
    if changed:
        raise SystemExit(f"the runs in {out} were made from other inputs than these: {', '.join(changed)} differ from "
                         f"the fingerprints in {path}. Point --assets at the folders the runs were made from, or "
                         "--out at a new folder to start these inputs' runs apart")
    if write and set(now) - set(pinned):
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**pinned, **now}, indent=1, sort_keys=True))
        tmp.replace(path)


# ----------------------------------------------------------------------------- restoring records from a report's data

@dataclass(frozen=True)
class Committed:
    """A report's run data (``report.save_run_tables``: ``runs.csv``, ``steps.csv.gz``) by run key
    (:func:`committed_key`): what ``--restore`` writes records from when the run files are gone (a new machine)."""

    source: Path
    rows: dict  # key -> its runs.csv row (the run's summary, analysis.run_summary's fields; empty cells None)
    steps: dict  # key -> its steps.csv.gz rows in step order (step 0: the evaluation before the first update)
    identity: str = ""  # sha256 of the two files (the check history is kept per data, not per path)

    def warm_starts(self) -> list[int]:
        """The warm starts of the data's tuning and evaluation runs (the study's accepted ones), sorted."""
        return sorted({key[4] for key in self.rows if key[0] in ("tune", "eval")})

    def run_length(self) -> int | None:
        """The steps of the data's evaluation runs (the study's T, which its tuning runs share); None when the data
        has none."""
        lengths = {len(v) - 1 for k, v in self.steps.items() if k[0] == "eval"}
        return lengths.pop() if len(lengths) == 1 else None


def committed_key(phase: str, regime: str, method: str, lr: float, warm_start: int, seed: int) -> tuple:
    """A run's key in :class:`Committed` (the lr at the data's 6 significant digits)."""
    return phase, regime, method, float(f"{float(lr):.6g}"), int(warm_start), int(seed)


def _run_key(r: Run) -> tuple:
    return committed_key(r.phase, r.regime, r.method, r.lr, r.warm_start, r.seed)


def _plain(row: dict) -> dict:
    """A pandas row as JSON-ready values: numpy scalars as Python ones, empty cells (NaN) as None."""
    out = {}
    for k, v in row.items():
        v = v.item() if hasattr(v, "item") else v
        out[k] = None if isinstance(v, float) and v != v else v
    return out


def load_committed(data_dir: Path) -> Committed:
    """:class:`Committed` from ``data_dir``; stops with a message when its files are absent or lack a column."""
    import pandas as pd

    missing = [str(data_dir / n) for n in ("runs.csv", "steps.csv.gz") if not (data_dir / n).exists()]
    if missing:
        raise SystemExit(f"--restore {data_dir}: {', '.join(missing)} not found; allowed: a report's data folder "
                         "(docs/study_data for docs/study.md)")
    key_columns = ("phase", "regime", "method", "lr", "warm_start", "seed")
    runs, steps = pd.read_csv(data_dir / "runs.csv"), pd.read_csv(data_dir / "steps.csv.gz")
    for name, frame in (("runs.csv", runs), ("steps.csv.gz", steps)):
        if lacking := [c for c in (*key_columns, *(("step",) if name == "steps.csv.gz" else ())) if c not in frame]:
            raise SystemExit(f"--restore {data_dir}: {name} has no column {', '.join(lacking)}; allowed: the data of a "
                             "v4 report (runs.csv and steps.csv.gz with phase, regime, method, lr, warm_start, seed)")
    rows = {committed_key(*(row[c] for c in key_columns)): _plain(row) for row in runs.to_dict("records")}
    by_run = {committed_key(*key): [_plain(r) for r in group.sort_values("step").to_dict("records")]
              for key, group in steps.groupby(list(key_columns), sort=False)}
    digest = hashlib.sha256(b"".join((data_dir / n).read_bytes() for n in ("runs.csv", "steps.csv.gz"))).hexdigest()
    return Committed(data_dir, rows, by_run, digest)


def restored_record(run: Run, committed: Committed, task: str, steps: int, base: lean.LoopSettings) -> dict:
    """The record of ``run`` from ``committed``: its summary (``restored.summary``, which analysis.run_summary
    returns as it is), its measured wall and CPU time, and where the data has its steps, the evaluation before
    the first update (``first_eval``) and each step's ``metrics`` (the data's columns only); settings and
    definitions are this code's (:func:`restore` checks that this code gives the data's figures). Stops with a
    message when the data's run has another number of steps than ``steps``."""
    key = _run_key(run)
    summary = {k: v for k, v in committed.rows[key].items() if k != "warm_start"}
    per_step = [{k: v for k, v in m.items() if v is not None and k not in (*asdict(run), "step")}
                for m in committed.steps.get(key, [])]
    length = len(per_step) - 1 if run.phase in ("pilot", "eval") else committed.run_length()
    if run.phase in ("pilot", "eval") and not per_step:
        raise SystemExit(f"--restore {committed.source}: its run {run.path(Path('.'))} has a row in runs.csv and no "
                         "steps in steps.csv.gz (every pilot and evaluation run has them): the data is incomplete; "
                         "point --restore at a report's whole data, or leave --restore out (the runs run again)")
    if length is not None and length != steps:
        raise SystemExit(f"--restore {committed.source}: its run {run.path(Path('.'))} has {length} steps, "
                         f"this plan runs {steps}: the data is from another plan; point --restore at this plan's data, "
                         "or leave --restore out (the runs run again)")
    return {"run": asdict(run), "task": task, "steps": steps, "settings": run_settings(base, run),
            "definitions": run_definitions(run), "wall_s": summary["wall_s"], "cpu_s": summary["cpu_s"],
            "restored": {"from": str(committed.source), "summary": summary},
            "first_eval": per_step[0] if per_step else None, "metrics": per_step[1:]}


def _cell(v) -> str:
    """A summary value as the data writes it (6 significant digits; empty for None/NaN)."""
    import numpy as np

    if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)):
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, float, np.number)):
        return f"{float(v):.6g}"
    return str(v)


def restore(runs: list[Run], committed: Committed, task: str, assets: str | None, steps: int,
            base: lean.LoopSettings, out: Path, as_recorded: bool = False, log=print) -> int:
    """Write the record of each run of ``runs`` (a stage's) that has no file in ``out`` and a row in ``committed``
    (:func:`restored_record`); returns how many were written.

    The data is first checked against this machine and this code: the first run to restore of each phase and
    regime runs here (in a scratch folder; once per data, by its content) and its summary must give the data's
    row at the data's 6 digits (wall and CPU time aside). When it does, every such run is restored. When it does
    not (another commit's lean loop, settings or definitions; or another machine: its CPU's arithmetic builds
    other warm starts from the same recipe and seeds), the study stops naming the run, the field and both values
    -- unless ``as_recorded``: then the data counts as made elsewhere, no run is checked again, and a stage is
    restored only when the data holds every one of its runs and none was made here (otherwise all of them run
    here, so no comparison mixes the two machines' runs). A restored record holds this code's settings and
    definitions: what it was made with is the data's commit's (its report's Command line). Each stage's outcome
    is appended to ``<out>/restored.jsonl`` (:func:`restored_line` reports it); the data's warm starts are pinned
    in ``<out>/warm_starts.json`` once a tuning or evaluation record is restored from it."""
    todo = [r for r in runs if not r.path(out).exists() and _run_key(r) in committed.rows]
    if not todo:
        return 0
    history = [h for h in _restored(out) if h.get("data") == committed.identity]
    difference = next((h["difference"] for h in history if h["difference"]), None)
    checked = []
    if difference is None:
        done = {tuple(c.split("/")[1:3]) for h in history for c in h["checked"]}  # (phase, regime) checked already
        firsts: dict[tuple[str, str], Run] = {}
        for r in todo:
            if (r.phase, r.regime) not in done:
                firsts.setdefault((r.phase, r.regime), r)
        checked, difference = _check(list(firsts.values()), committed, task, assets, steps, base, out, log)
    if difference and not as_recorded:
        raise SystemExit(f"--restore {committed.source}: {difference}: the data is not what this code computes on "
                         "this machine (another commit's lean loop, settings or definitions, or another machine's "
                         "arithmetic and warm starts). Leave --restore out (the runs run again here), restore with the "
                         "code that made the data, or add --restore-as-recorded (the data's complete stages are "
                         "restored as made elsewhere, and the report says so)")
    made_here = [r for r in runs if r.path(out).exists() and not _restored_from(r.path(out), committed)] \
        if difference else []
    whole = all(_run_key(r) in committed.rows for r in runs) and not made_here
    written = 0
    if not difference or whole:
        records = [(r, restored_record(r, committed, task, steps, base)) for r in todo]  # (a stop: none written)
        for r, record in records:
            path = r.path(out)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record))
            tmp.replace(path)
            written += 1
    if written and todo[0].phase in ("tune", "eval") and not (out / PINNED_WARM_STARTS).exists():
        (out / PINNED_WARM_STARTS).write_text(json.dumps({"seeds": committed.warm_starts(),
                                                          "from": _shown(committed.source)}) + "\n")
    label = f"{todo[0].phase} {', '.join(dict.fromkeys(r.regime for r in runs))}"
    log(f"--restore: {written} records of the {label} stage written from {committed.source}" +
        (f" ({difference}: restored as made elsewhere)" if difference and written else "") +
        (f"; the data holds {len(todo)} of its {len(runs)} runs" + (f", {len(made_here)} were made here" if made_here
                                                                      else "") + ", made elsewhere: all run here"
         if not written else ""))
    with open(out / RESTORED, "a") as f:  # what the report says of its records' origin (restored_line)
        f.write(json.dumps({"from": _shown(committed.source), "data": committed.identity, "stage": label,
                            "written": written, "checked": checked, "difference": difference}) + "\n")
    return written


def _check(firsts: list[Run], committed: Committed, task: str, assets: str | None, steps: int,
           base: lean.LoopSettings, out: Path, log) -> tuple[list[str], str | None]:
    """:func:`restore`'s check: each run of ``firsts`` runs here in a scratch folder (under :func:`keep_built`)
    until one's summary differs from the data's row at its 6 digits (wall and CPU time aside). Returns the runs
    checked (paths relative to ``out``) and the first difference ("<run> ran here with <field> <here>, the data
    holds <there>"; None when every one matched)."""
    import tempfile

    from hmpo_verl.lab.study import analysis

    checked = []
    for r in firsts:
        log(f"--restore: running {r.path(out).relative_to(out)} here to check {committed.source} against this "
            "machine and code")
        with tempfile.TemporaryDirectory() as scratch, keep_built(out):
            execute(r, task, assets, steps, base, scratch, None, lean.REGIMES_BY_NAME[r.regime].model == "moe")
            got = analysis.run_summary({**json.loads(r.path(Path(scratch)).read_text()), "run": r})
        checked.append(str(r.path(out).relative_to(out)))
        want = committed.rows[_run_key(r)]
        if field := next((f for f in sorted(set(got) - {"wall_s", "cpu_s"}) if _cell(got[f]) != _cell(want.get(f))),
                         None):
            return checked, f"{checked[-1]} ran here with {field} {_cell(got[field])!r}, the data holds " \
                            f"{_cell(want.get(field))!r}"
    return checked, None


def _restored_from(path: Path, committed: Committed) -> bool:
    """Whether the record at ``path`` was restored from ``committed`` (not made here)."""
    return json.loads(path.read_text()).get("restored", {}).get("from") == str(committed.source)


PINNED_WARM_STARTS = "warm_starts.json"  # in --out: the warm starts of the data restore() restored runs from
RESTORED = "restored.jsonl"  # in --out: a line per stage restore() found runs of in the data


def _restored(out: Path) -> list[dict]:
    path = out / RESTORED
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def restored_elsewhere(out: Path) -> bool:
    """Whether ``out`` holds records :func:`restore` wrote as made on another machine."""
    return any(r["difference"] and r["written"] for r in _restored(out))


def _shown(path: Path) -> str:
    """``path`` relative to the repository where it lies in it (as a report names it), else as it is."""
    try:
        return str(Path(path).resolve().relative_to(Path(REPO_ROOT).resolve()))
    except ValueError:
        return str(path)


def restored_line(out: Path) -> str | None:
    """The report's line on the records :func:`restore` wrote into ``out`` (None when it wrote none): how many, from
    where, which stages after a run of the data reproduced here and which as made elsewhere (after one differed),
    and which stages the data held part of, made elsewhere, and so ran here."""
    rows = _restored(out)
    if not sum(r["written"] for r in rows):
        return None
    stages = lambda rs: "; ".join(dict.fromkeys(r["stage"] for r in rs))  # noqa: E731
    sources = ", ".join(sorted({r["from"] for r in rows}))
    same = [r for r in rows if r["written"] and not r["difference"]]
    elsewhere = [r for r in rows if r["written"] and r["difference"]]
    rerun = [r for r in rows if not r["written"]]
    parts = [f"{sum(r['written'] for r in rows)} run records restored from the committed data ({sources}; "
             "`--restore`, on a new machine) rather than run again"]
    if same:
        parts.append(f"{sum(r['written'] for r in same)} of them ({stages(same)}) once "
                     f"{sum(len(r['checked']) for r in rows if not r['difference'])} of the data's runs ran here and "
                     "gave its summary at its 6 significant digits")
    if elsewhere:
        parts.append(f"{sum(r['written'] for r in elsewhere)} of them ({stages(elsewhere)}) as made elsewhere "
                     f"(another machine or commit): a run of the data ran here and differed "
                     f"({elsewhere[0]['difference']})")
    if rerun:
        parts.append(f"run here instead, the data holding part of them or this machine some: {stages(rerun)}")
    return "; ".join(parts) + (". Each stage's runs come from one machine, so every paired comparison is within one "
                               "machine" if elsewhere else "")
