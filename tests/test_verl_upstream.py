"""verl's own tests of the functions hmpo_verl wraps or registers into pass the same with the plugin loaded
as without it (issue 27, F8): `tests/verl_upstream/run_upstream.py` runs them both ways, in two processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).resolve().parent / "verl_upstream" / "run_upstream.py"


def test_verls_tests_of_wrapped_functions_pass_with_and_without_the_plugin(tmp_path):
    runs = {}
    for mode in ("with", "without"):  # in parallel: each is mostly verl's import time
        out = tmp_path / f"{mode}.json"
        runs[mode] = (out, subprocess.Popen([sys.executable, str(RUNNER), mode, str(out)], env=dict(os.environ),
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = {}
    for mode, (out, proc) in runs.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{mode}:\n{log[-4000:]}"
        results[mode] = json.loads(out.read_text())
    with_plugin, without = results["with"], results["without"]
    assert len(without) >= 30 and "verl_test_debug_metrics.py::TestMetrics::test_calculate_debug_metrics" in "\n".join(without)
    assert with_plugin == without
    assert set(without.values()) == {"passed"}, {k: v for k, v in without.items() if v != "passed"}
