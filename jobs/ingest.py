"""Import features into the feature store as a new dataset version.

The URI of the written version is printed as the last line of stdout.
"""

from __future__ import annotations

import argparse
import json
import logging

from feature_store.noise import NOISE_MODES, apply_noise
from feature_store.store import open_dataset, write_dataset
from jobs._cli import EXIT_OK, run_main, setup_logging

log = logging.getLogger("jobs.ingest")


def _noise_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--noise-rate", type=float, default=0.0, help="share of training items to relabel"
    )
    p.add_argument("--noise-mode", choices=NOISE_MODES, default="symmetric")
    p.add_argument("--noise-seed", type=int, default=0)


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="store root (local directory)")
    p.add_argument("--name", required=True, help="dataset name inside the store")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.ingest", description=__doc__)
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

    s = sub.add_parser("synthetic", help="generate the embedded class-structured dataset")
    _target_args(s)
    s.add_argument("--num-classes", type=int, default=10)
    s.add_argument("--train", type=int, default=2000)
    s.add_argument("--valid", type=int, default=200)
    s.add_argument("--test", type=int, default=500)
    s.add_argument("--image-dim", type=int, default=128)
    s.add_argument("--text-dim", type=int, default=100)
    s.add_argument("--class-sep", type=float, default=0.8, help="smaller is harder")
    s.add_argument("--modality-gap", type=float, default=1.5, help="larger is harder")
    s.add_argument("--seed", type=int, default=0)
    _noise_args(s)

    sh = sub.add_parser("show", help="print a version's manifest after verifying it")
    sh.add_argument("uri")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.command == "show":
        ds = open_dataset(args.uri)
        print(json.dumps(ds.manifest, indent=2, sort_keys=True))
        return EXIT_OK
    if args.command == "wiki-mat":
        from feature_store.formats import read_wiki_mat

        splits, meta = read_wiki_mat(args.input, valid_from_test=args.valid_from_test)
    else:
        from feature_store.synthetic import generate

        splits, meta = generate(
            num_classes=args.num_classes,
            counts={"train": args.train, "valid": args.valid, "test": args.test},
            image_dim=args.image_dim,
            text_dim=args.text_dim,
            class_sep=args.class_sep,
            modality_gap=args.modality_gap,
            seed=args.seed,
        )
    noise = apply_noise(splits["train"], args.noise_mode, args.noise_rate, args.noise_seed)
    uri = write_dataset(
        args.store, args.name, splits, source=meta["source"], noise=noise, protocol=meta["protocol"]
    )
    log.info("noise: %s", noise)
    print(uri)
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
