"""End to end against live servers: local stack up, S3 ingest, `ray job submit` training and sweep,
MLflow run and registry, pull, a failing job, stack down (run alone with `pytest -m e2e`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UP, DOWN = REPO / "infra" / "local" / "up.sh", REPO / "infra" / "local" / "down.sh"

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 20000:  # outside Ray's default worker port range
            return port


def _exports(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export ") :].partition("=")
            out[key] = value
    return out


def _tail(logs: str, n: int = 60) -> str:
    """The last lines of a job log that are not Ray's per-report chatter."""
    keep = [ln for ln in logs.splitlines() if "Reporting training result" not in ln]
    return "\n".join(keep[-n:])


def _wait(client, job_id: str, timeout: float = 900) -> str:
    from ray.job_submission import JobStatus

    end = time.time() + timeout
    while time.time() < end:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        time.sleep(2)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


@pytest.fixture()
def stack(tmp_path):
    ports = {
        k: str(_free_port())
        for k in ("RAY_PORT", "DASHBOARD_PORT", "AGENT_PORT", "MLFLOW_PORT", "S3_PORT")
    }
    state = f"/tmp/rshnl-e2e-{ports['RAY_PORT']}"
    env = {
        **os.environ,
        **ports,
        "RSHNL_STACK_DIR": state,
        "NUM_CPUS": "4",
        "S3_BUCKET": "rshnl-e2e",
        "PYTHON": sys.executable,
    }
    t0 = time.time()
    up = subprocess.run([str(UP)], env=env, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stderr[-3000:]
    exports = _exports(up.stdout)
    assert set(exports) >= {"RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "S3_BUCKET"}
    yield {**env, **exports}, state, ports, t0
    down = subprocess.run([str(DOWN)], env=env, capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stderr
    import psutil

    left = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any(state in a for a in (p.info["cmdline"] or []))
    ]
    assert left == [], f"stack processes left: {left}"
    for port in ports.values():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", int(port))) != 0, f"port {port} still open"


def test_stack_end_to_end(stack, tmp_path):
    import boto3
    import mlflow
    from ray.job_submission import JobSubmissionClient

    env, _state, _ports, t0 = stack
    bucket = env["S3_BUCKET"]
    py = [sys.executable, "-m"]
    wiki = Path(
        os.environ.get("RSHNL_WIKI_MAT", REPO.parent / "shared/datasets/wikipedia/wiki.mat")
    )
    source = (
        ["wiki-mat", "--input", str(wiki)]
        if wiki.is_file()
        else ["synthetic", "--train", "600", "--valid", "100", "--test", "200"]
    )
    ingest = subprocess.run(
        [
            *py,
            "jobs.ingest",
            *source,
            "--store",
            f"s3://{bucket}/store",
            "--name",
            "e2e",
            "--noise-rate",
            "0.4",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ingest.returncode == 0, ingest.stderr[-2000:]
    uri = ingest.stdout.strip().splitlines()[-1]
    assert uri == f"s3://{bucket}/store/e2e/v1"

    client = JobSubmissionClient(env["RAY_ADDRESS"])
    runtime_env = {"working_dir": str(REPO)}
    summary = tmp_path / "train.json"
    train_id = client.submit_job(
        entrypoint=f"python -m jobs.train --dataset {uri} --workers 2 --epochs 2 "
        f"--warmup-epochs 1 --bits 32 --hidden-dim 64 --storage-path s3://{bucket}/runs "
        f"--registered-model-name rshnl-e2e --summary-json {summary}",
        runtime_env=runtime_env,
    )
    status = _wait(client, train_id)
    logs = client.get_job_logs(train_id)
    assert status == "SUCCEEDED", _tail(logs)
    assert "epoch 2/2" in logs
    s = json.loads(summary.read_text())

    tracking = mlflow.tracking.MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = tracking.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in tracking.get_metric_history(run.info.run_id, "valid_map_mean")] == [
        1,
        2,
    ]
    artifacts = {a.path for a in tracking.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "dataset_manifest.json", "final_metrics.json", "plots"} <= artifacts
    assert tracking.get_model_version("rshnl-e2e", s["registered_model"]["version"])
    s3 = boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/")["Contents"]]
    assert any("checkpoint_" in k and k.endswith("model.pt") for k in keys)  # checkpoints in S3

    pulled = tmp_path / "pull.json"
    pull = subprocess.run(
        [
            *py,
            "jobs.pull",
            "--model",
            "rshnl-e2e@champion",
            "--k",
            "5",
            "--summary-json",
            str(pulled),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pull.returncode == 0, pull.stderr[-2000:]
    p = json.loads(pulled.read_text())
    assert p["k"] == 5 and p["queries"]["count"] > 0 and p["results"]
    assert 0.0 <= p["metrics"]["map"]["expected"] <= 1.0  # test labels exist: MAP is reported

    bad_id = client.submit_job(
        entrypoint=f"python -m jobs.train --dataset s3://{bucket}/store/missing/v1",
        runtime_env=runtime_env,
    )
    assert _wait(client, bad_id) == "FAILED"
    bad_logs = client.get_job_logs(bad_id)
    assert "bad input" in bad_logs and "has no manifest.json" in bad_logs

    sweep = tmp_path / "sweep.json"
    tune_id = client.submit_job(  # the stack keeps serving after a failed job
        entrypoint=f"python -m jobs.tune --dataset {uri} --num-samples 2 --epochs 2 --workers 1 "
        f"--cpus-per-worker 0.5 --bits 16 --hidden-dim 32 --storage-path s3://{bucket}/tune "
        f"--grace-period 1 --name e2e-sweep --registered-model-name rshnl-e2e-sweep "
        f"--summary-json {sweep}",
        runtime_env=runtime_env,
    )
    status = _wait(client, tune_id)
    assert status == "SUCCEEDED", _tail(client.get_job_logs(tune_id))
    t = json.loads(sweep.read_text())
    assert len(t["trials"]) == 2 and t["registered_model"]["name"] == "rshnl-e2e-sweep"
    print(f"\nend-to-end wall time so far: {time.time() - t0:.0f} s")
