"""End to end against live servers (run with `pytest -m e2e`): the local stack starts once for the
module. It listens on 127.0.0.1 only and refuses clients without the Ray token or the MLflow login;
then S3 ingest, `ray job submit` training and sweep, MLflow run and registry, pull, a failing job;
then no planted secret appears in any MLflow param, tag or artifact, S3 object or log; last, the
stack goes down and leaves no process and no open port."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
LOCAL = REPO / "infra" / "local"
UP, DOWN = LOCAL / "up.sh", LOCAL / "down.sh"
PORT_NAMES = (
    "RAY_PORT",
    "DASHBOARD_PORT",
    "AGENT_PORT",
    "AGENT_GRPC_PORT",
    "RUNTIME_ENV_PORT",
    "CLIENT_PORT",
    "NODE_MANAGER_PORT",
    "OBJECT_MANAGER_PORT",
    "METRICS_PORT",
    "DASHBOARD_METRICS_PORT",
    "AUTOSCALER_METRICS_PORT",
    "MLFLOW_PORT",
    "S3_PORT",
)
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
# Files whose job is to hold the stack's own credentials (never the caller's, never a job's).
SECRET_HOLDERS = {
    "stack.env",
    "ray-token",
    "mlflow-auth.ini",
    "job-home/.aws/credentials",
    "job-home/.mlflow/credentials",
}

pytestmark = pytest.mark.e2e

_spec = importlib.util.spec_from_file_location("stack_stop", LOCAL / "stop.py")
stop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stop)


@dataclass
class Stack:
    env: dict[str, str]  # what a user's shell has after `eval "$(up.sh)"`
    exports: dict[str, str]
    state: Path
    ports: dict[str, int]
    up: subprocess.CompletedProcess
    caller_secret: str
    canary: str
    out: Path
    t0: float
    jobs: list[str] = field(default_factory=list)


def _free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 20000:  # outside Ray's default worker port range
            ports.add(port)
    return sorted(ports)


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


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    ports = dict(zip(PORT_NAMES, _free_ports(len(PORT_NAMES)), strict=True))
    state = Path(f"/tmp/rshnl-e2e-{ports['RAY_PORT']}")
    caller_secret = f"caller-own-secret-{uuid.uuid4().hex}"
    env = {
        **_clean_env(),
        **{k: str(v) for k, v in ports.items()},
        "RSHNL_STACK_DIR": str(state),
        "NUM_CPUS": "4",
        "S3_BUCKET": "rshnl-e2e",
        "PYTHON": sys.executable,
        # the caller's own cloud credentials: the stack must neither use nor forward them
        "AWS_ACCESS_KEY_ID": "AKIACALLEROWNKEY",
        "AWS_SECRET_ACCESS_KEY": caller_secret,
    }
    t0 = time.time()
    up = subprocess.run([str(UP)], env=env, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stderr[-3000:]
    exports = _exports(up.stdout)
    user_env = {
        **_clean_env(),
        **exports,
        "PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    yield Stack(
        env=user_env,
        exports=exports,
        state=state,
        ports=ports,
        up=up,
        caller_secret=caller_secret,
        canary=f"job-canary-{uuid.uuid4().hex}",
        out=tmp_path_factory.mktemp("e2e-out"),
        t0=t0,
    )
    if (state / "stack.env").exists() or list(state.glob("*.pid")):
        subprocess.run([str(DOWN)], env=env, capture_output=True, text=True, timeout=300)
    if not list(state.glob("*.pid")):  # stopped: its logs and databases go too
        shutil.rmtree(state, ignore_errors=True)


def _token(stack: Stack) -> str:
    return Path(stack.exports["RAY_AUTH_TOKEN_PATH"]).read_text().strip()


def _client(stack: Stack):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(
        stack.exports["RAY_ADDRESS"], headers={"Authorization": f"Bearer {_token(stack)}"}
    )


def _runtime_env(stack: Stack, **env_vars: str) -> dict:
    """The stack's runtime env (credential files, endpoints) plus the repo and ``env_vars``."""
    runtime_env = yaml.safe_load(Path(stack.exports["RSHNL_RUNTIME_ENV"]).read_text())
    runtime_env["working_dir"] = str(REPO)
    runtime_env["env_vars"].update(env_vars)
    return runtime_env


