"""Benchmarks of the training path.

``scaling``: seconds per epoch of a plain single-process PyTorch loop over in-memory tensors and of
Ray Train runs with 1..N workers, measured in one invocation, with the time each Ray epoch spends
outside the training step (data wait, end-of-epoch gathers, evaluation, checkpoint, report).
``plain``: the training step alone in one process, on CPU or one GPU.
``grid``: method × noise rate × bits × seed, each cell a training run; resumable; writes a Markdown
table laid out like the paper's Table 1 and a CSV, and logs every cell to MLflow.
``index``: Hamming top-k on N synthetic clustered codes: the exact scan vs IVF (and mih), queries/s,
tie-aware recall@k against the exact scan, build time and memory, in one run.
``scbch-knn``: SCBCH's sharded reliability kNN on synthetic codes: memory per worker, seconds per
refresh, agreement with the exact kNN.
``streaming``: Ray Train on a train split larger than the object store (streamed) against a split
that fits (cached), under the same object-store size: rows seen, rows/s, peak RSS per process and
object-store use per epoch.
"""

from __future__ import annotations

import argparse
import logging

from jobs._cli import EXIT_FAILED, EXIT_OK, job_parser, run_main, setup_logging, write_json_atomic
from pipeline.config import ConfigError, TrainConfig
from pipeline.experiments.benchmark import format_table, plain_benchmark, scaling
from pipeline.method.variants import DESCRIPTIONS

log = logging.getLogger("jobs.benchmark")


def build_parser() -> argparse.ArgumentParser:
    p = job_parser("benchmark", __doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scaling", help="plain loop vs Ray Train with 1..N workers")
    s.add_argument("--dataset", required=True)
    s.add_argument("--config", help="YAML with TrainConfig keys (e.g. configs/wiki.yaml)")
    s.add_argument("--epochs", type=int, default=4)
    s.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    s.add_argument("--threads", type=int, default=2, help="CPU threads for the whole run")
    s.add_argument("--use-gpu", action="store_true")
    s.add_argument(
        "--checkpoint-every",
        default="",
        help="comma-separated checkpoint policies to run side by side, e.g. 1,5 "
        "(full checkpoint every N epochs and at the last; default: the config's)",
    )
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
    ix = sub.add_parser("index", help="exact scan vs IVF (and mih) on N synthetic clustered codes")
    ix.add_argument("--n", type=int, default=10_000_000, help="database codes (10M)")
    ix.add_argument("--bits", type=int, default=128, help="code length, a multiple of 8 (128)")
    ix.add_argument("--queries", type=int, default=1000, help="queries (1000)")
    ix.add_argument("--k", type=int, default=100, help="results per query (100)")
    ix.add_argument("--centers", type=int, default=None, help="cluster centres (default N/1000)")
    ix.add_argument("--flip", type=float, default=0.1, help="bit-flip probability (0.1)")
    ix.add_argument("--nlist", type=int, default=None, help="IVF lists (default: ≈√N, power of 2)")
    ix.add_argument("--nprobe", default="", help="comma-separated nprobe values to measure")
    ix.add_argument("--mih", action="store_true", help="also measure IndexBinaryMultiHash")
    ix.add_argument("--threads", type=int, default=1, help="faiss threads (1)")
    ix.add_argument("--seed", type=int, default=0)
    ix.add_argument("--summary-json")
    kn = sub.add_parser("scbch-knn", help="SCBCH's sharded reliability kNN on synthetic codes")
    kn.add_argument("--items", type=int, default=1_000_000, help="training items (1M)")
    kn.add_argument("--bits", type=int, default=64)
    kn.add_argument("--shards", type=int, default=4, help="simulated workers (4)")
    kn.add_argument("--kind", choices=("flat", "ivf"), default="ivf")
    kn.add_argument("--nprobe", type=int, default=16)
    kn.add_argument("--subset", type=int, default=20_000, help="queries checked against exact")
    kn.add_argument("--seed", type=int, default=0)
    kn.add_argument("--summary-json")
    st = sub.add_parser(
        "streaming", help="a train split larger than the object store vs one that fits"
    )
    st.add_argument("--big", required=True, help="dataset URI whose train split is streamed")
    st.add_argument("--small", required=True, help="dataset URI whose train split fits")
    st.add_argument("--config", help="YAML with TrainConfig keys")
    st.add_argument("--epochs", type=int, default=2)
    st.add_argument("--workers", type=int, default=2)
    st.add_argument("--cpus-per-worker", type=float, default=0.5)
    st.add_argument(
        "--object-store-memory", default="1GiB", help="object store size, e.g. 1GiB, 800MB"
    )
    st.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    st.add_argument("--summary-json")
    return p


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20}
_UNITS |= {"GIB": 2**30}


