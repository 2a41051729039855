"""The only module that talks to MLflow: runs, params, metrics, artifacts and the model registry."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

_PKG_ROOT = Path(__file__).resolve().parents[2]  # the folder holding pipeline/, jobs/, ...
_SOURCE_DIRS = ("pipeline", "jobs", "feature_store")


def source_files() -> list[Path]:
    """The project's Python sources that :func:`code_version` digests."""
    return [p for d in _SOURCE_DIRS for p in sorted((_PKG_ROOT / d).rglob("*.py"))]


def resolve_tracking_uri(configured: str = "") -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a sqlite store in the working directory."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        uri = f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    return uri


def code_version() -> dict[str, str]:
    """Git commit (when in a checkout) and a digest of the project's source files."""
    h = hashlib.sha256()
    for p in source_files():
        h.update(str(p.relative_to(_PKG_ROOT)).encode())
        h.update(p.read_bytes())
    out = {"code_digest": h.hexdigest()[:16], "git_commit": "unknown"}
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_PKG_ROOT, capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=_PKG_ROOT,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            out["git_commit"] = commit.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _experiment_id(client, name: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
) -> str:
    """Create a run with its config as params and its data/code versions as tags; return its id."""
    client = _client(tracking_uri)
    exp_id = _experiment_id(client, experiment_name, tracking_uri)
    run = client.create_run(exp_id, run_name=run_name or None, tags=tags)
    from mlflow.entities import Param

    flat = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(flat), 100):
        client.log_batch(run.info.run_id, params=flat[i : i + 100])
    return run.info.run_id


