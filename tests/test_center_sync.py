"""The per-step center equality check catches ranks that drift apart (2 gloo processes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo_util import finish_worker

from pipeline.training.step import assert_centers_synced, center_checksum


def _worker(rank: int, world: int, init_file: str, out_dir: str, drift: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    centers = torch.ones(3, 4)
    if drift and rank == 1:
        centers[2, 1] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))  # one ulp apart
    result = {"checksum": center_checksum(centers)}
    try:
        assert_centers_synced(centers, step=7)
        result["error"] = None
    except RuntimeError as e:
        result["error"] = str(e)
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps(result))
    finish_worker()


def _run(tmp_path: Path, drift: bool) -> list[dict]:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), drift), nprocs=2)
    return [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]


def test_equal_centers_pass(tmp_path):
    res = _run(tmp_path, drift=False)
    assert [r["error"] for r in res] == [None, None]
    assert res[0]["checksum"] == res[1]["checksum"]


def test_one_ulp_difference_is_caught(tmp_path):
    res = _run(tmp_path, drift=True)
    assert all("differ between rank 0 and rank 1 at step 7" in r["error"] for r in res)
    assert res[0]["checksum"] != res[1]["checksum"]
