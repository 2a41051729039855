"""The streaming benchmark's pieces: the cache decision against the object store's size, the
per-epoch windows of the cluster samples, the size parser, and (slow tier) one small benchmark
run whose streamed split is checked row by row."""

from __future__ import annotations

import math

import pytest

from feature_store.store import open_dataset
from pipeline.config import ConfigError
from pipeline.experiments.streaming_bench import per_epoch
from pipeline.training.data import cached_in_memory


class _Version:
    def __init__(self, size: int) -> None:
        self.manifest = {"files": {"train.parquet": {"bytes": size}}}


@pytest.mark.parametrize(
    "size,limit,store,want",
    [
        (100, 1000, 0, True),  # object store unknown: the byte limit alone
        (100, 99, 0, False),
        (100, 1000, 400, True),  # exactly a quarter of the store
        (100, 1000, 399, False),  # more than a quarter of the store: streamed
        (3_000_000_000, 2 << 30, 10**12, False),  # over the byte limit whatever the store
    ],
)
def test_cache_decision_respects_the_object_store(size, limit, store, want):
    assert cached_in_memory(_Version(size), limit, store) is want


def _sample(t, rss, used=None, spilled=None, restored=0.0):
    s = {"t": t, "rss": rss}
    if used is not None:
        s |= {"store_used": used, "spilled": spilled, "restored": restored}
    return s


def test_per_epoch_windows_by_hand():
    samples = [
        _sample(0.5, {"driver": [(1, 10.0)], "train_worker": [(2, 5.0), (3, 7.0)]}, 1.0, 0.0),
        _sample(1.5, {"driver": [(1, 12.0)], "train_worker": [(2, 9.0), (3, 1.0)]}, 4.0, 2.0),
        _sample(2.5, {"driver": [(1, 11.0)]}, 3.0, 2.0),
        _sample(3.5, {"driver": [(1, 30.0)], "train_worker": [(2, 2.0)]}, 8.0, 7.0, 1.0),
        _sample(3.7, {"driver": [(1, 40.0)]}),  # no store stats in this sample
    ]
    got = per_epoch(samples, ends=[2.0, 4.0], start=0.0)
    e1, e2 = got
    assert e1["samples"] == 2 and e2["samples"] == 3
    assert e1["rss_by_role"]["driver"]["max_process"] == 12.0
    want = {"max_process": 9.0, "max_sum": 12.0, "processes": 2}
    assert e1["rss_by_role"]["train_worker"] == want
    assert e1["store_peak"] == 4.0 and e2["store_peak"] == 8.0
    # epoch 1 from its first sample (0 spilled) to its last (2); epoch 2 from epoch 1's last
    assert e1["spilled"] == 2.0 and e2["spilled"] == 5.0
    assert e2["restored"] == 1.0
    assert e2["rss_by_role"]["driver"]["max_process"] == 40.0


def test_per_epoch_without_store_stats_is_nan():
    (e,) = per_epoch([_sample(1.0, {"driver": [(1, 5.0)]})], ends=[2.0], start=0.0)
    assert math.isnan(e["store_peak"]) and e["spilled"] == 0.0


@pytest.mark.parametrize(
    "text,want", [("1GiB", 2**30), ("800MB", 800 * 10**6), ("123456", 123456), ("1.5gb", 1.5e9)]
)
def test_parse_bytes(text, want):
    from jobs.benchmark import parse_bytes

    assert parse_bytes(text) == want


@pytest.mark.parametrize("text", ["1XB", "GB", "-"])
def test_parse_bytes_refuses(text):
    from jobs.benchmark import parse_bytes

    with pytest.raises(ConfigError, match="object-store-memory"):
        parse_bytes(text)


@pytest.fixture
def own_ray():
    """The benchmark starts and stops its own Ray; the session's Ray is back afterwards."""
    import ray

    was = ray.is_initialized()
    if was:
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()
    if was:
        from conftest import SESSION_RAY

        ray.init(**SESSION_RAY)


@pytest.mark.slow
@pytest.mark.ray
def test_streaming_benchmark_sees_every_row_and_measures_memory(own_ray, tiny_dataset, tmp_path):
    from feature_store import schema as S
    from pipeline.config import TrainConfig
    from pipeline.experiments.streaming_bench import format_streaming, streaming_benchmark

    common = {
        "dataset": tiny_dataset, "epochs": 2, "workers": 2, "cpus_per_worker": 0.5, "bits": 16,
        "hidden_dim": 64, "warmup_epochs": 1, "register_model": False, "run_name": "",
        "storage_path": str(tmp_path / "runs"), "tracking_uri": f"sqlite:///{tmp_path}/m.db",
    }  # fmt: skip
    big = TrainConfig.from_dict(common | {"data_cache_max_bytes": 1})  # forced to stream
    small = TrainConfig.from_dict(common)
    r = streaming_benchmark(big, small, 200 * 10**6, interval=0.2)
    n = len(open_dataset(tiny_dataset).read_arrays("train", [S.ITEM_ID])[S.ITEM_ID])
    assert r["runs"]["streamed"]["in_memory"] is False and r["runs"]["fits"]["in_memory"] is True
    for run in r["runs"].values():
        assert [e["epoch"] for e in run["epochs"]] == [1, 2]
        for e in run["epochs"]:
            assert e["every_row_once"] and e["rows"] == n
            assert sorted(e["worker_peak_rss"]) == ["0", "1"]
            assert "train_worker" in e["rss_by_role"] and not math.isnan(e["store_peak"])
    assert r["streamed_over_fits_rows_per_s"] > 0
    assert "| streamed |" in format_streaming(r)
