"""The local stack's safety without starting it: down.sh stops exactly the recorded sessions (their
daemonised members included) and nothing that merely mentions the state directory; up.sh refuses
bad settings in one line and never forwards the caller's credentials; the cluster configs turn on
token authentication."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
LOCAL = REPO / "infra" / "local"
CLUSTER = REPO / "infra" / "cluster"


def _load_stop():
    spec = importlib.util.spec_from_file_location("stack_stop", LOCAL / "stop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wait_for_file(path: Path, timeout: float = 10) -> str:
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} was not written")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _kill(pid: int) -> None:
    try:
        psutil.Process(pid).kill()
    except psutil.NoSuchProcess:
        pass


@pytest.fixture()
def fake_stack(tmp_path):
    """A recorded "service" session whose leader daemonises a grandchild (as Ray's client server
    outlives `ray start`), plus an unrelated process whose command line names the state dir."""
    state = tmp_path / "state"
    (state / "ray").mkdir(parents=True)
    leader_file, grandchild_file = tmp_path / "leader.pid", tmp_path / "grandchild.pid"
    service = f"( sleep 300 & echo \\$! > {grandchild_file} ); exec sleep 301"
    # Started the way up.sh starts a service: a new session, outliving the shell that made it.
    subprocess.run(
        ["bash", "-c", f'setsid bash -c "{service}" >/dev/null 2>&1 & echo $! > {leader_file}'],
        check=True,
    )
    leader = int(_wait_for_file(leader_file))
    (state / "svc.pid").write_text(f"{leader}\n")
    grandchild = int(_wait_for_file(grandchild_file))
    unrelated = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", str(state), str(state / "ray")],
        start_new_session=True,
    )
    (state / "stack.env").write_text("export X=1\n")
    (state / "ray-token").write_text("t" * 64)
    yield state, leader, grandchild, unrelated
    unrelated.kill()
    unrelated.wait()
    for pid in (leader, grandchild):
        _kill(pid)


def test_stop_ends_the_recorded_session_and_spares_processes_naming_the_state_dir(fake_stack):
    state, leader, grandchild, unrelated = fake_stack
    assert psutil.Process(grandchild).ppid() != leader  # reparented: not the leader's child
    result = subprocess.run(
        [str(LOCAL / "down.sh")],
        env={**os.environ, "RSHNL_STACK_DIR": str(state), "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unrelated.poll() is None, "down.sh killed a process that only names the state dir"
    assert _gone(grandchild), "down.sh left the session's daemonised process running"
    assert _gone(leader)
    assert result.returncode == 0, result.stderr
    assert not (state / "svc.pid").exists() and not (state / "stack.env").exists()
    assert not (state / "ray-token").exists()  # the dead stack's credentials go with it


def test_stop_ignores_a_recycled_session_id(tmp_path):
    """A pid file older than the process now holding that session id does not claim it."""
    stop = _load_stop()
    state = tmp_path / "state"
    state.mkdir()
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        pid_file = state / "old.pid"
        pid_file.write_text(str(proc.pid))
        old = time.time() - 3600
        os.utime(pid_file, (old, old))
        assert stop.stack_processes(state) == []
        os.utime(pid_file, None)
        assert [p.pid for p in stop.stack_processes(state)] == [proc.pid]
    finally:
        proc.kill()
        proc.wait()


def test_stop_reports_a_port_still_listening(tmp_path):
    import socket

    stop = _load_stop()
    state = tmp_path / "state"
    state.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        (state / "ports").write_text(f"{port}\n")
        (state / "stack.env").write_text("x")
        assert stop.stop(state, port_timeout=0.5) == 1
        assert (state / "stack.env").exists()  # kept, so that down.sh can be run again
    assert stop.stop(state, port_timeout=0.5) == 0 and not (state / "stack.env").exists()


def test_stop_waits_for_a_port_that_closes_late(tmp_path):
    """A socket released a moment after the processes exit (a dying process's last threads)."""
    import socket
    import threading

    stop = _load_stop()
    state = tmp_path / "state"
    state.mkdir()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    (state / "ports").write_text(f"{s.getsockname()[1]}\n")
    (state / "stack.env").write_text("x")
    closer = threading.Timer(1.0, s.close)
    closer.start()
    t0 = time.monotonic()
    try:
        assert stop.stop(state, port_timeout=10.0) == 0
    finally:
        closer.cancel()
        s.close()
    assert 0.9 < time.monotonic() - t0 < 10.0
    assert not (state / "stack.env").exists()


def test_stop_rejects_a_file_as_state_dir(tmp_path, capsys):
    stop = _load_stop()
    f = tmp_path / "f"
    f.write_text("")
    assert stop.main([str(f)]) == 2
    assert stop.main([str(tmp_path), "extra"]) == 2


def _up(tmp_path, **extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}
    env.update(RSHNL_STACK_DIR=str(tmp_path / "state"), PYTHON=sys.executable, **extra)
    return subprocess.run(
        [str(LOCAL / "up.sh")], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"RAY_PORT": "63x79"}, "'63x79' is not a number"),
        ({"CLIENT_PORT": "12000"}, "port 12000 lies in the worker port range"),
        ({"MLFLOW_PORT": "6379"}, "two of the stack's ports are the same"),
        ({"MLFLOW_AUTH": "off"}, "MLFLOW_AUTH must be basic or none"),
    ],
)
def test_up_refuses_bad_settings_in_one_line(tmp_path, settings, message):
    result = _up(tmp_path, **settings)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert result.stdout == "" and not (tmp_path / "state").exists()


def test_up_refuses_a_recorded_stack_without_stopping_it(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    gone = subprocess.Popen(["true"], start_new_session=True)  # a session id no process holds
    gone.wait()
    (state / "ray.pid").write_text(f"{gone.pid}\n")
    result = _up(tmp_path)
    assert result.returncode == 2 and "already recorded" in result.stderr
    assert (state / "ray.pid").exists()


def test_cluster_configs_enable_token_auth():
    aws = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    for cmd in [*aws["head_start_ray_commands"], *aws["worker_start_ray_commands"]]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd, cmd
    head = next(c for c in aws["head_start_ray_commands"] if "ray start" in c)
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert any("auth_token" in dst for dst in aws["file_mounts"])
    job = yaml.safe_load((CLUSTER / "rayjob-train.yaml").read_text())
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
