"""The package's house rules (docs/design.md): three kinds of code in three folders, imports that run
downward only, the maths with torch alone, the lab on public names, and every documented name importable."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "hmpo_verl"

# the layer of each folder; an import may name its own layer or a lower one
LAYERS = {"maths": 0, "hosts": 1, "guards": 1, "lab": 2}
LAYER_NAMES = {0: "maths", 1: "hosts/guards", 2: "lab"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _public_modules() -> dict[str, str]:
    import hmpo_verl

    return dict(hmpo_verl._MODULES)


def _imported(path: Path, known: set[str]) -> set[str]:
    """The hmpo_verl modules `path` imports anywhere (module level or inside a function), resolved to
    real module names: a public alias is followed, `from pkg import submodule` names the submodule."""
    aliases = _public_modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            name = aliases.get(name, name)
            if name in known:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        # a package's own __init__ and the parents Python imports on the way are not edges
        graph[name] = {m for m in _imported(path, known) if m != name and not name.startswith(m + ".")
                       and not (m == "hmpo_verl" and name.startswith("hmpo_verl."))}
    return graph


def _layer(module: str):
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_every_module_lives_in_one_of_the_folders():
    stray = [name for name in _modules() if name != "hmpo_verl" and _layer(name) is None]
    assert not stray, f"modules outside maths/, hosts/, guards/, lab/ (docs/design.md says where code goes): {stray}"


def test_the_import_graph_has_no_cycle():
    assert _cycles(_graph()) == []


def test_imports_run_downward_only():
    upward = [f"{a} ({LAYER_NAMES[_layer(a)]}) imports {b} ({LAYER_NAMES[_layer(b)]})"
              for a, targets in _graph().items() for b in targets
              if _layer(a) is not None and _layer(b) is not None and _layer(b) > _layer(a)]
    assert not upward, upward


def test_the_lab_uses_only_public_names():
    """The lab is a user of the plugin: it names the public paths (hmpo_verl.means, hmpo_verl.trl, ...),
    never where they live now (hmpo_verl.maths.means)."""
    public = set(_public_modules()) | {"hmpo_verl"}
    private = []
    for path in sorted((PACKAGE / "lab").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                     else [])
            private += [f"{path.relative_to(REPO_ROOT)}:{node.lineno} {name}" for name in names
                        if name.startswith("hmpo_verl") and name not in public and not name.startswith("hmpo_verl.lab")]
    assert not private, private


def test_the_graph_test_sees_a_cycle_and_an_upward_import():
    """The checks above can fail: a made-up cycle and a made-up upward edge are found."""
    graph = {"hmpo_verl.hosts.verl.losses": {"hmpo_verl.hosts.verl.registry"},
             "hmpo_verl.hosts.verl.registry": {"hmpo_verl.guards.offpolicy", "hmpo_verl.hosts.verl.losses"},
             "hmpo_verl.guards.offpolicy": {"hmpo_verl.hosts.verl.registry"},
             "hmpo_verl.maths.means": {"hmpo_verl.hosts.verl.config"}}
    assert _cycles(graph) == [["hmpo_verl.guards.offpolicy", "hmpo_verl.hosts.verl.losses",
                               "hmpo_verl.hosts.verl.registry"]]
    assert _layer("hmpo_verl.hosts.verl.config") > _layer("hmpo_verl.maths.means")
    # and the resolver follows a public alias inside a function body
    source = "def f():\n    from hmpo_verl.registry import check_options\n"
    path = REPO_ROOT / "tests" / ".house_probe.py"
    try:
        path.write_text(source)
        assert _imported(path, set(_modules())) == {"hmpo_verl.hosts.verl.registry"}
    finally:
        path.unlink()


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_the_maths_imports_with_torch_alone():
    """Every module of hmpo_verl/maths (and its public name) imports without verl, TRL or Ray."""
    maths = sorted(name for name in _modules() if _layer(name) == 0)
    public = sorted(k for k, v in _public_modules().items() if v in maths)
    result = _python(
        f"""
        import importlib, sys
        for name in {maths + public!r}:
            importlib.import_module(name)
        hosts = sorted({{m.split(".")[0] for m in sys.modules}} & {{"verl", "trl", "ray", "transformers"}})
        print("hosts:", hosts)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "hosts: []" in result.stdout, result.stdout
    assert len(maths) >= 8 and "hmpo_verl.means" in public


