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
from pipeline.config import RESUMABLE_KEYS, ConfigError, TrainConfig
from pipeline.method.suspects import SUSPECTS_FILE
from pipeline.method.weights import WEIGHTS, load_model_file
from pipeline.tracking import runs as tracking
from pipeline.training.data import (
    cached_in_memory,
    feature_normalisation,
    training_dataset,
)
from pipeline.training.final_eval import fetch_weights, final_evaluation
from pipeline.training.guards import TrainingError
from pipeline.training.record import SCORE
from pipeline.training.step import arch_of
from pipeline.training.train_loop import train_func

log = logging.getLogger(__name__)


def ensure_ray(
    cfg: TrainConfig,
    address: str | None = None,
    *,
    include_dashboard: bool = False,
    object_store_memory: int | None = None,
) -> None:
    """Connect to $RAY_ADDRESS / ``address`` or start a local Ray with CPUs for workers and data
    (and ``object_store_memory`` bytes of object store; None: Ray's default)."""
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
        object_store_memory=object_store_memory,
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
            self.rows: dict[int, dict[str, int]] = {}
            self.workers: dict[int, dict[str, Any]] = {}
            self.usage: dict[int, dict[int, dict[str, float]]] = {}

        def record_usage(self, epoch: int, rank: int, usage: dict[str, float]) -> None:
            self.usage.setdefault(epoch, {})[rank] = usage

        def start_attempt(self) -> int:
            self.attempts += 1
            return self.attempts

        def record(
            self, epoch: int, timing: dict[str, float], rows: dict[str, int] | None = None
        ) -> None:
            self.timings[epoch] = timing
            if rows is not None:
                self.rows[epoch] = rows

        def register_worker(self, rank: int, pid: int, node_id: str) -> None:
            self.workers[rank] = {"pid": pid, "node_id": node_id, "attempt": self.attempts}

        def status(self) -> dict[str, Any]:
            return {
                "attempts": self.attempts,
                "epochs_done": len(self.timings),
                "workers": dict(self.workers),
            }

        def get(self) -> tuple[int, dict[int, Any], dict[int, Any], dict[int, Any]]:
            return self.attempts, self.timings, self.rows, self.usage

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


def _write_bytes(fs: Any, path: str, data: bytes) -> None:
    """Write a file in the storage; locally to a temporary name, then rename."""
    import pyarrow.fs as pafs

    if not isinstance(fs, pafs.LocalFileSystem):  # an object store's put is atomic
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def _write_run_info(cfg: TrainConfig, run_name: str, info: dict[str, Any]) -> None:
    fs, path = _run_info(cfg, run_name)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    _write_bytes(fs, path, json.dumps(info).encode())


def check_storage(cfg: TrainConfig) -> None:
    """Create the storage path and write a probe file there, so that a storage path that
    cannot be written fails as bad input before any run starts."""
    import pyarrow.fs as pafs

    storage = _storage(cfg)
    try:
        fs, root = pafs.FileSystem.from_uri(storage)
        root = root.rstrip("/")
        fs.create_dir(root, recursive=True)
        probe = f"{root}/.write-check-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except (OSError, ValueError) as e:
        detail = " ".join(str(e).split())[:300]
        raise ConfigError(f"storage_path '{storage}': cannot write there: {detail}") from None


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


def _resume_record(cfg: TrainConfig, ds: Any) -> dict[str, Any]:
    """What a later resume of this run must match: the data, its dims and the fixed config."""
    fixed = {k: v for k, v in cfg.to_dict().items() if k not in RESUMABLE_KEYS}
    return {
        "data_version": ds.data_version,
        "dims": dict(ds.dims),
        "num_classes": int(ds.num_classes),
        "config": fixed,
        "resumable": {k: v for k, v in cfg.to_dict().items() if k in RESUMABLE_KEYS},
    }


