"""Two Ray nodes on this machine: the 2-worker training spreads over both (slow tier)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_own_cluster(temp_dir: str) -> None:
    """Kill only this test's Ray processes (``ray stop`` would stop every cluster here)."""
    import psutil

    roots = [
        p
        for p in psutil.process_iter(["cmdline"])
        if any(temp_dir in arg for arg in (p.info["cmdline"] or []))
    ]
    victims = {p.pid: p for r in roots for p in [r, *r.children(recursive=True)]}
    for p in victims.values():
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(victims.values()), timeout=30)


def test_training_spread_over_two_nodes(tiny_dataset, tmp_path):
    port = _free_port()
    temp_dir = f"/tmp/rshnl-mn-{port}"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": str(REPO),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    ray = str(BIN / "ray")
    common = ["--disable-usage-stats", f"--temp-dir={temp_dir}"]
    try:
        subprocess.run(
            [
                ray,
                "start",
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={port}",
                "--num-cpus=2",
                "--include-dashboard=false",
                *common,
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [
                ray,
                "start",
                f"--address=127.0.0.1:{port}",
                "--node-ip-address=127.0.0.1",
                "--num-cpus=2",
                '--resources={"node2": 1}',
                *common,
            ],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        summary = tmp_path / "summary.json"
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "jobs.train",
                "--dataset",
                tiny_dataset,
                "--workers",
                "2",
                "--epochs",
                "2",
                "--warmup-epochs",
                "1",
                "--bits",
                "16",
                "--hidden-dim",
                "32",
                "--batch-size",
                "48",
                "--placement-strategy",
                "STRICT_SPREAD",
                "--ray-address",
                f"127.0.0.1:{port}",
                "--storage-path",
                str(tmp_path / "shared-storage"),
                "--tracking-uri",
                f"sqlite:///{tmp_path / 'mlflow.db'}",
                "--no-register",
                "--summary-json",
                str(summary),
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        s = json.loads(summary.read_text())
        assert len(s["worker_nodes"]) == 2
        assert len(set(s["worker_nodes"])) == 2  # one worker on each node
        assert s["epochs_run"] == 2 and len(set(s["center_checksums"])) == 1
        assert Path(s["checkpoint_path"]).is_relative_to(tmp_path / "shared-storage")
    finally:
        _stop_own_cluster(temp_dir)
