"""The per-worker training loop: the only module that touches ``ray.train``."""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from feature_store.store import open_dataset
from pipeline import evaluate
from pipeline.config import TrainConfig
from pipeline.data import EvalSplit, local_shuffle_seed, noise_flags
from pipeline.losses import rshnl_objective
from pipeline.model import RSHNLModel
from pipeline.serving import WEIGHTS, encode, save_model_file

log = logging.getLogger("pipeline.train")

STATE = "train_state.pt"
SCORE = "checkpoint_score"  # validation MAP (mean), ties broken towards the later epoch


def checkpoint_score(valid_map_mean: float, epoch: int) -> float:
    """Strictly ordered score so that the best checkpoint is unambiguous under equal MAPs."""
    return valid_map_mean + epoch * 1e-12


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def center_checksum(centers: torch.Tensor) -> str:
    """SHA-256 of the exact bytes of the centers (bit-identical ⇔ equal checksums)."""
    return hashlib.sha256(centers.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _assert_centers_synced(centers: torch.Tensor, step: int) -> None:
    gathered = [torch.empty_like(centers) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, centers.contiguous())
    for rank, c in enumerate(gathered):
        if not torch.equal(c, gathered[0]):
            raise RuntimeError(f"hash centers differ between rank 0 and rank {rank} at step {step}")


def build_model(cfg: TrainConfig, dims: dict[str, int], num_classes: int) -> RSHNLModel:
    return RSHNLModel(dims["image"], dims["text"], num_classes, cfg.bits, cfg.hidden_dim)


def arch_of(cfg: TrainConfig, dims: dict[str, int], num_classes: int) -> dict[str, int]:
    return {
        "image_dim": dims["image"],
        "text_dim": dims["text"],
        "num_classes": num_classes,
        "bits": cfg.bits,
        "hidden": cfg.hidden_dim,
    }


def evaluate_split(model: RSHNLModel, split: EvalSplit, batch_size: int) -> dict[str, float]:
    model.eval()
    img = encode(model, split.image, "image", batch_size)
    txt = encode(model, split.text, "text", batch_size)
    model.train()
    return evaluate.cross_modal_map(img, txt, split.label)


def train_func(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = TrainConfig.from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed_everything(cfg.seed)

    ds = open_dataset(cfg.dataset, verify=False)  # the driver verified checksums
    dims, k = ds.dims, ds.num_classes
    model = build_model(cfg, dims, k)
    for m, (mean, scale) in loop_config["normalisation"].items():
        model.set_normalisation(m, torch.tensor(mean), torch.tensor(scale))
    arch = arch_of(cfg, dims, k)

    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model)
    core: RSHNLModel = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    start_epoch, best_map, best_epoch, best_score = 0, -1.0, -1, -1.0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE, map_location="cpu", weights_only=False)
            core.load_state_dict(
                torch.load(Path(d) / WEIGHTS, map_location="cpu", weights_only=False)["state_dict"]
            )
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
        best_map, best_epoch = state["best_valid_map"], state["best_epoch"]
        best_score = checkpoint_score(best_map, best_epoch)
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        log.info(
            "rank %d resumed from epoch %d (best %.4f at %d)",
            rank,
            start_epoch,
            best_map,
            best_epoch,
        )
    attempt_counter = loop_config.get("attempt_counter")
    if rank == 0 and attempt_counter is not None:
        ray.get(attempt_counter.increment.remote())

    valid = test_ids = None
    epoch_logger = None
    if rank == 0:
        valid = EvalSplit.load(ds, "valid")
        test_ids = noise_flags(ds)  # measurement only: joined with SPL weights, never in the loss
        if loop_config.get("run_id"):
            from pipeline.tracking import EpochLogger

            epoch_logger = EpochLogger(loop_config["tracking_uri"], loop_config["run_id"])

    shard = ray.train.get_dataset_shard("train")
    local_bs = max(1, cfg.batch_size // world)
    step = 0
    last_centers = None
    train_seconds: list[float] = []
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        sums = torch.zeros(4, dtype=torch.float64)  # total, chl, center, n
        ids_l, w_l = [], []
        for batch in shard.iter_torch_batches(
            batch_size=local_bs,
            dtypes={
                "item_id": torch.int64,
                "image": torch.float32,
                "text": torch.float32,
                "label": torch.float32,
            },
            device=device,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=local_shuffle_seed(cfg.seed, epoch, rank),
        ):
            h_img, h_txt, centers = model(batch["image"], batch["text"])
            terms = rshnl_objective(
                h_img,
                h_txt,
                centers,
                batch["label"],
                epoch=epoch,
                warmup_epochs=cfg.warmup_epochs,
                gamma=cfg.gamma,
                alpha=cfg.alpha,
                r=cfg.r,
                tau=cfg.tau,
                exclude_self=cfg.chl_exclude_self,
            )
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            optimizer.step()
            step += 1
            n = batch["image"].shape[0]
            sums += torch.tensor(
                [terms.total.item() * n, terms.chl.item() * n, terms.center.item() * n, n],
                dtype=torch.float64,
            )
            ids_l.append(batch["item_id"].cpu())
            w_l.append(terms.weights.cpu())
            if (
                cfg.center_sync_check_every
                and step % cfg.center_sync_check_every == 0
                and _distributed()
            ):
                with torch.no_grad():
                    _assert_centers_synced(core.center_net(), step)
        with torch.no_grad():
            last_centers = core.center_net().cpu()
        ids = torch.cat(ids_l) if ids_l else torch.zeros(0, dtype=torch.int64)
        weights = torch.cat(w_l) if w_l else torch.zeros(0)
        if _distributed():
            dist.all_reduce(sums)
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, (ids.numpy(), weights.numpy()))
            ids = np.concatenate([g[0] for g in gathered])
            weights = np.concatenate([g[1] for g in gathered])
        else:
            ids, weights = ids.numpy(), weights.numpy()
        train_seconds.append(time.perf_counter() - t0)

        checksums: list[Any] = [center_checksum(last_centers)]
        if _distributed():
            checksums = [None] * world
            dist.all_gather_object(checksums, center_checksum(last_centers))

        metrics: dict[str, Any] = {"epoch": epoch + 1}
        ckpt_dir = None
        if rank == 0:
            n = max(sums[3].item(), 1.0)
            vmap = evaluate_split(core, valid, cfg.eval_batch_size)
            item_ids, flags = test_ids
            order = np.argsort(item_ids)
            pos = np.searchsorted(item_ids[order], ids)
            det = evaluate.noise_detection(weights, flags[order][pos])
            score = checkpoint_score(vmap["mean"], epoch + 1)
            if score > best_score:
                best_score, best_map, best_epoch = score, vmap["mean"], epoch + 1
            metrics.update(
                {
                    "loss": sums[0].item() / n,
                    "loss_chl": sums[1].item() / n,
                    "loss_center": sums[2].item() / n,
                    "valid_map_i2t": vmap["i2t"],
                    "valid_map_t2i": vmap["t2i"],
                    "valid_map_mean": vmap["mean"],
                    SCORE: score,
                    "best_valid_map_mean": best_map,
                    "best_epoch": best_epoch,
                    "zero_weight_share": float(np.mean(weights <= 0)) if weights.size else 0.0,
                    "mean_weight": float(np.mean(weights)) if weights.size else 0.0,
                    "noise_precision": float(det["precision"]),
                    "noise_recall": float(det["recall"]),
                    "noise_f1": float(det["f1"]),
                    "epoch_seconds": train_seconds[-1],
                    "warmup": float(epoch < cfg.warmup_epochs),
                }
            )
            log.info(
                "epoch %d/%d loss=%.4f chl=%.4f center=%.4f valid_map=%.4f (i2t %.4f t2i %.4f) "
                "best=%.4f@%d zero_w=%.3f noise_p/r=%.3f/%.3f %.1fs",
                epoch + 1,
                cfg.epochs,
                metrics["loss"],
                metrics["loss_chl"],
                metrics["loss_center"],
                vmap["mean"],
                vmap["i2t"],
                vmap["t2i"],
                best_map,
                best_epoch,
                metrics["zero_weight_share"],
                det["precision"],
                det["recall"],
                train_seconds[-1],
            )
            if epoch_logger is not None:
                epoch_logger.log({k: v for k, v in metrics.items() if k != "epoch"}, epoch + 1)
            ckpt_dir = tempfile.mkdtemp(prefix="rshnl-ckpt-")
            save_model_file(
                Path(ckpt_dir) / WEIGHTS, core, arch, {"epoch": epoch + 1, "valid_map": vmap}
            )
            torch.save(
                {
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch,
                    "best_valid_map": best_map,
                    "best_epoch": best_epoch,
                    "torch_rng": torch.get_rng_state(),
                    "numpy_rng": np.random.get_state(),
                    "python_rng": random.getstate(),
                },
                Path(ckpt_dir) / STATE,
            )
            metrics.update(
                {
                    "center_checksums": checksums,
                    "seconds_per_epoch": float(np.mean(train_seconds)),
                    "noise_detection": {
                        "precision": float(det["precision"]),
                        "recall": float(det["recall"]),
                    },
                }
            )
        # Every epoch's checkpoint is scored by its validation MAP; Ray keeps the best and latest.
        checkpoint_obj = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=checkpoint_obj)
        if ckpt_dir is not None:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
