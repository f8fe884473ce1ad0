"""recipes/slurm/ray_on_slurm.slurm on a real SLURM, and recipes/lib/ray_wait.py, which it waits with.

The SLURM test starts munged, slurmctld and slurmd on this machine (Debian's slurm-wlm; its own ports, state
and socket under a temp dir; one node with 2 GPUs declared as generic resources `gpu:h100:2` backed by empty
files) and submits the script with `sbatch --wait --gpus-per-node=h100:2`: the head address parsing, the
`h100:2` count, the Ray head through recipes/lib/cluster.sh, ray_wait.py's bounded wait on the registered
nodes, GPUs and CPUs, and run.sh with no overrides (DRY_RUN=1: it prints the trainer's command instead of
training, the trainer itself is tested in tests/test_recipes_cpu_size.py). Skipped, with the reason, where
SLURM is not installed (`apt-get install -y slurm-wlm`: Debian's, ~1.5 min here; .ci/run installs it where it runs as root with apt)
or not as root. Last run here: passed, `sbatch --wait` 74 s, the test 83 s (load average ~30).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from ray_cluster import HEAD_NAMED, WORKER_PORTS, free_ports, free_range, ray_cli

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "recipes" / "slurm" / "ray_on_slurm.slurm"
sys.path.insert(0, str(REPO / "recipes" / "lib"))
import ray_wait  # noqa: E402

SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "slurmd")


def _node(host: str, gpus: float, cpus: float, alive: bool = True) -> dict:
    return {"Alive": alive, "NodeManagerHostname": host, "NodeManagerAddress": f"10.0.0.{len(host)}",
            "Resources": {"GPU": gpus, "CPU": cpus}}


def test_shortfall_names_missing_and_short_nodes():
    nodes = [_node("n1.cluster.example", 8, 64), _node("n2", 4, 64), _node("n3", 8, 64, alive=False)]
    problems = ray_wait.shortfall(nodes, 3, 8, 64, ["n1", "n2", "n3"])
    assert problems[0] == "1 of 3 nodes ready (>= 8 GPUs and >= 64 CPUs each)"
    assert "n3: not registered in Ray" in problems  # dead: as good as absent
    assert "n2 (10.0.0.2): 4 GPUs, 64 CPUs registered" in problems
    assert not any(p.startswith("n1") for p in problems)  # FQDN n1.cluster.example is SLURM's n1
    assert ray_wait.shortfall(nodes[:1], 1, 8, 64, ["n1"]) == []
    assert ray_wait.shortfall(nodes, 1, 8, 65, []) == ["0 of 1 nodes ready (>= 8 GPUs and >= 65 CPUs each)",
                                                      "n1.cluster.example (10.0.0.18): 8 GPUs, 64 CPUs registered",
                                                      "n2 (10.0.0.2): 4 GPUs, 64 CPUs registered"]


def test_ray_wait_stops_after_its_timeout_naming_the_hosts():
    port = free_ports(1)[0]
    start = time.time()
    result = subprocess.run([sys.executable, str(REPO / "recipes" / "lib" / "ray_wait.py"), "--address",
                             f"127.0.0.2:{port}", "--nodes", "2", "--hosts", "node01,node02", "--timeout", "3"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"no Ray cluster answers at 127.0.0.2:{port}" in result.stderr
    assert "node01: not registered in Ray" in result.stderr and "node02: not registered in Ray" in result.stderr
    assert time.time() - start < 30


def test_ray_wait_is_bounded_when_the_port_listens_but_no_gcs_answers():
    """A head whose port is open but whose GCS does not answer (starting, or failing under load): ray.init
    alone would retry for minutes; ray_wait's polls are cut off, and it stops at its timeout naming the host."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.2", 0))
        listener.listen()
        port = listener.getsockname()[1]
        start = time.time()
        result = subprocess.run([sys.executable, str(REPO / "recipes" / "lib" / "ray_wait.py"), "--address",
                                 f"127.0.0.2:{port}", "--nodes", "1", "--hosts", "node01", "--timeout", "8"],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "node01: not registered in Ray" in result.stderr and "Traceback" not in result.stderr
    assert time.time() - start < 60


def test_the_slurm_script_guards_its_possibly_empty_override_array():
    """`"${HYDRA_OVERRIDES[@]}"` of an empty array is an unbound-variable error under `set -u` on bash < 4.4."""
    text = SCRIPT.read_text()
    assert '"${HYDRA_OVERRIDES[@]}"' not in text.replace('${HYDRA_OVERRIDES[@]+"${HYDRA_OVERRIDES[@]}"}', "")
    assert "sleep" not in text.split("set -euo pipefail", 1)[1], "wait on the cluster (ray_wait.py), not a clock"


# ---------------------------------------------------------------------------------------------
# a real SLURM: munged + slurmctld + slurmd on this machine


def _why_no_slurm() -> str | None:
    missing = [p for p in SLURM_PROGRAMS if shutil.which(p) is None and not Path(f"/usr/sbin/{p}").exists()]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing): apt-get install -y slurm-wlm"
    if os.geteuid() != 0:
        return "slurmd must run as root to start job steps"
    return None


