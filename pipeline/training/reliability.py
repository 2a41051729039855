"""SCBCH's per-epoch reliability weights across ranks: each rank encodes only the training rows it
owns and searches its own shard index; the neighbour math is :mod:`pipeline.method.knn`.

What crosses ranks per refresh: every rank's queries in rounds of ``chunk`` rows (float32, 2L per
item; at most W·chunk rows held at a time), each shard's top k per query (2·sim, item id), the
labels once (uint8 multi-hot, K per item) and the final weights (N floats, so that a rank can
look up any row a streamed epoch hands it). Features and the full code matrix are never
replicated. Every rank's weights are identical to a one-process run of
:func:`pipeline.method.knn.sharded_reliability` (the merge is order-invariant) and, with
``scbch_knn = "flat"``, to the exact kNN of :func:`pipeline.method.scbch.reliability_weights`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from feature_store import schema as S
from pipeline.config import TrainConfig
from pipeline.method import knn
from pipeline.training.step import is_distributed, scbch_neighbours

log = logging.getLogger(__name__)

Rows = dict[str, np.ndarray]
ROW_COLUMNS = (S.ITEM_ID, S.IMAGE, S.TEXT, S.LABEL)


def memory_rows(shard: Any) -> Rows:
    """A rank's in-memory rows (a ``MemoryShard``) as NumPy arrays (copied off a GPU only)."""
    cols = {
        S.ITEM_ID: shard.item_id,
        S.IMAGE: shard.image,
        S.TEXT: shard.text,
        S.LABEL: shard.label,
    }
    return {k: v.detach().cpu().numpy() for k, v in cols.items()}


def strided_rows(ds: Any, rank: int, world: int, split: str = "train") -> Rows:
    """Rows ``rank::world`` of a split, read one row group at a time (for a streamed split,
    whose rows a rank does not hold)."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in ROW_COLUMNS}
    pos = 0
    for t in ds.iter_batches(split, list(ROW_COLUMNS)):
        keep = np.flatnonzero((np.arange(pos, pos + t.num_rows) % world) == rank)
        pos += t.num_rows
        if keep.size == 0:
            continue
        t = t.take(keep)
        for c in ROW_COLUMNS:
            arr = t.column(c).combine_chunks()
            parts[c].append(
                S.to_matrix(arr) if c != S.ITEM_ID else arr.to_numpy(zero_copy_only=False)
            )
    return {c: np.concatenate(v) for c, v in parts.items() if v} if parts[S.ITEM_ID] else {}


def owned_rows(ds: Any, rank: int, world: int, memory: Rows | None = None) -> Rows:
    """The rows this rank encodes for the kNN: its in-memory shard when the ranks' shards
    together hold the whole train split (checked by count), else rows ``rank::world`` of it."""
    rows = int(ds.manifest["counts"]["train"])
    if memory is not None:
        held = sum(_all_gather(int(memory[S.ITEM_ID].shape[0])))
        if held == rows:
            return memory
        log.info("rank shards hold %d of %d train rows; the kNN reads rows rank::world", held, rows)
    return strided_rows(ds, rank, world)


@torch.no_grad()
def encode_rows(
    model: Any, image: np.ndarray, text: np.ndarray, batch: int, device: Any
) -> tuple[np.ndarray, np.ndarray]:
    """The continuous image and text codes of rows (float32 NumPy), ``batch`` rows at a time."""
    out: list[list[np.ndarray]] = [[], []]
    bits = int(model.bits)
    for s in range(0, image.shape[0], batch):
        for j, (x, m) in enumerate(((image, "image"), (text, "text"))):
            xb = torch.as_tensor(np.asarray(x[s : s + batch], dtype=np.float32), device=device)
            out[j].append(model.encode(xb, m).float().cpu().numpy())
    img, txt = (np.concatenate(p) if p else np.zeros((0, bits), np.float32) for p in out)
    return img, txt


def _all_gather(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def rank_reliability(
    model: Any, rows: Rows, cfg: TrainConfig, device: Any, chunk: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """(item ids, weights) of every training item, the same on every rank; ``rows`` are the
    rows this rank owns (disjoint across ranks, together the training set)."""
    rank = dist.get_rank() if is_distributed() else 0
    ids = np.asarray(rows.get(S.ITEM_ID, np.zeros(0)), dtype=np.int64)
    bits = int(model.bits)
    if ids.size:
        img, txt = encode_rows(model, rows[S.IMAGE], rows[S.TEXT], cfg.eval_batch_size, device)
        labels = np.asarray(rows[S.LABEL], dtype=np.float32)
    else:
        img = txt = np.zeros((0, bits), np.float32)
        labels = np.zeros((0, 0), np.float32)
    queries = knn.cross_modal_vectors(img, txt)
    neighbours = scbch_neighbours(cfg)
    index = knn.ShardIndex.build(
        queries,
        ids,
        kind=cfg.scbch_knn,
        nprobe=cfg.scbch_knn_nprobe,
        seed=cfg.seed + rank,
        neighbours=neighbours,
    )
    gathered = _all_gather((ids, knn.compact_labels(labels)))
    table = knn.LabelTable.of(
        np.concatenate([g[0] for g in gathered]),
        np.concatenate([g[1] for g in gathered if g[0].size]),
    )
    k = knn.effective_k(cfg.scbch_k, len(table))
    rounds = max(-(-g[0].size // chunk) for g in gathered)
    weights = np.empty(ids.size, dtype=np.float32)
    for t in range(rounds):
        sl = slice(t * chunk, (t + 1) * chunk)
        round_queries = _all_gather((queries[sl], ids[sl]))
        found = [index.topk(q, qid, k) for q, qid in round_queries]
        mine = [part[rank] for part in _all_gather(found)]  # every shard's top k of my queries
        if ids[sl].size:
            scores, nbr = knn.merge_topk(mine, k)
            weights[sl] = knn.neighbour_weights(
                scores, nbr, labels[sl], table, cfg.scbch_g, neighbours
            )
    every = _all_gather((ids, weights))
    return np.concatenate([e[0] for e in every]), np.concatenate([e[1] for e in every])
