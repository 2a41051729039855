"""One training epoch, the same for the Ray Train worker, the in-process executor and the benchmark.

Shuffle, batches, optimizer steps, SCBCH pair weights and per-item records (ℓ_i, w_i, the
predicted class) live here; Ray, MLflow and checkpoints stay with the callers (no Ray, no MLflow).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.config import TrainConfig
from pipeline.method.losses import LossMixture, fit_loss_mixture
from pipeline.training.data import local_shuffle_seed
from pipeline.training.reliability import rank_reliability
from pipeline.training.step import compute_loss, needs_loss_mixture

Batch = dict[str, torch.Tensor]


@dataclass
class MemoryShard:
    """A worker's training rows in memory, sorted by item id (where every shuffle starts)."""

    item_id: torch.Tensor  # int64, on the CPU
    image: torch.Tensor
    text: torch.Tensor
    label: torch.Tensor

    @classmethod
    def from_batches(cls, batches: Iterable[Batch], device: torch.device | str) -> MemoryShard:
        parts: dict[str, list[torch.Tensor]] = {"item_id": [], "image": [], "text": [], "label": []}
        for b in batches:
            for k, v in parts.items():
                v.append(b[k].cpu())
        cols = {k: torch.cat(v) if v else torch.zeros(0) for k, v in parts.items()}
        return cls.from_arrays(
            cols["item_id"].numpy(), cols["image"], cols["text"], cols["label"], device
        )

    @classmethod
    def from_arrays(
        cls, item_id: Any, image: Any, text: Any, label: Any, device: torch.device | str
    ) -> MemoryShard:
        ids = np.array(item_id, dtype=np.int64)  # a writable copy
        order = torch.as_tensor(np.argsort(ids, kind="stable"))

        def put(x: Any) -> torch.Tensor:
            return torch.as_tensor(np.array(x, dtype=np.float32))[order].to(device)

        return cls(torch.as_tensor(ids)[order], put(image), put(text), put(label))

    def __len__(self) -> int:
        return int(self.item_id.shape[0])

    def batches(self, batch_size: int, seed: int, epoch: int, rank: int = 0) -> Iterator[Batch]:
        """This epoch's batches: a permutation seeded by (seed, epoch, rank), cut in order."""
        gen = torch.Generator().manual_seed(local_shuffle_seed(seed, epoch, rank))
        perm = torch.randperm(len(self), generator=gen)
        dev_perm = perm.to(self.image.device)
        for s in range(0, len(self), batch_size):
            rows, dev_rows = perm[s : s + batch_size], dev_perm[s : s + batch_size]
            yield {
                "item_id": self.item_id[rows],
                "image": self.image[dev_rows],
                "text": self.text[dev_rows],
                "label": self.label[dev_rows],
            }


@dataclass
class PairWeights:
    """Per-item weights (SCBCH's reliability) looked up by item id."""

    sorted_ids: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def of(cls, item_id: Any, weights: torch.Tensor) -> PairWeights:
        ids = torch.as_tensor(np.array(item_id, dtype=np.int64))
        order = torch.argsort(ids, stable=True)
        return cls(ids[order], weights.cpu()[order])

    def lookup(self, item_id: torch.Tensor) -> torch.Tensor:
        """The weights of ``item_id``; KeyError for an id that has none."""
        ids = item_id.cpu()
        pos = torch.searchsorted(self.sorted_ids, ids).clamp_max(max(len(self.sorted_ids) - 1, 0))
        found = self.sorted_ids[pos] == ids if len(self.sorted_ids) else torch.zeros_like(ids) > 0
        if not bool(found.all()):
            missing = ids[~found][:5].tolist()
            raise KeyError(f"no reliability weight for item id(s) {missing}")
        return self.weights[pos]


def epoch_pair_weights(
    model: torch.nn.Module,
    rows: dict[str, np.ndarray] | None,
    cfg: TrainConfig,
    epoch: int,
    device: torch.device | str,
) -> PairWeights | None:
    """SCBCH's reliability weights of every training item for this epoch; None in warm-up and
    for RSHNL. ``rows`` (item_id, image, text, label) are the rows this rank owns: under
    torch.distributed the ranks' rows together are the training set, each rank encodes only its
    own and the kNN is sharded (:func:`pipeline.training.reliability.rank_reliability`); in one
    process they are the whole train split."""
    if rows is None or cfg.method != "scbch" or epoch < cfg.warmup_epochs:
        return None
    ids, w = rank_reliability(model, rows, cfg, device)
    return PairWeights.of(ids, torch.from_numpy(w))


def next_mixture(
    cfg: TrainConfig, ell: np.ndarray, current: LossMixture | None
) -> LossMixture | None:
    """The loss mixture the next epoch uses, fitted on this epoch's ℓ_i of the whole training
    set (the same on every rank), when the config needs one."""
    return fit_loss_mixture(ell) if needs_loss_mixture(cfg) and ell.size else current


@dataclass
class EpochResult:
    """What one epoch did: mean losses over its items, per-item records in visiting order."""

    loss: float
    chl: float
    center: float
    items: int
    steps: int
    item_id: np.ndarray
    ell: np.ndarray
    weight: np.ndarray
    predicted: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)  # data_wait, step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    cfg: TrainConfig,
    epoch: int,
    *,
    global_negatives: bool = False,
    mixture: LossMixture | None = None,
    pair_weights: PairWeights | None = None,
    after_step: Callable[[], None] | None = None,
) -> EpochResult:
    """Run the optimizer over ``batches`` once (Eq 9 per batch via ``compute_loss``)."""
    sums = torch.zeros(4, dtype=torch.float64)  # total, chl, center, n
    ids_l, ell_l, w_l, pred_l = [], [], [], []
    t = {"data_wait": 0.0, "step": 0.0}
    steps, it = 0, iter(batches)
    while True:
        t0 = time.perf_counter()
        batch = next(it, None)
        t["data_wait"] += time.perf_counter() - t0
        if batch is None:
            break
        t0 = time.perf_counter()
        image = batch["image"]
        w = None if pair_weights is None else pair_weights.lookup(batch["item_id"]).to(image.device)
        terms = compute_loss(
            model, image, batch["text"], batch["label"], cfg, epoch, global_negatives, w, mixture
        )
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()  # under DDP the gradients are all-reduced here
        optimizer.step()
        _sync(image.device)
        t["step"] += time.perf_counter() - t0
        steps += 1
        n = image.shape[0]
        sums += torch.tensor(
            [terms.total.item() * n, terms.chl.item() * n, terms.center.item() * n, n],
            dtype=torch.float64,
        )
        ids_l.append(batch["item_id"].cpu())
        ell_l.append(terms.ell.detach().double().cpu())
        w_l.append(terms.weights.detach().double().cpu())
        pred = terms.predicted if terms.predicted is not None else torch.full((n,), -1)
        pred_l.append(pred.cpu())
        if after_step is not None:
            after_step()
    n = max(sums[3].item(), 1.0)

    def cat(parts: list[torch.Tensor], dtype: Any) -> np.ndarray:
        return torch.cat(parts).numpy().astype(dtype) if parts else np.zeros(0, dtype=dtype)

    return EpochResult(
        loss=sums[0].item() / n,
        chl=sums[1].item() / n,
        center=sums[2].item() / n,
        items=int(sums[3].item()),
        steps=steps,
        item_id=cat(ids_l, np.int64),
        ell=cat(ell_l, np.float64),
        weight=cat(w_l, np.float64),
        predicted=cat(pred_l, np.int64),
        seconds=t,
    )