def parse_bytes(text: str) -> int:
    """``1GiB``, ``800MB``, ``123456`` as bytes; ConfigError naming the value otherwise."""
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        return int(float(num) * _UNITS[t[len(num) :]])
    except (ValueError, KeyError):
        msg = f"--object-store-memory {text!r}: expected bytes such as 1GiB or 800MB"
        raise ConfigError(msg) from None


def streaming(args: argparse.Namespace) -> int:
    """The streaming subcommand (``pipeline.experiments.streaming_bench``)."""
    from feature_store.store import open_dataset
    from pipeline.experiments.streaming_bench import format_streaming, streaming_benchmark

    store = parse_bytes(args.object_store_memory)
    if store < 80 * 10**6:
        raise ConfigError(f"--object-store-memory {args.object_store_memory}: Ray needs ≥ 80 MB")
    if args.epochs < 1 or args.workers < 1 or args.cpus_per_worker <= 0:
        raise ConfigError("--epochs and --workers must be ≥ 1, --cpus-per-worker > 0")
    cfgs = []
    for uri in (args.big, args.small):
        open_dataset(uri, verify=False)  # a missing or broken version: exit 2 before Ray starts
        cfgs.append(
            TrainConfig.load(
                args.config,
                {
                    "dataset": uri,
                    "epochs": args.epochs,
                    "workers": args.workers,
                    "cpus_per_worker": args.cpus_per_worker,
                    "register_model": False,
                    "run_name": "",
                    "experiment_name": "benchmark",
                },
            )
        )
    result = streaming_benchmark(cfgs[0], cfgs[1], store, args.interval)
    table = format_streaming(result)
    log.info("streaming:\n%s", table)
    print(table)
    if args.summary_json:
        write_json_atomic(args.summary_json, result)
    return EXIT_OK


def index(args: argparse.Namespace) -> int:
    """The index subcommand: its flags passed to ``pipeline.retrieval.index_bench``."""
    from pipeline.retrieval.index_bench import format_index_table, index_benchmark

    result = index_benchmark(
        args.n,
        bits=args.bits,
        queries=args.queries,
        k=args.k,
        centers=args.centers,
        flip=args.flip,
        nlist=args.nlist,
        nprobes=_csv(args.nprobe, int),
        mih=args.mih,
        threads=args.threads,
        seed=args.seed,
    )
    print(format_index_table(result))
    if args.summary_json:
        write_json_atomic(args.summary_json, result)
    return EXIT_OK


def _csv(text: str, kind: type) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ConfigError(f"could not read the list {text!r}: {e}") from e


def grid(args: argparse.Namespace) -> int:
    """The grid subcommand: its flags as a GridSpec, run by ``pipeline.experiments.grid``."""
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


def scbch_knn(args: argparse.Namespace) -> int:
    """The scbch-knn subcommand (``pipeline.experiments.knn_bench``)."""
    from pipeline.experiments.knn_bench import scbch_knn_benchmark

    if min(args.items, args.shards, args.bits, args.nprobe, args.subset) < 1:
        raise ConfigError("--items, --shards, --bits, --nprobe and --subset must be ≥ 1")
    result = scbch_knn_benchmark(
        args.items, args.bits, args.shards, args.kind, args.nprobe, subset=args.subset,
        seed=args.seed,
    )  # fmt: skip
    log.info("scbch-knn: %s", result)
    if args.summary_json:
        write_json_atomic(args.summary_json, result)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.command == "grid":
        return grid(args)
    if args.command == "index":
        return index(args)
    if args.command == "scbch-knn":
        return scbch_knn(args)
    if args.command == "streaming":
        return streaming(args)
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
        result = plain_benchmark(cfg, args.threads, args.device)
        log.info("plain loop on %s: %s", args.device, result)
        if args.summary_json:
            write_json_atomic(args.summary_json, result)
        return EXIT_OK
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    result = scaling(cfg, workers, args.threads, _csv(args.checkpoint_every, int) or None)
    table = format_table(result)
    log.info("scaling (steady-state epochs 2..%d):\n%s", cfg.epochs, table)
    print(table)
    if args.summary_json:
        write_json_atomic(args.summary_json, result)
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
