"""The checkpoint policy (full checkpoints every N epochs and at the last, the best epoch's
weights carried in the latest one), resume from the last full checkpoint, and the streamed train
split seen once per epoch, checked against brute-force references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from feature_store.store import open_dataset
from pipeline.config import ConfigError, TrainConfig
from pipeline.method.weights import WEIGHTS, safe_load
from pipeline.training.final_eval import BEST
from pipeline.training.record import best_of_history, full_checkpoint
from pipeline.training.train_loop import id_checksum, rows_seen

M64 = 2**64


def _mix(i: int) -> int:
    """splitmix64's finaliser in Python integers (the reference for id_checksum)."""
    x = ((i % M64) + 0x9E3779B97F4A7C15) % M64
    x = (x * 0xBF58476D1CE4E5B9) % M64
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) % M64
    x ^= x >> 29
    return x


def _ref_checksum(ids) -> int:
    return (sum(_mix(int(i)) for i in ids) % M64) % (2**63)


@pytest.mark.parametrize("every,epochs", [(1, 4), (2, 5), (3, 9), (4, 3), (10, 7)])
def test_full_checkpoint_epochs(every, epochs):
    got = [e for e in range(1, epochs + 1) if full_checkpoint(e, every, epochs)]
    want = sorted({e for e in range(1, epochs + 1) if e % every == 0} | {epochs})
    assert got == want


@pytest.mark.parametrize("interval", [0.0, 25.0])
def test_full_checkpoint_after_an_interval(interval):
    """Every 10 epochs and at the last, plus once ``interval`` seconds have passed since the last
    full checkpoint (0: never); epochs of 10 s each, replayed by hand."""
    got, last = [], 0.0
    for e in range(1, 15):
        now = 10.0 * e
        if full_checkpoint(e, 10, 14, now - last, interval):
            got.append(e)
            last = now
    # 25 s: epochs 3 (30 s), 6, 9 by time; 10 by count; 13 (30 s after 10); 14, the last
    assert got == ([10, 14] if interval == 0 else [3, 6, 9, 10, 13, 14])


def test_checkpoint_every_is_validated():
    with pytest.raises(ConfigError, match="checkpoint_every"):
        TrainConfig(dataset="x", checkpoint_every=0).validate()
    with pytest.raises(ConfigError, match="checkpoint_interval_s"):
        TrainConfig(dataset="x", checkpoint_interval_s=-1).validate()


def test_best_of_history_reads_the_best_epoch():
    h = {"epoch": [1, 2, 3], "valid_map_i2t": [0.1, 0.5, 0.2]}
    h |= {"valid_map_t2i": [0.3, 0.4, 0.9], "valid_map_mean": [0.2, 0.45, 0.55]}
    assert best_of_history(h, 2) == {"i2t": 0.5, "t2i": 0.4, "mean": 0.45}
    assert best_of_history(h, 7) == {}


def test_rows_seen_counts_duplicates_and_missing_rows():
    rng = np.random.default_rng(0)
    ids = rng.permutation(np.arange(1000, 1500))
    assert id_checksum(ids) == _ref_checksum(ids)
    assert id_checksum(ids) == id_checksum(ids[::-1])  # order-free
    dup = np.concatenate([ids[:-1], ids[:1]])  # one row twice, one missing
    r = rows_seen(dup)
    assert r["count"] == 500 and r["distinct"] == 499
    assert r["checksum"] != id_checksum(ids)


def _cfg(dataset: str, root: Path, **kw) -> TrainConfig:
    base = dict(
        dataset=dataset,
        bits=16,
        hidden_dim=32,
        epochs=5,
        warmup_epochs=1,
        gamma=3.0,
        batch_size=64,
        lr=1e-3,
        workers=1,
        storage_path=str(root / "runs"),
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        experiment_name="ckpt",
        register_model=False,
        run_name="p1",
    )
    return TrainConfig(**(base | kw))


def _checkpoints(root: Path, run: str) -> dict[int, Path]:
    """Stored checkpoint directories of a run by the epoch of their train state."""
    out = {}
    for d in (root / "runs" / run).glob("checkpoint_*"):
        if (d / "train_state.pt").exists():
            out[int(safe_load(d / "train_state.pt")["epoch"]) + 1] = d
    return out


@pytest.mark.ray
def test_policy_keeps_best_weights_and_resumes_from_last_full(ray_cluster, tiny_dataset, tmp_path):
    from pipeline.training import trainer

    cfg = _cfg(tiny_dataset, tmp_path, checkpoint_every=2)
    s = trainer.run_training(cfg)
    h = s["history"]
    assert h["epoch"] == [1, 2, 3, 4, 5]
    # best epoch: the highest validation MAP, ties to the later epoch (brute force)
    means = h["valid_map_mean"]
    best = max(range(5), key=lambda i: (means[i], i)) + 1
    assert s["best_epoch"] == best
    assert s["best_valid_map"]["mean"] == pytest.approx(means[best - 1])
    assert s["best_valid_map"]["i2t"] == pytest.approx(h["valid_map_i2t"][best - 1])
    stored = _checkpoints(tmp_path, "p1")
    assert set(stored) <= {2, 4, 5} and 5 in stored  # full checkpoints only at 2, 4 and the last
    latest = stored[5]
    model_file = latest / BEST if best != 5 else latest / WEIGHTS
    assert (latest / BEST).exists() == (best != 5)
    blob = safe_load(model_file)
    assert blob["epoch"] == best
    assert blob["valid_map"]["mean"] == pytest.approx(means[best - 1])

    # resume from the last full checkpoint when the newest is lost: epochs 5.. are replayed
    snap_path = tmp_path / "runs" / "p1" / trainer.SNAPSHOT
    snap = json.loads(snap_path.read_text())
    assert {r["metrics"]["epoch"] for r in snap["checkpoint_results"]} <= {2, 4, 5}
    (latest / "train_state.pt").write_bytes(b"broken")
    r = trainer.run_training(
        _cfg(tiny_dataset, tmp_path, checkpoint_every=2, epochs=6, resume=True)
    )
    assert r["history"]["epoch"] == [1, 2, 3, 4, 5, 6]
    assert r["history"]["valid_map_mean"][:4] == pytest.approx(means[:4])
    assert r["epochs_run"] == 6
    means6 = r["history"]["valid_map_mean"]
    assert r["best_epoch"] == max(range(6), key=lambda i: (means6[i], i)) + 1


@pytest.mark.ray
def test_streamed_split_sees_every_row_once_per_epoch(ray_cluster, tiny_dataset, tmp_path):
    from pipeline.training import trainer

    ds = open_dataset(tiny_dataset)
    ids = ds.read_arrays("train", ["item_id"])["item_id"].tolist()
    cfg = _cfg(tiny_dataset, tmp_path, workers=2, epochs=2, data_cache_max_bytes=1, run_name="")
    s = trainer.run_training(cfg)
    assert s["in_memory"] is False  # the split is larger than the 1-byte cache limit
    assert [r["epoch"] for r in s["rows_seen"]] == [1, 2]
    for r in s["rows_seen"]:
        assert r["count"] == len(ids) and r["distinct"] == len(set(ids))
        assert r["checksum"] == _ref_checksum(ids)
    # every rank reported its memory at the end of every epoch (VmRSS ≤ VmHWM, both > 0)
    assert [u["epoch"] for u in s["worker_usage"]] == [1, 2]
    for u in s["worker_usage"]:
        assert sorted(u["ranks"]) == ["0", "1"]
        for v in u["ranks"].values():
            assert 0 < v["rss"] <= v["peak_rss"]
