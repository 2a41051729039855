"""Pull a registered RSHNL model, encode a database from the feature store and answer top-k queries.

Needs torch, mlflow, numpy and faiss-cpu only (no Ray). The model reference is NAME@ALIAS (e.g.
rshnl-demo@champion), NAME/VERSION, or any MLflow model URI (models:/..., runs:/.../model). By
default the database is the test split's text features of the dataset the model was trained on
and the queries are that split's images (cross-modal retrieval); results go to stdout, MAP and
precision are computed when the queries have labels, progress goes to the log (stderr).

Exit code 0 is success, 2 is bad input (named in one line on stderr), 1 is a failure.
"""

from __future__ import annotations

import argparse
import logging
import os
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
from pipeline.retrieval.index import KINDS
from pipeline.retrieval.search import MODALITIES
from pipeline.tracking.pull import PullError, run_pull

log = logging.getLogger("jobs.pull")


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("pull", __doc__)
    p.add_argument("--model", required=True, help="NAME@ALIAS, NAME/VERSION or an MLflow model URI")
    p.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow store (else $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)",
    )
    p.add_argument(
        "--dataset", default="", help="feature-store version URI (default: the model's dataset)"
    )
    p.add_argument(
        "--db-split",
        default=None,
        help="split encoded as the database (default: 'database' when the dataset has one, "
        "as multi-label sets do, else 'test')",
    )
    p.add_argument("--db-modality", choices=MODALITIES, default="text")
    p.add_argument(
        "--query-split",
        default=None,
        help="split whose items query (default: 'query' when the dataset has one, else 'test')",
    )
    p.add_argument(
        "--query-modality",
        choices=MODALITIES,
        default=None,
        help="modality of the queries (default: the other one than --db-modality)",
    )
    p.add_argument(
        "--queries",
        default=None,
        help="a .npy (n, d) array of query features "
        "instead of --query-split (no labels, so no MAP)",
    )
    p.add_argument("--max-queries", type=int, default=None, help="use the first N queries")
    p.add_argument("--k", type=int, default=10, help="results per query (10)")
    p.add_argument(
        "--index",
        choices=KINDS,
        default=None,
        help="default: the index recorded with the model (auto unless its config's "
        "search_index says otherwise); flat: exact (faiss IndexBinaryFlat); ivf: IndexBinaryIVF; "
        "hash: IndexBinaryHash; mih: multi-index hashing (the last three approximate, for large "
        "databases); auto: flat below --exact-below codes, else ivf",
    )
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default ≈ √N)")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists searched per query")
    p.add_argument(
        "--exact-below",
        type=int,
        default=None,
        help="--index auto: the exact scan below this many database codes (1000000)",
    )
    p.add_argument("--hash-bits", type=int, default=None, help="bits hashed by --index hash")
    p.add_argument("--mih-tables", type=int, default=None, help="tables of --index mih")
    p.add_argument("--nflip", type=int, default=None, help="bit flips probed by hash/mih")
    p.add_argument(
        "--index-cache",
        default=None,
        help="keep built IVF indexes in this folder and reuse one when the same database codes "
        "were indexed with the same nlist, train size and seed (skips the k-means training)",
    )
    p.add_argument(
        "--labels",
        choices=("label", "clean_label"),
        default="label",
        help="label column that defines relevance for MAP (label)",
    )
    p.add_argument("--show", type=int, default=5, help="print the results of N queries (5)")
    p.add_argument("--results", default=None, help="write all results to this .npz file")
    p.add_argument("--summary-json", help="write the summary here (JSON)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.k < 1:
        raise PullError(f"--k must be at least 1, got {args.k}")
    if args.max_queries is not None and args.max_queries < 0:
        raise PullError(f"--max-queries must be ≥ 0, got {args.max_queries}")
    if args.show < 0:
        raise PullError(f"--show must be ≥ 0, got {args.show}")
    for flag in ("nlist", "nprobe", "hash_bits", "mih_tables"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise PullError(f"--{flag.replace('_', '-')} must be ≥ 1, got {v}")
    if (
        args.index_cache
        and os.path.exists(args.index_cache)
        and not os.path.isdir(args.index_cache)
    ):
        raise PullError(f"--index-cache '{args.index_cache}' exists and is not a folder")
    for flag in ("nflip", "exact_below"):
        v = getattr(args, flag)
        if v is not None and v < 0:
            raise PullError(f"--{flag.replace('_', '-')} must be ≥ 0, got {v}")


def _print_results(summary: dict[str, Any]) -> None:
    """The shown queries' results, then MAP, MAP@k and P@k when they were computed."""
    db, queries, k = summary["database"], summary["queries"], summary["k"]
    if summary["results"]:
        print(
            f"top-{k} {db['modality']} items of {db['source']} for {queries['modality']} queries "
            f"(item_id:distance, * = shares a label)"
        )
    for row in summary["results"]:
        marks = row["relevant"] or [False] * len(row["ids"])
        cells = " ".join(
            f"{it}:{d}{'*' if m else ''}"
            for it, d, m in zip(row["ids"], row["distances"], marks, strict=True)
        )
        print(f"query {row['query_id']}: {cells}")
    metrics = summary["metrics"]
    if metrics is None:
        return
    m = metrics["map"]
    print(
        f"MAP {queries['modality']}→{db['modality']}, {queries['count']} queries × "
        f"{db['size']} items, {summary['model']['bits']} bits: {m['index']:.4f} (ties by index), "
        f"{m['expected']:.4f} (tie-aware)"
    )
    at = metrics["map_at_k"][str(k)]
    pk = metrics["precision_at_k"][str(k)]
    print(
        f"MAP@{k}: {at['index']:.4f} (ties by index), {at['expected']:.4f} (tie-aware); "
        f"P@{k}: {pk['index']:.4f} (ties by index), {pk['expected']:.4f} (tie-aware); "
        f"P@{k} of the {summary['index']['kind']} index results: "
        f"{metrics['search_precision_at_k']:.4f}"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    passive_openmp()  # before faiss or torch is imported
    setup_logging(args.verbose)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        _check_args(args)
        summary = run_pull(
            args.model,
            tracking_uri=args.tracking_uri,
            dataset=args.dataset,
            db_split=args.db_split,
            db_modality=args.db_modality,
            query_split=args.query_split,
            query_modality=args.query_modality,
            queries=args.queries,
            max_queries=args.max_queries,
            k=args.k,
            index=args.index,
            hash_bits=args.hash_bits,
            mih_tables=args.mih_tables,
            nflip=args.nflip,
            nlist=args.nlist,
            nprobe=args.nprobe,
            exact_below=args.exact_below,
            labels=args.labels,
            show=args.show,
            results=args.results,
            index_cache=args.index_cache,
        )
    except PullError as e:
        log.error("bad input: %s", e)
        return EXIT_BAD_INPUT
    _print_results(summary)
    if args.summary_json:
        write_json_atomic(args.summary_json, summary)
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
