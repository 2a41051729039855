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

import os

# Idle OpenMP threads sleep instead of spinning (see jobs.pull); set before faiss/torch load.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import logging
import resource
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jobs._cli import EXIT_BAD_INPUT, EXIT_OK, run_main, setup_logging, write_json_atomic

log = logging.getLogger("jobs.evaluate")


class EvaluateInputError(ValueError):
    """Bad arguments to the evaluate job."""


# ------------------------------------------------------------------ the straightforward reference


def straightforward_map(
    query_codes: np.ndarray,
    db_codes: np.ndarray,
    query_labels: np.ndarray,
    db_labels: np.ndarray,
    ties: str = "expected",
) -> float:
    """MAP the usual way: scipy ``cdist`` Hamming distances, an argsort and a loop per query.

    ``ties="expected"`` applies the exact tie-aware closed form to each query's tie groups.
    """
    from scipy.spatial.distance import cdist

    bits = query_codes.shape[1]
    dist = np.rint(cdist(query_codes, db_codes, "hamming") * bits).astype(np.int64)
    relevant = (query_labels.astype(np.float32) @ db_labels.astype(np.float32).T) > 0
    n_db = db_codes.shape[0]
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, n_db + 1))])
    aps = np.zeros(len(query_codes))
    for i in range(len(query_codes)):
        order = np.argsort(dist[i], kind="stable")
        rel = relevant[i, order]
        n_rel = int(rel.sum())
        if n_rel == 0:
            continue
        if ties == "index":
            ranks = np.flatnonzero(rel) + 1.0
            aps[i] = float(np.mean(np.arange(1, n_rel + 1) / ranks))
            continue
        d = dist[i, order]
        starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
        n = np.diff(np.r_[starts, n_db]).astype(np.float64)
        r = np.add.reduceat(rel.astype(np.float64), starts)
        before = starts.astype(np.float64)
        rel_before = np.cumsum(r) - r
        b = np.where(n > 1, (r - 1) / np.maximum(n - 1, 1), 0.0)
        a = rel_before + 1
        s = n * b + (a - b - b * before) * (
            harmonic[starts + n.astype(np.int64)] - harmonic[starts]
        )
        aps[i] = float(np.sum(r / n * s)) / n_rel
    return float(aps.mean())


# ------------------------------------------------------------------------------------ benchmark


