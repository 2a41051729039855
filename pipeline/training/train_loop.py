"""The Ray Train worker: data shard, epochs, gathers across ranks, checkpoints and reports
(``ray.train`` stays in ``pipeline/training``; the driver is :mod:`pipeline.training.trainer`).

The step itself (``compute_loss``) is plain PyTorch plus ``torch.distributed`` so that it can be
checked outside Ray against a single-process run on the concatenated batch.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from feature_store.store import open_dataset
from pipeline.config import TrainConfig
from pipeline.method.losses import LossMixture
from pipeline.method.model import HashModel
from pipeline.method.suspects import (
    DETECTION_KEYS,
    SUSPECTS_FILE,
    TrainReference,
    summary_of,
    suspect_report,
    write_report,
)
from pipeline.method.weights import (
    WEIGHTS,
    ModelFileError,
    plain,
    safe_load,
    save_model_file,
)
from pipeline.retrieval.protocol import EvalProtocol
from pipeline.training.data import local_shuffle_seed
from pipeline.training.epoch import MemoryShard, epoch_pair_weights, next_mixture, train_epoch
from pipeline.training.final_eval import BEST
from pipeline.training.record import RunRecord, empty_history, full_checkpoint
from pipeline.training.reliability import memory_rows, owned_rows
from pipeline.training.step import (
    arch_of,
    assert_centers_synced,
    center_checksum,
    epoch_gamma,
    is_distributed,
    make_optimizer,
    seed_everything,
    setup_model,
)

log = logging.getLogger("pipeline.train")

STATE = "train_state.pt"
_BATCH_DTYPES = {
    "item_id": torch.int64,
    "image": torch.float32,
    "text": torch.float32,
    "label": torch.float32,
}


class _Timer:
    """Accumulates wall time per phase of an epoch."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}

    def add(self, key: str, seconds: float) -> None:
        self.t[key] = self.t.get(key, 0.0) + seconds


def rng_states() -> dict[str, Any]:
    """The torch, NumPy and Python RNG states as tensors and plain values."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python_rng": {
            "version": int(version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }


def restore_rng_states(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_states`."""
    torch.set_rng_state(state["torch_rng"])
    n = state["numpy_rng"]
    keys = n["keys"].numpy().view(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python_rng"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


def save_train_state(
    path: Path,
    optimizer_state: dict[str, Any],
    epoch: int,
    best_valid_map: float,
    best_epoch: int,
    history: dict[str, Any],
) -> None:
    """Write the resumable state (tensors and plain values only) to a temporary name; rename."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "optimizer": optimizer_state,
            "epoch": int(epoch),
            "best_valid_map": float(best_valid_map),
            "best_epoch": int(best_epoch),
            "history": json.dumps(plain(history)),
            **rng_states(),
        },
        tmp,
    )
    os.replace(tmp, path)


_STATE_KEYS = ("optimizer", "epoch", "best_valid_map", "best_epoch", "history", "torch_rng")


def load_train_state(source: Path | str | bytes, what: str = "") -> dict[str, Any]:
    """Read :func:`save_train_state` output without unpickling anything but tensors and plain
    values; :class:`~pipeline.method.weights.ModelFileError` names the file otherwise."""
    name = what or str(source)
    state = safe_load(source, name)
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ModelFileError(f"{name}: not a training state file (missing {missing})")
    try:
        state["history"] = json.loads(state["history"]) if state["history"] else {}
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{name}: history is not valid JSON: {e}") from None
    return state


def process_memory() -> dict[str, float]:
    """This process's resident set size now and its peak so far, in bytes (Linux /proc)."""
    out = {"rss": 0.0, "peak_rss": 0.0}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):  # kB
                    out["rss" if key == "VmRSS" else "peak_rss"] = float(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def rows_seen(ids: np.ndarray) -> dict[str, int]:
    """What an epoch's item ids (all ranks') say about its coverage: how many rows, how many
    distinct ids, and an order-independent checksum (sum of 64-bit mixed ids, mod 2**63)."""
    ids = np.asarray(ids, dtype=np.int64)
    return {
        "count": int(ids.size),
        "distinct": int(np.unique(ids).size),
        "checksum": id_checksum(ids),
    }


def id_checksum(ids: np.ndarray) -> int:
    """Sum over ids of a splitmix64-style mix of each id, mod 2**63 (order-independent)."""
    x = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) * np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(31)
        x = x * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(29)
        total = int(x.sum(dtype=np.uint64))
    return total % (2**63)


