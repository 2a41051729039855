"""Training learns: the loss falls and test MAP beats a random ranking by a stated margin on a
small noisy synthetic set, in float32 and in bfloat16 autocast (config key ``bf16``), and on a
noisy multi-label set (query vs database) for RSHNL and SCBCH; one bf16 step on the CPU gives
losses and gradients close to float32's.

The random baseline is the exact expected MAP of a uniformly random ranking under the test
labels (tests/references.py), not a number produced by the code under test.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import references as R
import torch
from synthetic_util import write_synthetic

from feature_store import schema as S
from feature_store.store import open_dataset
from pipeline.config import TrainConfig

MARGIN = 0.2  # test MAP must exceed the random-ranking MAP (≈ 0.21 here) by this much
NOISE = 0.4  # symmetric label noise on the train split


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and spinning threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def learn_set(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_synthetic(
        tmp_path_factory.mktemp("learn-store"), "learn", noise=("symmetric", NOISE, 0), seed=9,
        num_classes=6, counts={"train": 384, "valid": 96, "test": 96}, image_dim=24, text_dim=16,
        difficulty=0.2,
    )  # fmt: skip


def _cfg(dataset: str, **kw) -> TrainConfig:
    base = dict(
        dataset=dataset, bits=16, hidden_dim=64, epochs=6, warmup_epochs=2, lr=3e-3,
        batch_size=64, seed=0,
    )  # fmt: skip
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def baseline(learn_set: str) -> float:
    labels = open_dataset(learn_set).read_arrays("test", [S.LABEL])[S.LABEL]
    b = R.random_ranking_map(labels, labels)  # set-vs-itself: the same for I2T and T2I
    assert 0.15 < b < 0.3  # six classes of ~16 test items each
    return b


@pytest.fixture(scope="module")
def runs(learn_set: str) -> dict[bool, dict]:
    """The run summaries of one config trained in float32 and in bf16 autocast."""
    from pipeline.training.inprocess import train_in_process

    return {bf16: train_in_process(_cfg(learn_set, bf16=bf16)) for bf16 in (False, True)}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_training_learns(runs, baseline, bf16):
    s = runs[bf16]
    assert s["epochs_run"] == 6
    loss = s["history"]["loss"]
    # Eq 9 changes form after warm-up (L_p → L_S), so the loss is compared within each phase
    assert loss[1] < 0.95 * loss[0], loss
    assert loss[-1] < 0.95 * loss[2], loss
    assert all(b < a for a, b in itertools.pairwise(loss[2:])), loss
    valid = s["history"]["valid_map_mean"]
    assert valid[-1] > valid[0] + 0.1, valid
    for key in ("i2t", "t2i", "mean"):
        assert s["test_map"][key] > baseline + MARGIN, (key, s["test_map"], baseline)


def test_bf16_training_tracks_fp32(runs):
    fp32, bf16 = runs[False], runs[True]
    assert bf16["history"]["loss"] == pytest.approx(fp32["history"]["loss"], rel=0.02)
    assert bf16["history"]["loss"] != fp32["history"]["loss"]  # bf16 did change the arithmetic
    assert abs(bf16["test_map"]["mean"] - fp32["test_map"]["mean"]) < 0.05


def _step_inputs(learn_set: str):
    from pipeline.training.step import build_model

    ds = open_dataset(learn_set)
    a = ds.read_arrays("train", [S.IMAGE, S.TEXT, S.LABEL])
    torch.manual_seed(0)
    model = build_model(_cfg(learn_set), ds.dims, ds.num_classes)
    batch = [torch.tensor(np.asarray(a[k][:64], dtype=np.float32)) for k in
             (S.IMAGE, S.TEXT, S.LABEL)]  # fmt: skip
    return model, batch


@pytest.mark.parametrize("epoch", [0, 3])  # warm-up and self-paced (N_w = 2)
def test_bf16_step_on_cpu_is_close_to_fp32(learn_set, epoch):
    from pipeline.training.step import compute_loss

    model, (image, text, label) = _step_inputs(learn_set)
    seen: list[torch.dtype] = []
    model.image_head.net[0].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    terms, grads = {}, {}
    for bf16 in (False, True):
        m = copy.deepcopy(model)
        cfg = _cfg(learn_set, bf16=bf16, gamma=2.0)
        t = compute_loss(m, image, text, label, cfg, epoch, global_negatives=False)
        t.total.backward()
        terms[bf16] = t
        grads[bf16] = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    # the bf16 path did run the layers in bfloat16 (the fp32 path did not) ...
    assert seen == [torch.float32, torch.bfloat16]
    # ... and the loss is still computed in float32 from the upcast codes
    assert terms[True].total.dtype == torch.float32
    f, b = terms[False], terms[True]
    assert f.warmup == b.warmup == (epoch < 2)
    assert b.total.item() == pytest.approx(f.total.item(), rel=1e-2)
    assert b.chl.item() == pytest.approx(f.chl.item(), rel=1e-2)
    assert b.center.item() == pytest.approx(f.center.item(), rel=1e-2, abs=1e-3)
    assert torch.allclose(b.ell, f.ell, rtol=2e-2, atol=1e-3)
    assert torch.allclose(b.weights, f.weights, atol=2e-2)
    assert b.total.item() != f.total.item()  # not the same computation
    gf, gb = grads[False], grads[True]
    cos = torch.nn.functional.cosine_similarity(gf, gb, dim=0).item()
    assert cos > 0.99 and (gb.norm() / gf.norm()).item() == pytest.approx(1.0, rel=0.05)


ML_MARGIN = 0.1  # multi-label: test MAP over the random-ranking MAP (≈ 0.31 here)


@pytest.fixture(scope="module")
def multilabel_set(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_synthetic(
        tmp_path_factory.mktemp("learn-ml-store"), "learn-ml", noise=("multilabel", 0.5, 1),
        num_classes=8, counts={"train": 384, "valid": 48, "query": 48, "database": 192},
        image_dim=24, text_dim=16, label_kind="multi", max_labels=2, difficulty=0.1, seed=5,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["rshnl", "scbch:project", "scbch:upstream"])
def test_training_learns_on_noisy_multilabel_data(multilabel_set, method):
    from pipeline.training.inprocess import train_in_process

    method, _, form = method.partition(":")
    extra = {"scbch_form": form} if form else {}

    ds = open_dataset(multilabel_set)
    query, db = (ds.read_arrays(split, [S.LABEL])[S.LABEL] for split in ("query", "database"))
    baseline = R.random_ranking_map(query, db)  # query vs database, relevant = a shared label
    assert 0.25 < baseline < 0.4
    cfg = _cfg(multilabel_set, method=method, eval_top_k=50, scbch_k=5, **extra)
    s = train_in_process(cfg)
    valid = s["history"]["valid_map_mean"]
    assert valid[-1] > valid[0] + 0.05, valid
    for key in ("i2t", "t2i", "mean"):
        assert s["test_map"][key] > baseline + ML_MARGIN, (key, s["test_map"], baseline)
