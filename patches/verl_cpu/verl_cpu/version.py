"""The verl version this backend is written for, and a clear failure on any other."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from verl_cpu import SUPPORTED_VERL_VERSION


class UnsupportedVerlVersion(RuntimeError):
    """Raised when the installed verl is not the version the CPU backend was written for."""


def installed_verl_version() -> str | None:
    """The installed verl version from package metadata (does not import verl)."""
    try:
        return version("verl")
    except PackageNotFoundError:
        return None


def check_verl_version(found: str | None = None) -> None:
    """Raise :class:`UnsupportedVerlVersion` unless verl ``SUPPORTED_VERL_VERSION`` is installed."""
    found = installed_verl_version() if found is None else found
    if found != SUPPORTED_VERL_VERSION:
        raise UnsupportedVerlVersion(
            f"verl_cpu is written for verl=={SUPPORTED_VERL_VERSION}, but verl=={found} is installed. "
            f"Its patches touch verl internals (platform registry, engine registry, rollout registries, "
            f"process-group setup) that change between releases. Install verl=={SUPPORTED_VERL_VERSION} "
            f"(`pip install verl=={SUPPORTED_VERL_VERSION}`) or unset VERL_PLATFORM=cpu."
        )
