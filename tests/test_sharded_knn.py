"""The sharded cross-modal kNN of SCBCH's reliability weights against brute force: 1, 2 and 3
uneven shards, exact ties, self-exclusion, k clipping, and the torch.distributed path."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import references as R
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import TrainConfig
from pipeline.method import knn
from pipeline.method.scbch import reliability_weights
from pipeline.training.epoch import epoch_pair_weights
from pipeline.training.reliability import rank_reliability
from pipeline.training.step import build_model

# ---------- data ----------


def _continuous(n=90, bits=8, k_labels=5, seed=0):
    rng = np.random.default_rng(seed)
    img = np.tanh(rng.standard_normal((n, bits))).astype(np.float32)
    txt = np.tanh(img + 0.5 * rng.standard_normal((n, bits))).astype(np.float32)
    labels = (rng.random((n, k_labels)) < 0.35).astype(np.float32)
    labels[3] = 0.0  # an item without labels: its weight is g
    return img, txt, labels


def _tied(n=80, bits=16, seed=1):
    """±1 codes of 16 bits (exact float arithmetic) with a block of identical items: many
    exactly equal similarities at the k-th place."""
    rng = np.random.default_rng(seed)
    img = np.where(rng.random((n, bits)) < 0.5, -1.0, 1.0).astype(np.float32)
    txt = np.where(rng.random((n, bits)) < 0.5, -1.0, 1.0).astype(np.float32)
    img[10:45], txt[10:45] = img[10], img[10]  # 35 identical items, sim 1 to each other: more
    # than k + 1 + extra of them tie at the top
    labels = (rng.random((n, 4)) < 0.4).astype(np.float32)
    return img, txt, labels


def _split(n, sizes):
    assert sum(sizes) == n
    return np.split(np.arange(n), np.cumsum(sizes)[:-1])


SHARDINGS = {1: [None], 2: [[13, 77], [50, 40]], 3: [[5, 60, 25], [1, 1, 88]]}


def _shardings(n):
    for w, options in SHARDINGS.items():
        for sizes in options:
            sizes = [n] if sizes is None else [*sizes[:-1], n - sum(sizes[:-1])]
            yield w, sizes


def _sharded(img, txt, labels, ids, sizes, k, g, **kw):
    parts = _split(len(ids), sizes)
    out = knn.sharded_reliability(
        [(ids[p], img[p], txt[p], labels[p]) for p in parts], k=k, g=g, **kw
    )
    return np.concatenate(out)


def _sharded_neighbours(img, txt, ids, sizes, k):
    parts = _split(len(ids), sizes)
    q = knn.cross_modal_vectors(img, txt)
    indexes = [knn.ShardIndex.build(q[p], ids[p]) for p in parts]
    return knn.merge_topk([ix.topk(q, ids, k) for ix in indexes], k)


# ---------- tests ----------


@pytest.mark.parametrize("data", [_continuous, _tied])
def test_sharded_weights_equal_brute_force_for_1_2_3_uneven_shards(data):
    img, txt, labels = data()
    n, k, g = img.shape[0], 6, 0.3
    ids = np.arange(n, dtype=np.int64)
    ref = R.reliability_weights_loop(img, txt, labels, ids, k, g)
    torch_ref = reliability_weights(
        torch.from_numpy(img), torch.from_numpy(txt), torch.from_numpy(labels), k=k, g=g
    ).numpy()
    np.testing.assert_allclose(torch_ref, ref, atol=1e-6)  # the two references agree
    first = None
    for _, sizes in _shardings(n):
        w = _sharded(img, txt, labels, ids, sizes, k, g)
        np.testing.assert_allclose(w, ref, atol=1e-6)
        np.testing.assert_allclose(w, torch_ref, atol=1e-6)
        if first is None:
            first = w
        np.testing.assert_array_equal(w, first)  # bit-identical whatever the sharding
    assert np.isclose(first[3], g) or labels[3].sum() > 0


@pytest.mark.parametrize("data", [_continuous, _tied])
def test_neighbour_sets_and_tie_rule_match_brute_force(data):
    img, txt, _ = data()
    n, k = img.shape[0], 6
    # ids not in row order: the tie rule follows the item id, self-exclusion the id too
    ids = np.random.default_rng(5).permutation(np.arange(1000, 1000 + 3 * n, 3)).astype(np.int64)
    ref = R.reliability_neighbours_loop(img, txt, ids, k)
    for _, sizes in _shardings(n):
        scores, nbr = _sharded_neighbours(img, txt, ids, sizes, k)
        for i in range(n):
            assert [t[1] for t in ref[i]] == nbr[i].tolist(), (sizes, i)
            np.testing.assert_allclose(0.5 * scores[i], [t[0] for t in ref[i]], atol=1e-12)
            assert ids[i] not in nbr[i]


def test_ties_beyond_the_proposed_candidates_are_resolved_by_the_full_scan(monkeypatch):
    img, txt, _ = _tied()
    ids = np.arange(img.shape[0], dtype=np.int64)
    q = knn.cross_modal_vectors(img, txt)
    scans = []
    full_scan = knn.ShardIndex._full_scan
    monkeypatch.setattr(
        knn.ShardIndex, "_full_scan", lambda self, *a: scans.append(a[1]) or full_scan(self, *a)
    )
    scores, nbr = knn.ShardIndex.build(q, ids).topk(q[40:42], ids[40:42], 4)
    # items 40 and 41 are among 35 identical items tied at sim 1: the 4 smallest other ids win
    assert nbr.tolist() == [[10, 11, 12, 13], [10, 11, 12, 13]]
    assert np.all(scores == 2.0)
    assert scans == [40, 41]


def test_k_is_clipped_to_n_minus_one_and_a_single_item_gets_g():
    img, txt, labels = _continuous(n=4)
    ids = np.arange(4, dtype=np.int64)
    ref = R.reliability_weights_loop(img, txt, labels, ids, 20, 0.5)
    for sizes in ([4], [1, 3], [2, 1, 1]):
        np.testing.assert_allclose(_sharded(img, txt, labels, ids, sizes, 20, 0.5), ref, atol=1e-6)
    one = knn.sharded_reliability([(ids[:1], img[:1], txt[:1], labels[:1])], k=20, g=0.25)
    assert one[0].tolist() == [0.25]


def test_ivf_with_every_list_probed_finds_the_exact_neighbours():
    img, txt, labels = _continuous(n=400, bits=16, seed=3)
    ids = np.arange(400, dtype=np.int64)
    exact = _sharded(img, txt, labels, ids, [150, 250], 5, 0.5)
    ivf = _sharded(img, txt, labels, ids, [150, 250], 5, 0.5, kind="ivf", nprobe=10_000)
    np.testing.assert_array_equal(ivf, exact)
    with pytest.raises(ValueError, match="unknown kNN index kind"):
        knn.ShardIndex.build(knn.cross_modal_vectors(img, txt), ids, kind="hnsw")


def _cfg(**kw) -> TrainConfig:
    base = dict(dataset="unused", method="scbch", bits=8, hidden_dim=16, scbch_k=5, scbch_g=0.4)
    return TrainConfig(**(base | kw))


def _model_and_rows(n=70, seed=0):
    torch.manual_seed(seed)
    model = build_model(_cfg(), {"image": 12, "text": 10}, 4).eval()
    rng = np.random.default_rng(seed)
    rows = {
        "item_id": rng.permutation(n).astype(np.int64) + 100,
        "image": rng.standard_normal((n, 12)).astype(np.float32),
        "text": rng.standard_normal((n, 10)).astype(np.float32),
        "label": (rng.random((n, 4)) < 0.4).astype(np.float32),
    }
    return model, rows


def test_epoch_pair_weights_equal_the_whole_set_reference_in_one_process():
    model, rows = _model_and_rows()
    order = np.argsort(rows["item_id"])  # the reference's tie key is the row position
    sorted_rows = {key: v[order] for key, v in rows.items()}
    with torch.no_grad():  # the whole-set computation on the full code matrices
        ref = reliability_weights(
            model.encode(torch.from_numpy(sorted_rows["image"]), "image"),
            model.encode(torch.from_numpy(sorted_rows["text"]), "text"),
            torch.from_numpy(sorted_rows["label"]),
            k=5,
            g=0.4,
            neighbours="intra",  # the default upstream form's rule
        )
    pw = epoch_pair_weights(model, rows, _cfg(), epoch=5, device="cpu")
    got = pw.lookup(torch.as_tensor(sorted_rows["item_id"]))
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    assert epoch_pair_weights(model, rows, _cfg(warmup_epochs=6), epoch=5, device="cpu") is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, sizes: list[int], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, rows = _model_and_rows()
        part = _split(len(rows["item_id"]), sizes)[rank]
        mine = {key: v[part] for key, v in rows.items()}
        ids, w = rank_reliability(model, mine, _cfg(), "cpu", chunk=16)  # several rounds
        np.savez(f"{out}/rank{rank}.npz", ids=ids, w=w)
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_derive_the_one_process_weights(tmp_path):
    model, rows = _model_and_rows()
    ids1, w1 = rank_reliability(model, rows, _cfg(), "cpu")
    one = dict(zip(ids1.tolist(), w1.tolist(), strict=True))
    sizes = [9, 40, 21]  # uneven; rank 0 has fewer rows than one round of another
    mp.spawn(_worker, args=(3, _free_port(), sizes, str(tmp_path)), nprocs=3, join=True)
    for rank in range(3):
        got = np.load(tmp_path / f"rank{rank}.npz")
        assert sorted(got["ids"].tolist()) == sorted(one)
        assert [one[i] for i in got["ids"].tolist()] == got["w"].tolist()  # bit-identical


def test_pair_weights_look_up_by_id_and_refuse_unknown_ids():
    from pipeline.training.epoch import PairWeights

    pw = PairWeights.of(np.array([30, 10, 20]), torch.tensor([0.3, 0.1, 0.2]))
    got = pw.lookup(torch.tensor([20, 30, 10, 20]))
    assert got.tolist() == pytest.approx([0.2, 0.3, 0.1, 0.2])
    for unknown in ([15], [40], [5], [10, 25]):
        with pytest.raises(KeyError, match="no reliability weight"):
            pw.lookup(torch.tensor(unknown))