def random_case(
    n_query: int, n_db: int, bits: int, classes: int, labels: str, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random ±1 int8 codes with single-label (one-hot) or multi-label (multi-hot) labels."""
    rng = np.random.default_rng(seed)
    qc = np.where(rng.random((n_query, bits), dtype=np.float32) < 0.5, 1, -1).astype(np.int8)
    dc = np.where(rng.random((n_db, bits), dtype=np.float32) < 0.5, 1, -1).astype(np.int8)
    if labels == "single":
        eye = np.eye(classes, dtype=np.uint8)
        return qc, dc, eye[rng.integers(0, classes, n_query)], eye[rng.integers(0, classes, n_db)]
    share = min(1.0, 2.0 / classes)  # about two labels per item
    ql = (rng.random((n_query, classes)) < share).astype(np.uint8)
    dl = (rng.random((n_db, classes)) < share).astype(np.uint8)
    return qc, dc, ql, dl


_CPU: list[float] = []  # process CPU seconds of the latest _times call, one per run


def _times(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    """Wall seconds of ``repeat`` runs (CPU seconds of each run go to ``_CPU``)."""
    out, result = [], None
    _CPU.clear()
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        result = fn()
        out.append(time.perf_counter() - t0)
        _CPU.append(time.process_time() - c0)
    return out, result


def _stats(ts: list[float], cpu: list[float] | None = None) -> dict[str, float]:
    out = {"min": min(ts), "median": statistics.median(ts), "runs": len(ts)}
    if cpu:
        out["cpu_median"] = statistics.median(cpu)
    return out


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark of the module docstring; returns its summary."""
    from pipeline.retrieval import metrics as evaluate
    from pipeline.retrieval.index import HammingIndex
    from pipeline.retrieval.metrics import mean_average_precision

    evaluate.WORKERS = args.threads
    out: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_avg_start": list(os.getloadavg())},
        "threads": args.threads,
    }
    qc, dc, ql, dl = random_case(args.n_query, args.n_db, args.bits, args.classes, args.labels, 0)
    case = f"{args.n_query}×{args.n_db} at {args.bits} bits, {args.labels}-label"
    out["case"] = {
        "n_query": args.n_query,
        "n_db": args.n_db,
        "bits": args.bits,
        "labels": args.labels,
        "classes": args.classes,
    }
    log.info("case: %s; load average %s", case, out["machine"]["load_avg_start"])

    mean_average_precision(qc[:8], dc[:64], ql[:8], dl[:64], ties="expected")  # warm-up
    fast: dict[str, Any] = {}
    for ties in ("expected", "index"):
        ts, value = _times(
            lambda t=ties: mean_average_precision(qc, dc, ql, dl, ties=t), args.repeat
        )
        fast[ties] = {"map": value, "seconds": _stats(ts, _CPU)}
        log.info(
            "fast MAP (%s): %.6f in %.3fs (median %.3fs wall, %.3fs CPU)",
            ties,
            value,
            min(ts),
            statistics.median(ts),
            statistics.median(_CPU),
        )
    out["fast"] = fast

    if not args.skip_straightforward:
        ref: dict[str, Any] = {}
        for ties in ("expected", "index"):
            ts, value = _times(
                lambda t=ties: straightforward_map(qc, dc, ql, dl, ties=t), args.repeat_reference
            )
            ref[ties] = {"map": value, "seconds": _stats(ts, _CPU)}
            diff = abs(value - fast[ties]["map"])
            ref[ties]["abs_difference"] = diff
            ref[ties]["speedup_median"] = statistics.median(ts) / fast[ties]["seconds"]["median"]
            ref[ties]["speedup_min"] = min(ts) / fast[ties]["seconds"]["min"]
            log.info(
                "straightforward MAP (%s): %.6f in %.2fs → %.1f× slower than the fast path "
                "(medians; %.1f× by minimum times; |difference| %.2e)",
                ties,
                value,
                min(ts),
                ref[ties]["speedup_median"],
                ref[ties]["speedup_min"],
                diff,
            )
            if diff > 1e-9:
                raise RuntimeError(f"fast and straightforward MAP ({ties}) differ by {diff:.3e}")
        out["straightforward"] = ref

    if args.search_k:
        k = min(args.search_k, args.n_db)
        import faiss

        packed_q, packed_d = evaluate.pack_codes(qc), evaluate.pack_codes(dc)
        plain = faiss.IndexBinaryFlat(packed_d.shape[1] * 8)
        plain.add(packed_d)
        ours = HammingIndex(dc)
        t_plain, t_ours = [], []
        for _ in range(args.repeat):  # interleaved, so both see the same machine load
            t0 = time.perf_counter()
            d_plain, i_plain = plain.search(packed_q, k)
            t_plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            d_ours, i_ours = ours.search(qc, k)
            t_ours.append(time.perf_counter() - t0)
        pack_s, _ = _times(lambda: ours._pack(qc, "query_codes"), args.repeat)
        same = bool(np.array_equal(i_plain, i_ours) and np.array_equal(d_plain, d_ours))
        ratio = statistics.median(t_ours) / statistics.median(t_plain)
        out["search"] = {
            "k": k,
            "faiss_index_binary_flat": _stats(t_plain),
            "hamming_index": _stats(t_ours),
            "ratio_median": ratio,
            "query_packing": _stats(pack_s),
            "identical_results": same,
        }
        log.info(
            "top-%d search: HammingIndex %.3fs vs faiss IndexBinaryFlat %.3fs (medians) → "
            "ratio %.3f (its own work, checking and packing the ±1 queries: %.4fs); "
            "identical results: %s",
            k,
            statistics.median(t_ours),
            statistics.median(t_plain),
            ratio,
            statistics.median(pack_s),
            same,
        )

    if args.large:
        n = args.large
        qc2, dc2, ql2, dl2 = random_case(n, n, args.bits, args.classes, args.labels, 1)
        large: dict[str, Any] = {"n": n, "pairs": n * n}
        for ties in args.large_ties:
            tracemalloc.start()
            t0 = time.perf_counter()
            value = mean_average_precision(qc2, dc2, ql2, dl2, ties=ties)
            seconds = time.perf_counter() - t0
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            large[ties] = {"map": value, "seconds": seconds, "peak_traced_mib": peak / 2**20}
            log.info(
                "%d×%d MAP (%s): %.6f in %.2fs, peak traced memory %.0f MiB (inputs %.0f MiB)",
                n,
                n,
                ties,
                value,
                seconds,
                peak / 2**20,
                (qc2.nbytes + dc2.nbytes + ql2.nbytes + dl2.nbytes) / 2**20,
            )
        large["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["large"] = large
    out["machine"]["load_avg_end"] = list(os.getloadavg())
    return out


# ---------------------------------------------------------------------------------------- model


def run_model(args: argparse.Namespace) -> dict[str, Any]:
    """Cross-modal evaluation of a registered model on one split of the feature store."""
    from feature_store import schema as S
    from feature_store.store import open_dataset
    from jobs.pull import PullError, load_registered_model
    from pipeline.retrieval import metrics as evaluate
    from pipeline.tracking.runs import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    model = load_registered_model(args.model, tracking_uri)
    dataset = args.dataset or model.dataset
    if not dataset:
        raise PullError("the model names no dataset (config or run tag); pass --dataset URI")
    ds = open_dataset(dataset)
    for m in ("image", "text"):
        if int(ds.dims[m]) != model.dim(m):
            raise PullError(
                f"dataset {ds.data_version} has {m} features of dimension {ds.dims[m]}, but the "
                f"model's {m} head expects {model.dim(m)}"
            )
    splits = set(ds.manifest.get("counts", {}))
    if args.split is None and {"query", "database"} <= splits:
        query_split, db_split = "query", "database"  # the multi-label protocol
    else:
        query_split = db_split = args.split or "test"  # a set against itself

    def codes(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a = ds.read_arrays(split, [S.IMAGE, S.TEXT, args.labels])
        if len(a[S.IMAGE]) == 0:
            raise PullError(f"split '{split}' of {ds.uri} is empty")
        img = model.encode(a[S.IMAGE].astype(np.float32), "image")
        return img, model.encode(a[S.TEXT].astype(np.float32), "text"), a[args.labels]

    q_img, q_txt, q_lab = codes(query_split)
    d_img, d_txt, d_lab = (q_img, q_txt, q_lab) if db_split == query_split else codes(db_split)
    ks = sorted({min(k, len(d_lab)) for k in args.ks})
    report = {
        "i2t": evaluate.retrieval_report(q_img, d_txt, q_lab, d_lab, ks=ks),
        "t2i": evaluate.retrieval_report(q_txt, d_img, q_lab, d_lab, ks=ks),
    }
    for direction, r in report.items():
        print(
            f"{direction}: MAP {r['map']['index']:.4f} (ties by index), "
            f"{r['map']['expected']:.4f} (tie-aware); "
            + "; ".join(
                f"MAP@{k} {r['map_at_k'][str(k)]['index']:.4f}, "
                f"P@{k} {r['precision_at_k'][str(k)]['index']:.4f}"
                for k in ks
            )
        )
    if args.out_dir:
        from pipeline.tracking.plots import PR_PNG, plot_pr_curves

        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_pr_curves({d: r["pr_curve"] for d, r in report.items()}, out_dir / PR_PNG)
        log.info("wrote %s", out_dir / PR_PNG)
    return {
        "model": {"ref": args.model, "uri": model.uri, "version": model.version},
        "dataset": ds.uri,
        "data_version": ds.data_version,
        "query_split": query_split,
        "database_split": db_split,
        "labels": args.labels,
        "bits": model.bits,
        "report": report,
    }


# ------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    from jobs.pull import PullError

    try:
        if args.command == "bench":
            if min(args.n_query, args.n_db, args.bits, args.classes, args.repeat) < 1:
                raise EvaluateInputError(
                    "--n-query, --n-db, --bits, --classes and --repeat must be ≥ 1"
                )
            summary = run_bench(args)
        else:
            summary = run_model(args)
    except (PullError, EvaluateInputError) as e:
        log.error("bad input: %s", e)
        return EXIT_BAD_INPUT
    if args.summary_json:
        write_json_atomic(args.summary_json, summary)
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
