"""Training on a train split larger than the object store: the streamed run against a run whose
split fits, both through Ray Train under the same object-store size, in one invocation.

Per epoch: rows trained on (and distinct item ids) from the workers' reports, rows/s, the peak RSS
of every process of the local Ray cluster grouped by role (sampled), each worker's own peak RSS,
and the object store's peak use and spilled / restored bytes (sampled from the raylet).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from typing import Any

from pipeline.config import TrainConfig
from pipeline.experiments.benchmark import steady_mean

log = logging.getLogger(__name__)


def _role(proc: Any) -> str:
    """A process's role in the local Ray cluster, from its title (``ray::...``) or its name."""
    try:
        title = " ".join(proc.cmdline()) or proc.name()
    except Exception:  # the process has exited
        return "gone"
    if title.startswith("ray::"):
        name = title.split()[0][5:]
        if "TrainWorker" in name:
            return "train_worker"
        if name in ("IDLE", "IDLE_SPILL_WORKER", "IDLE_RESTORE_WORKER"):
            return f"idle:{name}"
        return f"task:{name.split('.')[0][:40]}"
    for key in ("raylet", "gcs_server", "dashboard", "runtime_env", "log_monitor", "monitor.py"):
        if key in title:
            return key.replace(".py", "")
    return os.path.basename(title.split()[0])[:40] if title else "other"


