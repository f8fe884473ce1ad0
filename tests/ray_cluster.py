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
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

CLUSTER = Path(__file__).resolve().parents[1] / "recipes" / "lib" / "cluster.sh"
# Both nodes' address: a loopback one that Ray keeps (it replaces 127.0.0.1 / localhost by the machine's
# outward address, services.resolve_ip_for_localhost), so nothing leaves the machine.
LOOPBACK = "127.0.0.2"
# Ray 2.60's `ray start` turns token authentication on; a driver that connects must ask for it too (the
# token is ~/.ray/auth_token). Set for the nodes, the probes and run.sh alike.
AUTH = {"RAY_AUTH_MODE": "token"}


def ray_cli(folder: Path) -> str:
    """A `ray` executable that runs this interpreter's Ray CLI (a venv need not have the script)."""
    path = folder / "ray"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ray.scripts.scripts "$@"\n')
    path.chmod(0o755)
    return str(path)


def free_ports(n: int) -> list[int]:
    """n distinct ports nothing listens on now, drawn by the kernel from its ephemeral range."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind((LOOPBACK, 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_range(size: int, taken: set[int]) -> int:
    """The low end of `size` consecutive free ports, none of them in `taken`.

    Drawn below the kernel's ephemeral range, where :func:`free_ports` and every outgoing connection take
    theirs: Ray refuses to start a node whose worker-port range holds one of its named ports
    ("Ray component worker_ports is trying to use a port number ... used by other components")."""
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    draw = random.Random()
    for _ in range(200):
        low = draw.randrange(10000, ephemeral_low - size)
        span = range(low, low + size)
        if taken.isdisjoint(span) and all(_bindable(port) for port in span):
            return low
    raise RuntimeError(f"no {size} consecutive free ports below {ephemeral_low}")


# Each node's named ports (its GCS port, for the head, comes apart) and the size of its worker-port range.
NAMED = ["--node-manager-port", "--object-manager-port", "--runtime-env-agent-port", "--dashboard-agent-grpc-port",
         "--dashboard-agent-listen-port", "--metrics-export-port"]
HEAD_NAMED = [*NAMED, "--ray-client-server-port"]
WORKER_PORTS = 201


def node_args(ports: list[int], worker_low: int, head: bool) -> str:
    """`ray start` flags that keep this node off every default port (several clusters share the machine)."""
    flags = [f"{name}={port}" for name, port in zip(HEAD_NAMED if head else NAMED, ports, strict=True)]
    return " ".join([*flags, f"--min-worker-port={worker_low}",
                     f"--max-worker-port={worker_low + WORKER_PORTS - 1}", "--block"])


def _log(logs: Path, role: str) -> Path:
    return logs / f"ray_{role}.log"


def _start(role: str, env: dict, args: list[str], logs: Path) -> subprocess.Popen:
    """`cluster.sh <role> <args>` in its own session, its output to :func:`_log`."""
    return subprocess.Popen(["bash", str(CLUSTER), role, *args], env=env, stdout=_log(logs, role).open("w"),
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
             f"print('RAYQ', json.dumps({expression}))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180,
                         env={**os.environ, **AUTH})
    # the answer's own line: a raylet that crashes beside the probe may print its stack to the same stdout
    answers = [line[len("RAYQ "):] for line in out.stdout.splitlines() if line.startswith("RAYQ ")]
    if out.returncode != 0 or not answers:
        raise RuntimeError(out.stderr[-2000:] + out.stdout[-2000:])
    return json.loads(answers[-1])


def _listening(port: int) -> bool:
    """Whether something accepts connections on the port (the GCS, before a driver may wait on it)."""
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex((LOOPBACK, port)) == 0


def alive_nodes(address: str) -> list[str]:
    """The ids of the cluster's live nodes; none while its GCS does not answer a driver yet."""
    try:
        return _ray_query(address, "[n['NodeID'] for n in ray.nodes() if n['Alive']]")
    except (RuntimeError, subprocess.TimeoutExpired):
        return []


def head_node(address: str) -> str:
    """The id of the cluster's head node (the one holding Ray's ``node:__internal_head__`` resource)."""
    (head,) = _ray_query(address, "[n['NodeID'] for n in ray.nodes() if n['Alive'] and "
                                  "'node:__internal_head__' in n['Resources']]")
    return head


