"""Experiment grids: method × noise rate × bits × seed, each cell one training run.

Cells run as Ray tasks (each starts its own Ray Train run), at most ``max_concurrent`` at a time,
or one after another in this process (``executor="inprocess"``, for machines without Ray).
A finished cell leaves ``<out>/cells/<cell>.json``; running the same grid again skips those, and a
cell that was interrupted mid-run resumes from its latest checkpoint. The tables (Markdown laid out
like the paper's Table 1, and a CSV with one row per cell) are rewritten after every cell.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from feature_store.store import list_versions, open_dataset, write_noisy_copy
from pipeline.config import RUN_KEYS, ConfigError, TrainConfig
from pipeline.files import write_json_atomic, write_text_atomic
from pipeline.method.variants import METHODS, apply_method
from pipeline.tracking import runs as tracking

log = logging.getLogger(__name__)

GRID_INFO = "grid.json"


@dataclass(frozen=True)
class Cell:
    method: str
    noise: float
    bits: int
    seed: int

    @property
    def id(self) -> str:
        return f"{self.method}-n{self.noise:.2f}-b{self.bits}-s{self.seed}"


@dataclass
class GridSpec:
    """What to run and where its results go."""

    base: TrainConfig
    methods: list[str]
    noise_rates: list[float]
    bits: list[int]
    seeds: list[int]
    out: str
    noise_seed: int = 0
    noise_mode: str | None = None
    max_concurrent: int = 0  # 0: as many as the cluster's CPUs allow
    keep_checkpoints: bool = False  # keep each finished cell's Ray Train storage
    executor: str = "ray"  # "ray": cells as Ray tasks; "inprocess": one after another, no Ray
    device: str = "cpu"  # inprocess executor: cpu or cuda
    tracking: bool = True  # log the grid and its cells to MLflow

    def validate(self) -> GridSpec:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ConfigError(f"grid: unknown method(s) {bad}; known: {', '.join(METHODS)}")
        if not (self.methods and self.noise_rates and self.bits and self.seeds):
            raise ConfigError("grid: methods, noise rates, bits and seeds must each be non-empty")
        for r in self.noise_rates:
            if not 0 <= r < 1:
                raise ConfigError(f"grid: noise rate {r} is outside [0, 1)")
        for b in self.bits:
            if b <= 0:
                raise ConfigError(f"grid: bits {b} must be positive")
        if self.executor not in ("ray", "inprocess"):
            raise ConfigError(f"grid: executor {self.executor!r} must be 'ray' or 'inprocess'")
        if self.executor == "ray" and not self.tracking:
            raise ConfigError("grid: the Ray executor always logs its cells to MLflow")
        if self.max_concurrent < 0:
            raise ConfigError(f"grid: max_concurrent {self.max_concurrent} must be ≥ 0")
        self.base.validate()
        return self

    def cells(self) -> list[Cell]:
        return [
            Cell(m, r, b, s)
            for m in self.methods
            for r in self.noise_rates
            for b in self.bits
            for s in self.seeds
        ]


def fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """The parts of a cell's config that decide its result."""
    return {k: v for k, v in cfg.to_dict().items() if k not in RUN_KEYS}


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ; a key one side lacks counts only if the other is not its default
    (so cells recorded before a config key existed still match). Run-only keys an older cell
    recorded are ignored."""
    defaults = TrainConfig().to_dict()
    missing = object()
    out = []
    for k in sorted((set(old) | set(new)) - RUN_KEYS):
        a, b = old.get(k, missing), new.get(k, missing)
        if a is missing:
            a = defaults.get(k)
        if b is missing:
            b = defaults.get(k)
        if a != b:
            out.append(k)
    return out


def noisy_datasets(
    base_uri: str, rates: list[float], seed: int, mode: str | None = None
) -> dict[float, str]:
    """A dataset version per noise rate: the clean base for 0, else a (reused) noisy copy."""
    base = open_dataset(base_uri)
    base_rate = float(base.manifest.get("noise", {}).get("rate") or 0.0)
    if base_rate > 0:
        raise ConfigError(
            f"grid: dataset {base.uri} already has {base_rate:.2f} label noise; "
            "pass the clean version (the grid makes one noisy copy per rate)"
        )
    out: dict[float, str] = {}
    existing = list_versions(base.store_location.uri, base.manifest["name"])
    for rate in rates:
        if rate == 0:
            out[rate] = base.uri
            continue
        match = [
            v
            for v in existing
            if v["base"] == base.data_version
            and v["noise"]["rate"] == rate
            and v["noise"]["seed"] == seed
            and (mode is None or v["noise"]["mode"] == mode)
        ]
        if match:
            out[rate] = match[-1]["uri"]
            log.info("noise %.2f: reusing %s", rate, out[rate])
        else:
            out[rate] = write_noisy_copy(base.uri, mode=mode, rate=rate, seed=seed)
            log.info("noise %.2f: wrote %s", rate, out[rate])
    return out


def cell_config(spec: GridSpec, cell: Cell, dataset_uri: str, grid_name: str) -> TrainConfig:
    cfg = spec.base.replace(
        dataset=dataset_uri,
        bits=cell.bits,
        seed=cell.seed,
        run_name=f"{grid_name}-{cell.id}",
        register_model=False,
        resume=False,
        tags={**spec.base.tags, "grid": grid_name, "method": cell.method, "cell": cell.id},
    )
    return apply_method(cell.method, cfg).validate()


def _run_cell(cfg_dict: dict[str, Any], parent_run_id: str, keep: bool) -> dict[str, Any]:
    """Body of one cell's Ray task."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    import pyarrow.fs as pafs

    from pipeline.training.trainer import read_run_info, run_training

    cfg = TrainConfig.from_dict(cfg_dict)
    if read_run_info(cfg, cfg.run_name):
        cfg = cfg.replace(resume=True)  # an earlier attempt was interrupted: continue it
    s = run_training(cfg, parent_run_id=parent_run_id, log_model=False)
    if not keep:  # the cell's metrics are in MLflow and the cell record; drop its checkpoints
        fs, root = pafs.FileSystem.from_uri(cfg.storage_path)
        fs.delete_dir(f"{root.rstrip('/')}/{cfg.run_name}")
    timings = s.get("epoch_timings") or []
    evals = [t.get("eval", 0.0) for t in timings]
    return {
        "test_map": s["test_map"],
        "best_valid_map": s["best_valid_map"],
        "best_epoch": s["best_epoch"],
        "epochs_run": s["epochs_run"],
        "seconds_per_epoch": s["seconds_per_epoch"],
        "valid_eval_seconds_per_epoch": sum(evals) / len(evals) if evals else float("nan"),
        "test_eval_seconds": s.get("test_eval_seconds", float("nan")),
        "wall_seconds": s["wall_seconds"],
        "mlflow_run_id": s["mlflow_run_id"],
        "restarts": s["restarts"],
        "dataset": s["dataset"],
        "data_version": s["data_version"],
    }


