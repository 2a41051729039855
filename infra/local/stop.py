"""Stop every process of a local stack: the ones in its pid files and the Ray processes of its
temp dir (``ray stop`` would also stop unrelated clusters on the machine); exit 1 if any is left."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil


def stack_processes(state: Path) -> list[psutil.Process]:
    procs: dict[int, psutil.Process] = {}
    for pid_file in state.glob("*.pid"):
        try:
            p = psutil.Process(int(pid_file.read_text().strip()))
        except (ValueError, psutil.NoSuchProcess):
            continue
        procs[p.pid] = p
    marker = str(state / "ray")
    for p in psutil.process_iter(["cmdline"]):
        if any(marker in arg for arg in (p.info["cmdline"] or [])):
            procs[p.pid] = p
    for p in list(procs.values()):
        try:
            for c in p.children(recursive=True):
                procs[c.pid] = c
        except psutil.NoSuchProcess:
            pass
    return list(procs.values())


def main(state: Path) -> int:
    procs = stack_processes(state)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)
    time.sleep(0.5)
    left = [p for p in stack_processes(state) if p.is_running()]
    for f in [*state.glob("*.pid"), state / "stack.env"]:
        f.unlink(missing_ok=True)
    if left:
        print(f"[stack] still running: {[p.pid for p in left]}", file=sys.stderr)
        return 1
    print(f"[stack] stopped {len(procs)} processes; nothing left", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/rshnl-stack")))
