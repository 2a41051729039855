"""Evaluate hash codes: a registered model on a feature-store split, or the metrics' own speed.

  model   encode a dataset with a registered model and report, for image→text and text→image,
          MAP (ties by index and tie-aware), MAP@k, P@k and the PR curve by Hamming radius
          (query vs database for multi-label sets, a split against itself otherwise); optional
          PR plot.
  bench   time the metrics on random codes side by side with the straightforward way (scipy
          cdist, an argsort and a Python loop per query), a large query set × database run in
          bounded memory, and top-k search against plain faiss IndexBinaryFlat.

Exit code 0 is success, 2 is bad input (named in one line on stderr), 1 is a failure.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from jobs._cli import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    job_parser,
    passive_openmp,
    run_main,
    setup_logging,
    write_json_atomic,
)
from pipeline.retrieval.bench import run_bench
from pipeline.tracking.pull import PullError, evaluate_registered_model

log = logging.getLogger("jobs.evaluate")


class EvaluateInputError(ValueError):
    """Bad arguments to the evaluate job."""


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("evaluate", __doc__)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("model", help="evaluate a registered model on a feature-store split")
    m.add_argument("--model", required=True, help="NAME@ALIAS, NAME/VERSION or a model URI")
    m.add_argument("--tracking-uri", default="")
    m.add_argument("--dataset", default="", help="default: the dataset the model was trained on")
    m.add_argument(
        "--split",
        default=None,
        help="evaluate this split against itself (default: query vs database when the dataset "
        "has them, as multi-label sets do, else test vs test)",
    )
    m.add_argument("--labels", choices=("label", "clean_label"), default="label")
    m.add_argument("--ks", type=int, nargs="+", default=[1, 10, 50, 100])
    m.add_argument("--out-dir", default=None, help="write the PR-curve plot here")

    b = sub.add_parser("bench", help="time the metrics and the search")
    b.add_argument("--n-query", type=int, default=8000)
    b.add_argument("--n-db", type=int, default=8000)
    b.add_argument("--bits", type=int, default=128)
    b.add_argument("--classes", type=int, default=10)
    b.add_argument("--labels", choices=("single", "multi"), default="single")
    b.add_argument("--repeat", type=int, default=5, help="runs of each fast measurement")
    b.add_argument("--repeat-reference", type=int, default=1, help="runs of the slow reference")
    b.add_argument("--skip-straightforward", action="store_true")
    b.add_argument("--search-k", type=int, default=100, help="top-k search benchmark (0: skip)")
    b.add_argument("--large", type=int, default=0, help="also N×N in bounded memory (0: skip)")
    b.add_argument("--large-ties", nargs="+", choices=("expected", "index"), default=["expected"])
    b.add_argument("--threads", type=int, default=1, help="threads over query chunks")

    for sp in (m, b):
        sp.add_argument("--summary-json", help="write the summary here (JSON)")
        sp.add_argument("-v", "--verbose", action="store_true")
    return p


def _print_report(summary: dict[str, Any], ks: list[int]) -> None:
    """One line per direction: MAP, then MAP@k and P@k for each k (cut to the database size)."""
    for direction, r in summary["report"].items():
        cut = sorted({min(k, r["num_database"]) for k in ks})
        print(
            f"{direction}: MAP {r['map']['index']:.4f} (ties by index), "
            f"{r['map']['expected']:.4f} (tie-aware); "
            + "; ".join(
                f"MAP@{k} {r['map_at_k'][str(k)]['index']:.4f}, "
                f"P@{k} {r['precision_at_k'][str(k)]['index']:.4f}"
                for k in cut
            )
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    passive_openmp()  # before faiss or torch is imported
    setup_logging(args.verbose)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        if args.command == "bench":
            if min(args.n_query, args.n_db, args.bits, args.classes, args.repeat) < 1:
                raise EvaluateInputError(
                    "--n-query, --n-db, --bits, --classes and --repeat must be ≥ 1"
                )
            summary = run_bench(
                n_query=args.n_query,
                n_db=args.n_db,
                bits=args.bits,
                classes=args.classes,
                labels=args.labels,
                repeat=args.repeat,
                repeat_reference=args.repeat_reference,
                skip_straightforward=args.skip_straightforward,
                search_k=args.search_k,
                large=args.large,
                large_ties=args.large_ties,
                threads=args.threads,
            )
        else:
            summary = evaluate_registered_model(
                args.model,
                tracking_uri=args.tracking_uri,
                dataset=args.dataset,
                split=args.split,
                labels=args.labels,
                ks=args.ks,
                out_dir=args.out_dir,
            )
            _print_report(summary, args.ks)
    except (PullError, EvaluateInputError) as e:
        log.error("bad input: %s", e)
        return EXIT_BAD_INPUT
    if args.summary_json:
        write_json_atomic(args.summary_json, summary)
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
