"""Two Ray nodes on one machine, the trainer on the head: recipes/lib/cluster.sh + run.sh with NNODES=2, CPU size.

Each node is its own `ray start` (cluster.sh head / worker) with its own temp dir and free ports, so the
test joins and stops no other cluster on the machine; both are stopped by their process groups, never with
a global `ray stop`. Each node offers one logical GPU slot, so verl's resource pool (one placement group of
trainer.n_gpus_per_node = 1 bundle per node) must put one actor rank on each node; the test reads where the
ranks ran from the cluster's actor table (GCS) after the 2 steps. About 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_recipes_cpu_size import RECIPES, offline_env, prepare, sample  # noqa: F401 - sample is a fixture

CLUSTER = RECIPES / "lib" / "cluster.sh"
RAY = str(Path(sys.executable).parent / "ray")


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def node_args(ports: list[int], head: bool) -> str:
    """`ray start` flags that keep this node off every default port (several clusters share the machine)."""
    names = ["--node-manager-port", "--object-manager-port", "--runtime-env-agent-port",
             "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port", "--metrics-export-port"]
    if head:
        names.append("--ray-client-server-port")
    flags = [f"{name}={port}" for name, port in zip(names, ports)]
    low = ports[-1]
    return " ".join([*flags, f"--min-worker-port={low}", f"--max-worker-port={low + 200}", "--block"])


def start_node(role: str, env: dict, *args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(CLUSTER), role, *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop_node(process: subprocess.Popen) -> None:
    """SIGTERM to the node's process group (`ray start --block` and the raylet, GCS, workers it started)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_for_nodes(address: str, count: int, timeout: float = 240) -> list[str]:
    probe = ("import ray, json; ray.init(address=%r, logging_level='ERROR'); "
             "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))") % address
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        if out.returncode == 0:
            nodes = json.loads(out.stdout.strip().splitlines()[-1])
            if len(nodes) >= count:
                return nodes
        time.sleep(3)
    raise AssertionError(f"the cluster at {address} did not reach {count} nodes")


def actor_nodes(address: str) -> dict[str, list[str]]:
    """{actor class name: [node id of each of its actors]} from the cluster's actor table."""
    probe = ("import ray, json, ray._private.state as s; ray.init(address=%r, logging_level='ERROR'); "
             "print(json.dumps([[a['ActorClassName'], a['Address']['NodeID']] for a in s.actors().values()]))"
             ) % address
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    table: dict[str, list[str]] = {}
    for name, node in json.loads(out.stdout.strip().splitlines()[-1]):
        table.setdefault(name, []).append(node)
    return table


@pytest.fixture(scope="module")
def two_node_run(sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_nodes")
    data = out / "data"
    prepared = prepare("gsm8k", sample, data)
    assert prepared.returncode == 0, prepared.stderr
    ports = free_ports(17)
    gcs = ports[0]
    address = f"127.0.0.1:{gcs}"
    # short temp dirs: Ray's socket paths must stay under 107 characters
    temp = [Path(tempfile.mkdtemp(prefix="rayi18h")), Path(tempfile.mkdtemp(prefix="rayi18w"))]
    base = offline_env(out, RAY=RAY, NGPUS_PER_NODE="1", NUM_CPUS="8", NODE_IP="127.0.0.1", VERL_PLATFORM="cpu")
    head = start_node("head", {**base, "RAY_PORT": str(gcs), "RAY_TEMP_DIR": str(temp[0]),
                               "RAY_START_ARGS": node_args(ports[1:9], head=True)}, log=out / "head.log")
    nodes, processes = [], [head]
    try:
        wait_for_nodes(address, 1)
        processes.append(start_node("worker", {**base, "RAY_TEMP_DIR": str(temp[1]),
                                               "RAY_START_ARGS": node_args(ports[9:17], head=False)},
                                    address, log=out / "worker.log"))
        nodes = wait_for_nodes(address, 2)
        env = offline_env(out, SIZE="cpu", MEAN="harmonic", NNODES="2", NGPUS_PER_NODE="1", RAY_ADDRESS=address,
                          DATA_DIR=str(data), MODEL_PATH=str(sample / "hmpo_cpu_model"), CKPT_DIR=str(out / "ckpt"),
                          LOGGER="console,file", VERL_FILE_LOGGER_PATH=str(out / "metrics.jsonl"))
        start = time.time()
        result = subprocess.run(["bash", str(RECIPES / "gsm8k" / "run.sh"), "trainer.val_before_train=false",
                                 "trainer.test_freq=-1"], env=env, capture_output=True, text=True, timeout=900, cwd=out)
        print(f"2-node SIZE=cpu gsm8k/run.sh: {time.time() - start:.0f} s")
        table = actor_nodes(address)
    finally:
        for process in reversed(processes):
            stop_node(process)
    log = result.stdout + result.stderr
    (out / "train.log").write_text(log)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").exists() else []
    return result.returncode, log, metrics, table, nodes


def test_two_nodes_train_two_steps(two_node_run):
    code, log, metrics, _, nodes = two_node_run
    assert code == 0, log[-6000:]
    assert len(set(nodes)) == 2
    assert sorted(m["step"] for m in metrics) == [1, 2]
    assert all("actor/pm/power" in m["data"] for m in metrics)


def test_the_actor_ranks_ran_on_both_nodes(two_node_run):
    _, _, _, table, nodes = two_node_run
    workers = {name: on for name, on in table.items() if "WorkerDict" in name or "ActorRollout" in name}
    assert workers, f"no trainer worker actors in {sorted(table)}"
    for name, on in workers.items():
        assert len(on) == 2 and set(on) == set(nodes), (name, on, nodes)