def check_resume(
    previous: dict[str, Any], cfg: TrainConfig, ds: Any, tracking_uri: str, run_name: str
) -> list[str]:
    """Refuse a resume whose data, dims or fixed config differ from the run's first start.

    Returns the resumable keys that changed, as ``"key: old → new"``.
    """
    if previous.get("tracking_uri") and previous["tracking_uri"] != tracking_uri:
        raise ConfigError(
            f"--resume: run '{run_name}' is tracked at {previous['tracking_uri']}, "
            f"not at {tracking_uri}; pass --tracking-uri {previous['tracking_uri']}"
        )
    if "config" not in previous:
        log.warning(
            "run '%s' was started without a resume record; only its checkpoint's architecture "
            "is checked",
            run_name,
        )
        return []
    if previous["data_version"] != ds.data_version:
        raise ConfigError(
            f"--resume: run '{run_name}' was trained on data_version {previous['data_version']}, "
            f"but {ds.uri} is {ds.data_version}; start a new --run-name for other data"
        )
    if previous["dims"] != dict(ds.dims) or previous["num_classes"] != ds.num_classes:
        raise ConfigError(
            f"--resume: run '{run_name}' was trained on feature dims {previous['dims']} with "
            f"{previous['num_classes']} classes, but {ds.uri} has {dict(ds.dims)} with "
            f"{ds.num_classes}"
        )
    now = cfg.to_dict()
    for key, old in sorted(previous["config"].items()):
        if key in now and now[key] != old:
            raise ConfigError(
                f"--resume: config '{key}' = {now[key]!r} differs from {old!r} of run "
                f"'{run_name}'; a resume may change only {sorted(RESUMABLE_KEYS)}"
            )
    first = previous.get("resumable") or {}
    return [
        f"{k}: {first[k]!r} → {now[k]!r}"
        for k in sorted(first)
        if k in now and now[k] != first[k] and k not in ("resume",)
    ]


def _checkpoint_problem(fs: Any, ckpt_dir: str, arch: dict[str, Any]) -> tuple[str | None, int]:
    """Why a stored checkpoint cannot be resumed from (None if intact), and its epochs done."""
    from pipeline.method.weights import ModelFileError, safe_load
    from pipeline.training.train_loop import STATE, load_train_state

    try:
        blobs = {}
        for name in (WEIGHTS, STATE):
            try:
                with fs.open_input_stream(f"{ckpt_dir}/{name}") as f:
                    blobs[name] = f.read()
            except (OSError, FileNotFoundError):
                return f"{name} is missing", -1
        state = load_train_state(blobs[STATE], f"{ckpt_dir}/{STATE}")
        weights = safe_load(blobs[WEIGHTS], f"{ckpt_dir}/{WEIGHTS}")
    except ModelFileError as e:
        return str(e), -1
    if not isinstance(weights, dict) or "arch" not in weights:
        return f"{ckpt_dir}/{WEIGHTS} holds no architecture", -1
    for key, value in arch.items():
        if weights["arch"].get(key) != value:
            raise ConfigError(
                f"--resume: the checkpoint {ckpt_dir} has {key} = {weights['arch'].get(key)!r}, "
                f"the config and dataset give {value!r}"
            )
    return None, int(state["epoch"]) + 1


