"""Markdown tables of SCBCH, RSHNL and plain runs on MIRFlickr (the JSON summaries that
``benchmarks/anchors/scbch/run_project.py`` writes): one row per run, then means over seeds with
the differences the method comparison asks for (SCBCH − plain, SCBCH − RSHNL).

    python benchmarks/mirflickr_methods.py RUN.json [RUN.json ...] > table.md
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any


def method_of(cfg: dict[str, Any]) -> str:
    """SCBCH (with its form), RSHNL or plain, from the run's config."""
    if cfg["method"] == "scbch":
        return f"SCBCH {cfg.get('scbch_form', 'project')}"
    return "plain" if cfg["loss_form"] == "ce" and cfg["weighting"] == "none" else "RSHNL"


def load(paths: list[str]) -> list[dict[str, Any]]:
    rows = []
    for p in paths:
        s = json.loads(Path(p).read_text())
        c = s["config"]
        rows.append(
            {
                "method": method_of(c),
                "data": s["data_version"],
                "bits": c["bits"],
                "train_epochs": c["epochs"],
                "seed": c["seed"],
                "i2t": s["test_map"]["i2t"],
                "t2i": s["test_map"]["t2i"],
                "i2t_k": s["test_map"].get("i2t_at_k", float("nan")),
                "t2i_k": s["test_map"].get("t2i_at_k", float("nan")),
                "auc": s["noise_detection"].get("weight_auc", float("nan")),
                "best_epoch": s["best_epoch"],
                "epochs": s["epochs_run"],
                "executor": s.get("executor", "?"),
                "wall": s.get("process_wall_seconds", float("nan")),
            }
        )
    return rows


def main(paths: list[str]) -> None:
    rows = sorted(
        load(paths),
        key=lambda r: (r["data"], r["bits"], r["train_epochs"], r["method"], r["seed"]),
    )
    out = [
        "| data version | bits | method | seed | executor | best epoch | MAP@all I2T | MAP@all T2I "
        "| MAP@5000 I2T | MAP@5000 T2I | noise AUC of −w | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['data']} | {r['bits']} | {r['method']} | {r['seed']} | {r['executor']} | "
            f"{r['best_epoch']}/{r['epochs']} | {r['i2t']:.4f} | {r['t2i']:.4f} | "
            f"{r['i2t_k']:.4f} | {r['t2i_k']:.4f} | {r['auc']:.3f} | {r['wall']:.0f} |"
        )
    out += [
        "",
        "Means over the seeds every method of the row ran (MAP@all; n = seeds), and SCBCH's "
        "margins:",
        "",
        "| data version | bits | epochs | SCBCH form | n | SCBCH I2T / T2I | RSHNL I2T / T2I "
        "| plain I2T / T2I | SCBCH − plain | SCBCH − RSHNL |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    cells: dict[tuple[str, int, int], dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        key = (r["data"], r["bits"], r["train_epochs"])
        cells.setdefault(key, {}).setdefault(r["method"], []).append(r)
    for (data, bits, epochs), by in sorted(cells.items()):
        for form in sorted(m for m in by if m.startswith("SCBCH")):
            if not all(m in by for m in ("RSHNL", "plain")):
                continue
            trio = (form, "RSHNL", "plain")
            seeds = set.intersection(*({r["seed"] for r in by[m]} for m in trio))
            if not seeds:
                continue
            mean = {
                m: {
                    t: statistics.mean(r[t] for r in by[m] if r["seed"] in seeds)
                    for t in ("i2t", "t2i")
                }
                for m in trio
            }
            pair = {m: f"{mean[m]['i2t']:.4f} / {mean[m]['t2i']:.4f}" for m in trio}
            diff = {
                b: " / ".join(f"{mean[form][t] - mean[b][t]:+.4f}" for t in ("i2t", "t2i"))
                for b in ("plain", "RSHNL")
            }
            out.append(
                f"| {data} | {bits} | {epochs} | {form.split()[1]} | {len(seeds)} | {pair[form]} | "
                f"{pair['RSHNL']} | {pair['plain']} | {diff['plain']} | {diff['RSHNL']} |"
            )
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1:])
