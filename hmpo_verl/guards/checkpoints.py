"""verl's checkpoints: which are complete, a guard before a resume, and a clear error when a save fails.

What verl 0.9.1's trainer (`_save_checkpoint`, v1 and v0 alike) writes under
`trainer.default_local_dir`, in this order:

1. `global_step_<k>/actor/`: every rank its shards -- FSDP: `model_`, `optim_`, `extra_state_`
   `world_size_<W>_rank_<r>.pt` (torch zip files); Megatron: `model/`, `optimizer/`, `extra/`
   dist-checkpoint trees, then, last and atomically, `ckpt_contents.json`;
2. `global_step_<k>/critic/` (with a critic), the same way;
3. `global_step_<k>/data.pt`: the dataloader's state (torch zip file);
4. the V1 trainer in `colocate_async` / `separate_async` mode only: `global_step_<k>/transfer_queue/`
   (the queue's in-flight prompts and finished trajectories; written to `transfer_queue.tmp/`, renamed);
5. `latest_checkpointed_iteration.txt` (the *tracker*): `k`, with a plain `open("w")` + write.

A torch file is complete when its zip central directory and every member it lists are there
(`torch_file_problem`); a checkpoint, when every file its trainer writes and a resume loads is --
FSDP shards of the launch's world size only (verl loads no other), `transfer_queue/` only if the
trainer that saved it writes one (recorded with its settings, else seen on disk: `saved_trainer_mode`).

`resume_mode=auto` resumes from the step the tracker names, and the tracker is written last,
so a run killed while saving resumes from the previous checkpoint -- except that (a) a tracker
caught mid-write, or written to a full disk, is empty, and verl's resume then fails on
`int("")`; (b) with `max_actor_ckpt_to_keep=1` the worker deletes the previous checkpoint's
`actor/` as soon as the new one's shards are written, before `data.pt` and the tracker: a kill
in between leaves the tracker naming a checkpoint without `actor/` (verl fails on a missing
file); (c) without a tracker verl trains from scratch beside the checkpoints it ignores.

`guard_resume(config)` runs in verl's driver before Ray starts (the plugin's `validate_config`).
It stops with `CheckpointResumeError` on a `resume_mode` other than auto / disable / resume_path
(verl's trainers disagree on those) and on a `resume_from_path` verl cannot read a step from.
With `resume_mode=auto`, when the tracker is missing, unreadable or names an incomplete
checkpoint, it falls back to the newest complete `global_step_<k>` (rewriting the tracker
atomically, with a warning naming the partial directory), and stops naming the partial
directories, and how to start afresh, when none is complete but a tracker says a run was there.
The checkpoint it lets verl resume (the tracked one, checked first, or the fallback, checked
before the tracker is rewritten) must have been saved by a trainer mode that keeps a queue as this
launch's does (`trainer_mode_problem`) and with the same settings (`run_settings`), or it stops
with `ResumeSettingsError`; with `resume_mode=resume_path` it stops when that checkpoint is
another run's or incomplete. `check_checkpoint_directory(config)` refuses a `default_local_dir`
that cannot be written, before Ray starts. `guard_saves(trainer_cls)` makes a failed save
(a full disk, a directory gone read-only) raise `CheckpointSaveError` naming the checkpoint
directory, its free space and the checkpoint a resume would use.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

TRACKER = "latest_checkpointed_iteration.txt"
STEP_DIR = re.compile(r"global_step_(\d+)")
FSDP_SHARD = re.compile(r"(model|optim|extra_state)_world_size_(\d+)_rank_(\d+)\.pt")
SHARD_KIND = {"model": "model", "optimizer": "optim", "extra": "extra_state"}  # checkpoint contents -> file prefix
MEGATRON_MANIFEST = "ckpt_contents.json"
DEFAULT_CONTENTS = ("model", "optimizer", "extra")
TRANSFER_QUEUE_FILES = ("controller_state.pkl", "metadata.json")  # transfer_queue.interface's; metadata last

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or resumed from."""


class CheckpointResumeError(CheckpointError):
    """No complete checkpoint to resume from, where one was expected."""


class CheckpointSaveError(CheckpointError):
    """Saving a checkpoint failed."""