def choose_resume_checkpoint(
    cfg: TrainConfig, run_name: str, arch: dict[str, Any]
) -> tuple[str | None, int]:
    """The newest intact checkpoint of ``run_name`` and its epochs done; (None, 0) if none was
    ever reported. Broken newer ones are dropped from Ray's record so that Ray resumes from it."""
    import pyarrow.fs as pafs

    fs, info_path = _run_info(cfg, run_name)
    run_dir = info_path.rsplit("/", 1)[0]
    snapshot_path = f"{run_dir}/{SNAPSHOT}"
    if fs.get_file_info(snapshot_path).type != pafs.FileType.File:
        log.info("run %s has no checkpoint yet; it starts from its first epoch", run_name)
        return None, 0
    with fs.open_input_stream(snapshot_path) as f:
        snap = json.loads(f.read().decode())
    results = snap.get("checkpoint_results") or []
    if not results:
        return None, 0
    order = sorted(
        range(len(results)),
        key=lambda i: (results[i]["metrics"].get("epoch", 0), results[i]["checkpoint_dir_name"]),
        reverse=True,
    )
    latest = (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    broken: dict[str, str] = {}
    for i in order:
        name = results[i]["checkpoint_dir_name"]
        problem, epochs_done = _checkpoint_problem(fs, f"{run_dir}/{name}", arch)
        if problem is None:
            break
        broken[name] = problem
        log.warning("checkpoint %s of run %s cannot be resumed from: %s", name, run_name, problem)
    else:
        raise ConfigError(
            f"--resume: run '{run_name}' has no intact checkpoint in {_storage(cfg)}: "
            + "; ".join(f"{n}: {p}" for n, p in broken.items())
        )
    if broken or latest != name:
        keep = [i for i in range(len(results)) if results[i]["checkpoint_dir_name"] not in broken]
        indices = snap.get("checkpoint_report_indices") or []
        snap["checkpoint_results"] = [results[i] for i in keep]
        if len(indices) == len(results):
            snap["checkpoint_report_indices"] = [indices[i] for i in keep]
        snap["latest_checkpoint_result"] = results[i]
        pending = list(
            zip(
                snap.get("pending_training_results") or [],
                snap.get("pending_validation_specs") or [],
                strict=False,
            )
        )
        pending = [(r, v) for r, v in pending if r["checkpoint_dir_name"] not in broken]
        snap["pending_training_results"] = [r for r, _ in pending]
        snap["pending_validation_specs"] = [v for _, v in pending]
        for key in (
            "validated_checkpoint_dir_names",
            "timed_out_validation_checkpoint_dir_names",
            "failed_validation_checkpoint_dir_names",
        ):
            snap[key] = [n for n in snap.get(key) or [] if n not in broken]
        _write_bytes(fs, snapshot_path, json.dumps(snap).encode())
        log.warning(
            "run %s resumes from checkpoint %s (after epoch %d), the newest intact one",
            run_name,
            name,
            epochs_done,
        )
    return name, epochs_done


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
    check_storage(cfg)  # before the MLflow run exists: bad storage is bad input
    previous = read_run_info(cfg, run_name) if cfg.run_name else None
    if previous and not cfg.resume:
        raise ConfigError(
            f"run '{run_name}' already exists in {_storage(cfg)}; pass --resume to continue it "
            "from its latest checkpoint, or choose another --run-name"
        )
    if cfg.resume and not previous:
        raise ConfigError(f"--resume: no run '{run_name}' in {_storage(cfg)} to resume")
    status_before = None
    if previous:
        run_id = previous["mlflow_run_id"]
        changes = check_resume(previous, cfg, ds, tracking_uri, run_name)
        status_before = tracking.run_status(tracking_uri, run_id)
        if status_before is None:
            raise ConfigError(
                f"--resume: MLflow run {run_id} of run '{run_name}' is not at {tracking_uri}"
            )
        ckpt, epochs_done = choose_resume_checkpoint(
            cfg, run_name, arch_of(cfg, ds.dims, ds.num_classes)
        )
        if status_before == "FINISHED" and epochs_done >= cfg.epochs:
            raise ConfigError(
                f"--resume: run '{run_name}' finished {epochs_done} epochs; pass --epochs above "
                f"{epochs_done} to extend it"
            )
        log.info(
            "resuming run %s (MLflow run %s, %s) from %s after epoch %d%s",
            run_name,
            run_id,
            status_before,
            ckpt or "no checkpoint",
            epochs_done,
            f"; changed: {', '.join(changes)}" if changes else "",
        )
    else:
        run_id = tracking.start_run(tracking_uri, cfg.experiment_name, run_name, params, tags)
    log.info("MLflow run %s (%s) at %s", run_id, run_name, tracking_uri)
    try:
        if previous:
            # A finished run keeps its status (its model may be serving); any other goes back
            # to RUNNING so that a failure below marks it FAILED again.
            tracking.update_run(
                tracking_uri,
                run_id,
                status=None if status_before == "FINISHED" else "RUNNING",
                tags={
                    "resumed_from": f"{ckpt or 'start'} (after epoch {epochs_done})",
                    "resume_changes": "; ".join(changes) or "none",
                },
            )
        else:
            info = {"mlflow_run_id": run_id, "tracking_uri": tracking_uri}
            _write_run_info(cfg, run_name, info | _resume_record(cfg, ds))
        summary = _fit(
            cfg, ds, normalisation, run_name, run_id, tracking_uri, ray_address, callbacks or []
        )
        best_weights = Path(summary.pop("_best_weights"))
        pr_curves = summary.pop("_pr_curves")
        suspects = summary.pop("_suspects")
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
                    "suspect_labels",
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
                suspects=suspects,
                registered_model_name=(
                    cfg.registered_model_name if cfg.register_model and log_model else None
                ),
            )
            if suspects is not None:
                shutil.rmtree(suspects.parent, ignore_errors=True)
    except BaseException as e:
        if status_before == "FINISHED":
            try:
                tracking.update_run(
                    tracking_uri, run_id, tags={"resume_error": f"{type(e).__name__}: {e}"}
                )
            except Exception as tag_error:
                log.warning("could not tag MLflow run %s: %s", run_id, tag_error)
        else:
            tracking.fail_run(tracking_uri, run_id, e)
        raise
    summary.update(
        {"mlflow_run_id": run_id, "registered_model": registered, "tracking_uri": tracking_uri}
    )
    return summary


