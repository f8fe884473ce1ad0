"""Do the GPU requirements files resolve to binary wheels only? A dry run of pip, nothing installed.

    python3 recipes/lib/resolve_gpu.py                         # every install step, its Python versions
    python3 recipes/lib/resolve_gpu.py --python 3.12 --json out.json

For each install step (a requirements file, and how it is installed: `--no-deps` for
requirements-gpu-megatron-nodeps.txt) and each CPython version the step declares (a `# python:` line
in the file; --python overrides), pip resolves the file for manylinux x86_64 with

    pip install --dry-run --ignore-installed --only-binary=:all: --target <tmp> --implementation cp
        --python-version X.Y --abi cpXY --abi abi3 --abi none --platform manylinux_2_35_x86_64 ...
        --report <json> -r <file>

(glibc 2.35, Ubuntu 22.04: every manylinux tag from 2_35 down to 2014 / 2_17 is listed, since pip 23
does not widen `--platform manylinux_2_28_x86_64` to older glibc tags -- without them torch's
`nvidia-cudnn-cu13` wheels, tagged manylinux_2_27, look missing from the index). pip's own configured indexes are
used (`pip config`); each `--extra-index-url` of a file is probed and, when it cannot be reached
from here, reported and left out of that resolve.

When pip stops at a requirement it cannot satisfy, the index is asked (PEP 691 JSON) which case it is:
- the pinned version exists there but with no wheel for this Python / platform: **no binary wheel**,
  a defect of the file (exit 1);
- the package or that version is not on any reachable index (a partial mirror, or a package served
  only by an extra index that cannot be reached from here): **this index lacks it**, a limit of where
  the script runs. A stand-in wheel (no files, no dependencies) takes its place in a local
  --find-links folder, and the resolve goes on, so everything else is still resolved; the package is
  listed by name (its own dependencies stay unresolved).
Conflicting pins (pip's ResolutionImpossible) are a defect too. The summary per step and Python:
packages resolved, source builds (packages the report would build from an sdist: must be 0), what this
index lacks, unreachable indexes. Exit 0 when no step has a defect.

`--lock` writes, per install step that resolved, the exact versions as a pip constraints file beside the
requirements file (`requirements-gpu.txt` -> `requirements-gpu.lock.txt`), used by the install commands
(`pip install -r recipes/requirements-gpu.txt -c recipes/requirements-gpu.lock.txt`) and checked by
recipes/lib/preflight.py on every node: one `name==version` line per package pip would install. A wheel
that comes from a direct URL rather than an index carries its URL and sha256 (pip's report) in a comment;
one that cannot be reached from here is pinned at its file name's version, marked "not reachable from
here: sha256 not recorded"; a package this index lacks is pinned at its requirement's version, marked so
(its own dependencies are not in the lock).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1]
# (requirements file, install it with --no-deps) in install order
STEPS = (("requirements-gpu.txt", False), ("requirements-gpu-megatron.txt", False),
         ("requirements-gpu-megatron-nodeps.txt", True))
# The target: x86_64 Linux with glibc 2.35 (Ubuntu 22.04, the oldest LTS CUDA 13 and verl's images run on)
# and every older manylinux tag. vLLM 0.24's llguidance has x86_64 wheels only for glibc >= 2.31.
PLATFORMS = ([f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)]
             + ["manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64", "manylinux_2_5_x86_64",
                "manylinux1_x86_64", "linux_x86_64"])
DEFAULT_INDEX = "https://pypi.org/simple"
_MISSING = re.compile(r"No matching distribution found for ([^\s;]+)")
_CONFLICT = "ResolutionImpossible"


@dataclass
class Result:
    """One install step resolved for one Python version."""

    file: str
    python: str
    ok: bool = False
    resolved: list[str] = field(default_factory=list)  # name==version from a real index
    source_builds: list[str] = field(default_factory=list)
    lacking: list[str] = field(default_factory=list)  # requirement strings this index lacks
    unreachable_indexes: list[str] = field(default_factory=list)  # and wheel URLs
    defect: str = ""
    locked: list[str] = field(default_factory=list)  # the constraints file's lines (lock_lines)


# ----------------------------------------------------------------------------- pure parts (tested offline)


def declared_pythons(text: str) -> list[str]:
    """The versions of a `# python: 3.10 3.11 3.12` line (default: 3.10, 3.11, 3.12)."""
    match = re.search(r"^#\s*python:\s*([0-9. ]+)$", text, re.M)
    return match.group(1).split() if match else ["3.10", "3.11", "3.12"]


def extra_indexes(text: str) -> list[str]:
    """The `--extra-index-url` values of a requirements file's text."""
    return re.findall(r"^\s*--extra-index-url[ =](\S+)", text, re.M)