class EpochLogger:
    """Per-epoch metrics from the training loop into an existing run."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self._client = _client(tracking_uri)
        self._run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for attempt in range(5):  # sqlite can be briefly locked by another writer
            try:
                self._client.log_batch(self._run_id, metrics=batch)
                return
            except Exception as e:
                if attempt == 4:
                    log.warning("could not log epoch %d metrics to MLflow: %s", step, e)
                time.sleep(0.5 * (attempt + 1))


CHAMPION = "champion"


def data_version_of(config: dict[str, Any], manifest: dict[str, Any]) -> str:
    """The run's dataset version: the config's ``data_version``, else derived from the manifest
    the way :attr:`feature_store.store.DatasetVersion.data_version` derives it."""
    if config.get("data_version"):
        return str(config["data_version"])
    if {"name", "version", "files"} <= set(manifest):
        digest = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode())
        return f"{manifest['name']}/v{manifest['version']}@{digest.hexdigest()[:12]}"
    return ""


def _valid_map(final_metrics: dict[str, Any]) -> float | None:
    """``best_valid_map``: its ``mean`` when it is a dict (I2T, T2I, mean), else the number."""
    v = final_metrics.get("best_valid_map")
    if isinstance(v, dict):
        v = v.get("mean")
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


# A new version is compared only with a champion that agrees on all of these.
COMPARABLE_ON = ("data_version", "bits", "method")
LOCK_SUFFIX = ".promotion-lock"
LOCK_LEASE_SECONDS = 60.0  # a holder that died releases the lock after this long
LOCK_WAIT_SECONDS = 180.0
_ALIAS_ATTEMPTS = 3


class PromotionError(RuntimeError):
    """The champion alias could not be decided safely (e.g. the promotion lock stayed held)."""


def comparison_key(config: dict[str, Any], data_version: str) -> dict[str, str]:
    """What a validation MAP is comparable across: dataset version, code length and method."""
    return {
        "data_version": str(data_version or ""),
        "bits": str(config.get("bits", "") or ""),
        "method": str(config.get("method", "") or ""),
    }


def _describe(key: dict[str, str]) -> str:
    return ", ".join(f"{k} {key.get(k) or 'unrecorded'}" for k in COMPARABLE_ON)


def _version_key(client: Any, mv: Any) -> dict[str, str]:
    """A registered version's comparison key: its tags, else its run's params."""
    key = {k: mv.tags.get(k, "") for k in COMPARABLE_ON}
    if not all(key.values()) and mv.run_id:
        from mlflow.exceptions import MlflowException

        try:
            params = client.get_run(mv.run_id).data.params
        except MlflowException:
            params = {}
        key = {k: key[k] or params.get(k, "") for k in COMPARABLE_ON}
    return key


def promotion_decision(
    client: Any, name: str, key: dict[str, str], valid_map: float | None
) -> tuple[bool, str]:
    """Whether a new version of ``name`` gets the champion alias, and why (one sentence).

    Rule: it does when there is no champion yet, or when its validation MAP is strictly higher
    than the champion's and the champion has the same dataset version, bits and method
    (:data:`COMPARABLE_ON`). A champion that differs in any of them, or did not record one, is
    not comparable and keeps the alias (move it by hand to switch).
    """
    from mlflow.exceptions import MlflowException

    dv = key.get("data_version", "")
    if valid_map is None:
        return False, "no validation MAP was recorded, so it cannot be compared"
    try:
        champ = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return True, f"no '{CHAMPION}' yet; validation MAP {valid_map:.4f} on {dv}"
    champ_key = _version_key(client, champ)
    differs = [k for k in COMPARABLE_ON if not champ_key[k] or champ_key[k] != key.get(k)]
    if differs:
        return False, (
            f"current {CHAMPION} (version {champ.version}) has {_describe(champ_key)}; this "
            f"one has {_describe(key)}; validation MAPs that differ in "
            f"{', '.join(differs)} are not comparable"
        )
    champ_map: float | None = None
    try:
        champ_map = float(champ.tags["valid_map_mean"])
    except (KeyError, ValueError):
        if champ.run_id:
            champ_map = client.get_run(champ.run_id).data.metrics.get("final/best_valid_map_mean")
    if champ_map is None or not math.isfinite(champ_map):
        return True, (
            f"current {CHAMPION} (version {champ.version}) has no recorded validation MAP; "
            f"this one has {valid_map:.4f} on {dv}"
        )
    if valid_map > champ_map:
        return True, (
            f"validation MAP {valid_map:.4f} beats {CHAMPION} version {champ.version} "
            f"({champ_map:.4f}) on {dv}"
        )
    return False, (
        f"validation MAP {valid_map:.4f} does not beat {CHAMPION} version {champ.version} "
        f"({champ_map:.4f}) on {dv}"
    )


def _lock_holder(client: Any, lock: str) -> tuple[str, float] | None:
    """(owner, expiry as a Unix time) of the promotion lock, or None when it is free."""
    from mlflow.exceptions import MlflowException

    try:
        rm = client.get_registered_model(lock)
    except MlflowException:
        return None
    try:
        expires = float(rm.tags["expires"])
    except (KeyError, ValueError):  # not written by promotion_lock: a lease from its creation
        expires = (rm.creation_timestamp or 0) / 1000 + LOCK_LEASE_SECONDS
    return rm.tags.get("owner", ""), expires


@contextmanager
def promotion_lock(
    client: Any,
    name: str,
    *,
    lease_seconds: float | None = None,
    wait_seconds: float | None = None,
) -> Iterator[str]:
    """Hold the promotion lock of registered model ``name``; yield the owner id.

    The lock is a registered model ``NAME.promotion-lock``: creating a registered model is
    atomic in the registry (a second create of the same name fails), which a tag written and
    read back is not. Its ``expires`` tag is a lease: a lock whose holder died is taken over
    once it has expired. Raises :class:`PromotionError` after ``wait_seconds`` of a live lock.
    """
    from mlflow.exceptions import MlflowException

    lease_seconds = LOCK_LEASE_SECONDS if lease_seconds is None else lease_seconds
    wait_seconds = LOCK_WAIT_SECONDS if wait_seconds is None else wait_seconds
    lock = f"{name}{LOCK_SUFFIX}"
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={"owner": owner, "expires": repr(time.time() + lease_seconds)},
                description=(
                    f"Held while a version of '{name}' is being promoted; removed when done. "
                    "Safe to delete once its 'expires' time has passed."
                ),
            )
            break
        except MlflowException as e:
            # The SQL store answers a duplicate create by looking the model up; when the holder
            # released the lock in between, that lookup fails with "not found": retry.
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        holder = _lock_holder(client, lock)
        if holder is not None and holder[1] < time.time():
            log.warning("promotion lock of %s held by %s expired; taking it over", name, holder[0])
            if _lock_holder(client, lock) == holder:
                _delete_lock(client, lock)
            continue
        if time.monotonic() > deadline:
            raise PromotionError(
                f"promotion lock '{lock}' is still held by {holder[0] if holder else 'someone'} "
                f"after {wait_seconds:.0f} s"
            )
        time.sleep(random.uniform(0.05, 0.25))
    try:
        yield owner
    finally:
        holder = _lock_holder(client, lock)
        if holder is not None and holder[0] == owner:
            _delete_lock(client, lock)


def _delete_lock(client: Any, lock: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(lock)
    except MlflowException:  # already gone
        pass


def promote(
    client: Any, name: str, version: str, key: dict[str, str], valid_map: float | None
) -> tuple[bool, str]:
    """Compare-and-set of the champion alias: decide and set under the promotion lock, then
    read the alias back; if another promoter moved it meanwhile, decide again against that one.

    Returns whether ``version`` holds the alias and why.
    """
    if valid_map is None:
        return promotion_decision(client, name, key, valid_map)
    with promotion_lock(client, name):
        for _ in range(_ALIAS_ATTEMPTS):
            ok, reason = promotion_decision(client, name, key, valid_map)
            if not ok:
                return False, reason
            client.set_registered_model_alias(name, CHAMPION, version)
            now = client.get_model_version_by_alias(name, CHAMPION)
            if str(now.version) == version:
                return True, reason
            log.warning(
                "%s alias of %s moved to version %s while version %s was promoted; deciding again",
                CHAMPION,
                name,
                now.version,
                version,
            )
    return False, f"the {CHAMPION} alias kept moving while this version was promoted"


def _register(
    client: Any,
    model_uri: str,
    name: str,
    run_id: str,
    key: dict[str, str],
    final_metrics: dict[str, Any],
) -> dict[str, Any]:
    import mlflow

    mv = mlflow.register_model(model_uri, name)
    version = str(mv.version)
    valid_map = _valid_map(final_metrics)
    for k in COMPARABLE_ON:
        client.set_model_version_tag(name, version, k, key.get(k, ""))
    client.set_model_version_tag(name, version, "run_id", run_id)
    if valid_map is not None:
        client.set_model_version_tag(name, version, "valid_map_mean", repr(valid_map))
    try:
        promoted, reason = promote(client, name, version, key, valid_map)
    except PromotionError as e:  # the model is fine; only the alias could not be decided
        log.warning("version %s of %s not promoted: %s", version, name, e)
        promoted, reason = False, f"not compared: {e}"
    outcome = CHAMPION if promoted else "not_promoted"
    client.set_model_version_tag(name, version, "promotion", outcome)
    client.set_model_version_tag(name, version, "promotion_reason", reason)
    client.set_tag(run_id, "registered_model", f"{name}/{version}")
    client.set_tag(run_id, "promotion", outcome)
    client.set_tag(run_id, "promotion_reason", reason)
    log.info("registered %s version %s: %s (%s)", name, version, outcome, reason)
    return {
        "name": name,
        "version": version,
        "alias": CHAMPION if promoted else None,
        "promotion_reason": reason,
    }


def finish_run(
    tracking_uri: str,
    run_id: str,
    *,
    config: dict[str, Any],
    manifest: dict[str, Any],
    final_metrics: dict[str, Any],
    model_dir: Path | None,
    registered_model_name: str | None,
    history: dict[str, Any] | None = None,
    pr_curves: dict[str, Any] | None = None,
    suspects: Path | None = None,
) -> dict[str, Any] | None:
    """Log final metrics, artifacts and plots, log the pyfunc model, register and maybe promote it.

    Artifacts: ``config.yaml`` (resolved config), ``dataset_manifest.json``,
    ``final_metrics.json``; with ``history`` (per-epoch lists, see :mod:`pipeline.tracking.plots`)
    ``history.json`` and the per-epoch plots; with ``pr_curves`` (``{"i2t": ..., "t2i": ...}``
    from :func:`~pipeline.retrieval.metrics.precision_recall_curve`) ``pr_curves.json`` and its
    plot; all PNGs under ``plots/``; with ``suspects`` (:mod:`pipeline.method.suspects`) the
    report ``suspect_labels.parquet`` and its top rows as ``suspect_labels.md``. The model goes to
    ``model/`` and, with ``registered_model_name``, into the registry, where it takes the
    ``champion`` alias by :func:`promotion_decision`, set compare-and-set by :func:`promote`.

    Returns ``{"name", "version", "alias", "promotion_reason"}`` of the registered version
    (``alias`` is "champion" or None), or None when nothing was registered.
    """
    import mlflow

    client = _client(tracking_uri)
    flat = _flatten(final_metrics)
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    metrics = [
        Metric(f"final/{k}", float(v), ts, 0)
        for k, v in flat.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i : i + 500])
    dv = data_version_of(config, manifest)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
        (t / "dataset_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        (t / "final_metrics.json").write_text(
            json.dumps(final_metrics, indent=2, sort_keys=True, default=_json_default)
        )
        files = ["config.yaml", "dataset_manifest.json", "final_metrics.json"]
        if history is not None:
            (t / "history.json").write_text(json.dumps(history, indent=1, default=_json_default))
            files.append("history.json")
        if pr_curves is not None:
            (t / "pr_curves.json").write_text(
                json.dumps(pr_curves, indent=1, default=_json_default)
            )
            files.append("pr_curves.json")
        if suspects is not None:
            from pipeline.method.suspects import SUSPECTS_FILE, markdown_head, read_report

            shutil.copy(suspects, t / SUSPECTS_FILE)
            (t / "suspect_labels.md").write_text(
                "Most suspect training labels (score: the pair loss ℓ_i of the last epoch)\n\n"
                + markdown_head(read_report(t / SUSPECTS_FILE))
            )
            files += [SUSPECTS_FILE, "suspect_labels.md"]
        for f in files:
            client.log_artifact(run_id, str(t / f))
        if history is not None or pr_curves is not None:
            from pipeline.tracking.plots import write_run_plots

            warmup = config.get("warmup_epochs")
            written, problems = write_run_plots(
                t / "plots",
                history=history,
                pr_curves=pr_curves,
                warmup_epochs=int(warmup) if isinstance(warmup, int) else None,
            )
            if written:
                client.log_artifacts(run_id, str(t / "plots"), artifact_path="plots")
            if problems:
                client.set_tag(run_id, "plot_problems", "; ".join(problems)[:5000])
    registered = None
    if model_dir is not None:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        from pipeline.tracking.serving import log_pyfunc

        with mlflow.start_run(run_id=run_id):
            info = log_pyfunc(
                model_dir,
                manifest=manifest,
                metrics=final_metrics,
                config={**config, "data_version": dv},
            )
        if registered_model_name:
            registered = _register(
                client,
                info.model_uri,
                registered_model_name,
                run_id,
                comparison_key(config, dv),
                final_metrics,
            )
    client.set_terminated(run_id, "FINISHED")
    return registered


def fail_run(tracking_uri: str, run_id: str, error: BaseException) -> None:
    """Mark a run FAILED with the error message as a tag."""
    try:
        client = _client(tracking_uri)
        client.set_tag(run_id, "error", f"{type(error).__name__}: {error}"[:5000])
        client.set_terminated(run_id, "FAILED")
    except Exception as e:
        log.warning("could not mark MLflow run %s failed: %s", run_id, e)


def _json_default(o: Any) -> Any:
    """NumPy scalars and arrays (and torch tensors) as plain JSON values."""
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "_"))
        else:
            out[key] = v
    return out


def close_trial_runs(tracking_uri: str, trials: list[dict[str, Any]]) -> None:
    """Give every sweep trial's run its final state: FINISHED, KILLED (stopped early) or FAILED.

    A trial stopped by the scheduler is killed mid-run, so its run would otherwise stay RUNNING.
    """
    client = _client(tracking_uri)
    status_of = {"completed": "FINISHED", "early_stopped": "KILLED", "failed": "FAILED"}
    for t in trials:
        run_id = t.get("mlflow_run_id")
        if not run_id:
            continue
        client.set_tag(run_id, "trial_status", t["status"])
        client.set_tag(run_id, "trial_id", str(t.get("trial_id", "")))
        if t.get("error"):
            client.set_tag(run_id, "error", str(t["error"])[:5000])
        if t.get("best_valid_map") is not None:
            client.log_metric(run_id, "trial/best_valid_map", float(t["best_valid_map"]))
        client.set_terminated(run_id, status_of.get(t["status"], "FINISHED"))


def finish_sweep(
    tracking_uri: str,
    parent_run_id: str,
    best_config: dict[str, Any],
    summary: dict[str, Any],
    files: list[Path],
) -> None:
    """Log a sweep's best config (params ``best.*``), its summary and files; close its run."""
    from mlflow.entities import Metric, Param

    client = _client(tracking_uri)
    client.log_batch(
        parent_run_id,
        params=[Param(f"best.{k}", str(v)) for k, v in sorted(best_config.items())],
        metrics=[
            Metric("best_valid_map", float(summary["best_valid_map"]), int(time.time() * 1000), 0)
        ]
        + [
            Metric(f"best_test_map_{k}", float(v), int(time.time() * 1000), 0)
            for k, v in summary.get("best_test_map", {}).items()
        ],
    )
    counts: dict[str, int] = {}
    for t in summary["trials"]:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    for status, n in counts.items():
        client.log_metric(parent_run_id, f"trials_{status}", n)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "sweep_summary.json"
        p.write_text(json.dumps(summary, indent=2, sort_keys=True, default=_json_default))
        client.log_artifact(parent_run_id, str(p))
    for f in files:
        client.log_artifact(parent_run_id, str(f))
    if summary.get("registered_model"):
        reg = summary["registered_model"]
        client.set_tag(parent_run_id, "registered_model", f"{reg['name']}/{reg['version']}")
    client.set_terminated(parent_run_id, "FINISHED")


