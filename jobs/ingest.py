"""Import features into the feature store as a new dataset version; list, show and clean up.

STORE is a local directory or s3://bucket/prefix (endpoint, region and credentials come from the
standard AWS environment variables). Importing commands print the URI of the written version as
the last line of stdout (mirflickr: the import's, then one line per --noise-file copy); bad input
exits with code 2 and one line on stderr, and leaves the store as it was.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from typing import Any

from feature_store import schema as S
from feature_store.ingest import import_version, import_with_label_copies, noisy_copy
from feature_store.noise import NOISE_MODES
from feature_store.plan import ImportPlan
from feature_store.store import DEFAULT_GC_HOURS, collect_garbage, open_dataset, scan_store
from jobs._cli import EXIT_OK, job_parser, run_main, setup_logging

log = logging.getLogger("jobs.ingest")


def _noise_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("label noise (train split only; clean labels are kept)")
    g.add_argument(
        "--noise-rate", type=float, default=0.0, help="share of training items to corrupt"
    )
    g.add_argument(
        "--noise-mode",
        choices=NOISE_MODES,
        default=None,
        help="symmetric (paper), asymmetric (class flip map) or multilabel; default: symmetric "
        "for single-label data, multilabel for multi-label data",
    )
    g.add_argument("--noise-seed", type=int, default=0)
    g.add_argument(
        "--flip-map",
        default=None,
        help="asymmetric noise: SRC:DST pairs such as 0:1,1:2,2:0 (default: every class to the "
        "next, c -> c+1 mod K)",
    )


def _target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument("--store", required=True, help="store root: a directory or s3://bucket/prefix")
    g.add_argument("--name", required=True, help="dataset name inside the store")
    g.add_argument(
        "--version",
        type=int,
        default=None,
        help="version number to write (default: the next one); an existing version is refused",
    )
    g.add_argument(
        "--row-group-rows",
        type=int,
        default=None,
        help="rows per Parquet row group (default: about 64 MiB of features)",
    )


def _label_args(p: argparse.ArgumentParser, *, base: bool = True) -> None:
    p.add_argument(
        "--num-classes", type=int, default=None, help="K (default: from the largest label)"
    )
    if base:
        p.add_argument(
            "--label-base",
            default="auto",
            choices=("auto", "0", "1"),
            help="class numbers start at 0 or 1 (auto: 1 when the smallest label is 1)",
        )


def _mat_importer(sub: Any, name: str, help_: str, *, valid: int | None) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_)
    p.add_argument("--input", required=True, help="path of the .mat (v5 or v7.3/HDF5) file")
    if valid is not None:
        p.add_argument(
            "--valid-from-test",
            type=int,
            default=valid,
            help=f"the first N test items become the validation split (default {valid})",
        )
    _label_args(p)
    _target_args(p)
    _noise_args(p)
    return p


def _mirflickr_parser(sub: Any) -> None:
    help_ = (
        "MIRFlickr-25K: LAll / YAll / XAll .mat files and published noisy-label .h5 files; "
        "query rows 0-1999, train rows 2000-11999, database = all but the query, validation a "
        "seeded sample of the database rows outside train"
    )
    p = sub.add_parser(
        "mirflickr",
        help=help_,
        description=help_ + ". Prints the import's URI, then one noisy copy's per --noise-file.",
    )
    p.add_argument("--labels", required=True, metavar="LALL.mat", help="variable LAll (n × 24)")
    p.add_argument(
        "--tags", required=True, metavar="YALL.mat", help="variable YAll (n × 1386): the text"
    )
    p.add_argument(
        "--image-features",
        required=True,
        metavar="XALL.mat|synthetic",
        help="variable XAll (n × 4096 VGG features), or 'synthetic': an image modality "
        "generated from the real labels (class-centre mixture + noise, seeded), recorded in the "
        "manifest as synthetic",
    )
    p.add_argument(
        "--noise-file",
        action="append",
        default=[],
        metavar="F.h5",
        help="published noisy labels (variables True, result) for the train rows (repeatable): "
        "each becomes a noisy copy of the import, a label overlay sharing its features",
    )
    p.add_argument(
        "--valid-from-database",
        type=int,
        default=2000,
        help="validation queries: a seeded sample of N database rows outside train (default "
        "2000; 0: none); never test queries",
    )
    p.add_argument("--valid-seed", type=int, default=0)
    g = p.add_argument_group("synthetic image features (--image-features synthetic)")
    g.add_argument("--synthetic-dim", type=int, default=4096, help="width (default 4096)")
    g.add_argument(
        "--synthetic-difficulty",
        type=float,
        default=0.5,
        help="0..1: class-sep 1.6(1-d), noise 3d (default 0.5, as the synthetic importer)",
    )
    g.add_argument("--synthetic-seed", type=int, default=0)
    _target_args(p)
    _noise_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = job_parser("ingest", __doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser("wiki-mat", help="Wikipedia shallow features (.mat, struct 'data')")
    w.add_argument("--input", required=True, help="path of wiki.mat")
    w.add_argument(
        "--valid-from-test",
        type=int,
        default=231,
        help="first N test items become the validation split (paper: 231)",
    )
    _target_args(w)
    _noise_args(w)

    _mat_importer(
        sub,
        "wiki-deep",
        "Wikipedia deep features: train_imgs_deep, train_texts_doc, train_imgs_labels, test_*",
        valid=231,
    )
    _mat_importer(
        sub,
        "xmedia",
        "XMedia: I_tr_CNN, I_te_CNN, T_tr_BOW, T_te_BOW, trImgCat, teImgCat",
        valid=500,
    )
    _mat_importer(
        sub,
        "inria",
        "INRIA-Websearch: tr_img, tr_txt, tr_img_lab, val_*, te_* (own validation split)",
        valid=None,
    )
    _mat_importer(
        sub,
        "xmedianet",
        "XMediaNet: cells train/valid/test ({1} image, {2} text) and *_labels",
        valid=None,
    )

    m = sub.add_parser(
        "multilabel-h5",
        help="multi-label HDF5 layout: ImgTrain/TagTrain/LabTrain, *Query, *DataBase "
        "(MIRFlickr-25K, NUS-WIDE, MS-COCO, IAPR TC-12)",
    )
    m.add_argument("--input", required=True, help="path of the .h5/.mat file")
    m.add_argument(
        "--valid-from-query",
        type=int,
        default=0,
        help="move the first N query items into a validation split (default 0: the published "
        "protocol has none)",
    )
    _label_args(m, base=False)
    _target_args(m)
    _noise_args(m)

    _mirflickr_parser(sub)

    pl = sub.add_parser(
        "plain",
        help="your own Parquet / CSV / NumPy features, mapped by column name",
        description="Inputs are FILE (with a split column) or SPLIT=FILE, one per split. "
        "Formats: .parquet, .csv/.tsv, .npz, or a directory of COLUMN.npy files.",
    )
    pl.add_argument(
        "--input", required=True, action="append", help="FILE or SPLIT=FILE (repeatable)"
    )
    pl.add_argument("--image-col", default="image", help="vector column or glob like 'img_*'")
    pl.add_argument("--text-col", default="text", help="vector column or glob like 'txt_*'")
    pl.add_argument("--label-col", default="label")
    pl.add_argument("--id-col", default=None, help="item id column (default: number the rows)")
    pl.add_argument("--split-col", default="split", help="split column of a single input file")
    pl.add_argument("--label-kind", choices=("auto", "single", "multi"), default="auto")
    pl.add_argument(
        "--label-format", choices=("auto", "index", "multi-hot", "indices"), default="auto"
    )
    pl.add_argument(
        "--valid-from-test", type=int, default=0, help="carve a validation split out of test"
    )
    pl.add_argument(
        "--valid-from-query", type=int, default=0, help="carve a validation split out of query"
    )
    pl.add_argument("--num-classes", type=int, default=None)
    pl.add_argument("--label-base", default="0", choices=("auto", "0", "1"))
    _target_args(pl)
    _noise_args(pl)

    s = sub.add_parser("synthetic", help="generate the embedded class-structured dataset")
    _target_args(s)
    s.add_argument("--label-kind", choices=S.LABEL_KINDS, default=S.SINGLE)
    s.add_argument("--num-classes", type=int, default=10)
    s.add_argument("--train", type=int, default=2000)
    s.add_argument(
        "--valid", type=int, default=200, help="validation size (multi-label too; 0: none)"
    )
    s.add_argument("--test", type=int, default=500, help="single-label test size")
    s.add_argument("--query", type=int, default=200, help="multi-label query size")
    s.add_argument("--database", type=int, default=1000, help="multi-label database size")
    s.add_argument("--max-labels", type=int, default=3, help="multi-label: classes per item, max")
    s.add_argument("--image-dim", type=int, default=128)
    s.add_argument("--text-dim", type=int, default=100)
    s.add_argument(
        "--class-sep", type=float, default=0.8, help="class separation: smaller is harder"
    )
    s.add_argument("--modality-gap", type=float, default=1.5, help="larger is harder")
    s.add_argument(
        "--difficulty",
        type=float,
        default=None,
        help="0..1, sets both: class-sep 1.6(1-d), modality-gap 3d (0.5 = the defaults)",
    )
    s.add_argument("--seed", type=int, default=0)
    _noise_args(s)

    n = sub.add_parser(
        "noise",
        help="a noisy copy of a version: new train labels, features shared by reference",
    )
    n.add_argument("uri", help="the base version (STORE/NAME/vN)")
    n.add_argument("--name", default=None, help="dataset name of the copy (default: the base's)")
    n.add_argument("--version", type=int, default=None)
    _noise_args(n)

    cl = sub.add_parser(
        "clean",
        help="a new version without (--drop) or with corrected (--relabel) suspect labels, "
        "taken from a training run's suspect_labels.parquet",
    )
    cl.add_argument("uri", help="the version the run was trained on (STORE/NAME/vN)")
    cl.add_argument("--from-run", required=True, metavar="RUN_ID", help="MLflow run id")
    how = cl.add_mutually_exclusive_group(required=True)
    how.add_argument("--drop", action="store_true", help="remove the suspects from train")
    how.add_argument(
        "--relabel", action="store_true", help="give the suspects the run's predicted class"
    )
    which = cl.add_mutually_exclusive_group(required=True)
    which.add_argument("--top", type=int, metavar="K", help="the K most suspect pairs")
    which.add_argument("--share", type=float, metavar="F", help="the most suspect share F")
    cl.add_argument("--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI")
    cl.add_argument("--name", default=None, help="dataset name of the copy (default: the base's)")
    cl.add_argument("--version", type=int, default=None)

    ls = sub.add_parser(
        "list",
        help="list the versions in a store; unreadable versions and unfinished writes are "
        "reported on stderr",
    )
    ls.add_argument("store")
    ls.add_argument("--name", default=None, help="only this dataset")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")

    gc = sub.add_parser(
        "gc",
        help="remove unfinished writes (a killed writer's .vN.tmp-* directories; on S3, claimed "
        "versions without a manifest) idle for longer than a grace period",
    )
    gc.add_argument("store")
    gc.add_argument("--name", default=None, help="only this dataset")
    gc.add_argument(
        "--older-than",
        type=float,
        default=DEFAULT_GC_HOURS,
        metavar="HOURS",
        help=f"grace period: keep writes active within this many hours (default "
        f"{DEFAULT_GC_HOURS:g}; a write still in progress is active)",
    )
    gc.add_argument("--dry-run", action="store_true", help="only report what would be removed")

    sh = sub.add_parser("show", help="print a version's manifest after verifying it")
    sh.add_argument("uri")
    return parser


# importer subcommand → (feature_store.formats function, the options it takes besides --input)
_FORMAT_PLANS: dict[str, tuple[str, tuple[str, ...]]] = {
    "wiki-mat": ("plan_wiki_mat", ("valid_from_test",)),
    "wiki-deep": ("plan_wiki_deep", ("valid_from_test", "label_base", "num_classes")),
    "xmedia": ("plan_xmedia", ("valid_from_test", "label_base", "num_classes")),
    "inria": ("plan_inria", ("label_base", "num_classes")),
    "xmedianet": ("plan_xmedianet", ("label_base", "num_classes")),
    "multilabel-h5": ("plan_multilabel_h5", ("valid_from_query", "num_classes")),
}


def _plan(args: argparse.Namespace) -> ImportPlan:
    """Read the input named on the command line into an import plan."""
    from feature_store import formats as F

    cmd = args.command
    if cmd in _FORMAT_PLANS:
        func, options = _FORMAT_PLANS[cmd]
        return getattr(F, func)(args.input, **{o: getattr(args, o) for o in options})
    if cmd == "plain":
        return _plain_plan(args)
    return _synthetic_plan(args)


def _plain_plan(args: argparse.Namespace) -> ImportPlan:
    """The ``plain`` importer's plan: files mapped by column name."""
    from feature_store.plain import plan_plain

    return plan_plain(
        args.input,
        image_col=args.image_col,
        text_col=args.text_col,
        label_col=args.label_col,
        id_col=args.id_col,
        split_col=args.split_col,
        label_kind=args.label_kind,
        label_format=args.label_format,
        num_classes=args.num_classes,
        label_base=args.label_base,
        valid_from_test=args.valid_from_test,
        valid_from_query=args.valid_from_query,
    )