def _epoch_metrics_callback(tracking_uri: str, run_id: str) -> Any:
    """A Ray Train callback, run by the Train controller, that logs the scalars rank 0 reports
    each epoch to the MLflow run (step = epoch), so the workers never talk to MLflow."""
    import threading

    import ray.train

    class EpochMetrics(ray.train.UserCallback):
        def __init__(self) -> None:
            self._logger: Any = None
            self._lock = threading.Lock()

        def __getstate__(self) -> dict[str, Any]:
            return {}

        def __setstate__(self, state: dict[str, Any]) -> None:
            # Unpickled in the controller as it starts: import MLflow and open the client while
            # the workers start (~2 CPU s), not during the second epoch, on the workers' cores.
            self._logger, self._lock = None, threading.Lock()
            threading.Thread(target=self._get_logger, daemon=True).start()

        def _get_logger(self) -> Any:
            with self._lock:
                if self._logger is None:
                    from pipeline.tracking.runs import EpochLogger

                    self._logger = EpochLogger(tracking_uri, run_id)
                return self._logger

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
            scalars = metrics[0].get("epoch_scalars") if metrics else None
            if not scalars:
                return
            self._get_logger().log(scalars, int(metrics[0]["epoch"]))

    return EpochMetrics()


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
    if run_id:
        callbacks = [*callbacks, _epoch_metrics_callback(tracking_uri, run_id)]
    storage = _storage(cfg)
    store_bytes = int(ray.cluster_resources().get("object_store_memory", 0))
    in_memory = cached_in_memory(ds, cfg.data_cache_max_bytes, store_bytes)
    log.info(
        "train split (%d bytes) %s (cache limit %d bytes, object store %d bytes)",
        ds.manifest["files"]["train.parquet"]["bytes"],
        "cached in the object store" if in_memory else "streamed",
        cfg.data_cache_max_bytes,
        store_bytes,
    )
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "config": cfg.to_dict(),
            "normalisation": normalisation,
            "run_id": run_id,
            "tracking_uri": tracking_uri,
            "monitor": monitor,
            "in_memory": in_memory,
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
            # The two best full checkpoints and the latest: an intact older one to resume from
            # if the latest is lost (each is written every checkpoint_every epochs).
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            callbacks=callbacks,
        ),
        datasets={"train": training_dataset(ds, cfg.seed, cfg.workers, in_memory)},
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
    if not result.best_checkpoints or result.checkpoint is None:
        raise TrainingError(f"training run {run_name} reported no checkpoint")
    # the latest checkpoint holds the best epoch's weights (its BEST file, or its own weights
    # when the best epoch is its epoch) and reports the best epoch's validation MAPs
    best_ckpt, best_metrics = result.checkpoint, last
    if "best_valid_map_i2t" not in last:  # written before the best travelled with the latest
        best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1][SCORE])
        best_metrics = {f"best_{k}": v for k, v in best_metrics.items()} | {
            "best_epoch": best_metrics["epoch"]
        }
    keep = Path(tempfile.mkdtemp(prefix="rshnl-best-")) / WEIGHTS
    fetch_weights(best_ckpt.filesystem, best_ckpt.path, keep)
    suspects = None  # the last epoch's report travels with the latest checkpoint
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            if (Path(d) / SUSPECTS_FILE).exists():
                suspects = Path(tempfile.mkdtemp(prefix="rshnl-suspects-")) / SUSPECTS_FILE
                shutil.copy(Path(d) / SUSPECTS_FILE, suspects)
    model, _ = load_model_file(keep)
    final = final_evaluation(model, ds, cfg, last.get("history") or {})
    import ray

    attempts, timings, rows, usage = ray.get(monitor.get.remote())
    ray.kill(monitor)
    if final.problems:
        shutil.rmtree(keep.parent, ignore_errors=True)
        if suspects is not None:
            shutil.rmtree(suspects.parent, ignore_errors=True)
        raise TrainingError(
            f"training run {run_name} produced an unusable model: {'; '.join(final.problems)}"
        )
    restarts = max(0, attempts - 1)
    summary = {
        "run_name": run_name,
        "dataset": ds.uri,
        "data_version": ds.data_version,
        "test_map": final.test_map,
        "best_valid_map": {
            "i2t": best_metrics["best_valid_map_i2t"],
            "t2i": best_metrics["best_valid_map_t2i"],
            "mean": best_metrics["best_valid_map_mean"],
        },
        "best_epoch": int(best_metrics["best_epoch"]),
        "epochs_run": int(last.get("epoch", 0)),
        "seconds_per_epoch": float(last.get("seconds_per_epoch", float("nan"))),
        "wall_seconds": wall,
        "test_eval_seconds": final.seconds,
        "noise_detection": last.get("noise_detection", {}),
        "suspect_labels": last.get("suspect_labels", {}),
        "center_checksums": list(last.get("center_checksums", [])),
        "restarts": restarts,
        "worker_nodes": list(last.get("worker_nodes", [])),
        "global_negatives": bool(last.get("global_negatives", False)),
        "epoch_timings": [timings[e] for e in sorted(timings)],
        "rows_seen": [rows[e] | {"epoch": e} for e in sorted(rows)],
        "worker_usage": [
            {"epoch": e, "ranks": {str(r): usage[e][r] for r in sorted(usage[e])}}
            for e in sorted(usage)
        ],
        "in_memory": in_memory,
        "history": last.get("history", {}),
        "checkpoint_path": best_ckpt.path,
        "_best_weights": str(keep),
        "_pr_curves": final.pr_curves,
        "_suspects": suspects,
    }
    log.info(
        "best epoch %d: valid MAP %.4f, test MAP %.4f (i2t %.4f, t2i %.4f)",
        summary["best_epoch"],
        best_metrics["best_valid_map_mean"],
        final.test_map["mean"],
        final.test_map["i2t"],
        final.test_map["t2i"],
    )
    return summary
