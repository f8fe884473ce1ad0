"""Two Ray nodes on one machine, started with recipes/lib/cluster.sh, for tests/test_recipes_cpu_size.py.

Each node is its own `ray start --block` (cluster.sh head / worker) with its own temp dir and free ports,
so a test joins and stops no other cluster on the machine; both are stopped by their process groups,
never with a global `ray stop`. Each node offers one logical GPU slot, so verl's resource pool (one
placement group of trainer.n_gpus_per_node = 1 bundle per node) has to put one actor rank on each node;
:func:`actor_nodes` reads where the actors ran from the cluster's actor table (GCS).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLUSTER = Path(__file__).resolve().parents[1] / "recipes" / "lib" / "cluster.sh"
# Both nodes' address: a loopback one that Ray keeps (it replaces 127.0.0.1 / localhost by the machine's
# outward address, services.resolve_ip_for_localhost), so nothing leaves the machine.
LOOPBACK = "127.0.0.2"
# Ray 2.60's `ray start` turns token authentication on; a driver that connects must ask for it too (the
# token is ~/.ray/auth_token, where `ray start` wrote it). Set for the nodes, the probes and run.sh alike.
AUTH = {"RAY_AUTH_MODE": "token"}


def ray_cli(folder: Path) -> str:
    """A `ray` executable that runs this interpreter's Ray CLI (a venv need not have the script)."""
    path = folder / "ray"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ray.scripts.scripts "$@"\n')
    path.chmod(0o755)
    return str(path)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind((LOOPBACK, 0))
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


def _start(role: str, env: dict, args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(CLUSTER), role, *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the node's process group (`ray start --block` and the raylet, GCS, workers)."""
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


def _ray_query(address: str, expression: str) -> object:
    probe = (f"import ray, json, ray._private.state as state; ray.init(address={address!r}, logging_level='ERROR'); "
             f"print(json.dumps({expression}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180,
                         env={**os.environ, **AUTH})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def alive_nodes(address: str) -> list[str]:
    return _ray_query(address, "[n['NodeID'] for n in ray.nodes() if n['Alive']]")


def actor_nodes(address: str) -> dict[str, list[str]]:
    """{actor class name: [the node id of each of its actors]} from the cluster's actor table."""
    table: dict[str, list[str]] = {}
    for name, node in _ray_query(address, "[[a['ActorClassName'], a['Address']['NodeID']] "
                                          "for a in state.actors().values()]"):
        table.setdefault(name, []).append(node)
    return table


@contextlib.contextmanager
def two_nodes(env: dict, logs: Path, timeout: float = 300):
    """Start a head and a worker (one logical GPU slot each); yield (GCS address, node ids); stop both.

    A driver joining it needs :data:`AUTH` in its environment."""
    ports = free_ports(17)
    address = f"{LOOPBACK}:{ports[0]}"
    base = {**env, **AUTH, "RAY": ray_cli(logs), "NGPUS_PER_NODE": "1", "NUM_CPUS": "8", "NODE_IP": LOOPBACK}
    # short temp dirs: Ray's socket paths must stay under 107 characters
    temps = [tempfile.mkdtemp(prefix="rayh"), tempfile.mkdtemp(prefix="rayw")]
    processes = [_start("head", {**base, "RAY_PORT": str(ports[0]), "RAY_TEMP_DIR": temps[0],
                                 "RAY_START_ARGS": node_args(ports[1:9], head=True)}, [], logs / "ray_head.log")]
    try:
        deadline = time.time() + timeout
        started_worker = False
        while True:
            try:
                nodes = alive_nodes(address)
            except RuntimeError:
                nodes = []
            if len(nodes) == 2:
                break
            if nodes and not started_worker:
                processes.append(_start("worker", {**base, "RAY_TEMP_DIR": temps[1],
                                                   "RAY_START_ARGS": node_args(ports[9:17], head=False)},
                                        [address], logs / "ray_worker.log"))
                started_worker = True
            if time.time() > deadline:
                raise AssertionError(f"the 2-node cluster did not come up: {nodes}; see {logs}/ray_*.log")
            time.sleep(3)
        yield address, nodes
    finally:
        for process in reversed(processes):
            _stop(process)
