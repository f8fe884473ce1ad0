"""Wait until a Ray cluster has the nodes a run needs, or stop naming what is missing.

    python3 recipes/lib/ray_wait.py --address <head-ip>:6379 --nodes 2 --gpus 8 --cpus 64 \
        --hosts node01,node02 [--timeout 600]

Polls the cluster's node table (`ray.nodes()`) until `--nodes` live nodes each offer at least `--gpus` GPUs and
`--cpus` CPUs (Ray's registered resources: what verl's resource pool can place), then exits 0. After
`--timeout` seconds it exits 1 with one line per problem: each expected host (`--hosts`, e.g. the SLURM
allocation's) with no live node of that name, each live node short of GPUs or CPUs, or no cluster answering
at all. recipes/slurm/ray_on_slurm.slurm calls it instead of fixed sleeps: a worker slow to start (a cold shared
file system) gets its time, and a node that never comes is named, before verl's resource check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def _short(host: str) -> str:
    """node01.cluster.example -> node01 (SLURM lists short names, Ray the node's own hostname)."""
    return host.split(".", 1)[0]


def shortfall(nodes: list[dict], want: int, gpus: float, cpus: float, hosts: list[str]) -> list[str]:
    """What keeps the cluster from having `want` ready nodes; [] when it has them.

    `nodes`: `ray.nodes()` records ({"Alive", "NodeManagerHostname", "NodeManagerAddress", "Resources"}).
    A node is ready if alive with Resources["GPU"] >= gpus and Resources["CPU"] >= cpus."""
    alive = [n for n in nodes if n.get("Alive")]

    def offers(node: dict, key: str) -> float:
        return float(node.get("Resources", {}).get(key, 0))

    ready = [n for n in alive if offers(n, "GPU") >= gpus and offers(n, "CPU") >= cpus]
    if len(ready) >= want:
        return []
    problems = [f"{len(ready)} of {want} nodes ready (>= {gpus:g} GPUs and >= {cpus:g} CPUs each)"]
    seen = {_short(n.get("NodeManagerHostname", "")) for n in alive}
    problems += [f"{host}: not registered in Ray" for host in hosts if _short(host) not in seen]
    problems += [f"{n.get('NodeManagerHostname')} ({n.get('NodeManagerAddress')}): {offers(n, 'GPU'):g} GPUs, "
                 f"{offers(n, 'CPU'):g} CPUs registered" for n in alive if n not in ready]
    return problems


def _listening(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return True
    except OSError:
        return False


# One driver per poll, in a process of its own: ray.init against a GCS that listens but does not answer (a head
# still starting, or failing) retries for minutes, so each poll is cut off by a timeout instead.
_PROBE = ("import json, sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False); "
          "print('RAY_NODES', json.dumps([{k: n.get(k) for k in ('Alive', 'NodeManagerHostname', "
          "'NodeManagerAddress', 'Resources')} for n in ray.nodes()]))")


def _nodes(address: str, timeout: float) -> list[dict] | None:
    """`ray.nodes()` of the cluster at `address`, or None if no driver could join it within `timeout` seconds."""
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE, address], capture_output=True, text=True,
                             timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return None
    lines = [line.split(" ", 1)[1] for line in out.stdout.splitlines() if line.startswith("RAY_NODES ")]
    return json.loads(lines[-1]) if out.returncode == 0 and lines else None


def wait(address: str, want: int, gpus: float, cpus: float, hosts: list[str], timeout: float,
         interval: float = 2.0) -> list[str]:
    """Poll until :func:`shortfall` is empty (returns []) or `timeout` seconds pass (returns the problems)."""
    deadline = time.monotonic() + timeout
    unreachable = [f"no Ray cluster answers at {address}", *(f"{host}: not registered in Ray" for host in hosts)]
    problems, last = unreachable, None
    while True:
        left = deadline - time.monotonic()
        nodes = _nodes(address, min(left, 120)) if left > 0 and _listening(address) else None
        problems = unreachable if nodes is None else shortfall(nodes, want, gpus, cpus, hosts)
        if problems != last:
            print(f"ray_wait: {problems[0] if problems else f'{want} of {want} nodes ready'}", flush=True)
            last = problems
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="<head-ip>:<GCS port>")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus", type=float, default=0, help="GPUs each node must offer")
    parser.add_argument("--cpus", type=float, default=0, help="CPUs each node must offer")
    parser.add_argument("--hosts", default="", help="comma-separated hostnames expected (named when missing)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds")
    args = parser.parse_args(argv)
    if not args.address:
        parser.error("--address (or RAY_ADDRESS) is required")
    hosts = [h for h in args.hosts.split(",") if h]
    problems = wait(args.address, args.nodes, args.gpus, args.cpus, hosts, args.timeout)
    if problems:
        print(f"ray_wait: the cluster at {args.address} is not ready after {args.timeout:g} s:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        print("  (see each node's `ray start` output in the job's log; RAY_WAIT_TIMEOUT=<s> waits longer)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
