"""The only module that talks to MLflow: runs, params, metrics, artifacts and the model registry."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

_PKG_ROOT = Path(__file__).resolve().parent.parent
_SOURCE_DIRS = ("pipeline", "jobs", "feature_store")


def resolve_tracking_uri(configured: str = "") -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a sqlite store in the working directory."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        uri = f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    return uri


def code_version() -> dict[str, str]:
    """Git commit (when in a checkout) and a digest of the project's source files."""
    h = hashlib.sha256()
    for d in _SOURCE_DIRS:
        for p in sorted((_PKG_ROOT / d).rglob("*.py")):
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


def finish_run(
    tracking_uri: str,
    run_id: str,
    *,
    config: dict[str, Any],
    manifest: dict[str, Any],
    final_metrics: dict[str, Any],
    model_dir: Path | None,
    registered_model_name: str | None,
) -> dict[str, str] | None:
    """Log final metrics and artifacts, log the pyfunc model and register it; close the run."""
    import mlflow

    client = _client(tracking_uri)
    flat = _flatten(final_metrics)
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[
            Metric(f"final/{k}", float(v), ts, 0)
            for k, v in flat.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ],
    )
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=True))
        (t / "dataset_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
        (t / "final_metrics.json").write_text(json.dumps(final_metrics, indent=2, sort_keys=True))
        for f in ("config.yaml", "dataset_manifest.json", "final_metrics.json"):
            client.log_artifact(run_id, str(t / f))
    registered = None
    if model_dir is not None:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        from pipeline.serving import log_pyfunc

        with mlflow.start_run(run_id=run_id):
            info = log_pyfunc(model_dir, manifest=manifest, metrics=final_metrics)
        if registered_model_name:
            mv = mlflow.register_model(info.model_uri, registered_model_name)
            client.set_model_version_tag(
                registered_model_name, mv.version, "data_version", config.get("data_version", "")
            )
            registered = {"name": registered_model_name, "version": str(mv.version)}
            client.set_tag(run_id, "registered_model", f"{registered_model_name}/{mv.version}")
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


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "_"))
        else:
            out[key] = v
    return out
