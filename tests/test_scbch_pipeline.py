"""SCBCH in the pipeline: reliability weights across workers, the model and its loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo_util import finish_worker
from synthetic_util import write_synthetic

from pipeline.config import TrainConfig
from pipeline.method.model import RSHNLModel
from pipeline.method.scbch import reliability_weights
from pipeline.training.reliability import rank_reliability
from pipeline.training.step import build_model, compute_loss

N, K, DI, DT = 37, 6, 5, 4


def _data():
    rng = np.random.default_rng(2)
    image = rng.normal(size=(N, DI)).astype(np.float32)
    text = rng.normal(size=(N, DT)).astype(np.float32)
    label = (rng.random((N, K)) < 0.3).astype(np.float32)
    label[np.arange(N), rng.integers(0, K, N)] = 1.0
    return image, text, label


def _cfg(form: str = "upstream") -> TrainConfig:
    return TrainConfig(
        dataset="x", method="scbch", bits=8, hidden_dim=16, scbch_k=4, eval_batch_size=5,
        scbch_form=form,
    )  # fmt: skip


def _model(form: str = "upstream") -> RSHNLModel:
    torch.manual_seed(0)
    return build_model(_cfg(form), {"image": DI, "text": DT}, K)


def _rows(part: slice | np.ndarray = slice(None)) -> dict[str, np.ndarray]:
    image, text, label = _data()
    ids = np.arange(N, dtype=np.int64) + 1000
    return {"item_id": ids[part], "image": image[part], "text": text[part], "label": label[part]}


def _worker(rank: int, init: str, out: str, form: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    ids, w = rank_reliability(_model(form), _rows(np.arange(rank, N, 2)), _cfg(form), "cpu")
    Path(out, f"{rank}.json").write_text(
        json.dumps(dict(zip(ids.tolist(), w.tolist(), strict=True)))
    )
    finish_worker()


@pytest.mark.parametrize("form", ["project", "upstream"])
def test_weights_are_equal_on_one_and_two_workers(tmp_path, form):
    """Ranks owning rows rank::2 derive every item's weight, the same on both and equal to the
    whole-set computation on the full code matrices."""
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), form), nprocs=2)
    two = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    ids1, w1 = rank_reliability(_model(form), _rows(), _cfg(form), "cpu")
    one = dict(zip((str(i) for i in ids1.tolist()), w1.tolist(), strict=True))
    assert two[0] == two[1]  # every rank holds the same weights
    assert two[0].keys() == one.keys()
    assert max(abs(one[i] - two[0][i]) for i in one) < 1e-6
    image, text, label = _data()
    m = _model(form)
    with torch.no_grad():
        ref = reliability_weights(
            m.encode(torch.from_numpy(image), "image"),
            m.encode(torch.from_numpy(text), "text"),
            torch.from_numpy(label),
            k=4,
            g=0.5,
            neighbours="intra" if form == "upstream" else "cross",
        )
    got = [one[str(1000 + i)] for i in range(N)]
    assert got == pytest.approx(ref.tolist(), abs=1e-6)
    assert min(got) >= 0.5 and max(got) <= 1.0


@pytest.mark.parametrize("form", ["project", "upstream"])
def test_scbch_model_has_classifiers_and_tanh_codes(form):
    m = _model(form)
    image, text, label = (torch.from_numpy(a[:8]) for a in _data())
    u_img, _, _, lg_img, lg_txt = m(image, text)
    assert lg_img.shape == (8, K) and lg_txt.shape == (8, K)
    unit = torch.allclose(u_img.norm(dim=1), torch.ones(8))
    assert unit == (form == "upstream")  # only the upstream form L2-normalises the codes
    assert u_img.abs().max() < 1
    terms = compute_loss(m, image, text, label, _cfg(form).replace(warmup_epochs=0), 3, False,
                         torch.full((8,), 0.5))  # fmt: skip
    terms.total.backward()
    assert all(p.grad is not None for p in m.parameters())  # no unused parameter under DDP
    assert terms.weights.tolist() == [0.5] * 8 and not terms.warmup


def test_warmup_ignores_weights():
    m = _model()
    image, text, label = (torch.from_numpy(a[:8]) for a in _data())
    cfg = _cfg().replace(warmup_epochs=2)
    t = compute_loss(m, image, text, label, cfg, 1, False, torch.zeros(8))
    assert t.warmup and t.weights.tolist() == [1.0] * 8


@pytest.fixture(scope="module")
def multilabel_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_synthetic(
        tmp_path_factory.mktemp("ml-store"), "ml", noise=("multilabel", 0.5, 1), num_classes=8,
        counts={"train": 160, "valid": 40, "query": 30, "database": 120}, image_dim=12,
        text_dim=10, label_kind="multi", max_labels=3, difficulty=0.1, seed=5,
    )  # fmt: skip


def test_multilabel_protocol_is_query_vs_database(multilabel_dataset):
    from feature_store.store import open_dataset
    from pipeline.retrieval import metrics as E
    from pipeline.retrieval.protocol import EvalProtocol

    ds = open_dataset(multilabel_dataset)
    valid = EvalProtocol.load(ds, "valid", top_k=50)
    test = EvalProtocol.load(ds, "test", top_k=50)
    assert valid.query.label.shape[0] == 40 and test.query.label.shape[0] == 30
    assert test.database is not None and test.database.label.shape[0] == 120
    rng = np.random.default_rng(0)
    arrays = (test.query.image, test.query.text, test.database.image, test.database.text)
    codes = {id(a): np.where(rng.random((a.shape[0], 16)) < 0.5, 1, -1) for a in arrays}
    got = test.evaluate(lambda x, m: codes[id(x)])
    q, d = test.query, test.database
    i2t = E.mean_average_precision(codes[id(q.image)], codes[id(d.text)], q.label, d.label)
    t2i_k = E.mean_average_precision(
        codes[id(q.text)], codes[id(d.image)], q.label, d.label, top_k=50
    )
    assert got["i2t"] == pytest.approx(i2t) and got["t2i_at_k"] == pytest.approx(t2i_k)
    assert got["mean"] == pytest.approx((got["i2t"] + got["t2i"]) / 2)


# slow: two-worker SCBCH weights are checked in the default tier by
# test_weights_are_equal_on_one_and_two_workers and tests/test_sharded_knn.py
@pytest.mark.slow
@pytest.mark.parametrize("method", ["scbch", "rshnl"])
def test_training_on_multilabel_data_with_two_workers(multilabel_dataset, ray_cluster, tmp_path,
                                                      method):  # fmt: skip
    from pipeline.training.trainer import run_training

    cfg = TrainConfig(
        dataset=multilabel_dataset, method=method, bits=16, hidden_dim=32, epochs=3,
        warmup_epochs=1, batch_size=32, lr=1e-3, workers=2, cpus_per_worker=0.5, eval_top_k=50,
        storage_path=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
        register_model=False, scbch_k=5,
    )  # fmt: skip
    s = run_training(cfg, log_model=False)
    assert s["epochs_run"] == 3 and len(set(s["center_checksums"])) == 1
    m = s["test_map"]
    assert {"i2t", "t2i", "mean", "i2t_at_k", "t2i_at_k", "mean_at_k"} <= set(m)
    assert m["mean"] == pytest.approx((m["i2t"] + m["t2i"]) / 2)
    assert m["mean_at_k"] == pytest.approx((m["i2t_at_k"] + m["t2i_at_k"]) / 2)
    hist = s["history"]
    assert len(hist["valid_map_mean"]) == 3
    # the best epoch is the one with the highest validation MAP (learning itself is checked on
    # a larger multi-label set in test_learns.py; 3 epochs here learn next to nothing)
    assert s["best_valid_map"]["mean"] == pytest.approx(max(hist["valid_map_mean"]))
    assert hist["valid_map_mean"][s["best_epoch"] - 1] == pytest.approx(max(hist["valid_map_mean"]))
    # each method's two loss terms are logged under its own names
    own, other = ("bsch", "cscc"), ("chl", "center")
    if method == "rshnl":
        own, other = other, own
    assert all(len(hist[f"loss_{t}"]) == 3 for t in own)
    assert not any(f"loss_{t}" in hist for t in other)


def test_scbch_and_rshnl_train_on_the_multilabel_hdf5_layout(tmp_path):
    from test_feature_store_layouts import write_multilabel_h5

    from jobs.ingest import main as ingest
    from pipeline.training.inprocess import train_in_process

    path = write_multilabel_h5(tmp_path / "nus.h5")
    args = ["multilabel-h5", "--input", str(path), "--store", str(tmp_path / "s"), "--name", "nus"]
    assert ingest([*args, "--valid-from-query", "4", "--noise-rate", "0.5"]) == 0
    uri = str(tmp_path / "s" / "nus" / "v1")
    for method in ("scbch", "rshnl"):
        cfg = TrainConfig(
            dataset=uri, method=method, bits=32, hidden_dim=64, epochs=3, warmup_epochs=1,
            batch_size=16, lr=1e-3, scbch_k=5, eval_top_k=10,
        )  # fmt: skip
        s = train_in_process(cfg)
        assert s["epochs_run"] == 3 and 1 <= s["best_epoch"] <= 3
        m = s["test_map"]
        assert {"i2t", "t2i", "i2t_at_k", "t2i_at_k"} <= set(m)
        assert m["mean"] == pytest.approx((m["i2t"] + m["t2i"]) / 2)
        # the layout's features carry no class signal, so only the selection is checked here
        # (learning on multi-label data: test_learns.py)
        valid = s["history"]["valid_map_mean"]
        assert s["best_valid_map"]["mean"] == pytest.approx(max(valid))
        assert valid[s["best_epoch"] - 1] == pytest.approx(max(valid))


def test_single_label_protocol_is_the_split_against_itself(tiny_dataset):
    from feature_store.store import open_dataset
    from pipeline.retrieval import metrics as E
    from pipeline.retrieval.protocol import EvalProtocol

    test = EvalProtocol.load(open_dataset(tiny_dataset), "test", top_k=10)
    assert test.database is None
    rng = np.random.default_rng(1)
    codes = {id(a): np.where(rng.random((a.shape[0], 16)) < 0.5, 1, -1)
             for a in (test.query.image, test.query.text)}  # fmt: skip
    both = test.encode(lambda x, m: codes[id(x)])
    q = test.query
    want = E.cross_modal_map(codes[id(q.image)], codes[id(q.text)], q.label)
    got = test.map_of(both)
    assert {k: got[k] for k in want} == pytest.approx(want)
    i2t_k = E.mean_average_precision(
        codes[id(q.image)], codes[id(q.text)], q.label, q.label, top_k=10
    )
    assert got["i2t_at_k"] == pytest.approx(i2t_k)
    assert test.pr_curves_of(both) == E.cross_modal_pr_curves(
        codes[id(q.image)], codes[id(q.text)], q.label
    )


def test_in_process_refuses_an_unusable_model_like_the_ray_path(tmp_path):
    """Non-finite losses from an infinite learning rate: the same checks as before registering."""
    from pipeline.training.guards import TrainingError
    from pipeline.training.inprocess import train_in_process

    uri = write_synthetic(tmp_path, "syn", num_classes=3, counts={"train": 48, "valid": 12,
                          "test": 12}, image_dim=6, text_dim=5, seed=0)  # fmt: skip
    cfg = TrainConfig(dataset=uri, bits=8, hidden_dim=8, epochs=2, warmup_epochs=1, lr=math.inf)
    with pytest.raises(TrainingError, match="unusable model: loss is nan at epoch 2"):
        train_in_process(cfg)