def _wait(client, job_id: str, timeout: float = 900, on_poll=None) -> str:
    from ray.job_submission import JobStatus

    end = time.time() + timeout
    while time.time() < end:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        if on_poll is not None and status == JobStatus.RUNNING:
            on_poll()
        time.sleep(2)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def _listeners(stack: Stack) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening socket of the stack's processes."""
    procs = {p.pid: p for p in stop.stack_processes(stack.state)}
    out = []
    for c in psutil.net_connections("inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in procs:
            try:
                name = procs[c.pid].name()
            except psutil.NoSuchProcess:
                name = "?"
            out.append((c.laddr.ip, c.laddr.port, name))
    return out


def _off_loopback(stack: Stack) -> list[tuple[str, int, str]]:
    return [entry for entry in _listeners(stack) if entry[0] not in LOOPBACK]


def _is_torch_distributed(entry: tuple[str, int, str]) -> bool:
    """A Ray Train worker's listener: torch.distributed's TCPStore, which torch binds to every
    interface whatever MASTER_ADDR says (no setting of Ray or torch moves it). The process
    title is the worker's actor name (cut to 15 characters by the kernel) or, while the group
    forms, the setup task it runs: the process group's, then Ray Data's context."""
    title = entry[2]
    return title.startswith("ray::RayTrainWo") or any(
        task in title for task in ("_setup_torch_process_group", "_propagate_data_context")
    )


def _machine_addresses() -> list[str]:
    return [
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and a.address not in LOOPBACK
    ]


def _driver(stack: Stack, home: Path, **extra: str) -> subprocess.CompletedProcess:
    """A Python driver that joins the cluster by its GCS port and reads a worker's environment."""
    code = (
        "import os, ray\n"
        f"ray.init(address='127.0.0.1:{stack.ports['RAY_PORT']}', log_to_driver=False)\n"
        "keys = ('AWS_SECRET_ACCESS_KEY', 'AWS_ACCESS_KEY_ID', 'MLFLOW_TRACKING_PASSWORD')\n"
        "seen = ray.get(ray.remote(lambda: {k: os.environ.get(k) for k in keys}).remote())\n"
        "print('WORKER_ENV', seen)\n"
    )
    env = {**_clean_env(), "HOME": str(home), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **extra}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180
    )


