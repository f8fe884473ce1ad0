"""The maths imports without verl; verl registers everything by itself, cheaply, and loudly on failure."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MATHS = ("hmpo_verl.means", "hmpo_verl.surrogate", "hmpo_verl.adaptive", "hmpo_verl.advantages", "hmpo_verl.options",
         "hmpo_verl.aggregators")

# A sitecustomize that makes `verl` (and everything under it) unimportable in the subprocess.
VERL_BLOCKER = '''
import importlib.abc, sys
class _NoVerl(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "verl" or name.startswith("verl."):
            raise ImportError(f"verl is blocked in this test ({name})")
sys.meta_path.insert(0, _NoVerl())
'''


def _python(code: str, pythonpath: list[str] | None = None, **env) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with this worktree first on sys.path."""
    path = [*(pythonpath or []), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), **env},
    )


def test_maths_imports_where_verl_cannot(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(VERL_BLOCKER)
    result = _python(
        f"""
        import sys
        try:
            import verl
        except ImportError as exc:
            print("blocked:", exc)
        else:
            raise SystemExit("the blocker did not block verl")
        import hmpo_verl
        import {", ".join(MATHS)}
        assert not [m for m in sys.modules if m == "verl" or m.startswith("verl.")]
        # the pure maths works
        import torch
        from hmpo_verl.means import log_power_mean
        x = torch.log(torch.tensor([[1.0, 4.0]], dtype=torch.float64))
        print("harmonic", round(log_power_mean(x, -1.0).exp().item(), 12))
        # the verl configs need verl, and say so when touched
        try:
            hmpo_verl.PowerMeanLossConfig
        except ImportError as exc:
            print("config needs verl:", exc)
        """,
        pythonpath=[str(tmp_path)],
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "blocked: verl is blocked" in out
    assert "harmonic 1.6" in out  # 2 / (1 + 1/4)
    assert "config needs verl:" in out and "pip install 'hmpo-verl[verl]'" in out


def test_import_verl_registers_every_loss_and_estimator_on_core_algos():
    result = _python(
        """
        import sys
        import verl
        import verl.utils.config
        # import verl alone pulls in neither our losses nor verl's core_algos
        print("at import:", sorted(m for m in ("hmpo_verl.hosts.verl.losses", "hmpo_verl.hosts.verl.config", "verl.trainer.ppo.core_algos")
                                   if m in sys.modules))
        print("validate_config extended:", getattr(verl.utils.config.validate_config, "_hmpo_checked", False))
        from verl.trainer.ppo.core_algos import get_adv_estimator_fn, get_policy_loss_fn
        from hmpo_verl.estimators import ADV_ESTIMATORS, GROUP_ADVANTAGES
        from hmpo_verl.hosts.verl.config import ADV_ESTIMATORS as CONFIGURED
        from hmpo_verl.losses import POLICY_LOSSES
        assert set(POLICY_LOSSES) == {"hmpo", "power_mean", "agm", "adaptive_power_mean"}
        assert set(ADV_ESTIMATORS) == {"power_mean", "agm"} == set(GROUP_ADVANTAGES) == set(CONFIGURED)
        for name, fn in POLICY_LOSSES.items():
            assert get_policy_loss_fn(name) is fn, name
        for name, fn in ADV_ESTIMATORS.items():
            assert get_adv_estimator_fn(name) is fn, name
        print("OK")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "at import: []" in result.stdout
    assert "validate_config extended: True" in result.stdout
    assert result.stdout.strip().endswith("OK")


def test_imported_after_core_algos_the_plugin_or_the_package_registers_at_once():
    """Where verl's plugin loading is off, or an older install's entry point names the package itself."""
    result = _python(
        """
        import importlib, sys
        from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
        OURS = ("hmpo", "power_mean", "agm", "adaptive_power_mean")

        def unregister():
            for name in OURS:
                POLICY_LOSS_REGISTRY.pop(name, None)
            for name in [m for m in sys.modules if m.startswith("hmpo_verl")]:
                del sys.modules[name]

        unregister()
        import hmpo_verl.verl_plugin
        print("plugin:", sorted(n for n in POLICY_LOSS_REGISTRY if n in OURS))
        unregister()
        import hmpo_verl
        print("package:", sorted(n for n in POLICY_LOSS_REGISTRY if n in OURS))
        """
    )
    assert result.returncode == 0, result.stderr
    assert "plugin: ['adaptive_power_mean', 'agm', 'hmpo', 'power_mean']" in result.stdout
    assert "package: ['adaptive_power_mean', 'agm', 'hmpo', 'power_mean']" in result.stdout


def test_losses_module_as_the_first_import_registers_without_error():
    """A user's unit test whose first import is the losses module: that import loads verl's core_algos,
    whose hook used to find the losses module half-made and log "failed to register"."""
    result = _python(
        """
        from hmpo_verl.losses import compute_policy_loss_hmpo
        from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, get_policy_loss_fn
        print("same:", get_policy_loss_fn("hmpo") is compute_policy_loss_hmpo, "agm" in ADV_ESTIMATOR_REGISTRY)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "same: True True" in result.stdout
    assert "failed to register" not in result.stderr


def test_failed_registration_at_plugin_load_is_logged_at_error():
    """With core_algos already loaded, the plugin registers at once; a failure is logged, then re-raised."""
    result = _python(
        """
        import sys, importlib.abc
        import verl, verl.trainer.ppo.core_algos
        class Breaker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "hmpo_verl.hosts.verl.estimators":
                    raise ImportError("simulated breakage in hmpo_verl.estimators")
        sys.meta_path.insert(0, Breaker())
        for name in [m for m in sys.modules if m.startswith("hmpo_verl")]:
            del sys.modules[name]
        try:
            import hmpo_verl.verl_plugin
        except ImportError as exc:
            print("re-raised:", exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "re-raised: simulated breakage" in result.stdout
    assert "hmpo_verl failed to register" in result.stderr


@pytest.mark.parametrize("name", ["PowerMeanLossConfig", "AdaptivePowerMeanLossConfig", "PowerMeanAlgoConfig"])
def test_hydra_targets_resolve_from_the_package(name):
    from hydra.utils import get_class

    import hmpo_verl.config

    assert get_class(f"hmpo_verl.{name}") is getattr(hmpo_verl.config, name)


def test_unknown_package_attribute_is_an_attribute_error():
    import hmpo_verl

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hmpo_verl.nope  # noqa: B018