def _grid_info(spec: GridSpec, out: Path, tracking_uri: str, data_version: str) -> dict[str, Any]:
    """The grid's name and parent MLflow run, created on the first invocation."""
    info_path = out / GRID_INFO
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info["base_data_version"] != data_version:
            raise ConfigError(
                f"grid: {out} holds a grid over data {info['base_data_version']}, not "
                f"{data_version}; choose another --out"
            )
        return info
    name = f"grid-{time.strftime('%Y%m%d-%H%M%S')}"
    if not spec.tracking:
        info = {"name": name, "parent_run_id": "", "base_data_version": data_version}
        write_json_atomic(info_path, info)
        return info
    params = {f"base.{k}": v for k, v in spec.base.to_dict().items() if k != "dataset"}
    params.update(
        {
            "methods": ",".join(spec.methods),
            "noise_rates": ",".join(map(str, spec.noise_rates)),
            "bits": ",".join(map(str, spec.bits)),
            "seeds": ",".join(map(str, spec.seeds)),
            "noise_seed": spec.noise_seed,
        }
    )
    run_id = tracking.start_run(
        tracking_uri,
        spec.base.experiment_name,
        name,
        params,
        {"grid": name, "data_version": data_version, **tracking.code_version()},
    )
    info = {"name": name, "parent_run_id": run_id, "base_data_version": data_version}
    write_json_atomic(info_path, info)
    return info