def train_func(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = TrainConfig.from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.seed)
    global_negatives = cfg.global_negatives == "on" or (
        cfg.global_negatives == "auto" and world > 1
    )

    ds = open_dataset(cfg.dataset, verify=False)  # the driver verified checksums
    dims, k = ds.dims, ds.num_classes
    cfg, model = setup_model(cfg, ds.manifest, dims, k, loop_config["normalisation"])
    if cfg.centers != "learned" and is_distributed():
        dist.broadcast(model.center_net.centers, src=0)  # rank 0's, bit for bit, on every rank
    arch = arch_of(cfg, dims, k)

    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model)
    core: HashModel = model.module if hasattr(model, "module") else model
    optimizer = make_optimizer(model, cfg)

    start_epoch, best_map, best_epoch = 0, -1.0, -1
    history = empty_history()
    # rank 0 keeps the best epoch's weights in memory; they are written with the next full
    # checkpoint (a resumed run replays the epochs after that checkpoint anyway)
    best_core: HashModel | None = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_train_state(Path(d) / STATE)
            weights_blob = safe_load(Path(d) / WEIGHTS)
            best_blob = safe_load(Path(d) / BEST) if (Path(d) / BEST).exists() else None
        core.load_state_dict(weights_blob["state_dict"])
        if rank == 0 and (best_blob is not None or state["best_epoch"] == state["epoch"] + 1):
            best_core = copy.deepcopy(core)
            if best_blob is not None:
                best_core.load_state_dict(best_blob["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
        best_map, best_epoch = state["best_valid_map"], state["best_epoch"]
        history = state["history"] or history
        restore_rng_states(state)
        log.info(
            "rank %d resumed after epoch %d (best valid MAP %.4f at epoch %d)",
            rank,
            start_epoch,
            best_map,
            best_epoch,
        )
    monitor = loop_config.get("monitor")  # driver-side actor: attempts and per-epoch timings
    if rank == 0 and monitor is not None:
        ray.get(monitor.start_attempt.remote())
    if is_distributed():
        dist.barrier()  # every rank registers under the attempt rank 0 just opened
    if monitor is not None:
        monitor.register_worker.remote(rank, os.getpid(), ray.get_runtime_context().get_node_id())

    nodes: list[Any] = [ray.get_runtime_context().get_node_id()]
    if is_distributed():
        nodes = [None] * world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())

    record = None
    if rank == 0:  # validation, detection (joined by id, not in the loss) and the history
        record = RunRecord(
            cfg,
            EvalProtocol.load(ds, "valid", cfg.eval_top_k),
            TrainReference.load(ds),
            history,
            best_map,
            best_epoch,
        )

    # the loss mixture of the previous epoch (every rank fits the same gathered ℓ_i)
    mixture = None
    if history.get("mixture_mean_clean"):
        mixture = LossMixture(*(tuple(history[f"mixture_{k}_{c}"][-1] for c in ("clean", "noisy"))
                                for k in ("pi", "mean", "var")))  # fmt: skip

    shard = ray.train.get_dataset_shard("train")
    local_bs = max(1, cfg.batch_size // world)
    memory: MemoryShard | None = None
    if loop_config.get("in_memory", False):  # a cached split: this rank's rows, read once
        t0 = time.perf_counter()
        memory = MemoryShard.from_batches(
            shard.iter_torch_batches(batch_size=4096, dtypes=_BATCH_DTYPES), device
        )
        log.info("rank %d holds %d rows (%.1fs)", rank, len(memory), time.perf_counter() - t0)
    train_rows = None  # SCBCH: the rows whose codes this rank encodes for the sharded kNN
    if cfg.method == "scbch":
        held = memory_rows(memory) if memory is not None else None
        train_rows = owned_rows(ds, rank, world, held)
    steps, seconds = [0], []
    last_checkpoint = time.monotonic()  # rank 0 alone decides and writes

    def after_step() -> None:
        steps[0] += 1
        if cfg.center_sync_check_every and steps[0] % cfg.center_sync_check_every == 0:
            if is_distributed():
                with torch.no_grad():
                    assert_centers_synced(core.center_net(), steps[0])

    for epoch in range(start_epoch, cfg.epochs):
        timer = _Timer()
        t_epoch = time.perf_counter()
        gamma = epoch_gamma(cfg, mixture)
        t0 = time.perf_counter()
        pair_weights = epoch_pair_weights(core, train_rows, cfg, epoch, device)
        if pair_weights is not None:
            timer.add("reliability", time.perf_counter() - t0)
        if memory is not None:
            batches: Any = memory.batches(local_bs, cfg.seed, epoch, rank)
        else:  # a streamed split: Ray Data's local shuffle buffer
            batches = shard.iter_torch_batches(
                batch_size=local_bs,
                dtypes=_BATCH_DTYPES,
                device=device,
                local_shuffle_buffer_size=cfg.shuffle_buffer or None,
                local_shuffle_seed=local_shuffle_seed(cfg.seed, epoch, rank),
            )
        res = train_epoch(
            model,
            optimizer,
            batches,
            cfg,
            epoch,
            global_negatives=global_negatives,
            mixture=mixture,
            pair_weights=pair_weights,
            after_step=after_step,
        )
        for k, v in res.seconds.items():
            timer.add(k, v)
        t0 = time.perf_counter()
        with torch.no_grad():
            last_centers = core.center_net().float().cpu()
        ids, weights, ell, predicted = res.item_id, res.weight, res.ell, res.predicted
        sums = torch.tensor(
            [res.loss * res.items, res.chl * res.items, res.center * res.items, res.items],
            dtype=torch.float64,
        )
        checksums: list[Any] = [center_checksum(last_centers)]
        if is_distributed():
            dist.all_reduce(sums)
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, (ids, weights, checksums[0], ell, predicted))
            ids = np.concatenate([g[0] for g in gathered])
            weights = np.concatenate([g[1] for g in gathered])
            checksums = [g[2] for g in gathered]
            ell = np.concatenate([g[3] for g in gathered])
            predicted = np.concatenate([g[4] for g in gathered])
        mixture = next_mixture(cfg, ell, mixture)  # every rank fits the gathered ℓ_i
        timer.add("gather", time.perf_counter() - t0)
        seconds.append(timer.t.get("data_wait", 0.0) + timer.t.get("step", 0.0))

        metrics: dict[str, Any] = {"epoch": epoch + 1}
        ckpt_dir = None
        if rank == 0:
            t0 = time.perf_counter()
            n = max(sums[3].item(), 1.0)
            every_rank = dataclasses.replace(
                res,
                loss=sums[0].item() / n,
                chl=sums[1].item() / n,
                center=sums[2].item() / n,
                items=int(sums[3].item()),
                item_id=ids,
                weight=weights,
                ell=ell,
                predicted=predicted,
            )
            metrics, improved = record.record(
                core, epoch, every_rank, gamma=gamma, mixture=mixture, seconds=seconds[-1]
            )
            if improved:  # an in-memory copy, no file: cheap every epoch
                if best_core is None:
                    best_core = copy.deepcopy(core)
                else:
                    best_core.load_state_dict(core.state_dict())
            # every training row once per epoch: count, distinct ids, order-free id checksum
            seen = rows_seen(ids)
            timer.add("eval", time.perf_counter() - t0)
            # what the driver's callback logs to MLflow for this epoch (workers do not talk to it)
            epoch_scalars = {k: v for k, v in metrics.items() if k != "epoch"} | {
                f"time_{k}": v for k, v in timer.t.items()
            }
            t0 = time.perf_counter()
            since_last = time.monotonic() - last_checkpoint
            if full_checkpoint(
                epoch + 1,
                cfg.checkpoint_every,
                cfg.epochs,
                since_last,
                cfg.checkpoint_interval_s,
            ):
                last_checkpoint = time.monotonic()
                ckpt_dir = tempfile.mkdtemp(prefix="rshnl-ckpt-")
                save_model_file(
                    Path(ckpt_dir) / WEIGHTS,
                    core,
                    arch,
                    {"epoch": epoch + 1, "valid_map": record.valid_map},
                )
                if record.best_epoch != epoch + 1 and best_core is not None:
                    save_model_file(
                        Path(ckpt_dir) / BEST,
                        best_core,
                        arch,
                        {"epoch": record.best_epoch, "valid_map": record.best_valid_map},
                    )
                save_train_state(
                    Path(ckpt_dir) / STATE,
                    optimizer.state_dict(),
                    epoch,
                    record.best_map,
                    record.best_epoch,
                    record.history,
                )
            timer.add("checkpoint", time.perf_counter() - t0)
            metrics.update(
                {
                    "center_checksums": checksums,
                    "seconds_per_epoch": float(np.mean(seconds)),
                    "noise_detection": {k: float(record.detection[k]) for k in DETECTION_KEYS},
                    "worker_nodes": nodes,
                    "mlflow_run_id": loop_config.get("run_id") or "",
                    "epoch_scalars": epoch_scalars,
                    "global_negatives": global_negatives,
                    "rows_seen": seen,
                }
            )
            if epoch + 1 == cfg.epochs:
                metrics["history"] = record.history
                report = suspect_report(record.ref, ids, ell, weights, predicted)
                write_report(report, Path(ckpt_dir) / SUSPECTS_FILE)
                metrics["suspect_labels"] = summary_of(record.ref, report)
        # A full checkpoint is scored by its epoch's validation MAP; Ray keeps the best two and
        # the latest. The best epoch's weights travel in the latest one (BEST or WEIGHTS).
        t0 = time.perf_counter()
        # The upload overlaps the next epoch; Ray deletes the local directory once it is stored.
        checkpoint_obj = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(
            metrics,
            checkpoint=checkpoint_obj,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
        )
        timer.add("report", time.perf_counter() - t0)
        if rank == 0 and monitor is not None:
            wall = {"wall": time.perf_counter() - t_epoch, "ended_at": time.time()}
            monitor.record.remote(epoch + 1, timer.t | wall, seen)
        if monitor is not None:
            monitor.record_usage.remote(epoch + 1, rank, process_memory())
