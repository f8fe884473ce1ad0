"""Every node checked before the trainer starts: run.sh joining a 2-node Ray cluster (tests/ray_cluster.py) runs
recipes/lib/preflight.py on each node through Ray, and a worker node without hmpo-verl stops the launch with
one report naming that node.

The worker node's Python sees a `hmpo_verl-0.0.0.dist-info` without entry points ahead of the installed one (a
PYTHONPATH shadow): to importlib.metadata -- and to verl's plugin loader, which reads the `verl.plugins` entry
points the same way -- hmpo-verl is not installed there, as on a node someone forgot to set up. The head is
complete. The run never reaches main_ppo (no Ray job, no checkpoint), so the test costs one cluster start-up and
one preflight: ~30-40 s on an idle machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from ray_cluster import AUTH, head_node, two_nodes
from test_recipes_cpu_size import offline_env

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES / "gsm8k"))
from prepare_extra import SYSTEM_PROMPT  # noqa: E402


def _model(folder: Path) -> Path:
    """A local model directory the preflight can count (a safetensors header of 1000 parameters, no data) and read
    the context of (config.json)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "max_position_embeddings": 2048}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return folder


def test_a_worker_node_without_hmpo_verl_is_named_and_nothing_launches(tmp_path):
    shadow = tmp_path / "shadow" / "hmpo_verl-0.0.0.dist-info"
    shadow.mkdir(parents=True)
    (shadow / "METADATA").write_text("Metadata-Version: 2.1\nName: hmpo-verl\nVersion: 0.0.0\n")
    node_env = offline_env(tmp_path, VERL_PLATFORM="cpu")
    worker_env = {"PYTHONPATH": f"{shadow.parent}:{node_env.get('PYTHONPATH', '')}"}
    data = tmp_path / "data"
    (data / "gsm8k").mkdir(parents=True)
    row = {"prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "1+1?"}]}
    for split in ("train", "test"):  # a row as recipes/gsm8k/prepare_data.sh writes it: the preflight reads the first
        pq.write_table(pa.Table.from_pylist([row]), data / "gsm8k" / f"{split}.parquet")
    with two_nodes(node_env, tmp_path, worker_env=worker_env) as (address, nodes):
        head = head_node(address)
        env = offline_env(tmp_path, SIZE="cpu", MEAN="harmonic", NNODES="2", NGPUS_PER_NODE="1", RAY_ADDRESS=address,
                          DATA_DIR=str(data), MODEL_PATH=str(_model(tmp_path / "model")),
                          CKPT_DIR=str(tmp_path / "ckpt"), **AUTH)
        result = subprocess.run(["bash", str(RECIPES / "gsm8k" / "run.sh")], env=env, capture_output=True, text=True,
                                timeout=600, cwd=tmp_path)
    (worker,) = set(nodes) - {head}
    err = result.stderr
    assert result.returncode == 3, result.stdout + err
    assert "preflight: 2 problem(s) on 1 of 2 node(s) (cpu):" in err, err
    lines = err.splitlines()
    at = next(i for i, line in enumerate(lines) if f"(worker, node id {worker[:12]}):" in line)
    assert lines[at + 1] == ("  - hmpo-verl (`pip install -e .` from the repository root) is not installed with its "
                             "verl.plugins entry point, on every node")
    assert lines[at + 2].startswith("  - hmpo-verl 0.0.0 there, ") and lines[at + 2].endswith(
        " in the driver (every node needs the same)")
    assert head[:12] not in err  # the complete node is not reported
    assert "preflight failed; nothing launched" in err
    assert not (tmp_path / "ckpt").exists() and "main_ppo" not in result.stdout
