"""The project's SCBCH (``method: scbch``) on one store version, in process, on CPU.

``jobs.benchmark grid`` makes its own noisy copies from a clean version, so it cannot train on the
published MIRFlickr noisy labels; this script trains one cell on a given (published-noise) version
with the in-process executor (``pipeline.training.inprocess.train_in_process``, the grid's
``--executor inprocess``), the settings of ``configs/scbch.yaml`` plus the given overrides, and
MAP@5000 (``eval_top_k``). It writes the run summary as JSON and prints one ``RESULT`` line.

    python benchmarks/anchors/scbch/run_project.py --dataset STORE/mirflickr/v3 --bits 32 \\
        --epochs 10 --seed 0 --out /tmp/x/project-n0.5-b32-s0.json [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import pipeline.training.inprocess as inprocess
from pipeline.config import TrainConfig
from pipeline.method.weights import encode
from pipeline.retrieval.protocol import EvalProtocol

sys.path.insert(0, str(Path(__file__).resolve().parent))
from topk import first_relevant_map, top_map_hits

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger("run_project")
ROOT = Path(__file__).resolve().parents[3]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", required=True, help="store version URI (STORE/NAME/vN)")
    p.add_argument("--config", default=str(ROOT / "configs" / "scbch.yaml"))
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, default=5000, help="eval_top_k (MAP@k)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any TrainConfig key"
    )
    p.add_argument("--out", required=True, help="summary JSON path")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> TrainConfig:
    """configs/scbch.yaml ← the run's dataset, bits, epochs, seed, MAP@k and ``--set`` pairs."""
    overrides: dict[str, Any] = {
        "dataset": args.dataset,
        "bits": args.bits,
        "epochs": args.epochs,
        "seed": args.seed,
        "eval_top_k": args.top_k,
        "workers": 1,
        "cpus_per_worker": args.threads,
    }
    for pair in args.set:
        key, _, value = pair.partition("=")
        overrides[key] = yaml.safe_load(value)
    return TrainConfig.load(args.config, overrides)


def other_conventions(extra: dict[str, float], top_k: int) -> None:
    """Wrap the in-process final evaluation to add the two other MAP@k conventions to ``extra``.

    The best-validation model's test codes are encoded once more (the project's ``encode``) and
    scored with ``topk.top_map_hits`` and ``topk.first_relevant_map`` (and MAP@all by the first
    convention, a cross-check of the project's MAP).
    """
    original = inprocess.final_evaluation

    def final_evaluation(model: Any, ds: Any, cfg: TrainConfig, history: Any) -> Any:
        result = original(model, ds, cfg, history)
        test = EvalProtocol.load(ds, "test", cfg.eval_top_k)
        model.eval()
        with torch.no_grad():
            (qi, qt, ql), (di, dt, dl) = test.encode(lambda x, m: encode(model, x, m))
        for name, q, d in (("i2t", qi, dt), ("t2i", qt, di)):
            extra[f"{name}_at_k_hits"] = top_map_hits(q, d, ql, dl, top_k)
            extra[f"{name}_first_k"] = first_relevant_map(q, d, ql, dl, top_k)
            extra[f"{name}_first_all"] = first_relevant_map(q, d, ql, dl, None)
        return result

    inprocess.final_evaluation = final_evaluation


def main(argv: list[str] | None = None) -> None:
    """Train, write the summary JSON (temporary name, then renamed), print the RESULT line."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = build_config(args)
    t0 = time.perf_counter()
    extra: dict[str, float] = {}
    other_conventions(extra, args.top_k)
    summary = inprocess.train_in_process(cfg, "cpu")
    summary["test_map_other_conventions"] = extra
    wall = time.perf_counter() - t0
    summary.pop("_suspects", None)
    summary["config"] = cfg.to_dict()
    summary["executor"] = "inprocess:cpu"
    summary["process_wall_seconds"] = wall
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=2, default=float))
    tmp.replace(out)
    t = summary["test_map"]
    log.info(
        "RESULT code=project executor=inprocess:cpu dataset=%s bits=%d epochs=%d seed=%d "
        "best_epoch=%s i2t=%.4f t2i=%.4f i2t@%d=%.4f t2i@%d=%.4f wall_s=%.0f",
        summary["data_version"],
        cfg.bits,
        cfg.epochs,
        cfg.seed,
        summary["best_epoch"],
        t["i2t"],
        t["t2i"],
        args.top_k,
        t.get("i2t_at_k", float("nan")),
        args.top_k,
        t.get("t2i_at_k", float("nan")),
        wall,
    )


if __name__ == "__main__":
    main()