def finish_grid(
    tracking_uri: str, parent_run_id: str, metrics: dict[str, float], files: list[Path]
) -> None:
    """Log a benchmark grid's tables to its parent run and close it."""
    client = _client(tracking_uri)
    for key, value in metrics.items():
        client.log_metric(parent_run_id, key, float(value))
    for f in files:
        client.log_artifact(parent_run_id, str(f))
    client.set_terminated(parent_run_id, "FINISHED")


def log_finished_run(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    metrics: dict[str, float],
) -> str:
    """One run that is already over (e.g. a grid cell trained in process): params, metrics, end."""
    run_id = start_run(tracking_uri, experiment_name, run_name, params, tags)
    client = _client(tracking_uri)
    for key, value in metrics.items():
        client.log_metric(run_id, key, float(value))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def run_status(tracking_uri: str, run_id: str) -> str | None:
    """The run's status (RUNNING, FINISHED, FAILED, KILLED), or None when there is no such run."""
    try:
        return str(_client(tracking_uri).get_run(run_id).info.status)
    except Exception as e:
        log.debug("run %s not found at %s: %s", run_id, tracking_uri, e)
        return None


def update_run(
    tracking_uri: str, run_id: str, *, status: str | None = None, tags: dict[str, str] | None = None
) -> None:
    """Set tags on a run and, with ``status``, change its status (e.g. back to RUNNING)."""
    client = _client(tracking_uri)
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, str(value)[:5000])
    if status is not None:
        client.update_run(run_id, status=status)


def run_artifact(tracking_uri: str, run_id: str, path: str, dst: str) -> tuple[str, dict[str, str]]:
    """Download one artifact of a run into ``dst``; return its local path and the run's tags.

    ``ConfigError`` names an unknown run or a run without that artifact.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.config import ConfigError

    client = _client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise ConfigError(f"--from-run: no MLflow run {run_id!r} at {tracking_uri}") from e
    names = {a.path for a in client.list_artifacts(run_id)}
    if path not in names:
        raise ConfigError(f"--from-run: run {run_id} has no artifact {path} (has {sorted(names)})")
    mlflow.set_tracking_uri(tracking_uri)
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=dst)
    return local, dict(run.data.tags)