def _http(url: str, method: str = "GET", body: dict | None = None, auth=None, headers=None):
    """Status code of one request (``auth``: (user, password) for basic auth)."""
    req = urllib.request.Request(url, method=method, headers=dict(headers or {}))
    if body is not None:
        req.data = json.dumps(body).encode()
        req.add_header("Content-Type", "application/json")
    if auth is not None:
        req.add_header(
            "Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_stack_listens_on_loopback_only(stack):
    listeners = _listeners(stack)
    bound = {port for _, port, _ in listeners}
    assert set(stack.ports.values()) <= bound, (
        f"ports not served: {set(stack.ports.values()) - bound}"
    )
    assert _off_loopback(stack) == [], f"listening beyond loopback: {_off_loopback(stack)}"
    for address in _machine_addresses():  # what a client on the network would try
        for name, port in stack.ports.items():
            with socket.socket() as s:
                s.settimeout(2)
                assert s.connect_ex((address, port)) != 0, f"{name} answers on {address}:{port}"


def test_ray_refuses_clients_without_the_token(stack, tmp_path):
    dashboard = stack.exports["RAY_ADDRESS"]
    assert _http(f"{dashboard}/api/jobs/") == 401
    bad = {"Authorization": "Bearer " + "0" * 64}
    assert _http(f"{dashboard}/api/jobs/", headers=bad) == 403
    right = {"Authorization": f"Bearer {_token(stack)}"}
    assert _http(f"{dashboard}/api/jobs/", headers=right) == 200
    agent = f"http://127.0.0.1:{stack.ports['AGENT_PORT']}/api/job_agent/jobs/"
    assert _http(agent) == 401

    cli_env = {k: v for k, v in stack.env.items() if not k.startswith("RAY_AUTH")}
    cli = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--", "python", "-c", "1"],
        env={**cli_env, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode != 0 and "Authentication required" in cli.stdout + cli.stderr

    anonymous = _driver(stack, tmp_path)
    assert anonymous.returncode != 0 and "WORKER_ENV" not in anonymous.stdout
    assert "Authentication token is missing or incorrect" in anonymous.stderr
    wrong = _driver(stack, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    assert wrong.returncode != 0 and "WORKER_ENV" not in wrong.stdout
    assert "Authentication token is missing or incorrect" in wrong.stderr

    # With the token a driver gets in, and its workers hold no credentials of any kind.
    token_path = stack.exports["RAY_AUTH_TOKEN_PATH"]
    ok = _driver(stack, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    seen = ok.stdout.split("WORKER_ENV", 1)[1]
    assert seen.count("None") == 3, seen
    # Only the MLflow server (which proxies artifacts to S3) holds the S3 secret; no process holds
    # the MLflow password or the caller's own secret.
    mlflow_sid = int((stack.state / "mlflow.pid").read_text())
    for p in stop.stack_processes(stack.state):
        try:
            values = set(p.environ().values())
            in_mlflow = os.getsid(p.pid) == mlflow_sid
        except (psutil.AccessDenied, psutil.NoSuchProcess, OSError):
            continue
        assert stack.caller_secret not in values, f"{p.name()} has the caller's secret"
        assert stack.exports["MLFLOW_TRACKING_PASSWORD"] not in values, p.name()
        if not in_mlflow:
            assert stack.exports["AWS_SECRET_ACCESS_KEY"] not in values, p.name()


def test_mlflow_refuses_anonymous_registry_writes(stack):
    api = stack.exports["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow"
    login = (stack.exports["MLFLOW_TRACKING_USERNAME"], stack.exports["MLFLOW_TRACKING_PASSWORD"])
    name = {"name": f"anon-{uuid.uuid4().hex[:8]}"}
    create = f"{api}/registered-models/create"
    assert _http(create, "POST", name) == 401
    assert _http(create, "POST", name, auth=(login[0], "wrong-password")) == 401
    assert _http(f"{api}/registered-models/search") == 401
    assert _http(create, "POST", name, auth=login) == 200
    assert _http(f"{api}/registered-models/delete", "DELETE", name) == 401
    assert _http(f"{api}/registered-models/get?name={name['name']}", auth=login) == 200
    assert _http(f"{api}/registered-models/delete", "DELETE", name, auth=login) == 200


def test_stack_end_to_end(stack, monkeypatch):
    import boto3
    import mlflow

    env, exports, out = stack.env, stack.exports, stack.out
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, exports[key])
    bucket = exports["S3_BUCKET"]
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

    client = _client(stack)
    summary = out / "train.json"
    train_id = client.submit_job(
        entrypoint=f"python -m jobs.train --dataset {uri} --workers 2 --epochs 2 "
        f"--warmup-epochs 1 --bits 32 --hidden-dim 64 --storage-path s3://{bucket}/runs "
        f"--registered-model-name rshnl-e2e --summary-json {summary}",
        runtime_env=_runtime_env(stack, RSHNL_E2E_CANARY=stack.canary),  # a job's own secret
    )
    stack.jobs.append(train_id)
    exposed: set = set()
    torch_store: set = set()

    def check_listeners() -> None:
        for entry in _off_loopback(stack):
            (torch_store if _is_torch_distributed(entry) else exposed).add(entry)

    status = _wait(client, train_id, on_poll=check_listeners)
    logs = client.get_job_logs(train_id)
    assert status == "SUCCEEDED", _tail(logs)
    assert exposed == set(), f"listening beyond loopback while training: {exposed}"
    if torch_store:
        print(f"\ntorch.distributed's TCPStore listened beyond loopback: {sorted(torch_store)}")
    assert "epoch 2/2" in logs
    s = json.loads(summary.read_text())

    tracking = mlflow.tracking.MlflowClient(exports["MLFLOW_TRACKING_URI"])
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
        endpoint_url=exports["AWS_ENDPOINT_URL"],
        aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"],
        region_name=exports["AWS_DEFAULT_REGION"],
    )
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/")["Contents"]]
    assert any("checkpoint_" in k and k.endswith("model.pt") for k in keys)  # checkpoints in S3

    pulled = out / "pull.json"
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
        cwd=out,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pull.returncode == 0, pull.stderr[-2000:]
    p = json.loads(pulled.read_text())
    assert p["k"] == 5 and p["queries"]["count"] > 0 and p["results"]
    # The pulled champion, encoded and searched by jobs.pull, scores what training reported for
    # it: same test protocol (image queries against database texts), same tie rule.
    assert p["queries"]["modality"] == "image" and p["database"]["modality"] == "text"
    assert p["metrics"]["map"]["index"] == pytest.approx(s["test_map"]["i2t"], abs=1e-4)

    # The README's way: `ray job submit` with the exported token and the stack's runtime env.
    bad_id = f"e2e-bad-{uuid.uuid4().hex[:8]}"
    submit = subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "submit",
            "--runtime-env",
            exports["RSHNL_RUNTIME_ENV"],
            "--working-dir",
            ".",
            "--submission-id",
            bad_id,
            "--no-wait",
            "--",
            "python",
            "-m",
            "jobs.train",
            "--dataset",
            f"s3://{bucket}/store/missing/v1",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert submit.returncode == 0, submit.stderr[-2000:]
    stack.jobs.append(bad_id)
    assert _wait(client, bad_id) == "FAILED"
    bad_logs = client.get_job_logs(bad_id)
    assert "bad input" in bad_logs and "has no manifest.json" in bad_logs

    sweep = out / "sweep.json"
    tune_id = client.submit_job(  # the stack keeps serving after a failed job
        entrypoint=f"python -m jobs.tune --dataset {uri} --num-samples 2 --epochs 2 --workers 1 "
        f"--cpus-per-worker 0.5 --bits 16 --hidden-dim 32 --storage-path s3://{bucket}/tune "
        f"--grace-period 1 --name e2e-sweep --registered-model-name rshnl-e2e-sweep "
        f"--summary-json {sweep}",
        runtime_env=_runtime_env(stack),
    )
    stack.jobs.append(tune_id)
    status = _wait(client, tune_id)
    assert status == "SUCCEEDED", _tail(client.get_job_logs(tune_id))
    t = json.loads(sweep.read_text())
    assert len(t["trials"]) == 2 and t["registered_model"]["name"] == "rshnl-e2e-sweep"
    print(f"\nend-to-end wall time so far: {time.time() - stack.t0:.0f} s")


def _mlflow_texts(stack: Stack) -> dict[str, str]:
    """Every MLflow param, tag, metric name and registry field, keyed by where it was found."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(stack.exports["MLFLOW_TRACKING_URI"])
    found: dict[str, str] = {}
    for exp in client.search_experiments(view_type=ViewType.ALL):
        found[f"experiment {exp.name} tags"] = json.dumps(exp.tags)
        for run in client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL):
            data = run.data
            found[f"run {run.info.run_id}"] = json.dumps(
                [data.params, data.tags, sorted(data.metrics), run.info.run_name]
            )
    for model in client.search_registered_models():
        found[f"model {model.name}"] = json.dumps([model.tags, model.description])
        for mv in client.search_model_versions(f"name='{model.name}'"):
            found[f"model {model.name} v{mv.version}"] = json.dumps(
                [mv.tags, mv.description, mv.source, mv.run_id]
            )
    return found


def test_no_planted_secret_in_tracking_or_logs(stack, monkeypatch):
    import boto3

    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, stack.exports[key])
    client = _client(stack)
    if not stack.jobs:  # run alone: one short run of our own
        job = client.submit_job(
            entrypoint="python -m jobs.ingest synthetic --store s3://rshnl-e2e/store --name leak "
            "--train 200 --valid 50 --test 50 && python -m jobs.train --dataset "
            "s3://rshnl-e2e/store/leak/v1 --workers 1 --epochs 1 --warmup-epochs 0 --bits 16 "
            "--hidden-dim 32 --storage-path s3://rshnl-e2e/runs --registered-model-name leak",
            runtime_env=_runtime_env(stack, RSHNL_E2E_CANARY=stack.canary),
        )
        stack.jobs.append(job)
        assert _wait(client, job) == "SUCCEEDED", _tail(client.get_job_logs(job))
    stack_secrets = {
        "the stack's S3 secret key": stack.exports["AWS_SECRET_ACCESS_KEY"],
        "the MLflow password": stack.exports["MLFLOW_TRACKING_PASSWORD"],
        "the Ray token": _token(stack),
    }
    foreign = {"the caller's AWS secret": stack.caller_secret, "a job's secret": stack.canary}
    everything = {**stack_secrets, **foreign}
    leaks: list[str] = []

    def scan(where: str, data: bytes, secrets: dict[str, str]) -> None:
        leaks.extend(f"{label} in {where}" for label, v in secrets.items() if v.encode() in data)

    scan("up.sh's progress output", stack.up.stderr.encode(), everything)
    scan("up.sh's export lines", stack.up.stdout.encode(), foreign)
    for job in stack.jobs:
        scan(f"the log of job {job}", client.get_job_logs(job).encode(), everything)
    for where, text in _mlflow_texts(stack).items():
        scan(f"MLflow {where}", text.encode(), everything)
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.exports["AWS_ENDPOINT_URL"],
        aws_access_key_id=stack.exports["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack.exports["AWS_SECRET_ACCESS_KEY"],
        region_name=stack.exports["AWS_DEFAULT_REGION"],
    )
    bucket = stack.exports["S3_BUCKET"]
    objects = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):  # datasets, checkpoints and every MLflow artifact
            body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            scan(f"s3://{bucket}/{obj['Key']}", body, everything)
            objects += 1
    assert objects > 0
    files = 0
    for root in (stack.state, stack.out):
        for path in root.rglob("*"):
            if not path.is_file() or path.is_symlink() or path.is_socket():
                continue
            rel = path.relative_to(root).as_posix()
            allowed = root == stack.state and rel in SECRET_HOLDERS
            scan(str(path), path.read_bytes(), foreign if allowed else everything)
            files += 1
    assert files > 0 and any(stack.state.glob("ray/session_*/logs/*.log"))
    assert leaks == [], "\n".join(leaks)


def test_down_stops_every_process_and_port(stack):
    sessions = set(stop.recorded_sessions(stack.state))
    assert sessions, "no session recorded"
    down = subprocess.run([str(DOWN)], env=stack.env, capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stderr
    left = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:  # exited, waiting to be reaped by init
            continue
        try:
            in_session = os.getsid(p.pid) in sessions
        except OSError:
            continue
        if in_session or any(str(stack.state) in a for a in (p.info["cmdline"] or [])):
            left.append(p.pid)
    assert left == [], f"stack processes left: {left}"
    open_ports = [
        c.laddr.port
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port in set(stack.ports.values())
    ]
    assert open_ports == [], f"ports still listening: {open_ports}"
    for name, port in stack.ports.items():  # the Ray client server's port among them
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"{name} {port} still open"
    for name in ("stack.env", "ray-token", "runtime-env.yaml", "job-home/.aws/credentials"):
        assert not (stack.state / name).exists(), f"{name} outlived the stack"
