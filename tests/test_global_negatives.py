"""Global CHL negatives: 2 DDP workers × B items match 1 process on the concatenated 2B batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo_util import finish_worker

from pipeline.config import TrainConfig
from pipeline.method.model import RSHNLModel
from pipeline.training.step import compute_loss

N_ITEMS, K = 8, 3


def _data():
    g = torch.Generator().manual_seed(11)
    image = torch.randn(N_ITEMS, 5, generator=g)
    text = torch.randn(N_ITEMS, 4, generator=g)
    label = torch.nn.functional.one_hot(torch.arange(N_ITEMS) % K, K).float()
    return image, text, label


def _model() -> RSHNLModel:
    torch.manual_seed(0)
    return RSHNLModel(5, 4, K, bits=8, hidden=16)


def _cfg(epoch_is_warmup: bool) -> TrainConfig:
    return TrainConfig(
        dataset="x", warmup_epochs=1 if epoch_is_warmup else 0, gamma=6.0, alpha=0.5, r=0.3
    )


def _grads(model: torch.nn.Module) -> list[float]:
    return torch.cat([p.grad.flatten() for p in model.parameters()]).tolist()


def _worker(rank: int, init: str, out: str, warmup: bool, global_negatives: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    image, text, label = _data()
    part = slice(rank * N_ITEMS // 2, (rank + 1) * N_ITEMS // 2)
    terms = compute_loss(
        model, image[part], text[part], label[part], _cfg(warmup), 0, global_negatives
    )
    terms.total.backward()  # DDP averages the gradients of the two ranks
    loss = torch.tensor([terms.total.item()])
    dist.all_reduce(loss)
    if rank == 0:
        Path(out).write_text(json.dumps({"loss": loss.item() / 2, "grads": _grads(model.module)}))
    finish_worker()


def _two_workers(tmp_path: Path, warmup: bool, global_negatives: bool) -> dict:
    out = tmp_path / f"out-{warmup}-{global_negatives}.json"
    init = tmp_path / f"init-{warmup}-{global_negatives}"
    mp.spawn(_worker, args=(str(init), str(out), warmup, global_negatives), nprocs=2)
    return json.loads(out.read_text())


def _one_process(warmup: bool) -> dict:
    model = _model()
    image, text, label = _data()
    terms = compute_loss(model, image, text, label, _cfg(warmup), 0, global_negatives=True)
    terms.total.backward()
    return {"loss": terms.total.item(), "grads": _grads(model)}


@pytest.mark.parametrize("warmup", [True, False], ids=["warmup-Lp", "self-paced-LS"])
def test_two_workers_equal_one_big_batch(tmp_path, warmup):
    two = _two_workers(tmp_path, warmup, global_negatives=True)
    one = _one_process(warmup)
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-5)
    diff = max(abs(a - b) for a, b in zip(two["grads"], one["grads"], strict=True))
    assert diff < 1e-5


def test_local_negatives_do_not_match(tmp_path):
    """Without gathering, each worker's CHL sees only its own half: the result differs."""
    two = _two_workers(tmp_path, True, global_negatives=False)
    one = _one_process(True)
    diff = max(abs(a - b) for a, b in zip(two["grads"], one["grads"], strict=True))
    assert diff > 1e-4