def run_grid(spec: GridSpec, ray_address: str | None = None) -> dict[str, Any]:
    """Run every cell of ``spec`` not yet done under ``spec.out``; write and return the tables."""
    spec.validate()
    out = Path(spec.out).resolve()
    (out / "cells").mkdir(parents=True, exist_ok=True)
    base_ds = open_dataset(spec.base.dataset)
    tracking_uri = tracking.resolve_tracking_uri(spec.base.tracking_uri) if spec.tracking else ""
    storage = spec.base.storage_path
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    spec.base = spec.base.replace(tracking_uri=tracking_uri, storage_path=storage)
    datasets = noisy_datasets(base_ds.uri, spec.noise_rates, spec.noise_seed, spec.noise_mode)
    info = _grid_info(spec, out, tracking_uri, base_ds.data_version)

    todo: list[tuple[Cell, TrainConfig]] = []
    for cell in spec.cells():
        cfg = cell_config(spec, cell, datasets[cell.noise], info["name"])
        done_path = out / "cells" / f"{cell.id}.json"
        if done_path.is_file():
            done = json.loads(done_path.read_text())
            diff = fingerprint_diff(done["fingerprint"], fingerprint(cfg))
            if diff:
                raise ConfigError(
                    f"grid: cell {cell.id} in {out} was run with different settings ({diff}); "
                    "choose another --out to run a different grid"
                )
            log.info("cell %s: done earlier, skipped", cell.id)
            continue
        todo.append((cell, cfg))

    failed: dict[str, str] = {}
    t0 = time.perf_counter()
    if todo and spec.executor == "inprocess":
        from pipeline.training.inprocess import train_in_process

        for n_done, (cell, cfg) in enumerate(todo, 1):
            log.info("cell %s: start (%s, in process on %s)", cell.id, cfg.dataset, spec.device)
            try:
                result = train_in_process(cfg, spec.device)
                result.pop("_suspects", None)
            except Exception as e:  # one failed cell does not stop the grid
                failed[cell.id] = f"{type(e).__name__}: {e}"
                log.error("cell %s failed: %s", cell.id, failed[cell.id])
                continue
            if spec.tracking:
                tags = {**cfg.tags, "mlflow.parentRunId": info["parent_run_id"]}
                metrics = {f"test_map_{k}": v for k, v in result["test_map"].items()}
                metrics.update(
                    {
                        "best_valid_map_mean": result["best_valid_map"]["mean"],
                        "best_epoch": result["best_epoch"],
                        "seconds_per_epoch": result["seconds_per_epoch"],
                        "test_eval_seconds": result["test_eval_seconds"],
                    }
                )
                params = {**cfg.to_dict(), "data_version": result["data_version"]}
                result["mlflow_run_id"] = tracking.log_finished_run(
                    tracking_uri, cfg.experiment_name, cfg.run_name, params, tags, metrics
                )
            _finish_cell(spec, out, cell, cfg, result, n_done, len(todo))
    elif todo:
        import ray

        from pipeline.training.trainer import ensure_ray

        ensure_ray(spec.base, ray_address)
        per_cell = spec.base.workers * spec.base.cpus_per_worker
        cpus = ray.cluster_resources().get("CPU", 1.0)
        limit = spec.max_concurrent or max(1, int((cpus - 1) // per_cell))
        log.info("grid %s: %d cells to run, %d at a time", info["name"], len(todo), limit)
        task = ray.remote(num_cpus=0, max_retries=0)(_run_cell)
        pending: dict[Any, tuple[Cell, TrainConfig]] = {}
        queue = list(todo)
        n_done = 0
        while queue or pending:
            while queue and len(pending) < limit:
                cell, cfg = queue.pop(0)
                log.info("cell %s: start (%s)", cell.id, cfg.dataset)
                ref = task.remote(cfg.to_dict(), info["parent_run_id"], spec.keep_checkpoints)
                pending[ref] = (cell, cfg)
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell, cfg = pending.pop(ready[0])
            n_done += 1
            try:
                result = ray.get(ready[0])
            except Exception as e:  # one failed cell does not stop the grid
                failed[cell.id] = str(e).splitlines()[0] if str(e) else type(e).__name__
                log.error("cell %s failed: %s", cell.id, failed[cell.id])
                continue
            _finish_cell(spec, out, cell, cfg, result, n_done, len(todo))
    wall = time.perf_counter() - t0
    records = write_tables(spec, out)
    files = [out / "table.md", out / "cells.csv"]
    complete = len(records) == len(spec.cells())
    if complete and spec.tracking:
        metrics = {"cells": len(records), "wall_seconds_last_invocation": wall}
        tracking.finish_grid(tracking_uri, info["parent_run_id"], metrics, files)
    return {
        "grid": info["name"],
        "parent_run_id": info["parent_run_id"],
        "out": str(out),
        "cells_total": len(spec.cells()),
        "cells_done": len(records),
        "cells_run_now": len(todo) - len(failed),
        "failed": failed,
        "complete": complete,
        "datasets": {str(k): v for k, v in datasets.items()},
        "table_markdown": (out / "table.md").read_text(),
        "wall_seconds": wall,
    }


def _finish_cell(
    spec: GridSpec,
    out: Path,
    cell: Cell,
    cfg: TrainConfig,
    result: dict[str, Any],
    n_done: int,
    n_todo: int,
) -> None:
    record = {
        "cell": cell.id,
        "method": cell.method,
        "noise": cell.noise,
        "bits": cell.bits,
        "seed": cell.seed,
        "executor": spec.executor if spec.executor == "ray" else f"inprocess:{spec.device}",
        "fingerprint": fingerprint(cfg),
        **result,
    }
    write_json_atomic(out / "cells" / f"{cell.id}.json", record)
    log.info(
        "cell %d/%d %s: test MAP i2t %.4f t2i %.4f (best epoch %d, %.2f s/epoch)",
        n_done,
        n_todo,
        cell.id,
        result["test_map"]["i2t"],
        result["test_map"]["t2i"],
        result["best_epoch"],
        result["seconds_per_epoch"],
    )
    write_tables(spec, out)


def load_records(spec: GridSpec, out: Path) -> list[dict[str, Any]]:
    recs = []
    for cell in spec.cells():
        p = out / "cells" / f"{cell.id}.json"
        if p.is_file():
            recs.append(json.loads(p.read_text()))
    return recs


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0
    return m, sd


def aggregate(records: list[dict[str, Any]]) -> dict[tuple[str, float, int], dict[str, Any]]:
    """Mean and standard deviation over seeds per (method, noise, bits)."""
    groups: dict[tuple[str, float, int], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["method"], r["noise"], r["bits"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        agg: dict[str, Any] = {"seeds": len(rs)}
        for task in ("i2t", "t2i"):
            agg[task] = _mean_std([r["test_map"][task] for r in rs])
        for k in ("seconds_per_epoch", "valid_eval_seconds_per_epoch", "test_eval_seconds"):
            agg[k] = _mean_std([r[k] for r in rs])[0]
        agg["executors"] = sorted({r.get("executor", "ray") for r in rs})
        out[key] = agg
    return out


OFF_RAY = "†"


def format_markdown(spec: GridSpec, records: list[dict[str, Any]]) -> str:
    """Table 1 layout: I2T and T2I blocks, a row per method, a column per (noise, bits)."""
    agg = aggregate(records)
    cols = [(r, b) for r in spec.noise_rates for b in spec.bits]
    multi = len(spec.seeds) > 1
    seeds = ",".join(map(str, spec.seeds))
    over = f"mean ± std over seeds {seeds}" if multi else f"seed {seeds}"
    # a cell not (only) trained through Ray Train says so: the Ray path is what users run
    off_ray = {key for key, a in agg.items() if a["executors"] != ["ray"]}
    lines = [
        f"Test MAP (Hamming ranking, ties by index), noise rate / bits; {over}; "
        "best per column in bold."
        + (f" {OFF_RAY} trained by the in-process executor, not the Ray path." if off_ray else ""),
        "",
        "| Task | Method | " + " | ".join(f"{r:.1f} / {b}" for r, b in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for task, label in (("i2t", "I2T"), ("t2i", "T2I")):
        best = {
            c: max((agg[(m, *c)][task][0] for m in spec.methods if (m, *c) in agg), default=None)
            for c in cols
        }
        for m in spec.methods:
            cells = []
            for c in cols:
                a = agg.get((m, *c))
                if a is None:
                    cells.append("–")
                    continue
                mean, sd = a[task]
                text = f"{mean:.4f}" + (f" ± {sd:.4f}" if multi else "")
                text = f"**{text}**" if mean == best[c] else text
                cells.append(text + (OFF_RAY if (m, *c) in off_ray else ""))
            lines.append(f"| {label} | {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Timing per cell (mean over seeds): training seconds per epoch, validation evaluation "
        "seconds per epoch, test evaluation seconds.",
        "",
        "| Method | Noise | Bits | Seeds | executor | s/epoch | valid eval s/epoch | test eval s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in spec.methods:
        for r, b in cols:
            a = agg.get((m, r, b))
            if a is not None:
                lines.append(
                    f"| {m} | {r:.1f} | {b} | {a['seeds']} | {', '.join(a['executors'])} | "
                    f"{a['seconds_per_epoch']:.2f} | "
                    f"{a['valid_eval_seconds_per_epoch']:.2f} | {a['test_eval_seconds']:.2f} |"
                )
    return "\n".join(lines) + "\n"


CSV_FIELDS = (
    "method",
    "noise",
    "bits",
    "seed",
    "test_map_i2t",
    "test_map_t2i",
    "test_map_mean",
    "best_valid_map",
    "best_epoch",
    "epochs_run",
    "seconds_per_epoch",
    "valid_eval_seconds_per_epoch",
    "test_eval_seconds",
    "wall_seconds",
    "restarts",
    "data_version",
    "executor",
    "mlflow_run_id",
)


def format_csv(records: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in records:
        w.writerow(
            {
                **{k: r.get(k) for k in CSV_FIELDS},
                "test_map_i2t": r["test_map"]["i2t"],
                "test_map_t2i": r["test_map"]["t2i"],
                "test_map_mean": r["test_map"]["mean"],
                "best_valid_map": r["best_valid_map"]["mean"],
            }
        )
    return buf.getvalue()


def write_tables(spec: GridSpec, out: Path) -> list[dict[str, Any]]:
    records = load_records(spec, out)
    write_text_atomic(out / "table.md", format_markdown(spec, records))
    write_text_atomic(out / "cells.csv", format_csv(records))
    return records