class CheckpointDirectoryError(CheckpointError):
    """`trainer.default_local_dir` cannot be written."""


# ----------------------------------------------------------------------------- reading checkpoints


def read_tracker(root: Path) -> Optional[int]:
    """The step in `<root>/latest_checkpointed_iteration.txt`; None if it is missing or not a number."""
    try:
        return int((Path(root) / TRACKER).read_text().strip())
    except (OSError, ValueError):
        return None


LOCAL_HEADER = struct.Struct("<4s22xHH")  # a zip member's local header: signature, ..., name length, extra length
LOCAL_HEADER_SIGNATURE = b"PK\x03\x04"


def torch_file_problem(path: Path) -> Optional[str]:
    """Why a `torch.save` file (zip format) is not complete (None: it is).

    Reads the zip's central directory (`zipfile.ZipFile`), then checks every member against the
    file: its local header is where the directory says, carries the member's name, and its data
    ends before the central directory starts -- so a truncated file fails even when its last
    bytes happen to hold an end-of-directory marker (`PK\x05\x06`, which is all
    `zipfile.is_zipfile` looks for). The pickle member (`*/data.pkl`, small, read first by
    `torch.load`) is read in full, CRC included; tensor payloads are not (that would read
    every byte of every shard).
    """
    if not path.is_file():
        return "missing"
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            members = archive.infolist()
            if not members:
                return "an empty zip archive"
            for member in members:
                raw.seek(member.header_offset)
                header = raw.read(LOCAL_HEADER.size)
                if len(header) < LOCAL_HEADER.size:
                    return f"cut inside member {member.filename}"
                signature, name_length, extra_length = LOCAL_HEADER.unpack(header)
                if signature != LOCAL_HEADER_SIGNATURE or raw.read(name_length) != member.filename.encode():
                    return f"member {member.filename}'s header is not where the zip directory says"
                end = member.header_offset + LOCAL_HEADER.size + name_length + extra_length + member.compress_size
                if end > archive.start_dir:
                    return f"member {member.filename} runs past the start of the zip directory"
                if member.filename.endswith("data.pkl"):
                    archive.read(member)  # raises BadZipFile on a CRC mismatch
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        return f"not a complete zip archive ({exc})"
    return None


def is_complete_torch_file(path: Path) -> bool:
    """A `torch.save` file (zip format) that was written to the end (`torch_file_problem`)."""
    return torch_file_problem(path) is None


def _shard_problems(role_dir: Path, contents, world: Optional[int] = None) -> list[str]:
    """What is missing from the FSDP shards verl's checkpoint manager loads: those of world size `world` (the
    launch's; the directory may also hold another run's shards), or, without `world`, of the one size there."""
    sizes = {int(m.group(2)) for p in role_dir.iterdir() if (m := FSDP_SHARD.fullmatch(p.name))}
    world = next(iter(sizes)) if world is None and len(sizes) == 1 else world
    if world not in sizes:
        found = f"shards of world size {'/'.join(map(str, sorted(sizes)))}" if sizes else "no FSDP shards"
        return [f"{role_dir}: {found}" + (f", none of this launch's world size {world}" if sizes and world else "")]
    problems = []
    for content in contents:
        kind = SHARD_KIND.get(content)
        for rank in range(world) if kind else ():
            path = role_dir / f"{kind}_world_size_{world}_rank_{rank}.pt"
            if problem := torch_file_problem(path):
                problems.append(f"{path} is {problem}")
    return problems


def _role_problems(role_dir: Path, contents, world: Optional[int] = None) -> list[str]:
    """What is missing from a role's checkpoint (`actor/`, `critic/`), FSDP or Megatron layout."""
    if not role_dir.is_dir():
        return [f"{role_dir} is missing"]
    megatron = any((role_dir / sub).is_dir() for sub in ("model", "optimizer", "extra", "dist_ckpt"))
    if megatron:
        manifest = role_dir / MEGATRON_MANIFEST
        return [] if manifest.is_file() else [f"{manifest} (written last by verl's Megatron saver) is missing"]
    return _shard_problems(role_dir, contents, world)


