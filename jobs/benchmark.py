"""Benchmarks of the training path.

``scaling``: seconds per epoch of a plain single-process PyTorch loop over in-memory tensors and of
Ray Train runs with 1..N workers, measured in one invocation, with the time each Ray epoch spends
outside the training step (data wait, end-of-epoch gathers, evaluation, checkpoint, report).
``plain``: the training step alone in one process, on CPU or one GPU.
``grid``: method × noise rate × bits × seed, each cell a training run; resumable; writes a Markdown
table laid out like the paper's Table 1 and a CSV, and logs every cell to MLflow.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from jobs._cli import EXIT_FAILED, EXIT_OK, run_main, setup_logging, write_json_atomic
from pipeline.config import ConfigError, TrainConfig
from pipeline.method.variants import DESCRIPTIONS

log = logging.getLogger("jobs.benchmark")

PHASES = ("data_wait", "step", "gather", "eval", "log", "checkpoint", "report")


def plain_loop_seconds(
    cfg: TrainConfig, epochs: int, threads: int, device: str = "cpu"
) -> list[float]:
    """Seconds per epoch of the training epoch the Ray workers run, in one process, no eval."""
    import torch

    from pipeline.training.epoch import train_epoch
    from pipeline.training.inprocess import prepare_in_memory

    torch.set_num_threads(threads)
    run = prepare_in_memory(cfg, device)
    out = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        res = train_epoch(
            run.model,
            run.optimizer,
            run.shard.batches(run.cfg.batch_size, run.cfg.seed, epoch),
            run.cfg,
            epoch,
        )
        out.append(time.perf_counter() - t0)
        log.info(
            "plain loop epoch %d/%d %.3fs loss %.4f (%s%s)",
            epoch + 1,
            epochs,
            out[-1],
            res.loss,
            device,
            ", bf16" if cfg.bf16 else "",
        )
    return out


def _steady(values: list[float]) -> float:
    """Mean over epochs after the first (which pays one-off start-up costs)."""
    tail = values[1:] or values
    return sum(tail) / len(tail)


def scaling(cfg: TrainConfig, worker_counts: list[int], threads: int) -> dict[str, Any]:
    from feature_store.store import open_dataset
    from pipeline.training.trainer import run_training

    n_train = open_dataset(cfg.dataset).manifest["counts"]["train"]
    rows: list[dict[str, Any]] = []
    plain = plain_loop_seconds(cfg, cfg.epochs, threads)
    steady = _steady(plain)
    rows.append({"mode": "plain", "workers": 1, "train_s": steady, "wall_s": steady})
    for w in worker_counts:
        run_cfg = cfg.replace(
            workers=w,
            cpus_per_worker=max(threads / w, 0.5) if w > 1 else float(threads),
            register_model=False,
            run_name="",
        )
        s = run_training(run_cfg)
        t = s["epoch_timings"]
        row: dict[str, Any] = {"mode": "ray", "workers": w}
        for p in PHASES:
            row[p] = _steady([e.get(p, 0.0) for e in t])
        row["train_s"] = row["data_wait"] + row["step"]
        row["wall_s"] = _steady([e.get("wall", 0.0) for e in t])
        rows.append(row)
    for r in rows:
        r["samples_per_s"] = n_train / r["train_s"]
        r["outside_step_s"] = r["wall_s"] - (r.get("step", r["train_s"]))
    base = rows[0]
    one = next((r for r in rows if r["mode"] == "ray" and r["workers"] == 1), None)
    ratios = {}
    if one is not None:
        ratios = {
            "ray1_train_over_plain": one["train_s"] / base["train_s"],
            "ray1_wall_over_plain": one["wall_s"] / base["train_s"],
        }
    return {"rows": rows, "ratios": ratios, "train_items": n_train, "epochs": cfg.epochs}


def format_table(result: dict[str, Any]) -> str:
    head = ["mode", "workers", "samples/s", "train s/ep", "wall s/ep", *PHASES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [
            r["mode"],
            str(r["workers"]),
            f"{r['samples_per_s']:.0f}",
            f"{r['train_s']:.2f}",
            f"{r['wall_s']:.2f}",
        ] + [f"{r[p]:.2f}" if p in r else "-" for p in PHASES]
        lines.append("| " + " | ".join(cells) + " |")
    for k, v in result["ratios"].items():
        lines.append(f"{k}: {v:.3f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scaling", help="plain loop vs Ray Train with 1..N workers")
    s.add_argument("--dataset", required=True)
    s.add_argument("--config", help="YAML with TrainConfig keys (e.g. configs/wiki.yaml)")
    s.add_argument("--epochs", type=int, default=4)
    s.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    s.add_argument("--threads", type=int, default=2, help="CPU threads for the whole run")
    s.add_argument("--use-gpu", action="store_true")
    s.add_argument("--summary-json")
    pl = sub.add_parser("plain", help="the training step alone in one process (CPU or one GPU)")
    pl.add_argument("--dataset", required=True)
    pl.add_argument("--config", help="YAML with TrainConfig keys")
    pl.add_argument("--epochs", type=int, default=5)
    pl.add_argument("--device", default="cpu", help="cpu or cuda")
    pl.add_argument("--threads", type=int, default=2)
    pl.add_argument("--summary-json")
    g = sub.add_parser(
        "grid",
        help="methods × noise rates × bits × seeds, one training run per cell (resumable)",
        description="Methods: " + "; ".join(f"{k}: {v}" for k, v in DESCRIPTIONS.items()),
    )
    g.add_argument("--dataset", required=True, help="clean dataset version URI (STORE/NAME/vN)")
    g.add_argument("--config", help="YAML with TrainConfig keys (e.g. configs/wiki.yaml)")
    g.add_argument("--methods", default="RSHNL,RSHNL-3,plain", help="comma-separated")
    g.add_argument("--noise", default="0.2,0.4,0.6,0.8", help="comma-separated noise rates")
    g.add_argument("--bits", default="16,32,64,128", help="comma-separated code lengths")
    g.add_argument("--seeds", default="0", help="comma-separated training seeds")
    g.add_argument("--epochs", type=int)
    g.add_argument("--workers", type=int, help="Ray Train workers per cell (default 1)")
    g.add_argument(
        "--cpus-per-worker", type=float, help="CPUs (and torch threads) per worker; default 1"
    )
    g.add_argument("--noise-seed", type=int, default=0, help="seed of the label noise")
    g.add_argument("--noise-mode", help="symmetric (default for single-label), asymmetric, ...")
    g.add_argument("--max-concurrent", type=int, default=0, help="cells at a time (0: by CPUs)")
    g.add_argument("--out", required=True, help="results folder; rerun to resume")
    g.add_argument(
        "--keep-checkpoints", action="store_true", help="keep finished cells' checkpoints"
    )
    g.add_argument(
        "--executor",
        choices=("ray", "inprocess"),
        default="ray",
        help="ray: each cell a Ray Train run (default); inprocess: cells one after another in "
        "this process, for machines without Ray (no checkpoints)",
    )
    g.add_argument("--device", default="cpu", help="inprocess executor: cpu or cuda")
    g.add_argument("--no-tracking", action="store_true", help="inprocess: do not log to MLflow")
    g.add_argument("--summary-json")
    return p


def _csv(text: str, kind: type) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ConfigError(f"could not read the list {text!r}: {e}") from e


def grid(args: argparse.Namespace) -> int:
    from pipeline.experiments.grid import GridSpec, run_grid

    cfg = TrainConfig.load(
        args.config,
        {
            "dataset": args.dataset,
            "epochs": args.epochs,
            "workers": args.workers or 1,
            "cpus_per_worker": args.cpus_per_worker,
            "experiment_name": "benchmark-grid",
            "register_model": False,
        },
    )
    spec = GridSpec(
        base=cfg,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        noise_rates=_csv(args.noise, float),
        bits=_csv(args.bits, int),
        seeds=_csv(args.seeds, int),
        out=args.out,
        noise_seed=args.noise_seed,
        noise_mode=args.noise_mode,
        max_concurrent=args.max_concurrent,
        keep_checkpoints=args.keep_checkpoints,
        executor=args.executor,
        device=args.device,
        tracking=not args.no_tracking,
    )
    result = run_grid(spec)
    log.info("grid %s (%s):\n%s", result["grid"], result["out"], result["table_markdown"])
    if args.summary_json:
        write_json_atomic(args.summary_json, result)
    if result["failed"]:
        log.error("%d cell(s) failed: %s", len(result["failed"]), result["failed"])
        return EXIT_FAILED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.command == "grid":
        return grid(args)
    cfg = TrainConfig.load(
        args.config,
        {
            "dataset": args.dataset,
            "epochs": args.epochs,
            "use_gpu": getattr(args, "use_gpu", False) or None,
            "experiment_name": "benchmark",
        },
    )
    if args.command == "plain":
        result = {}
        for bf16 in (False, True):
            secs = plain_loop_seconds(cfg.replace(bf16=bf16), cfg.epochs, args.threads, args.device)
            result["bf16" if bf16 else "fp32"] = {"epoch_seconds": secs, "steady_s": _steady(secs)}
        result["bf16_speedup"] = result["fp32"]["steady_s"] / result["bf16"]["steady_s"]
        log.info("plain loop on %s: %s", args.device, result)
        if args.summary_json:
            write_json_atomic(args.summary_json, result)
        return EXIT_OK
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    result = scaling(cfg, workers, args.threads)
    table = format_table(result)
    log.info("scaling (steady-state epochs 2..%d):\n%s", cfg.epochs, table)
    print(table)
    if args.summary_json:
        write_json_atomic(args.summary_json, result)
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
