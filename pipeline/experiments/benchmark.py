"""Benchmarks of the training path: the training epoch alone in one process (CPU or one GPU, fp32
and bf16), and seconds per epoch of that plain loop against Ray Train runs with 1..N workers, with
the time each Ray epoch spends outside the training step (data wait, end-of-epoch gathers,
evaluation, checkpoint, report)."""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.config import TrainConfig

log = logging.getLogger(__name__)

PHASES = ("data_wait", "step", "gather", "eval", "checkpoint", "report")


def plain_loop_seconds(
    cfg: TrainConfig, epochs: int, threads: int, device: str = "cpu"
) -> list[float]:
    """Seconds per epoch of the training epoch the Ray workers run, in one process, no eval."""
    import torch

    from pipeline.training.epoch import epoch_pair_weights, next_mixture, train_epoch
    from pipeline.training.inprocess import prepare_in_memory

    torch.set_num_threads(threads)
    run = prepare_in_memory(cfg, device)
    out, mixture = [], None
    for epoch in range(epochs):
        pair_weights = epoch_pair_weights(run.model, run.arrays, run.cfg, epoch, device)
        t0 = time.perf_counter()  # the step phases only, as in the Ray worker's "train" time
        res = train_epoch(
            run.model,
            run.optimizer,
            run.shard.batches(run.cfg.batch_size, run.cfg.seed, epoch),
            run.cfg,
            epoch,
            mixture=mixture,
            pair_weights=pair_weights,
        )
        out.append(time.perf_counter() - t0)
        mixture = next_mixture(run.cfg, res.ell, mixture)
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


def steady_mean(values: list[float]) -> float:
    """Mean over epochs after the first (which pays one-off start-up costs)."""
    tail = values[1:] or values
    return sum(tail) / len(tail)


def scaling(
    cfg: TrainConfig,
    worker_counts: list[int],
    threads: int,
    checkpoint_every: list[int] | None = None,
) -> dict[str, Any]:
    """Steady-state seconds per epoch of the plain loop and of Ray Train with each worker count
    and each checkpoint policy (``checkpoint_every``; default: the config's), per phase for Ray,
    samples per second and the Ray-1-worker / plain ratios per policy. The plain loop runs before
    and after the Ray runs; the baseline is the mean of the two."""
    from feature_store.store import open_dataset
    from pipeline.training.trainer import run_training

    n_train = open_dataset(cfg.dataset).manifest["counts"]["train"]
    rows: list[dict[str, Any]] = []
    before = plain_loop_seconds(cfg, cfg.epochs, threads)
    policies = checkpoint_every or [cfg.checkpoint_every]
    for w in worker_counts:
        for every in policies:
            run_cfg = cfg.replace(
                workers=w,
                cpus_per_worker=max(threads / w, 0.5) if w > 1 else float(threads),
                register_model=False,
                run_name="",
                checkpoint_every=every,
            )
            s = run_training(run_cfg)
            t = s["epoch_timings"]
            row: dict[str, Any] = {"mode": "ray", "workers": w, "checkpoint_every": every}
            for p in PHASES:
                row[p] = steady_mean([e.get(p, 0.0) for e in t])
            row["train_s"] = row["data_wait"] + row["step"]
            row["wall_s"] = steady_mean([e.get("wall", 0.0) for e in t])
            row["epoch_wall_s"] = [e.get("wall", 0.0) for e in t]
            rows.append(row)
    # The plain loop runs before and after the Ray runs: their mean is the baseline, and the
    # drift between them says how far the machine's speed moved during the comparison.
    import ray

    ray.shutdown()  # as before the Ray runs: no Ray processes beside the plain loop
    after = plain_loop_seconds(cfg, cfg.epochs, threads)
    plain_rows = [
        {"mode": f"plain ({when})", "workers": 1, "epoch_wall_s": secs}
        for when, secs in (("before", before), ("after", after))
    ]
    for r in plain_rows:
        r["train_s"] = r["wall_s"] = steady_mean(r["epoch_wall_s"])
    steady = (plain_rows[0]["train_s"] + plain_rows[1]["train_s"]) / 2
    base = {"mode": "plain", "workers": 1, "train_s": steady, "wall_s": steady}
    rows = [base, *plain_rows, *rows]
    for r in rows:
        r["samples_per_s"] = n_train / r["train_s"]
        r["outside_step_s"] = r["wall_s"] - (r.get("step", r["train_s"]))
    ratios = {"plain_after_over_before": plain_rows[1]["train_s"] / plain_rows[0]["train_s"]}
    for one in (r for r in rows if r["mode"] == "ray" and r["workers"] == 1):
        tag = "" if len(policies) == 1 else f"_every{one['checkpoint_every']}"
        ratios[f"ray1_train_over_plain{tag}"] = one["train_s"] / base["train_s"]
        ratios[f"ray1_wall_over_plain{tag}"] = one["wall_s"] / base["train_s"]
    return {"rows": rows, "ratios": ratios, "train_items": n_train, "epochs": cfg.epochs}


def format_table(result: dict[str, Any]) -> str:
    """:func:`scaling`'s rows as a Markdown table, then its ratios."""
    head = ["mode", "workers", "ckpt every", "samples/s", "train s/ep", "wall s/ep", *PHASES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [
            r["mode"],
            str(r["workers"]),
            str(r.get("checkpoint_every", "-")),
            f"{r['samples_per_s']:.0f}",
            f"{r['train_s']:.2f}",
            f"{r['wall_s']:.2f}",
        ] + [f"{r[p]:.2f}" if p in r else "-" for p in PHASES]
        lines.append("| " + " | ".join(cells) + " |")
    for k, v in result["ratios"].items():
        lines.append(f"{k}: {v:.3f}")
    return "\n".join(lines)


def plain_benchmark(cfg: TrainConfig, threads: int, device: str = "cpu") -> dict[str, Any]:
    """:func:`plain_loop_seconds` in fp32 and in bf16, and the bf16 speed-up of steady epochs."""
    result: dict[str, Any] = {}
    for bf16 in (False, True):
        secs = plain_loop_seconds(cfg.replace(bf16=bf16), cfg.epochs, threads, device)
        result["bf16" if bf16 else "fp32"] = {"epoch_seconds": secs, "steady_s": steady_mean(secs)}
    result["bf16_speedup"] = result["fp32"]["steady_s"] / result["bf16"]["steady_s"]
    return result
