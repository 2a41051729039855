"""The training optimizer (fused Adam) against Adam written out by hand, across dtypes."""

from __future__ import annotations

import io

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.training.step import make_optimizer


def _reference_adam(p0, grads, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    """Adam with L2 weight decay (Kingma & Ba, Alg. 1; the gradient gets wd·p), in float64."""
    p = p0.double().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.double() + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
    return p


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_fused_adam_matches_the_hand_written_update(dtype, tol, wd):
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(7, 5).to(dtype)
    start = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(dataset="x", lr=1e-2, weight_decay=wd)
    opt = make_optimizer(model, cfg)
    assert opt.param_groups[0]["fused"] is True  # the CPU has the fused kernel
    grads = [[torch.randn(p.shape, generator=gen, dtype=dtype) for p in start] for _ in range(6)]
    for step in grads:
        for p, g in zip(model.parameters(), step, strict=True):
            p.grad = g.clone()
        opt.step()
    for i, p in enumerate(model.parameters()):
        want = _reference_adam(start[i], [s[i] for s in grads], cfg.lr, wd)
        torch.testing.assert_close(p.detach().double(), want, rtol=tol, atol=tol)
        assert not torch.equal(p.detach(), start[i])  # the parameters moved


def test_state_round_trips_into_a_new_optimizer():
    """A resumed run's optimizer continues exactly where the saved one stopped."""
    torch.manual_seed(1)
    a, cfg = torch.nn.Linear(4, 3), TrainConfig(dataset="x", lr=1e-2)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    oa = make_optimizer(a, cfg)
    g = [torch.randn(p.shape) for p in a.parameters()]
    for p, gi in zip(a.parameters(), g, strict=True):
        p.grad = gi.clone()
    oa.step()
    b.load_state_dict(a.state_dict())
    ob = make_optimizer(b, cfg)
    buf = io.BytesIO()  # through a file, as a checkpoint does
    torch.save(oa.state_dict(), buf)
    buf.seek(0)
    ob.load_state_dict(torch.load(buf, weights_only=True))
    assert ob.param_groups[0]["fused"] is True
    for m, o in ((a, oa), (b, ob)):
        for p, gi in zip(m.parameters(), g, strict=True):
            p.grad = gi.clone()
        o.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