class ClusterSampler(threading.Thread):
    """Samples, every ``interval`` seconds, the RSS of the driver and every process below it (the
    local Ray cluster) and the object store's use, spilled and restored bytes."""

    def __init__(self, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[dict[str, Any]] = []
        self._halt = threading.Event()

    def _store(self) -> dict[str, float]:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        if not hasattr(self, "_state"):
            import ray

            self._state = get_state_from_address(ray.get_runtime_context().gcs_address)
        st = get_memory_info_reply(self._state).store_stats
        return {
            "store_used": float(st.object_store_bytes_used),
            "spilled": float(st.spilled_bytes_total),
            "restored": float(st.restored_bytes_total),
        }

    def sample(self) -> dict[str, Any]:
        import psutil

        me = psutil.Process()
        rss: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for p in [me, *me.children(recursive=True)]:
            try:
                rss["driver" if p.pid == me.pid else _role(p)].append((p.pid, p.memory_info().rss))
            except Exception:  # exited between the listing and the read
                continue
        out: dict[str, Any] = {"t": time.time(), "rss": dict(rss)}
        try:
            out |= self._store()
        except Exception as e:  # the raylet is busy or gone: the sample has RSS only
            log.debug("object store stats unavailable: %s", e)
        return out

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append(self.sample())
            self._halt.wait(self.interval)

    def stop(self) -> list[dict[str, Any]]:
        self._halt.set()
        self.join(timeout=10)
        return self.samples


def per_epoch(samples: list[dict[str, Any]], ends: list[float], start: float) -> list[dict]:
    """The samples between consecutive epoch ends (the first from ``start``): peak RSS per role
    (the largest single process and the role's sum), peak object-store use, bytes spilled and
    restored during the epoch."""
    out = []
    bounds = [start, *ends]
    for e in range(len(ends)):
        window = [s for s in samples if bounds[e] <= s["t"] <= bounds[e + 1]]
        before = [s for s in samples if s["t"] < bounds[e] and "spilled" in s]
        with_store = [s for s in window if "spilled" in s]
        roles: dict[str, dict[str, float]] = {}
        for s in window:
            for role, procs in s["rss"].items():
                r = roles.setdefault(role, {"max_process": 0.0, "max_sum": 0.0, "processes": 0})
                r["max_process"] = max(r["max_process"], max(v for _, v in procs))
                r["max_sum"] = max(r["max_sum"], sum(v for _, v in procs))
                r["processes"] = max(r["processes"], len(procs))
        first = before[-1] if before else (with_store[0] if with_store else {})
        last = with_store[-1] if with_store else {}
        out.append(
            {
                "epoch": e + 1,
                "samples": len(window),
                "rss_by_role": roles,
                "store_peak": max((s["store_used"] for s in with_store), default=float("nan")),
                "spilled": last.get("spilled", 0.0) - first.get("spilled", 0.0),
                "restored": last.get("restored", 0.0) - first.get("restored", 0.0),
            }
        )
    return out


def streaming_run(
    cfg: TrainConfig, object_store_memory: int, interval: float = 1.0
) -> dict[str, Any]:
    """One Ray Train run on a fresh local Ray with ``object_store_memory`` bytes of object store,
    sampled throughout; the run's per-epoch rows, rates and memory."""
    import ray

    from feature_store import schema as S
    from feature_store.store import open_dataset
    from pipeline.training.train_loop import id_checksum
    from pipeline.training.trainer import ensure_ray, run_training

    if ray.is_initialized():
        ray.shutdown()
    ensure_ray(cfg, object_store_memory=object_store_memory)
    ds = open_dataset(cfg.dataset, verify=False)
    sampler = ClusterSampler(interval)
    start = time.time()
    sampler.start()
    try:
        s = run_training(cfg)
    finally:
        samples = sampler.stop()
        ray.shutdown()
    timings = s["epoch_timings"]
    mem = per_epoch(samples, [t["ended_at"] for t in timings], start)
    train_rows = ds.manifest["counts"]["train"]
    split_checksum = id_checksum(ds.read_arrays("train", [S.ITEM_ID])[S.ITEM_ID])
    epochs = []
    for t, rows, m, u in zip(timings, s["rows_seen"], mem, s["worker_usage"], strict=True):
        train_s = t.get("data_wait", 0.0) + t.get("step", 0.0)
        epochs.append(
            {
                "epoch": rows["epoch"],
                "rows": rows["count"],
                "distinct_ids": rows["distinct"],
                # the workers' ids: as many as the split's rows, all distinct, the split's checksum
                "every_row_once": rows["count"] == rows["distinct"] == train_rows
                and rows["checksum"] == split_checksum,
                "wall_s": t["wall"],
                "train_s": train_s,
                "rows_per_s": rows["count"] / train_s if train_s > 0 else float("nan"),
                "rows_per_wall_s": rows["count"] / t["wall"],
                "worker_peak_rss": {r: v["peak_rss"] for r, v in u["ranks"].items()},
                **{k: m[k] for k in ("store_peak", "spilled", "restored", "rss_by_role")},
            }
        )
    return {
        "dataset": cfg.dataset,
        "train_rows": train_rows,
        "train_bytes": ds.manifest["files"]["train.parquet"]["bytes"],
        "object_store_memory": object_store_memory,
        "in_memory": s["in_memory"],
        "workers": cfg.workers,
        "test_map": s["test_map"],
        "wall_seconds": s["wall_seconds"],
        "epochs": epochs,
    }


def streaming_benchmark(
    big: TrainConfig, small: TrainConfig, object_store_memory: int, interval: float = 1.0
) -> dict[str, Any]:
    """The streamed run (``big``: a split larger than the object store) and the run on a split
    that fits (``small``), and the ratio of their steady rows/s (epochs after the first)."""
    runs = {
        "streamed": streaming_run(big, object_store_memory, interval),
        "fits": streaming_run(small, object_store_memory, interval),
    }

    def steady(run: dict[str, Any], key: str) -> float:
        return steady_mean([e[key] for e in run["epochs"]])

    return {
        "runs": runs,
        "streamed_over_fits_rows_per_s": steady(runs["streamed"], "rows_per_s")
        / steady(runs["fits"], "rows_per_s"),
        "streamed_over_fits_rows_per_wall_s": steady(runs["streamed"], "rows_per_wall_s")
        / steady(runs["fits"], "rows_per_wall_s"),
    }


def format_streaming(result: dict[str, Any]) -> str:
    """A Markdown table: one row per run and epoch."""
    mb = 1 << 20
    head = (
        "| run | train split (MB) | cached | epoch | rows | every row once | rows/s (train) "
        "| rows/s (wall) | worker peak RSS (MB) | largest process (MB, role) | store peak (MB) "
        "| spilled (MB) | restored (MB) |\n"
        "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for name, run in result["runs"].items():
        for e in run["epochs"]:
            role, top = max(
                ((r, v["max_process"]) for r, v in e["rss_by_role"].items()),
                key=lambda x: x[1],
                default=("-", 0.0),
            )
            peaks = "/".join(f"{v / mb:.0f}" for v in e["worker_peak_rss"].values())
            lines.append(
                f"| {name} | {run['train_bytes'] / mb:.0f} | {run['in_memory']} | {e['epoch']} "
                f"| {e['rows']} | {e['every_row_once']} | {e['rows_per_s']:.0f} "
                f"| {e['rows_per_wall_s']:.0f} | {peaks} | {top / mb:.0f} ({role}) "
                f"| {e['store_peak'] / mb:.0f} | {e['spilled'] / mb:.0f} "
                f"| {e['restored'] / mb:.0f} |"
            )
    return "\n".join(lines)
