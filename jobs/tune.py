"""Ray Tune sweep over γ, α, r and the warm-up length; every trial in MLflow, the winner registered.

γ is sampled as a fraction of ℓmax(r) = M(r² − r + 1)/r (Eq 14), so every trial is valid. The YAML
given with --config holds TrainConfig keys for the base run, plus optional ``search_space`` (per
parameter: type uniform/loguniform/randint/choice/fixed with low/high/values/value) and ``sweep``
(SweepConfig keys such as num_samples, scheduler, grace_period) sections.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from jobs._cli import EXIT_OK, job_parser, run_main, setup_logging, write_json_atomic

log = logging.getLogger("jobs.tune")


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("tune", __doc__)
    p.add_argument("--dataset", help="dataset version URI (STORE/NAME/vN)")
    p.add_argument("--config", help="YAML: TrainConfig keys, search_space, sweep")
    p.add_argument("--num-samples", type=int, help="trials for the random search (default 12)")
    p.add_argument(
        "--mode",
        choices=("random", "gamma"),
        help="random search, or a grid over γ/ℓmax with the rest fixed",
    )
    p.add_argument("--gamma-fractions", help="comma-separated γ/ℓmax values for --mode gamma")
    p.add_argument("--scheduler", choices=("asha", "fifo"))
    p.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial may be stopped")
    p.add_argument("--max-concurrent", type=int, help="trials at a time (default: what fits)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--workers", type=int, help="Ray Train workers per trial")
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--bits", type=int)
    p.add_argument("--hidden-dim", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--name", help="sweep name (needed to --resume)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep --name")
    p.add_argument("--storage-path", help="where Tune and the trials' Train runs keep state")
    p.add_argument("--tracking-uri")
    p.add_argument("--experiment-name")
    p.add_argument("--registered-model-name")
    p.add_argument("--summary-json")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def load_sweep(args: argparse.Namespace) -> Any:
    """The sweep the flags ask for (flags over the YAML's keys)."""
    from pipeline.experiments.tune import sweep_from_yaml

    train = {
        "dataset": args.dataset,
        "epochs": args.epochs,
        "workers": args.workers,
        "cpus_per_worker": args.cpus_per_worker,
        "bits": args.bits,
        "hidden_dim": args.hidden_dim,
        "seed": args.seed,
        "tracking_uri": args.tracking_uri,
        "experiment_name": args.experiment_name,
        "registered_model_name": args.registered_model_name,
    }
    sweep = {
        "num_samples": args.num_samples,
        "mode": args.mode,
        "scheduler": args.scheduler,
        "grace_period": args.grace_period,
        "max_concurrent": args.max_concurrent,
        "name": args.name,
        "storage_path": args.storage_path,
        "gamma_fractions": [float(x) for x in args.gamma_fractions.split(",")]
        if args.gamma_fractions
        else None,
    }
    return sweep_from_yaml(args.config, train, sweep, resume=args.resume)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    sweep = load_sweep(args)
    from pipeline.experiments.tune import run_sweep

    summary = run_sweep(sweep)
    if args.summary_json:
        write_json_atomic(args.summary_json, summary)
    reg = summary.get("registered_model") or {}
    log.info(
        "sweep %s: %d trials in %.0fs; best %s valid MAP %.4f test MAP %.4f; parent MLflow "
        "run %s; registered %s version %s",
        summary["sweep"],
        len(summary["trials"]),
        summary["wall_seconds"],
        summary["best_config"],
        summary["best_valid_map"],
        summary["best_test_map"]["mean"],
        summary["parent_run_id"],
        reg.get("name"),
        reg.get("version"),
    )
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