def transfer_queue_problem(step_dir: Path) -> Optional[str]:
    """Why `<step_dir>/transfer_queue/` (verl's V1 async trainers' queue state) is not complete (None: it is).

    `transfer_queue.save_checkpoint` writes into `transfer_queue.tmp/` (`controller_state.pkl`,
    the storage's files, then `metadata.json`) and renames it into place; verl's resume loads
    it only `if os.path.exists(...)`, so a missing one would silently drop the in-flight prompts.
    """
    folder = Path(step_dir) / "transfer_queue"
    missing = [name for name in TRANSFER_QUEUE_FILES if not (folder / name).is_file()]
    if not folder.is_dir():
        return f"{folder} (the V1 async trainer's queue state, written after data.pt) is missing"
    return f"{folder} lacks {', '.join(missing)}" if missing else None


def checkpoint_problems(step_dir: Path, contents=DEFAULT_CONTENTS, transfer_queue: bool = False,
                        world: Optional[int] = None) -> list[str]:
    """Why `global_step_<k>` is not a complete checkpoint (empty: complete).

    `contents`: what a resume loads (verl's `actor.checkpoint.load_contents`); `transfer_queue`:
    the trainer also writes `transfer_queue/` (verl's V1 `colocate_async` / `separate_async`,
    `writes_transfer_queue(config)`); `world`: the FSDP world size whose shards a resume loads.
    """
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        return [f"{step_dir} is missing"]
    problems = _role_problems(step_dir / "actor", contents, world)
    if (step_dir / "critic").exists():
        problems += _role_problems(step_dir / "critic", contents, world)
    data = step_dir / "data.pt"
    if problem := torch_file_problem(data):
        problems.append(f"{data} (the dataloader state, written after the model) is {problem}")
    if transfer_queue and (problem := transfer_queue_problem(step_dir)):
        problems.append(problem)
    return problems


def step_dirs(root: Path) -> dict[int, Path]:
    """{k: <root>/global_step_<k>} for every such directory, newest first."""
    found = {}
    if Path(root).is_dir():
        for path in Path(root).iterdir():
            if (m := STEP_DIR.fullmatch(path.name)) and path.is_dir():
                found[int(m.group(1))] = path
    return dict(sorted(found.items(), reverse=True))


def write_tracker(root: Path, step: int) -> None:
    """Write the tracker atomically (temporary file + rename): never empty, never half written."""
    with tempfile.NamedTemporaryFile("w", dir=root, prefix=f".{TRACKER}.", delete=False) as tmp:
        tmp.write(str(step))
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, Path(root) / TRACKER)


# ----------------------------------------------------------------------------- before a resume


def _trainer(config, key: str, default=None):
    from omegaconf import OmegaConf

    return OmegaConf.select(config, f"trainer.{key}", default=default)


def _absolute(path: str) -> Path:
    """verl's resume makes a relative `default_local_dir` absolute against the launch directory."""
    return Path(path) if os.path.isabs(path) else Path(os.getcwd()) / path


RESUME_MODES = ("auto", "disable", "resume_path")
RESUME_PATH = re.compile(r".*global_step_\d+")  # verl: int(resume_from_path.split("global_step_")[-1])
MODE_KEYS = ("trainer.use_v1", "trainer.v1.trainer_mode")  # the trainer that saves: whether it writes transfer_queue/


def resume_mode(config) -> str:
    """`trainer.resume_mode`; raise `CheckpointResumeError` unless it is one verl's trainers all read alike."""
    mode = _trainer(config, "resume_mode", "disable")
    if mode in RESUME_MODES:
        return mode
    raise CheckpointResumeError(
        f"trainer.resume_mode={mode!r} ({type(mode).__name__}) is none of {', '.join(RESUME_MODES)}, and verl 0.9.1's "
        "trainers disagree on any other value: its v0 trainer (trainer.use_v1=false, one-step-off) and fully-async's "
        "trainer resume from the tracker as auto does, its V1 trainer fails inside Ray, fully-async's rollouter "
        "raises. Set trainer.resume_mode=auto (resume the newest checkpoint in trainer.default_local_dir), disable "
        "(train from scratch) or resume_path (with trainer.resume_from_path=<dir>/global_step_<k>)"
        + ("; Hydra reads an unquoted true/false as a boolean" if isinstance(mode, bool) else ""))