def wheel_urls(text: str) -> dict[str, str]:
    """{requirement name: wheel URL} of the `name @ https://...whl` lines of a requirements file's text."""
    return dict(re.findall(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*@\s*(\S+\.whl)\b", text, re.M))


def without(text: str, urls: list[str]) -> str:
    """The file with every line naming one of ``urls`` (an index or a wheel URL) commented out."""
    lines = []
    for line in text.splitlines():
        hit = any(url in line.split("#", 1)[0] for url in urls)
        lines.append(f"# (unreachable here) {line}" if hit else line)
    return "\n".join(lines) + "\n"


def wheel_requirement(name: str, url: str) -> str:
    """``name==version`` for a wheel URL (the version from its file name)."""
    from packaging.utils import parse_wheel_filename

    return f"{name}=={parse_wheel_filename(url.rsplit('/', 1)[1])[1]}"


def pip_args(requirements: Path, python: str, report: Path, target: Path, find_links: Path, no_deps: bool) -> list[str]:
    """pip's argv (after ``python -m pip``) for one dry-run resolve."""
    nodot = python.replace(".", "")
    args = ["install", "--dry-run", "--ignore-installed", "--only-binary=:all:", "--target", str(target),
            "--implementation", "cp", "--python-version", python, "--abi", f"cp{nodot}", "--abi", "abi3",
            "--abi", "none"]
    for platform in PLATFORMS:
        args += ["--platform", platform]
    args += ["--find-links", str(find_links), "--report", str(report), "--quiet", "--progress-bar", "off"]
    if no_deps:
        args.append("--no-deps")
    return args + ["-r", str(requirements)]


def parse_report(report: dict, stand_ins: Path) -> tuple[list[str], list[str], list[str]]:
    """(resolved, source builds, stand-ins) as ``name==version`` from pip's --report JSON."""
    resolved, builds, stubs = [], [], []
    for item in report.get("install", []):
        meta = item["metadata"]
        name = f"{meta['name']}=={meta['version']}"
        url = item.get("download_info", {}).get("url", "")
        if url.startswith(stand_ins.as_uri()):
            stubs.append(name)
        elif not url.split("#")[0].endswith(".whl"):
            builds.append(name)
        else:
            resolved.append(name)
    return sorted(resolved, key=str.lower), builds, stubs


def lock_lines(report: dict, stand_ins: Path, unreachable_wheels: dict[str, str]) -> list[str]:
    """The constraints of one resolve, sorted by name: ``name==version`` for every package of pip's --report.

    A wheel pip took from a direct URL (``is_direct``) gets ``# <url> sha256=<hash>``; a stand-in (a package
    this index lacks, its requirement's version) and each of ``unreachable_wheels`` ({name: wheel URL} taken out
    of the resolve) are pinned and marked, so that a reader sees which versions no resolve here confirmed.
    """
    lines = {}
    for item in report.get("install", []):
        meta, info = item["metadata"], item.get("download_info", {})
        pin = f"{meta['name']}=={meta['version']}"
        url = info.get("url", "")
        if url.startswith(stand_ins.as_uri()):
            if meta["version"] == "0":  # an unpinned requirement's stand-in (stand_in_wheel): no version to lock
                lines[meta["name"].lower()] = f"# {meta['name']}: not on the index reachable here, unpinned: not locked"
                continue
            note = "  # not on the index reachable here: the requirement's version, its dependencies not locked"
        elif item.get("is_direct"):
            note = f"  # {url} sha256={info.get('archive_info', {}).get('hashes', {}).get('sha256', '?')}"
        else:
            note = ""
        lines[meta["name"].lower()] = pin + note
    for name, url in unreachable_wheels.items():
        lines[name.lower()] = f"{wheel_requirement(name, url)}  # {url} (not reachable from here: sha256 not recorded)"
    return [lines[key] for key in sorted(lines)]


def lock_path(step: str) -> Path:
    """Where ``--lock`` writes the constraints of an install step: ``requirements-gpu.txt`` -> ``requirements-gpu.lock.txt``."""
    return RECIPES / step.replace(".txt", ".lock.txt")


def lock_text(result: Result, no_deps: bool) -> str:
    """The constraints file of a resolved step: a header saying how it was made and how it is used, then its lines."""
    flags = "--no-deps " if no_deps else ""
    return (f"# Exact versions of `pip install {flags}-r recipes/{result.file}` as resolved by recipes/lib/resolve_gpu.py --lock\n"
            f"# (CPython {result.python}, manylinux x86_64, wheels only): {len(result.locked)} packages. A pip constraints file:\n"
            f"#   pip install {flags}-r recipes/{result.file} -c recipes/{lock_path(result.file).name}\n"
            "# recipes/lib/preflight.py compares every line with what is installed, on every node. Regenerate with\n"
            "# `python3 recipes/lib/resolve_gpu.py --lock` after changing a requirements file.\n"
            + "".join(line + "\n" for line in result.locked))


def missing_requirement(stderr: str) -> str | None:
    """The requirement pip could not satisfy (``name==1.2``), from its error output."""
    match = _MISSING.search(stderr)
    return match.group(1) if match else None


def wheel_fits(filename: str, python: str) -> bool:
    """A wheel file name's tags fit CPython ``python`` on :data:`PLATFORMS` (or any platform)."""
    from packaging.utils import parse_wheel_filename

    nodot = python.replace(".", "")
    abis = {f"cp{nodot}", "abi3", "none"}
    interpreters = {f"cp{nodot}", f"py{nodot[0]}", f"py{nodot}"}
    for tag in parse_wheel_filename(filename)[3]:
        abi3_ok = tag.abi == "abi3" and tag.interpreter.startswith("cp") and int(tag.interpreter[3:] or 0) <= int(nodot[1:])
        if (tag.interpreter in interpreters or abi3_ok) and tag.abi in abis and tag.platform in PLATFORMS + ["any"]:
            return True
    return False


def classify(requirement: str, python: str, files: list[tuple[str, str]] | None, versions: list[str] | None) -> str:
    """'lacking' (not on this index: no listing, or not that version) or 'no-wheel' (listed, no usable wheel).

    ``files``: the project's (file name, Requires-Python) on the index; ``versions``: its versions (None: no
    such project). A wheel that fits the tags but whose Requires-Python excludes ``python`` does not count.
    """
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import parse_wheel_filename
    from packaging.version import Version

    req = Requirement(requirement)
    if files is None or versions is None:
        return "lacking"
    wanted = {v for v in versions if Version(v) in req.specifier}
    if not wanted:
        return "lacking"
    for name, requires_python in files:
        if not name.endswith(".whl") or str(parse_wheel_filename(name)[1]) not in wanted:
            continue
        if wheel_fits(name, python) and Version(python) in SpecifierSet(requires_python or ""):
            return "lacking"  # a wheel fits, so pip's index view lacks it (a partial mirror)
    return "no-wheel"


def stand_in_wheel(folder: Path, requirement: str) -> Path:
    """An empty, dependency-free wheel satisfying ``requirement`` (its pinned version, else 0)."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    pins = [s.version for s in req.specifier if s.operator in ("==", "===")]
    version = pins[0] if pins else "0"
    dist = re.sub(r"[-_.]+", "_", req.name)
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {req.name}\nVersion: {version}\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: resolve_gpu\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
    return path


# ----------------------------------------------------------------------------- the index (network)


def interpreter(python: str, given: dict[str, str]) -> str:
    """A CPython of version ``python`` to run pip with: pip 23 checks a package's Requires-Python against the
    interpreter it runs in, not against --python-version (megatron-core 0.18.0 requires >= 3.12)."""
    candidates = [given.get(python), shutil.which(f"python{python}"), sys.executable]
    for candidate in filter(None, candidates):
        out = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() == python:
            return candidate
    raise SystemExit(f"no CPython {python} to run pip with: --interpreter {python}=/path/to/python{python}")


def index_urls() -> list[str]:
    """pip's configured index (default PyPI) and extra indexes, http(s) only (`pip config list`)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    index, extras = DEFAULT_INDEX, []
    for line in out.splitlines():
        key, _, value = line.partition("=")
        urls = [u for u in value.strip().strip("'\"").split() if u.startswith("http")]
        if key.endswith("extra-index-url"):
            extras += urls
        elif key.endswith("index-url") and urls:
            index = urls[0]
    return list(dict.fromkeys([index, *extras]))


def reachable(url: str, timeout: float = 15) -> bool:
    """An index (``.../simple``) or a file URL answers from here."""
    target = url if url.endswith(".whl") else url.rstrip("/") + "/"
    try:
        with urllib.request.urlopen(urllib.request.Request(target, method="HEAD"), timeout=timeout) as response:
            return response.status < 400
    except (urllib.error.URLError, OSError, ValueError):
        return False


def project_listing(indexes: list[str], name: str) -> tuple[list[tuple[str, str]] | None, list[str] | None]:
    """((file name, Requires-Python) pairs, versions) of project ``name`` over ``indexes`` (PEP 691 JSON); (None, None) if none has it."""
    files, versions, found = [], [], False
    for index in indexes:
        url = f"{index.rstrip('/')}/{re.sub(r'[-_.]+', '-', name).lower()}/"
        request = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                data = json.load(response)
        except (urllib.error.URLError, OSError, ValueError):
            continue
        found = True
        files += [(f["filename"], f.get("requires-python") or "") for f in data.get("files", [])]
        versions += data.get("versions", [])
    return (files, versions) if found else (None, None)


def resolve(step: str, no_deps: bool, python: str, indexes: list[str], pip_python: str, log=print,
            rounds: int = 30) -> Result:
    result = Result(step, python)
    text = (RECIPES / step).read_text()
    includes = re.findall(r"^\s*-r\s+(\S+)", text, re.M)
    all_text = text + "".join((RECIPES / inc).read_text() for inc in includes)
    urls = [u for u in extra_indexes(all_text) if not reachable(u)]
    unreachable_wheels = {}
    for name, url in wheel_urls(all_text).items():
        if not wheel_fits(url.rsplit("/", 1)[1], python):
            result.defect = f"{name}'s wheel URL is not for CPython {python}: {url.rsplit('/', 1)[1]}"
            return result
        if not reachable(url):
            urls.append(url)
            unreachable_wheels[name] = url
            result.lacking.append(f"{wheel_requirement(name, url)} (its wheel URL)")
    result.unreachable_indexes = urls
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in [step, *includes]:  # the files, minus what cannot be reached, side by side
            (tmp / name).write_text(without((RECIPES / name).read_text(), urls))
        stand_ins = tmp / "stand_ins"
        stand_ins.mkdir()
        for _ in range(rounds):
            report = tmp / "report.json"
            argv = [pip_python, "-m", "pip", *pip_args(tmp / step, python, report, tmp / "target", stand_ins,
                                                          no_deps)]
            run = subprocess.run(argv, capture_output=True, text=True)
            if run.returncode == 0:
                data = json.loads(report.read_text())
                resolved, builds, _ = parse_report(data, stand_ins)
                result.resolved, result.source_builds = resolved, builds
                result.locked = lock_lines(data, stand_ins, unreachable_wheels)
                result.ok = not builds
                if builds:
                    result.defect = f"would build from source: {', '.join(builds)}"
                return result
            missing = missing_requirement(run.stderr)
            if missing is None:
                kind = "conflicting pins" if _CONFLICT in run.stderr else "pip failed"
                result.defect = f"{kind}: " + " | ".join(run.stderr.strip().splitlines()[-6:])
                return result
            files, versions = project_listing(indexes, re.split(r"[<>=!~\[ ]", missing, maxsplit=1)[0])
            if classify(missing, python, files, versions) == "no-wheel":
                result.defect = f"no binary wheel for {missing} on CPython {python} manylinux x86_64"
                return result
            log(f"  {step} py{python}: this index lacks {missing}; a stand-in takes its place")
            result.lacking.append(missing)
            stand_in_wheel(stand_ins, missing)
        result.defect = f"gave up after {rounds} rounds"
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", nargs="*", help="CPython versions (default: each file's `# python:` line)")
    parser.add_argument("--step", nargs="*", choices=[s for s, _ in STEPS], help="default: every install step")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--lock", action="store_true",
                        help="write each resolved step's exact versions beside it (requirements-gpu.lock.txt, ...)")
    parser.add_argument("--interpreter", nargs="*", default=[], metavar="X.Y=PATH",
                        help="the CPython X.Y to run pip with (default: pythonX.Y on PATH, or this one if X.Y)")
    args = parser.parse_args(argv)
    given = dict(item.split("=", 1) for item in args.interpreter)
    indexes = [u for u in index_urls() if reachable(u)]
    print(f"indexes used: {', '.join(indexes)}")
    results = []
    for step, no_deps in STEPS:
        if args.step and step not in args.step:
            continue
        for python in args.python or declared_pythons((RECIPES / step).read_text()):
            result = resolve(step, no_deps, python, indexes, interpreter(python, given))
            results.append(result)
            status = "ok" if result.ok else f"DEFECT: {result.defect}"
            print(f"{step} (CPython {python}{', --no-deps' if no_deps else ''}): {status}; "
                  f"{len(result.resolved)} resolved, {len(result.source_builds)} source builds; "
                  f"this index lacks: {', '.join(result.lacking) or 'nothing'}; "
                  f"unreachable: {', '.join(result.unreachable_indexes) or 'none'}", flush=True)
            if args.lock and result.ok:
                lock_path(step).write_text(lock_text(result, no_deps))
                print(f"  wrote {lock_path(step).relative_to(RECIPES.parent)} ({len(result.locked)} packages)")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
