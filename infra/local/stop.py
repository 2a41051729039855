"""Stop every process of a local stack and check that none is left.

up.sh starts each service (S3 endpoint, MLflow, Ray) in a session of its own and records the
session id in ``STATE/<name>.pid``. A process belongs to the stack when it is in one of those
sessions (Ray's daemons, the client server included, outlive ``ray start`` but keep its session)
or descends from one that is (Ray's job drivers open sessions of their own). Nothing is matched by
name or command line, so other Ray clusters and processes that merely mention the state directory
are left alone. Exit 0 when the stack is gone, 1 when a process or a recorded port is left, 2 on a
bad argument.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import psutil

log = logging.getLogger("stack")

# Files that hold the stack's credentials or identify its processes; removed once it is down.
STATE_FILES = (
    "stack.env",
    "ports",
    "ray-token",
    "runtime-env.yaml",
    "mlflow-auth.ini",
    "job-home/.aws/credentials",
    "job-home/.mlflow/credentials",
)
# A recorded session's leader starts just before its pid file is written; the margin covers clocks.
CLOCK_SLACK_S = 5.0
# How long a recorded port may stay listening after the stack's processes have exited.
PORT_CLOSE_S = 20.0


def recorded_sessions(state: Path) -> dict[int, float]:
    """Session id → the time its pid file was written, for every readable ``*.pid`` file."""
    sessions: dict[int, float] = {}
    for pid_file in state.glob("*.pid"):
        try:
            sessions[int(pid_file.read_text().strip())] = pid_file.stat().st_mtime
        except (OSError, ValueError):
            log.warning("ignoring unreadable pid file %s", pid_file)
    return sessions


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited (zombies count as exited); return those still alive."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _alive(p)]
    return alive


def stack_processes(state: Path) -> list[psutil.Process]:
    """The live processes of the stack recorded in ``state``: its sessions and their descendants."""
    sessions = recorded_sessions(state)
    for sid, written in list(sessions.items()):
        # A live leader started after its pid file was written holds a recycled id, not ours.
        try:
            if psutil.Process(sid).create_time() > written + CLOCK_SLACK_S:
                del sessions[sid]
        except psutil.NoSuchProcess:
            pass  # the leader exited (`ray start` does); its id stays reserved while members live
    procs: dict[int, psutil.Process] = {}
    if not sessions:
        return []
    me = os.getpid()
    for p in psutil.process_iter(["create_time"]):
        if p.pid == me:
            continue
        try:
            sid = os.getsid(p.pid)
        except OSError:
            continue
        written = sessions.get(sid)
        if written is not None and p.info["create_time"] >= written - CLOCK_SLACK_S:
            procs[p.pid] = p
    for p in list(procs.values()):
        try:
            for c in p.children(recursive=True):
                procs.setdefault(c.pid, c)
        except psutil.NoSuchProcess:
            pass
    return [p for p in procs.values() if _alive(p) and p.pid != me]


def recorded_ports(state: Path) -> list[int]:
    """The TCP ports up.sh recorded for the stack (none if it recorded none)."""
    try:
        return [int(x) for x in (state / "ports").read_text().split()]
    except (OSError, ValueError):
        return []


def listening(ports: list[int]) -> dict[int, int | None]:
    """Port → pid (None when not visible) for each of ``ports`` with a listening socket."""
    wanted = set(ports)
    found: dict[int, int | None] = {}
    try:
        conns = psutil.net_connections("inet")
    except psutil.AccessDenied:
        return found
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port in wanted:
            found[c.laddr.port] = c.pid
    return found


def _wait_ports_closed(ports: list[int], timeout: float) -> dict[int, int | None]:
    """Wait until none of ``ports`` listens; return those still listening after ``timeout`` s.

    A killed multi-threaded process shows as a zombie once its main thread has exited, while its
    other threads may still hold its sockets for a moment (psutil then names no pid for them).
    """
    deadline = time.monotonic() + timeout
    open_ports = listening(ports)
    while open_ports and time.monotonic() < deadline:
        time.sleep(0.2)
        open_ports = listening(ports)
    return open_ports


def _signal(procs: list[psutil.Process], kill: bool) -> None:
    for p in procs:
        try:
            p.kill() if kill else p.terminate()
        except psutil.NoSuchProcess:
            pass


def stop(state: Path, timeout: float = 15.0, port_timeout: float = PORT_CLOSE_S) -> int:
    """Terminate the stack's processes (SIGKILL after ``timeout`` s); 0 when nothing is left.

    A recorded port may take up to ``port_timeout`` s to close after its process has exited.
    """
    procs = stack_processes(state)
    _signal(procs, kill=False)
    alive = _wait_gone(procs, timeout)
    _signal(alive, kill=True)
    _wait_gone(alive, 10)
    # Processes forked while the first ones were stopping (a worker restarting) go the same way.
    late = stack_processes(state)
    _signal(late, kill=True)
    _wait_gone(late, 10)
    left = stack_processes(state)
    open_ports = _wait_ports_closed(recorded_ports(state), port_timeout)
    if left or open_ports:
        if left:
            log.error("still running: %s", sorted(p.pid for p in left))
        if open_ports:
            log.error("ports still listening (port: pid): %s", open_ports)
        return 1
    for f in [*state.glob("*.pid"), *(state / name for name in STATE_FILES)]:
        f.unlink(missing_ok=True)
    log.info("stopped %d processes; nothing left", len(procs) + len(late))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``stop.py [STATE]``: stop the stack recorded in STATE (default /tmp/rshnl-stack)."""
    logging.basicConfig(level=logging.INFO, format="[stack] %(message)s", stream=sys.stderr)
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1:
        log.error("usage: stop.py [STATE_DIR]")
        return 2
    state = Path(args[0] if args else "/tmp/rshnl-stack")
    if state.exists() and not state.is_dir():
        log.error("%s is not a directory", state)
        return 2
    if not state.is_dir():
        log.info("no stack recorded in %s", state)
        return 0
    return stop(state)


if __name__ == "__main__":
    sys.exit(main())