def resume_path(config) -> Path:
    """`trainer.resume_from_path`, absolute; raise `CheckpointResumeError` unless verl can read its step."""
    value = _trainer(config, "resume_from_path")
    if isinstance(value, str) and RESUME_PATH.fullmatch(value):
        return _absolute(value)
    fixed = value.rstrip("/") if isinstance(value, str) and RESUME_PATH.fullmatch(value.rstrip("/")) else None
    raise CheckpointResumeError(
        f"trainer.resume_mode=resume_path needs trainer.resume_from_path to end in global_step_<k>, and it is "
        f"{value!r}: verl 0.9.1 reads the step as int(resume_from_path.split('global_step_')[-1]) inside Ray. "
        f"Set trainer.resume_from_path={fixed or '<dir>/global_step_<k>'}")


def _writes_queue(use_v1, trainer_mode) -> bool:
    return bool(use_v1) and trainer_mode not in (None, "sync")


def writes_transfer_queue(config) -> bool:
    """verl's V1 trainer in an async mode (`colocate_async`, `separate_async`) also saves `transfer_queue/`."""
    return _writes_queue(_trainer(config, "use_v1", False), _trainer(config, "v1.trainer_mode", "sync"))


def _recorded_settings(step_dir: Path) -> dict:
    from hmpo_verl.guards.run_settings import SETTINGS_FILE

    try:
        return json.loads((Path(step_dir) / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def saved_trainer_mode(step_dir: Path, tracked: bool = False) -> tuple[Optional[bool], str]:
    """(whether the trainer that saved `step_dir` wrote `transfer_queue/`, its setting in words); (None, ''): unknown.

    Recorded with the run's settings (`MODE_KEYS`), else seen on disk: a `transfer_queue/` (or `.tmp/`) is there
    (an async mode), or it is not in the checkpoint the tracker names (verl writes the queue before the tracker).
    """
    settings = _recorded_settings(step_dir)
    if any(key in settings for key in MODE_KEYS):
        use_v1, mode = settings.get(MODE_KEYS[0], True), settings.get(MODE_KEYS[1], "sync")
        return _writes_queue(use_v1, mode), (f"trainer.use_v1=true trainer.v1.trainer_mode={mode}" if use_v1
                                             else "trainer.use_v1=false")
    if any((Path(step_dir) / name).exists() for name in ("transfer_queue", "transfer_queue.tmp")):
        return True, "trainer.use_v1=true trainer.v1.trainer_mode=colocate_async or separate_async"
    return (False, "trainer.v1.trainer_mode=sync (or trainer.use_v1=false)") if tracked else (None, "")


def trainer_mode_problem(step_dir: Path, config, tracked: bool = False) -> Optional[str]:
    """Why resuming `step_dir` under `config` would change whether the trainer keeps a queue of prompts (None:
    it would not, or the change is accepted by name, `run_settings.ACCEPT_KEY`). verl's async trainer loads
    `transfer_queue/` only if it is there; the sync and v0 trainers never load it."""
    from hmpo_verl.guards.run_settings import ACCEPT_KEY, accepted_keys, under

    saved_queue, saved = saved_trainer_mode(step_dir, tracked)
    if saved_queue in (None, writes_transfer_queue(config)) or any(under(k, accepted_keys(config)) for k in MODE_KEYS):
        return None
    mode = _trainer(config, "v1.trainer_mode", "sync")
    launch = f"trainer.v1.trainer_mode={mode}" if _trainer(config, "use_v1", False) else "trainer.use_v1=false"
    effect = ("this launch's trainer does not load its transfer_queue/, so the prompts in flight there would never "
              "be trained" if saved_queue else "it holds no transfer_queue/, so the async trainer would start with an "
              "empty queue")
    return (f"{step_dir} was saved with {saved}, and this launch runs {launch}: {effect}. Ways on: relaunch with "
            f"{saved} to resume it as it was saved; or accept the change by name: "
            f"'+{ACCEPT_KEY}=[{','.join(MODE_KEYS)}]'; or start apart (a new trainer.default_local_dir, or "
            "trainer.resume_mode=disable).")


def expected_contents(config, step_dir: Optional[Path] = None, tracked: bool = False) -> dict:
    """`checkpoint_problems`' keyword arguments for this config: what its trainer writes and a resume loads
    (with `step_dir`: whether that checkpoint's own trainer wrote `transfer_queue/`, where known)."""
    from omegaconf import OmegaConf

    from hmpo_verl.guards.run_settings import world_size

    contents = OmegaConf.select(config, "actor_rollout_ref.actor.checkpoint.load_contents", default=None)
    saved_queue = saved_trainer_mode(step_dir, tracked)[0] if step_dir is not None else None
    return {"contents": tuple(contents) if contents else DEFAULT_CONTENTS, "world": world_size(config),
            "transfer_queue": writes_transfer_queue(config) if saved_queue is None else saved_queue}


def _describe(step_dir: Path, problems: list[str]) -> str:
    return f"{step_dir}: " + "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")


def _check_same_run(step_dir: Path, config, tracked: bool = False, context: str = "") -> None:
    """Raise `ResumeSettingsError` (after `context`) if resuming `step_dir` would continue another run: another
    trainer mode (`trainer_mode_problem`), other settings or world size (`run_settings.check_resume_settings`)."""
    from hmpo_verl.guards.run_settings import ResumeSettingsError, check_resume_settings

    try:
        if problem := trainer_mode_problem(step_dir, config, tracked):
            raise ResumeSettingsError(f"hmpo_verl: {problem}")
        check_resume_settings(config, step_dir)
    except ResumeSettingsError as exc:
        if not context:
            raise
        raise ResumeSettingsError(f"hmpo_verl: {context}; {str(exc).removeprefix('hmpo_verl: ')}") from None


ACCEPT_ROLLBACK = "+hmpo.resume_accept=[trainer.resume_from_path]"


def newer_checkpoint_overwritten(path: Path, root: Path) -> Optional[str]:
    """The refusal for ``resume_mode=resume_path`` from step k while ``root`` (``default_local_dir``, where the run
    saves) tracks a later checkpoint: verl resumes step k and saves k + save_freq, ... over that run's own newer
    checkpoints and tracker, one save at a time (a relaunch of a command that once started from another run's
    checkpoint does it silently; so does a rollback to an earlier step of the same run, relaunched). None where
    the tracker names no later step. ``ACCEPT_ROLLBACK`` accepts it."""
    step, tracked = int(str(path).split("global_step_")[-1]), read_tracker(root)  # verl reads the step so
    if tracked is None or tracked <= step or not (root / f"global_step_{tracked}").is_dir():
        return None
    return (f"trainer.resume_mode=resume_path resumes step {step} ({path}), and trainer.default_local_dir={root}, "
            f"where this run saves, holds a later checkpoint, global_step_{tracked} (its {TRACKER} names it): the "
            f"saves after step {step} would overwrite it and the steps up to it, one save at a time. To continue "
            f"global_step_{tracked}, relaunch with trainer.resume_mode=auto; to train again from step {step} on "
            f"purpose, add '{ACCEPT_ROLLBACK}' (the later checkpoints are overwritten as the run reaches them), or "
            f"move {root / TRACKER} and the global_step_* directories above {step} out of {root}, or save elsewhere "
            "with a new trainer.default_local_dir")


def saved_after(dirs: dict[int, Path], complete: list[int]) -> Optional[Path]:
    """A complete checkpoint of a lower step saved after the highest one (`complete`: steps, highest first; the
    time of a save: its run-settings file's, written as the save starts, else the directory's), or None."""
    from hmpo_verl.guards.run_settings import SETTINGS_FILE

    def saved_at(step: int) -> float:
        stamp = dirs[step] / SETTINGS_FILE
        return (stamp if stamp.is_file() else dirs[step]).stat().st_mtime

    newest = saved_at(complete[0])
    return next((dirs[step] for step in complete[1:] if saved_at(step) > newest), None)


def guard_resume(config) -> Optional[str]:
    """Make sure the checkpoint verl is about to resume from is complete and this run's (see the module doc).

    Every refusal comes before the one write (a fallback's tracker). Returns the warning it logged when it fell
    back to an earlier checkpoint, else None. Raises `CheckpointResumeError` on a `resume_mode` or
    `resume_from_path` verl would misread, or when there is no complete checkpoint to use, and
    `run_settings.ResumeSettingsError` when the checkpoint was saved by another trainer mode or settings.
    """
    mode = resume_mode(config)
    if mode == "resume_path":
        path = resume_path(config)
        _check_same_run(path, config)
        if problems := checkpoint_problems(path, **expected_contents(config, path)):
            raise CheckpointResumeError(f"trainer.resume_from_path is not a complete checkpoint: "
                                        f"{_describe(path, problems)}")
        local = _trainer(config, "default_local_dir")
        tracker = _absolute(str(local)) / TRACKER if local else None
        if tracker is not None and tracker.exists() and read_tracker(tracker.parent) is None:
            raise CheckpointResumeError(
                f"{tracker} is unreadable (a save cut off mid-write leaves it empty), and verl 0.9.1's v0 and "
                "fully-async trainers read it even with trainer.resume_mode=resume_path (int('') inside Ray). "
                f"Write the step of a complete checkpoint there into it, or move it out of {tracker.parent}")
        if tracker is not None and (problem := newer_checkpoint_overwritten(path, tracker.parent)):
            from hmpo_verl.guards.run_settings import accepted_keys, under

            if not under("trainer.resume_from_path", accepted_keys(config)):
                raise CheckpointResumeError(problem)
            logger.warning("hmpo_verl: %s (accepted: %s)", problem, ACCEPT_ROLLBACK)
        return None
    if mode != "auto" or not _trainer(config, "default_local_dir"):
        return None
    root = _absolute(str(_trainer(config, "default_local_dir")))
    tracker, tracked = root / TRACKER, read_tracker(root)
    tracked_dir = root / f"global_step_{tracked}"
    if tracked is None:
        why = f"{tracker} {'is unreadable' if tracker.exists() else 'is missing'}"
    elif not tracked_dir.is_dir():
        why = f"{tracker} names {tracked_dir.name}, which is not there"
    else:
        _check_same_run(tracked_dir, config, tracked=True)  # another run's: say so, not "incomplete"
        problems = checkpoint_problems(tracked_dir, **expected_contents(config, tracked_dir, tracked=True))
        if not problems:
            return None
        why = f"{tracker} names an incomplete checkpoint, {_describe(tracked_dir, problems)}"
    dirs = step_dirs(root)
    partial = {k: checkpoint_problems(d, **expected_contents(config, d)) for k, d in dirs.items()}
    complete = [k for k, problems in partial.items() if not problems]
    if not complete and not tracker.exists():
        return None  # a fresh run, or its first save was interrupted: nothing complete to lose, verl starts afresh
    if not complete:
        listed = "; ".join(_describe(dirs[k], p) for k, p in partial.items()) or "no global_step_* directory"
        raise CheckpointResumeError(
            f"resume_mode=auto cannot resume from {root}: {why}, and no checkpoint there is complete ({listed}). "
            f"To train from scratch there, move {tracker}, and the global_step_* directories with it, out of {root} "
            f"(without a tracker verl starts afresh); or start apart with a new trainer.default_local_dir."
        )
    if later := saved_after(dirs, complete):
        raise CheckpointResumeError(
            f"resume_mode=auto: {why}, and the newest complete checkpoint by step, {dirs[complete[0]].name}, was saved "
            f"before {later.name} (a run rolled back to an earlier step saves over it): which one continues the run "
            f"is not known. Write the step to resume into {tracker}, or start apart with a new "
            "trainer.default_local_dir")
    _check_same_run(dirs[complete[0]], config, context=f"resume_mode=auto: {why}, so it would fall back to the "
                                                        "newest complete checkpoint")
    write_tracker(root, complete[0])
    message = (f"hmpo_verl: resume_mode=auto: {why}; resuming from the newest complete checkpoint, "
               f"{dirs[complete[0]]} (tracker rewritten to {complete[0]})")
    logger.warning(message)
    return message


def resume_step_dir(config) -> Optional[Path]:
    """The checkpoint verl's resume will load under `config` (None: it trains from scratch)."""
    mode = _trainer(config, "resume_mode", "disable")
    if mode == "resume_path" and _trainer(config, "resume_from_path"):
        return _absolute(str(_trainer(config, "resume_from_path")))
    if mode != "auto" or not _trainer(config, "default_local_dir"):
        return None
    root = _absolute(str(_trainer(config, "default_local_dir")))
    tracked = read_tracker(root)
    return None if tracked is None else root / f"global_step_{tracked}"


def checkpoint_directory_problem(directory: Path) -> Optional[str]:
    """Why checkpoints cannot be written under `directory` (None: they can), without creating anything.

    The directory, or its nearest existing parent (verl creates the rest), must be a directory
    this process may write, on a file system mounted read-write.
    """
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return f"{existing} is on a read-only file system"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user"
    return None


def check_checkpoint_directory(config) -> None:
    """Raise `CheckpointDirectoryError` if checkpoints are saved and `default_local_dir` cannot be written; warn
    when it is relative (verl's own default is: a one-line user keeps it, so it is said, not refused)."""
    save_freq = _trainer(config, "save_freq", -1)
    directory = _trainer(config, "default_local_dir")
    if save_freq is None or int(save_freq) <= 0 or not directory:
        return
    if not os.path.isabs(str(directory)):
        logger.warning(
            "trainer.default_local_dir=%s is relative: checkpoints (trainer.save_freq=%s) go to %s, under this "
            "launch's working directory, and a relaunch from another directory or through `ray job submit` finds "
            "none and starts from step 0. Set trainer.default_local_dir=%s (or CKPT_DIR=<absolute dir> with "
            "recipes/*/run.sh, which refuses a relative one)", directory, save_freq, _absolute(str(directory)),
            _absolute(str(directory)))
    root = _absolute(str(directory))
    problem = checkpoint_directory_problem(root)
    if problem:
        raise CheckpointDirectoryError(
            f"trainer.default_local_dir={root} cannot be written: {problem}; checkpoints "
            f"(trainer.save_freq={save_freq}) go there"
        )


# ----------------------------------------------------------------------------- while saving


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc  # a Ray task error carries the worker's exception as .cause
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


def _free_space(path: Path) -> str:
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return "unknown"
    return f"{shutil.disk_usage(existing).free / 2**30:.2f} GiB"


def save_failure_message(step_dir: Path, exc: BaseException, expected: Optional[dict] = None) -> str:
    """The message of `CheckpointSaveError`: the directory, the cause, the free space, what a resume would use."""
    root = step_dir.parent
    tracked = read_tracker(root)
    if tracked is not None and not checkpoint_problems(root / f"global_step_{tracked}", **(expected or {})):
        fallback = f"the latest complete checkpoint, {root / f'global_step_{tracked}'}, is intact"
    else:
        fallback = "no complete checkpoint is tracked"
    return (f"saving checkpoint {step_dir} failed ({_first_line(exc)}); free space there: {_free_space(step_dir)}; "
            f"{fallback}: resume_mode=auto resumes from it once the directory can be written")


def saved_step(trainer) -> int:
    """The k of the `global_step_<k>` a trainer saves to: fully-async's `current_param_version`, else `global_steps`."""
    version = getattr(trainer, "current_param_version", None)
    return int(trainer.global_steps if version is None else version)


def guard_saves(trainer_cls) -> None:
    """Wrap `trainer_cls._save_checkpoint` (idempotent): it first records the run's settings in the step's
    directory (`hmpo_verl.guards.run_settings`), and a failure raises `CheckpointSaveError`."""
    save = trainer_cls._save_checkpoint
    if getattr(save, "_hmpo_guarded", False):
        return

    @functools.wraps(save)
    def _save_checkpoint(self, *args, **kwargs):
        from hmpo_verl.guards.run_settings import write_run_settings

        step_dir = _absolute(str(self.config.trainer.default_local_dir)) / f"global_step_{saved_step(self)}"
        try:
            write_run_settings(step_dir, self.config)
            return save(self, *args, **kwargs)
        except Exception as exc:
            raise CheckpointSaveError(save_failure_message(step_dir, exc, expected_contents(self.config))) from exc

    _save_checkpoint._hmpo_guarded = True
    trainer_cls._save_checkpoint = _save_checkpoint
