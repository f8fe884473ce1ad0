"""Run verl's own tests of what hmpo_verl wraps or registers into, with or without the plugin.

    python tests/verl_upstream/run_upstream.py with|without OUT.json

"with": verl loads its plugins as usual (our entry point, `hmpo_verl.verl_plugin`); "without":
`VERL_USE_EXTERNAL_PLUGINS=none`. Checks that the plugin is (or is not) loaded and, with it, that its
wrapper of `calculate_debug_metrics` is the function verl's test calls; then writes {test id: outcome}
to OUT.json. The tests (`UPSTREAM_TESTS`): the vendored `verl_test_debug_metrics.py`, and from the
verl 0.9.1 wheel's `tests` package those of `core_algos` (the registries our losses and estimators
join, `agg_loss`), the policy-loss registry and rollout correction (`rollout_corr_helper`, whose
`apply_bypass_mode` we wrap).
"""

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WHEEL_TESTS = [
    "tests/trainer/ppo/test_core_algos_on_cpu.py",
    "tests/trainer/ppo/test_dynamic_policy_losses_on_cpu.py",
    "tests/trainer/ppo/test_loss_aggregation_on_cpu.py",
    "tests/trainer/ppo/test_rollout_corr_integration.py",
]


def upstream_tests() -> list[str]:
    """Paths of the selected tests; the wheel's ones live beside verl in site-packages."""
    import verl

    site = Path(verl.__file__).resolve().parent.parent
    paths = [site / rel for rel in WHEEL_TESTS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"verl's wheel lacks its tests {missing}: install verl 0.9.1 from PyPI (it ships tests/)")
    return [str(HERE / "verl_test_debug_metrics.py")] + [str(p) for p in paths]


class _Outcomes:
    def __init__(self):
        self.by_id = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            self.by_id[report.nodeid.split("site-packages/")[-1]] = report.outcome


def main(mode: str, out: str) -> int:
    if mode == "without":
        os.environ["VERL_USE_EXTERNAL_PLUGINS"] = "none"
    import pytest
    import verl.utils.debug.metrics as debug_metrics  # noqa: F401  (imports verl, which loads plugins)

    loaded = "hmpo_verl.verl_plugin" in sys.modules
    guarded = getattr(debug_metrics.calculate_debug_metrics, "_hmpo_guarded", False)
    if (mode == "with") != loaded or loaded != guarded:
        raise SystemExit(f"mode {mode!r}: plugin loaded={loaded}, calculate_debug_metrics wrapped={guarded}")
    outcomes = _Outcomes()
    pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-o", "addopts=", *upstream_tests()],
                plugins=[outcomes])
    Path(out).write_text(json.dumps(outcomes.by_id, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