DOCUMENTED = re.compile(r"\bhmpo_verl(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def _documented_names() -> list[str]:
    """Every `hmpo_verl.<...>` the README, docs/, recipes/, patches/README.md and pyproject.toml name."""
    files = [REPO_ROOT / "README.md", REPO_ROOT / "pyproject.toml", REPO_ROOT / "patches" / "README.md",
             *sorted((REPO_ROOT / "docs").glob("*.md")),
             *sorted(p for p in (REPO_ROOT / "recipes").rglob("*") if p.suffix in {".md", ".yaml", ".sh", ".py"})]
    names = set()
    for path in files:
        names |= set(DOCUMENTED.findall(path.read_text()))
    return sorted(names)


def _lab_file_exists(name: str) -> bool:
    """A module (or package) of the lab named by `name` or by a prefix of it (the rest: attributes)."""
    parts = name.split(".")
    return any((REPO_ROOT.joinpath(*parts[:cut]).with_suffix(".py")).is_file()
               or (REPO_ROOT.joinpath(*parts[:cut]) / "__init__.py").is_file() for cut in range(3, len(parts) + 1))


def test_every_documented_name_imports():
    """Each public module path and package attribute the docs and configs name resolves (Hydra's way:
    the longest importable module, then attributes), and the public path is the real module itself."""
    names = _documented_names()
    assert {"hmpo_verl.PowerMeanLossConfig", "hmpo_verl.verl_plugin", "hmpo_verl.trl", "hmpo_verl.means"} <= set(names)
    # the lab did not move and is no plugin name: its files are found, not imported (its imports are slow)
    lab = [name for name in names if name.startswith("hmpo_verl.lab.")]
    assert not [name for name in lab if not _lab_file_exists(name)]
    names = [name for name in names if name not in lab]
    result = _python(
        f"""
        import importlib, sys
        import verl  # as a verl process: the entry point has run
        def resolve(name):
            # Hydra's way: the longest importable module, then attributes; the error, or None
            parts = name.split(".")
            for cut in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ModuleNotFoundError as exc:
                    if name.startswith(exc.name or "?"):
                        continue  # that prefix is no module: try a shorter one
                    return repr(exc)  # a module it needs is missing
                except ImportError as exc:
                    if "pip install 'hmpo-verl[" in str(exc):
                        return None  # a host adapter whose host is not importable here: it says so by name
                    return repr(exc)
                try:
                    for attr in parts[cut:]:
                        obj = getattr(obj, attr)
                except AttributeError as exc:
                    return repr(exc)
                return None

        bad = [f"{{name}}: {{error}}" for name in {names!r} if (error := resolve(name))]
        import hmpo_verl
        for public, real in hmpo_verl._MODULES.items():
            if public in sys.modules and sys.modules[public] is not sys.modules.get(real):
                bad.append(f"{{public}} is a copy of {{real}}")
        print("unresolved:", bad)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "unresolved: []" in result.stdout, result.stdout


def test_a_public_package_path_serves_its_submodules_and_python_dash_m(tmp_path):
    """A host adapter that is a package (`hmpo_verl.openrlhf` -> `hmpo_verl.hosts.openrlhf`) keeps its public
    submodule paths -- one module object under both names -- and `python -m <public path>` runs the real code."""
    package = tmp_path / "probe_host"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "launcher.py").write_text("print('launcher ran as', __name__)\n")
    result = _python(
        f"""
        import runpy, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import hmpo_verl
        hmpo_verl._MODULES["hmpo_verl.probe"] = "probe_host"
        runpy.run_module("hmpo_verl.probe.launcher", run_name="__main__", alter_sys=True)  # what -m does
        import hmpo_verl.probe.launcher, probe_host.launcher
        print("one module:", sys.modules["hmpo_verl.probe.launcher"] is probe_host.launcher)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["launcher ran as __main__", "launcher ran as probe_host.launcher",
                                          "one module: True"]


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _broken_links(files: list[Path]) -> list[str]:
    """Markdown links (``[text](target)``, ``![alt](target)``) outside code fences whose target is a relative
    path that does not exist, read relative to the file that holds the link (as GitHub renders it)."""
    broken = []
    for f in files:
        text = re.sub(r"```.*?```", "", f.read_text(), flags=re.S)
        for target in _LINK.findall(text):
            if re.match(r"(https?:|mailto:|#)", target):
                continue
            if not (f.parent / target.split("#")[0]).exists():
                broken.append(f"{f.relative_to(REPO_ROOT) if f.is_relative_to(REPO_ROOT) else f}: {target}")
    return broken


def test_every_relative_link_in_the_docs_resolves():
    """Every committed Markdown file's relative links (generated reports included) name a file that exists."""
    tracked = subprocess.run(["git", "ls-files", "*.md"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    files = [REPO_ROOT / name for name in tracked.stdout.split()]
    assert REPO_ROOT / "docs" / "study.md" in files
    assert _broken_links(files) == []


def test_the_link_check_sees_a_broken_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("[ok](a.md) [web](https://x.org/y) [up](../b.md#part)\n"
                                            "```\n[in a fence](nowhere.md)\n```\n[bad](docs/a.md)\n")
    (tmp_path / "b.md").write_text("![figure](docs/missing.png)\n")
    assert _broken_links([tmp_path / "docs" / "a.md", tmp_path / "b.md"]) == [
        f"{tmp_path / 'docs' / 'a.md'}: docs/a.md", f"{tmp_path / 'b.md'}: docs/missing.png"]