def _synthetic_plan(args: argparse.Namespace) -> ImportPlan:
    """The generated dataset's plan."""
    from feature_store.synthetic import generate_plan, split_counts

    return generate_plan(
        num_classes=args.num_classes,
        counts=split_counts(
            args.label_kind,
            train=args.train,
            valid=args.valid,
            test=args.test,
            query=args.query,
            database=args.database,
        ),
        image_dim=args.image_dim,
        text_dim=args.text_dim,
        class_sep=args.class_sep,
        modality_gap=args.modality_gap,
        difficulty=args.difficulty,
        label_kind=args.label_kind,
        max_labels=args.max_labels,
        seed=args.seed,
    )


def _print_versions(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        for r in rows:
            print(json.dumps(r, sort_keys=True))
        return
    for r in rows:
        counts = " ".join(f"{k}={v}" for k, v in r["counts"].items())
        noise = r["noise"]
        noise_s = (
            "clean"
            if noise.get("mode") in (None, "none")
            else f"{noise['mode']}@{noise['rate']}"
            + ("" if noise.get("seed") is None else f" seed {noise['seed']}")
        )
        base = f" (copy of {r['base']})" if r["base"] else ""
        print(
            f"{r['name']}/v{r['version']}\t{r['label_kind']}\t{counts}\t{noise_s}{base}\t{r['uri']}"
        )


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds like an error, so a partial version is removed


def main(argv: list[str] | None = None) -> int:
    """Run one ingest command; returns the exit code (SIGTERM removes a partial write first)."""
    if threading.current_thread() is not threading.main_thread():
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    commands = {
        "show": _show,
        "list": _list,
        "gc": _gc,
        "clean": _clean,
        "noise": _noise,
        "mirflickr": _mirflickr,
    }
    return commands.get(args.command, _import)(args)


def _show(args: argparse.Namespace) -> int:
    ds = open_dataset(args.uri)
    print(json.dumps(ds.manifest, indent=2, sort_keys=True))
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    scan = scan_store(args.store, args.name)
    if not scan.versions:
        log.info("no versions in %s", args.store)
    _print_versions(scan.versions, args.json)
    for u in scan.unreadable:
        log.warning("unreadable version %s: %s", u["uri"], u["reason"])
    for st in scan.stale:
        log.warning(
            "unfinished write %s (%s, %d bytes, idle %.1f h); `python -m jobs.ingest gc` "
            "removes it once idle for longer than the grace period",
            st["uri"],
            st["kind"],
            st["bytes"],
            st["age_hours"] or 0.0,
        )
    return EXIT_OK


def _gc(args: argparse.Namespace) -> int:
    removed = collect_garbage(
        args.store, older_than_hours=args.older_than, dry_run=args.dry_run, name=args.name
    )
    total = sum(r["bytes"] for r in removed)
    verb = "would remove" if args.dry_run else "removed"
    log.info("%s %d unfinished write(s), %d bytes", verb, len(removed), total)
    return EXIT_OK


def _clean(args: argparse.Namespace) -> int:
    from pipeline.experiments.cleaning import clean_from_run

    print(
        clean_from_run(
            args.uri,
            args.from_run,
            mode="drop" if args.drop else "relabel",
            top=args.top,
            share=args.share,
            tracking_uri=args.tracking_uri,
            name=args.name,
            version=args.version,
        )
    )
    return EXIT_OK


def _noise(args: argparse.Namespace) -> int:
    uri = noisy_copy(
        args.uri,
        mode=args.noise_mode,
        rate=args.noise_rate,
        seed=args.noise_seed,
        flip_map=args.flip_map,
        name=args.name,
        version=args.version,
    )
    print(uri)
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    uri, noise = import_version(
        args.store,
        args.name,
        lambda: _plan(args),
        version=args.version,
        rows_per_group=args.row_group_rows,
        noise_mode=args.noise_mode,
        noise_rate=args.noise_rate,
        noise_seed=args.noise_seed,
        flip_map=args.flip_map,
    )
    log.info("noise: %s", noise)
    print(uri)
    return EXIT_OK


def _mirflickr(args: argparse.Namespace) -> int:
    from feature_store import mirflickr as M

    def plan() -> ImportPlan:
        return M.plan_mirflickr(
            args.labels,
            args.tags,
            args.image_features,
            valid_from_database=args.valid_from_database,
            valid_seed=args.valid_seed,
            synthetic_dim=args.synthetic_dim,
            synthetic_difficulty=args.synthetic_difficulty,
            synthetic_seed=args.synthetic_seed,
        )

    uris, noise = import_with_label_copies(
        args.store,
        args.name,
        plan,
        lambda p: M.published_noises(args.noise_file, p),
        version=args.version,
        rows_per_group=args.row_group_rows,
        noise_mode=args.noise_mode,
        noise_rate=args.noise_rate,
        noise_seed=args.noise_seed,
        flip_map=args.flip_map,
    )
    log.info("noise: %s", noise)
    for path, uri in zip(args.noise_file, uris[1:], strict=True):
        log.info("published noise %s: %s", path, uri)
    print("\n".join(uris))
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
