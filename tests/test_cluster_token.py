"""recipes/lib/cluster.sh on a new home: with RAY_AUTH_MODE=token (what recipes/slurm/ray_on_slurm.slurm exports
and recipes/README.md tells a multi-node user to set), Ray 2.60's `ray start --head` reads ~/.ray/auth_token and
does not make it, so on a node that never ran Ray it stopped with "Token authentication is enabled but no
authentication token was found" (seen on this project's CI machine, 2026-12-07). A 2-node cluster (two
`cluster.sh` processes on one machine, tests/ray_cluster.py) on an empty HOME must come up, the head having made
the token its worker and drivers read. ~30 s."""

from __future__ import annotations

import os

from ray_cluster import two_nodes


def test_a_cluster_starts_on_a_home_without_rays_token(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))  # the nodes, and the probes that list the cluster's nodes
    logs = tmp_path / "logs"
    logs.mkdir()
    with two_nodes(dict(os.environ), logs, restarts=0) as (_, nodes):
        assert len(nodes) == 2
    assert len((home / ".ray" / "auth_token").read_text()) >= 32
