"""Driver side of a training run.

Verify input, start the MLflow run, fit a TorchTrainer, evaluate the best checkpoint on the test
split, log and register the model. One code path for 1..N workers."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from feature_store.store import open_dataset
from pipeline import tracking
from pipeline.config import ConfigError, TrainConfig
from pipeline.data import EvalProtocol, feature_normalisation, training_dataset
from pipeline.train_loop import SCORE, train_func
from pipeline.weights import WEIGHTS, encode, load_model_file

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training did not complete; the message says why."""


def ensure_ray(
    cfg: TrainConfig, address: str | None = None, *, include_dashboard: bool = False
) -> None:
    """Connect to $RAY_ADDRESS / ``address`` or start a local Ray with CPUs for workers and data."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        # a job-submission (dashboard) address: connect to the running cluster on this machine
        log.info("RAY_ADDRESS %s is a dashboard address; connecting to the local cluster", address)
        address = "auto"
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # Ray Data's read/shuffle tasks need CPUs beside the training workers, or the run hangs.
    num_cpus = max(math.ceil(cfg.workers * cfg.cpus_per_worker) + 2, os.cpu_count() or 1)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=include_dashboard,
        log_to_driver=True,
        configure_logging=False,
    )


def _run_monitor(run_name: str):
    """A small actor beside the run: counts worker-group starts and collects epoch timings."""
    import ray

    @ray.remote(num_cpus=0)
    class RunMonitor:
        def __init__(self) -> None:
            self.attempts = 0
            self.timings: dict[int, dict[str, float]] = {}
            self.workers: dict[int, dict[str, Any]] = {}

        def start_attempt(self) -> int:
            self.attempts += 1
            return self.attempts

        def record(self, epoch: int, timing: dict[str, float]) -> None:
            self.timings[epoch] = timing

        def register_worker(self, rank: int, pid: int, node_id: str) -> None:
            self.workers[rank] = {"pid": pid, "node_id": node_id, "attempt": self.attempts}

        def status(self) -> dict[str, Any]:
            return {
                "attempts": self.attempts,
                "epochs_done": len(self.timings),
                "workers": dict(self.workers),
            }

        def get(self) -> tuple[int, dict[int, dict[str, float]]]:
            return self.attempts, self.timings

    return RunMonitor.options(name=f"rshnl-monitor-{run_name}", get_if_exists=True).remote()


RUN_INFO = "rshnl_run.json"


def _storage(cfg: TrainConfig) -> str:
    return cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).resolve())


def _run_info(cfg: TrainConfig, run_name: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(_storage(cfg))
    return fs, f"{root.rstrip('/')}/{run_name}/{RUN_INFO}"


def read_run_info(cfg: TrainConfig, run_name: str) -> dict[str, Any] | None:
    """The MLflow run of an earlier attempt of ``run_name`` in the storage path, if any."""
    import pyarrow.fs as pafs

    fs, path = _run_info(cfg, run_name)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def _write_run_info(cfg: TrainConfig, run_name: str, info: dict[str, Any]) -> None:
    fs, path = _run_info(cfg, run_name)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(info).encode())


def _execution_options():
    from ray.data import ExecutionOptions

    return ExecutionOptions(preserve_order=True)


def run_training(
    cfg: TrainConfig,
    *,
    ray_address: str | None = None,
    callbacks: list[Any] | None = None,
    parent_run_id: str | None = None,
    log_model: bool = True,
) -> dict[str, Any]:
    """Train, evaluate and (optionally) log and register the best model; return the run summary.

    ``callbacks`` go to the Train run (e.g. Tune's report callback); ``parent_run_id`` nests the
    MLflow run under a sweep's run.
    """
    cfg.validate()
    ds = open_dataset(cfg.dataset)  # verifies the manifest and checksums before any work
    normalisation = (
        feature_normalisation(ds)
        if cfg.feature_norm == "standardize"
        else {m: [[0.0] * d, [1.0] * d] for m, d in ds.dims.items()}
    )
    run_name = cfg.run_name or f"rshnl-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking_uri)
    versions = tracking.code_version()
    params = cfg.to_dict()
    params.update({"data_version": ds.data_version, "gamma_fraction": cfg.gamma_fraction})
    tags = {
        "data_version": ds.data_version,
        "dataset_uri": ds.uri,
        "noise_mode": str(ds.manifest["noise"].get("mode")),
        "noise_rate": str(ds.manifest["noise"].get("rate", 0.0)),
        **versions,
        **cfg.tags,
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    previous = read_run_info(cfg, run_name) if cfg.run_name else None
    if previous and not cfg.resume:
        raise ConfigError(
            f"run '{run_name}' already exists in {_storage(cfg)}; pass --resume to continue it "
            "from its latest checkpoint, or choose another --run-name"
        )
    if cfg.resume and not previous:
        raise ConfigError(f"--resume: no run '{run_name}' in {_storage(cfg)} to resume")
    if previous:
        run_id = previous["mlflow_run_id"]
        log.info("resuming run %s (MLflow run %s) from its latest checkpoint", run_name, run_id)
    else:
        run_id = tracking.start_run(tracking_uri, cfg.experiment_name, run_name, params, tags)
        _write_run_info(cfg, run_name, {"mlflow_run_id": run_id, "tracking_uri": tracking_uri})
    log.info("MLflow run %s (%s) at %s", run_id, run_name, tracking_uri)
    try:
        summary = _fit(
            cfg, ds, normalisation, run_name, run_id, tracking_uri, ray_address, callbacks or []
        )
        best_weights = Path(summary.pop("_best_weights"))
        pr_curves = summary.pop("_pr_curves")
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = Path(tmp)
            shutil.move(best_weights, model_dir / WEIGHTS)
            shutil.rmtree(best_weights.parent, ignore_errors=True)
            final = {
                k: summary[k]
                for k in (
                    "test_map",
                    "best_valid_map",
                    "best_epoch",
                    "epochs_run",
                    "seconds_per_epoch",
                    "noise_detection",
                    "restarts",
                )
            }
            registered = tracking.finish_run(
                tracking_uri,
                run_id,
                config={**cfg.to_dict(), "data_version": ds.data_version},
                manifest=ds.manifest,
                final_metrics=final,
                model_dir=model_dir if log_model else None,
                history=summary.get("history") or None,
                pr_curves=pr_curves,
                registered_model_name=(
                    cfg.registered_model_name if cfg.register_model and log_model else None
                ),
            )
    except BaseException as e:
        tracking.fail_run(tracking_uri, run_id, e)
        raise
    summary.update(
        {"mlflow_run_id": run_id, "registered_model": registered, "tracking_uri": tracking_uri}
    )
    return summary


def _fit(
    cfg: TrainConfig,
    ds: Any,
    normalisation: dict[str, Any],
    run_name: str,
    run_id: str,
    tracking_uri: str,
    ray_address: str | None,
    callbacks: list[Any],
) -> dict[str, Any]:
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ensure_ray(cfg, ray_address)
    monitor = _run_monitor(run_name)
    storage = _storage(cfg)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "config": cfg.to_dict(),
            "normalisation": normalisation,
            "run_id": run_id,
            "tracking_uri": tracking_uri,
            "monitor": monitor,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
        ),
        datasets={"train": training_dataset(ds, cfg.seed, cfg.workers, cfg.data_cache_max_bytes)},
        dataset_config=DataConfig(
            datasets_to_split=["train"], execution_options=_execution_options()
        ),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainingError(f"training run {run_name} failed: {e}") from e
    wall = time.perf_counter() - t0
    last = result.metrics or {}
    if not result.best_checkpoints:
        raise TrainingError(f"training run {run_name} reported no checkpoint")
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1][SCORE])
    with best_ckpt.as_directory() as d:
        keep = Path(tempfile.mkdtemp(prefix="rshnl-best-")) / WEIGHTS
        shutil.copy(Path(d) / WEIGHTS, keep)
    t_test = time.perf_counter()
    model, _ = load_model_file(keep)
    test = EvalProtocol.load(ds, "test", cfg.eval_top_k)
    codes = test.encode(lambda x, m: encode(model, x, m, cfg.eval_batch_size))
    test_map = test.map_of(codes)
    test_eval_seconds = time.perf_counter() - t_test
    pr_curves = test.pr_curves_of(codes)
    import ray

    attempts, timings = ray.get(monitor.get.remote())
    ray.kill(monitor)
    restarts = max(0, attempts - 1)
    summary = {
        "run_name": run_name,
        "dataset": ds.uri,
        "data_version": ds.data_version,
        "test_map": test_map,
        "best_valid_map": {
            "i2t": best_metrics["valid_map_i2t"],
            "t2i": best_metrics["valid_map_t2i"],
            "mean": best_metrics["valid_map_mean"],
        },
        "best_epoch": int(best_metrics["epoch"]),
        "epochs_run": int(last.get("epoch", 0)),
        "seconds_per_epoch": float(last.get("seconds_per_epoch", float("nan"))),
        "wall_seconds": wall,
        "test_eval_seconds": test_eval_seconds,
        "noise_detection": last.get("noise_detection", {}),
        "center_checksums": list(last.get("center_checksums", [])),
        "restarts": restarts,
        "worker_nodes": list(last.get("worker_nodes", [])),
        "global_negatives": bool(last.get("global_negatives", False)),
        "epoch_timings": [timings[e] for e in sorted(timings)],
        "history": last.get("history", {}),
        "checkpoint_path": best_ckpt.path,
        "_best_weights": str(keep),
        "_pr_curves": pr_curves,
    }
    log.info(
        "best epoch %d: valid MAP %.4f, test MAP %.4f (i2t %.4f, t2i %.4f)",
        summary["best_epoch"],
        best_metrics["valid_map_mean"],
        test_map["mean"],
        test_map["i2t"],
        test_map["t2i"],
    )
    return summary
