"""Ray Train end to end on a tiny dataset: synchronized centers, MLflow run and registry."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from feature_store import schema as S
from feature_store.store import open_dataset
from pipeline.config import TrainConfig

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, tiny_dataset, tmp_path_factory):
    from pipeline.training.trainer import run_training

    root = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(
        dataset=tiny_dataset,
        bits=16,
        hidden_dim=32,
        epochs=3,
        warmup_epochs=1,
        gamma=3.0,
        batch_size=64,
        lr=1e-3,
        workers=2,
        center_sync_check_every=1,  # all-gather the centers after every step and assert equality
        storage_path=str(root / "runs"),
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        experiment_name="test",
        registered_model_name="rshnl-test",
    )
    return cfg, run_training(cfg)


def test_summary_contract(tiny_run):
    _, s = tiny_run
    for key in ("test_map", "best_valid_map"):
        assert set(s[key]) == {"i2t", "t2i", "mean"}
        assert s[key]["mean"] == pytest.approx((s[key]["i2t"] + s[key]["t2i"]) / 2)
    assert s["epochs_run"] == 3 and 1 <= s["best_epoch"] <= 3
    # the best epoch is the one with the highest validation MAP of the history
    valid = s["history"]["valid_map_mean"]
    assert len(valid) == 3 and s["best_valid_map"]["mean"] == pytest.approx(max(valid))
    assert valid[s["best_epoch"] - 1] == pytest.approx(max(valid))
    assert s["seconds_per_epoch"] > 0
    assert {"auc", "precision", "recall", "clean_mean_weight", "noisy_mean_weight"} <= set(
        s["noise_detection"]
    )
    # the summary's detection is the last epoch's
    assert s["noise_detection"]["auc"] == pytest.approx(s["history"]["noise_auc"][-1])
    assert s["restarts"] == 0
    reg = s["registered_model"]
    assert (reg["name"], reg["version"]) == ("rshnl-test", "1")
    assert reg["alias"] == "champion"  # the first version on this dataset version is the champion


def test_centers_identical_on_every_rank(tiny_run):
    _, s = tiny_run
    assert len(s["center_checksums"]) == 2
    assert len(set(s["center_checksums"])) == 1


def _brute_map(query: np.ndarray, db: np.ndarray, labels: np.ndarray) -> float:
    """MAP of each query against every database item, ranked by Hamming distance (ties by
    index), relevant when the labels intersect: a loop per query."""
    aps = []
    for i in range(len(query)):
        dist = [int(np.sum(query[i] != db[j])) for j in range(len(db))]
        rel = [bool(np.dot(labels[i], labels[j]) > 0) for j in range(len(db))]
        hits, total = 0, 0.0
        for pos, j in enumerate(sorted(range(len(db)), key=lambda j: (dist[j], j)), start=1):
            if rel[j]:
                hits += 1
                total += hits / pos
        aps.append(total / max(sum(rel), 1))
    return float(np.mean(aps))


def test_mlflow_run_metrics_and_registered_model(tiny_run):
    cfg, s = tiny_run
    client = mlflow.tracking.MlflowClient(cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    run = client.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["gamma"] == "3.0" and run.data.params["bits"] == "16"
    assert run.data.tags["data_version"] == open_dataset(cfg.dataset).data_version
    assert "code_digest" in run.data.tags and "git_commit" in run.data.tags
    history = client.get_metric_history(run.info.run_id, "valid_map_mean")
    assert [m.step for m in history] == [1, 2, 3]
    for key in (
        "loss_chl",
        "loss_center",
        "zero_weight_share",
        "noise_precision",
        "noise_recall",
        "noise_auc",
        "noise_clean_mean_weight",
    ):
        assert len(client.get_metric_history(run.info.run_id, key)) == 3
    assert run.data.metrics["final/test_map_mean"] == pytest.approx(s["test_map"]["mean"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "dataset_manifest.json", "final_metrics.json"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert len(plots) >= 4 and all(p.endswith(".png") for p in plots)  # MAP, losses, PR, weights
    mv = client.get_model_version("rshnl-test", "1")
    assert mv.run_id == s["mlflow_run_id"]

    mlflow.set_tracking_uri(cfg.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/rshnl-test/1")
    ds = open_dataset(cfg.dataset)
    feats = ds.read_arrays("test", [S.IMAGE, S.TEXT])
    img = model.predict(feats[S.IMAGE].astype(np.float32), params={"modality": "image"})
    txt = model.predict(feats[S.TEXT].astype(np.float32), params={"modality": "text"})
    assert img.shape == (48, 16) and txt.shape == (48, 16)
    assert set(np.unique(img)) <= {-1, 1}
    # the summary's test MAP is the registered model's, by a brute-force ranking of its codes
    labels = ds.read_arrays("test", [S.LABEL])[S.LABEL]
    i2t, t2i = _brute_map(img, txt, labels), _brute_map(txt, img, labels)
    assert s["test_map"]["i2t"] == pytest.approx(i2t, abs=1e-9)
    assert s["test_map"]["t2i"] == pytest.approx(t2i, abs=1e-9)
    with pytest.raises(Exception, match=r"shape \(n, 24\)"):
        model.predict(feats[S.TEXT].astype(np.float32), params={"modality": "image"})


def test_worker_batches_carry_no_clean_labels(ray_cluster, tiny_dataset, tmp_path):
    """The batches a training worker receives hold only features, observed labels and ids."""
    import json

    import ray.train
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.training.data import training_dataset

    out = str(tmp_path)

    def probe(_config):
        seen, ids = set(), []
        for batch in ray.train.get_dataset_shard("train").iter_batches(batch_size=32):
            seen |= set(batch)
            ids += [int(i) for i in batch[S.ITEM_ID]]
        rank = ray.train.get_context().get_world_rank()
        with open(f"{out}/rank{rank}.json", "w") as f:  # the local cluster shares tmp_path
            json.dump({"columns": sorted(seen), "item_ids": ids}, f)

    ds = open_dataset(tiny_dataset)
    trainer = TorchTrainer(
        probe,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        datasets={"train": training_dataset(ds, seed=0, workers=2, in_memory=True)},
    )
    trainer.fit()
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for probe_out in seen:  # every worker saw batches, with exactly the training columns
        assert probe_out["columns"] == sorted(S.TRAINING_COLUMNS)
        assert S.CLEAN_LABEL not in probe_out["columns"] and S.IS_NOISY not in probe_out["columns"]
        assert probe_out["item_ids"]
    # the two shards are disjoint and together the whole train split
    train_ids = ds.read_arrays("train", [S.ITEM_ID])[S.ITEM_ID].tolist()
    assert not set(seen[0]["item_ids"]) & set(seen[1]["item_ids"])
    assert sorted(seen[0]["item_ids"] + seen[1]["item_ids"]) == sorted(train_ids)
    ray_ds = training_dataset(ds, seed=0, workers=2, in_memory=False)
    assert sorted(ray_ds.columns()) == sorted(S.TRAINING_COLUMNS)
    batch = ray_ds.take_batch(8)
    assert S.CLEAN_LABEL not in batch and S.IS_NOISY not in batch


def test_suspect_report_is_logged_with_the_run(tiny_run, tmp_path):
    import pyarrow.parquet as pq

    cfg, s = tiny_run
    client = mlflow.tracking.MlflowClient(cfg.tracking_uri)
    names = {a.path for a in client.list_artifacts(s["mlflow_run_id"])}
    assert {"suspect_labels.parquet", "suspect_labels.md"} <= names
    local = client.download_artifacts(s["mlflow_run_id"], "suspect_labels.parquet", str(tmp_path))
    t = pq.read_table(local)
    ds = open_dataset(cfg.dataset)
    train = ds.read_arrays("train", [S.ITEM_ID, S.LABEL, S.IS_NOISY])
    assert sorted(t.column("item_id").to_pylist()) == sorted(train[S.ITEM_ID].tolist())
    score = np.asarray(t.column("score"))
    assert (np.diff(score) <= 0).all() and t.column("rank").to_pylist()[:3] == [1, 2, 3]
    by_id = dict(
        zip(train[S.ITEM_ID].tolist(), train[S.LABEL].argmax(axis=1).tolist(), strict=True)
    )
    assert all(
        by_id[i] == c
        for i, c in zip(t.column("item_id").to_pylist(), t.column("label").to_pylist(), strict=True)
    )
    noisy = dict(zip(train[S.ITEM_ID].tolist(), train[S.IS_NOISY].tolist(), strict=True))
    top10 = np.mean([noisy[i] for i in t.column("item_id").to_pylist()[:10]])
    assert s["suspect_labels"]["precision_at"]["10"] == pytest.approx(top10)
    assert s["suspect_labels"]["rows"] == len(by_id)


@pytest.mark.ray
def test_streamed_split_reads_row_groups_in_a_new_seeded_order_each_epoch(ray_cluster, tmp_path):
    """The streamed path: every row once per epoch with a noisy copy's labels, whole row groups
    in an order that changes between epochs and repeats for the same seed."""
    import pyarrow.parquet as pq

    from feature_store.store import write_noisy_copy, write_version
    from feature_store.synthetic import generate_plan
    from pipeline.training.data import streamed_row_groups

    plan = generate_plan(
        num_classes=5, counts={"train": 60, "valid": 12, "test": 20}, image_dim=6, text_dim=4,
        seed=1,
    )  # fmt: skip
    base = write_version(str(tmp_path), "syn", plan, rows_per_group=7)
    ds = open_dataset(write_noisy_copy(base, mode="symmetric", rate=0.5, seed=3))
    want = ds.read_arrays("train", [S.ITEM_ID, S.LABEL])
    label_of = {int(i): tuple(row) for i, row in zip(want[S.ITEM_ID], want[S.LABEL], strict=True)}
    meta = pq.ParquetFile(ds.parquet_scan("train").path).metadata
    groups = []  # the item ids of each row group, read with pyarrow directly
    ids_in_file = pq.read_table(ds.parquet_scan("train").path, columns=[S.ITEM_ID])[S.ITEM_ID]
    start = 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        groups.append(ids_in_file[start : start + n].to_pylist())
        start += n

    def epochs(seed: int, count: int) -> list[list[int]]:
        rd = streamed_row_groups(ds, "train", seed)
        out = []
        for _ in range(count):
            ids, orders = [], []
            for b in rd.iter_batches(batch_size=None):
                assert [label_of[int(i)] for i in b[S.ITEM_ID]] == [tuple(r) for r in b[S.LABEL]]
                ids += [int(i) for i in b[S.ITEM_ID]]
            pos = 0
            while pos < len(ids):  # the stream is whole row groups, one after another
                g = next(g for g, grp in enumerate(groups) if grp[0] == ids[pos])
                assert ids[pos : pos + len(groups[g])] == groups[g]
                orders.append(g)
                pos += len(groups[g])
            assert sorted(orders) == list(range(len(groups)))  # each row group once
            out.append(orders)
        return out

    first = epochs(5, 3)
    assert len({tuple(o) for o in first}) > 1  # the order changes between epochs
    assert epochs(5, 3) == first  # and repeats for the same seed