def actor_nodes(address: str) -> dict[str, list[str]]:
    """{actor class name: [the node id of each of its actors]} from the cluster's actor table."""
    table: dict[str, list[str]] = {}
    for name, node in _ray_query(address, "[[a['ActorClassName'], a['Address']['NodeID']] "
                                          "for a in state.actors().values()]"):
        table.setdefault(name, []).append(node)
    return table


def _dashboard_up(port: int) -> bool:
    """Whether the head's dashboard answers Ray's job API version query (what `ray job submit` asks first)."""
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/api/version", timeout=5):
            return True
    except urllib.error.HTTPError:  # it answered (an auth refusal included): it is up
        return True
    except OSError:
        return False


@contextlib.contextmanager
def two_nodes(env: dict, logs: Path, timeout: float = 300, worker_env: dict | None = None, restarts: int = 3,
              dashboard_port: int | None = None):
    """Start a head and a worker (one logical GPU slot each); yield (GCS address, node ids); stop both.

    ``worker_env`` overrides the worker node's environment (what its Ray workers inherit). A node whose
    `ray start` exits while the cluster comes up is started again, up to ``restarts`` times each: Ray waits a
    fixed 30 s for its raylet to register (ray/_private/node.py, raylet_start_wait_time_s), which a loaded
    machine can miss. With `dashboard_port`, the head serves Ray's job API there (cluster.sh's DASHBOARD_HOST /
    DASHBOARD_PORT): `ray job submit --address=http://127.0.0.2:<port>`.
    A driver joining it needs :data:`AUTH` in its environment."""
    gcs, *named = free_ports(1 + len(HEAD_NAMED) + len(NAMED))
    head_ports, worker_ports = named[:len(HEAD_NAMED)], named[len(HEAD_NAMED):]
    head_low = free_range(WORKER_PORTS, {gcs, *named})
    worker_low = free_range(WORKER_PORTS, {gcs, *named, *range(head_low, head_low + WORKER_PORTS)})
    address = f"{LOOPBACK}:{gcs}"
    base = {**env, **AUTH, "RAY": ray_cli(logs), "NGPUS_PER_NODE": "1", "NUM_CPUS": "8", "NODE_IP": LOOPBACK}
    # short temp dirs: Ray's socket paths must stay under 107 characters
    temps = [tempfile.mkdtemp(prefix="rayh"), tempfile.mkdtemp(prefix="rayw")]
    head_env = {**base, "RAY_PORT": str(gcs), "RAY_TEMP_DIR": temps[0],
                "RAY_START_ARGS": node_args(head_ports, head_low, head=True)}
    if dashboard_port is not None:
        head_env.update(DASHBOARD_HOST=LOOPBACK, DASHBOARD_PORT=str(dashboard_port))
    starts = {"head": (head_env, []),
              "worker": ({**base, **(worker_env or {}), "RAY_TEMP_DIR": temps[1],
                          "RAY_START_ARGS": node_args(worker_ports, worker_low, head=False)}, [address])}
    processes = {"head": _start("head", *starts["head"], logs)}
    left = {"head": restarts, "worker": restarts}
    try:
        deadline = time.time() + timeout
        while True:
            for role, process in list(processes.items()):
                if process.poll() is not None:  # `ray start --block` returns only when its node failed
                    log = _log(logs, role).read_text()[-3000:]
                    if not left[role]:
                        raise AssertionError(f"the {role} node exited ({process.returncode}):\n{log}")
                    left[role] -= 1
                    print(f"the {role} node exited ({process.returncode}); starting it again:\n{log[-600:]}")
                    _stop(process)
                    starts[role][0]["RAY_TEMP_DIR"] = tempfile.mkdtemp(prefix=f"ray{role[0]}")  # a fresh session
                    processes[role] = _start(role, *starts[role], logs)
            nodes = alive_nodes(address) if _listening(gcs) else []
            if len(nodes) == 2 and (dashboard_port is None or _dashboard_up(dashboard_port)):
                break
            if nodes and "worker" not in processes:
                processes["worker"] = _start("worker", *starts["worker"], logs)
            if time.time() > deadline:
                raise AssertionError(f"the 2-node cluster did not come up: {nodes}; see {logs}/ray_*.log")
            time.sleep(3)
        yield address, nodes
    finally:
        for process in reversed(processes.values()):
            _stop(process)
