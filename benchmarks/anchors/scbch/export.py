"""Export an imported MIRFlickr-25K store version into the files the upstream SCBCH code reads.

The upstream loader (``utils/tools.py``: ``DataList``, ``get_data``) reads, relative to its working
directory,

* ``data/MIRFlickr.h5``: ``ImgTrain``/``TagTrain``/``LabTrain`` (10000 rows), ``ImgQuery``/
  ``TagQuery``/``LabQuery`` (2000) and ``ImgDataBase``/``TagDataBase``/``LabDataBase`` (18015),
  in file-row order; ``Lab*`` are the clean labels;
* ``noise_label/mirflickr25k-lall-noise_<rate>.h5``: ``result`` (the observed, noisy train
  labels) and ``True`` (the clean train labels), row i = train row i.

This writes exactly those from the store's ``train``, ``query`` and ``database`` splits (rows
sorted by ``item_id`` = file row, which is the upstream ``SaveH5File_F`` order): features as stored
(float32; the upstream code casts them to float32 when it reads them), labels as float64 (as
``SaveH5File_F`` writes them), observed train labels from the version's ``label`` column and
clean ones from ``clean_label``. The store's ``valid`` split is not exported (upstream has none).
``export.json`` records the version, its manifest digest and the item ids of every split.

    python benchmarks/anchors/scbch/export.py --dataset STORE/mirflickr/v3 --out WORKDIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from feature_store.store import open_dataset

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger("export")

SPLITS = {"train": "Train", "query": "Query", "database": "DataBase"}
COLUMNS = ["item_id", "image", "text", "label", "clean_label"]


def noise_file_name(rate: float) -> str:
    """The name upstream's loader builds with ``"...noise_{}.h5".format(noise_rate)``."""
    return f"mirflickr25k-lall-noise_{float(rate)}.h5"


def _write_h5(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write datasets to ``path`` under a temporary name, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with h5py.File(tmp, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
    tmp.replace(path)


def export(dataset_uri: str, out: str | Path) -> dict[str, Any]:
    """Write ``data/MIRFlickr.h5`` and the noise file for ``dataset_uri`` under ``out``."""
    ds = open_dataset(dataset_uri)
    out = Path(out)
    rate = float(ds.manifest.get("noise", {}).get("rate") or 0.0)
    main: dict[str, np.ndarray] = {}
    ids: dict[str, list[int]] = {}
    train: dict[str, np.ndarray] = {}
    for split, suffix in SPLITS.items():
        a = ds.read_arrays(split, COLUMNS)
        order = np.argsort(a["item_id"], kind="stable")
        a = {k: v[order] for k, v in a.items()}
        ids[split] = [int(i) for i in a["item_id"]]
        main[f"Img{suffix}"] = a["image"].astype(np.float32)
        main[f"Tag{suffix}"] = a["text"].astype(np.float32)
        main[f"Lab{suffix}"] = a["clean_label"].astype(np.float64)
        if split == "train":
            train = a
    _write_h5(out / "data" / "MIRFlickr.h5", main)
    noisy = train["label"].astype(np.float64)
    clean = train["clean_label"].astype(np.float64)
    _write_h5(out / "noise_label" / noise_file_name(rate), {"result": noisy, "True": clean})
    changed = int((noisy != clean).any(axis=1).sum())
    info = {
        "dataset": ds.uri,
        "data_version": ds.data_version,
        "noise_rate": rate,
        "noise_file": noise_file_name(rate),
        "changed_train_rows": changed,
        "counts": {s: len(v) for s, v in ids.items()},
        "item_ids": ids,
    }
    tmp = out / f".export.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(info))
    tmp.replace(out / "export.json")
    log.info(
        "exported %s to %s: counts %s, noise %s with %d changed train rows",
        ds.data_version,
        out,
        info["counts"],
        info["noise_file"],
        changed,
    )
    return info


def main(argv: list[str] | None = None) -> None:
    """Command line: --dataset URI --out DIR."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", required=True, help="a MIRFlickr store version (STORE/NAME/vN)")
    p.add_argument("--out", required=True, help="the upstream working directory to write")
    args = p.parse_args(argv)
    export(args.dataset, args.out)


if __name__ == "__main__":
    main()
