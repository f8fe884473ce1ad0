"""Entry point (group ``verl.plugins``) of the CPU backend; active only with ``VERL_PLATFORM=cpu``.

verl imports this module from ``verl/__init__.py`` in every process (driver, TaskRunner,
Ray workers, rollout servers). verl swallows exceptions raised by plugins (logged at
DEBUG level), so a wrong verl version is reported on stderr and the process exits:
with ``VERL_PLATFORM=cpu`` the user asked for this backend, and continuing would only
fail later with ``Unknown platform 'cpu'``.
"""

from __future__ import annotations

import os
import sys

from verl_cpu import ENV_SWITCH


def enabled() -> bool:
    """True when the user selected the CPU platform (``VERL_PLATFORM=cpu``)."""
    return os.environ.get(ENV_SWITCH, "").strip().lower() == "cpu"


def activate() -> None:
    """Install every CPU adaptation into the verl already being imported."""
    from verl_cpu.version import UnsupportedVerlVersion, check_verl_version

    try:
        check_verl_version()
    except UnsupportedVerlVersion as exc:
        print(f"verl_cpu: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None

    import verl.utils.config as verl_config

    from verl_cpu import distributed, engines, platform, rollout, vllm_rollout  # noqa: F401  (platform registers itself)
    from verl_cpu.import_hooks import after_import
    from verl_cpu.preflight import wrap_validate_config

    distributed.install()
    engines.install()
    rollout.register()
    vllm_rollout.install()
    if not getattr(verl_config.validate_config, "_verl_cpu_patched", False):
        verl_config.validate_config = wrap_validate_config(verl_config.validate_config)
    after_import("verl.trainer.main_ppo", _check_before_run_ppo)


def _check_before_run_ppo(main_ppo) -> None:
    """The off-policy trainers' entry points reach Ray through ``verl.trainer.main_ppo.run_ppo``."""
    from verl_cpu.preflight import wrap_run_ppo

    if not getattr(main_ppo.run_ppo, "_verl_cpu_patched", False):
        main_ppo.run_ppo = wrap_run_ppo(main_ppo.run_ppo)


if enabled():
    activate()