def _program(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _wait_for(predicate, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            tails = "\n".join(f"{p}:\n{p.read_text()[-2000:]}" for p in logs if p.exists())
            raise AssertionError(f"{what} not within {timeout} s\n{tails}")
        time.sleep(1)


@pytest.fixture
def slurm():
    """munged, slurmctld and slurmd of their own; yields the environment for sbatch; stops the three by pid."""
    reason = _why_no_slurm()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="slurm"))  # short: munge's socket path
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir()
    (root / "munge").chmod(0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname()
    ctld_port, d_port = free_ports(2)
    for i in range(2):
        (root / f"gpu{i}").touch()
    (root / "slurm.conf").write_text("\n".join([
        "ClusterName=hmpotest", f"SlurmctldHost={host}", f"SlurmctldPort={ctld_port}", f"SlurmdPort={d_port}",
        "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
        f"AuthInfo=socket={root}/munge/sock", f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "SchedulerType=sched/builtin", "MpiDefault=none", "ReturnToService=2",
        "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none", "GresTypes=gpu",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory=1000 Gres=gpu:h100:2 State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
    (root / "gres.conf").write_text(f"AutoDetect=off\nNodeName={host} Name=gpu Type=h100 File={root}/gpu[0-1]\n")
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    logs = [root / "munge" / "log", root / "slurmctld.log", root / "slurmd.log"]
    pid_files = [root / "slurmd.pid", root / "slurmctld.pid", root / "munge" / "pid"]
    try:
        subprocess.run([_program("munged"), "--force", f"--socket={root}/munge/sock", f"--key-file={key}",
                        f"--pid-file={root}/munge/pid", f"--log-file={root}/munge/log",
                        f"--seed-file={root}/munge/seed"], check=True, env=env, timeout=30)
        subprocess.run([_program("slurmctld"), "-i"], check=True, env=env, timeout=30)
        subprocess.run([_program("slurmd")], check=True, env=env, timeout=30)

        def idle() -> bool:
            out = subprocess.run([_program("sinfo"), "-h", "-o", "%T"], env=env, capture_output=True, text=True)
            return out.stdout.strip() == "idle"

        _wait_for(idle, 60, "the SLURM node idle", logs)
        yield root, env
    finally:
        pids = [int(f.read_text().split()[0]) for f in pid_files if f.exists()]
        # and the job-step daemons (slurmstepd) slurmd left behind: they run in its spool directory
        pids += [pid for pid in _pids_in(root) if pid not in pids]
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the processes this fixture started, each by its pid
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(1)
        shutil.rmtree(root, ignore_errors=True)


def _pids_in(folder: Path) -> list[int]:
    """The processes whose working directory is under `folder`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "cwd").startswith(str(folder)):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_the_slurm_script_waits_for_ray_and_launches_run_sh(slurm, tmp_path):
    root, env = slurm
    ports = free_ports(1 + len(HEAD_NAMED))
    low = free_range(WORKER_PORTS, set(ports))
    head_flags = [f"{name}={port}" for name, port in zip(HEAD_NAMED, ports[1:], strict=True)]
    ray_temp = tempfile.mkdtemp(prefix="rays")
    job_env = {**env, "TASK": "gsm8k", "SIZE": "cpu", "CKPT_DIR": str(tmp_path / "ckpt"), "DRY_RUN": "1",
               "PYTHON": sys.executable, "RAY": ray_cli(tmp_path), "RAY_PORT": str(ports[0]),
               "RAY_START_ARGS": " ".join([*head_flags, f"--min-worker-port={low}",
                                           f"--max-worker-port={low + WORKER_PORTS - 1}",
                                           f"--temp-dir={ray_temp}"]),
               "RAY_WAIT_TIMEOUT": "240"}
    job_env.pop("HYDRA_OVERRIDES", None)
    out = tmp_path / "slurm.out"
    start = time.time()
    result = subprocess.run([_program("sbatch"), "--wait", "--nodes=1", "--cpus-per-task=2",
                             "--gpus-per-node=h100:2", "--mem=0", "--time=10", f"--output={out}", str(SCRIPT)],
                            env=job_env, cwd=REPO, capture_output=True, text=True, timeout=400)
    log = out.read_text() if out.exists() else ""
    print(f"sbatch --wait ray_on_slurm.slurm: {time.time() - start:.0f} s")
    assert result.returncode == 0, result.stdout + result.stderr + log
    head = [line for line in log.splitlines() if line.startswith("Ray head: ")]
    assert head, log
    address = head[0].split("(", 1)[1].split(":", 1)[0]
    assert not address.startswith("127.") and ":" not in address, head  # an IPv4 address other nodes reach
    assert head[0].endswith(", 1 nodes x 2 GPUs"), head  # h100:2 -> 2
    assert "ray_wait: 1 of 1 nodes ready" in log
    printed = [line for line in log.splitlines() if " -m verl.trainer.main_ppo " in line]
    assert len(printed) == 1, log  # run.sh's dry run: the trainer's command
    command = shlex.split(printed[0])
    assert command[1:3] == ["-m", "verl.trainer.main_ppo"], log
    assert "trainer.nnodes=1" in command and "trainer.n_gpus_per_node=2" in command
    assert "ray_kwargs.ray_init.num_cpus=null" in command  # RAY_ADDRESS=<head>:<port> reached run.sh
