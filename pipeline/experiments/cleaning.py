"""A cleaned dataset version from a run's suspect-label report (drop or relabel the suspects)."""

from __future__ import annotations

import logging
import tempfile
from typing import Any

from feature_store.store import check_target, open_dataset, write_cleaned_copy
from pipeline.config import ConfigError
from pipeline.method.suspects import SUSPECTS_FILE, read_report
from pipeline.tracking import runs as tracking

log = logging.getLogger(__name__)


def select_suspects(report: Any, top: int | None, share: float | None) -> Any:
    """The ``top`` most suspect rows, or the most suspect ``share`` of the report."""
    if (top is None) == (share is None):
        raise ConfigError("clean: give exactly one of --top K or --share F")
    if top is not None and top < 1:
        raise ConfigError(f"clean: --top {top}: must be ≥ 1")
    if share is not None and not 0 < share < 1:
        raise ConfigError(f"clean: --share {share}: must be in (0, 1)")
    n = top if top is not None else round(share * report.num_rows)
    return report.slice(0, min(n, report.num_rows))


def clean_from_run(
    version_uri: str,
    run_id: str,
    *,
    mode: str,
    top: int | None = None,
    share: float | None = None,
    tracking_uri: str = "",
    name: str | None = None,
    version: int | None = None,
) -> str:
    """Write a new version of ``version_uri`` without (``mode`` "drop") or with corrected
    (``mode`` "relabel": the run's predicted class) suspect labels; return its URI.

    Every check (the run exists, holds a report, was trained on this very data version; the
    target version is free) runs before anything is written.
    """
    if mode not in ("drop", "relabel"):
        raise ConfigError(f"clean: mode {mode!r}: must be 'drop' or 'relabel'")
    ds = open_dataset(version_uri)
    check_target(ds.store_location.uri, name or ds.manifest["name"], version)
    uri = tracking.resolve_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local, tags = tracking.run_artifact(uri, run_id, SUSPECTS_FILE, tmp)
        report = read_report(local)
    trained_on = tags.get("data_version")
    if trained_on != ds.data_version:
        raise ConfigError(
            f"--from-run: run {run_id} was trained on data version {trained_on}, not on "
            f"{ds.uri} ({ds.data_version}); its suspects belong to that version"
        )
    chosen = select_suspects(report, top, share)
    ids = chosen.column("item_id").to_numpy()
    rule = {"top": top} if top is not None else {"share": share}
    cleaning = {
        "from_run": run_id,
        "tracking_uri": uri,
        "mode": mode,
        "rule": rule,
        "items": int(ids.size),
        "score": "pair loss ℓ_i of the run's last epoch",
        "source_data_version": ds.data_version,
    }
    if mode == "drop":
        out = write_cleaned_copy(ds.uri, drop=ids, cleaning=cleaning, name=name, version=version)
    else:
        pred = chosen.column("predicted").to_numpy()
        relabel = {int(i): int(c) for i, c in zip(ids, pred, strict=True)}
        out = write_cleaned_copy(
            ds.uri, relabel=relabel, cleaning=cleaning, name=name, version=version
        )
    log.info("%s %d suspect label(s) of %s → %s", mode, ids.size, ds.uri, out)
    return out
