"""The job entry points: help, the ingest contract, and bad input failing fast with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize("job", ["jobs.ingest", "jobs.train"])
def test_help(job):
    r = _run(job, "--help")
    assert r.returncode == 0 and "usage: python -m " + job in r.stdout


def test_ingest_prints_uri_last(tmp_path):
    r = _run(
        "jobs.ingest",
        "synthetic",
        "--store",
        str(tmp_path),
        "--name",
        "s",
        "--train",
        "30",
        "--valid",
        "10",
        "--test",
        "10",
        "--noise-rate",
        "0.2",
    )
    assert r.returncode == 0, r.stderr
    uri = r.stdout.strip().splitlines()[-1]
    assert uri == str(tmp_path / "s" / "v1") and (Path(uri) / "manifest.json").is_file()
    shown = _run("jobs.ingest", "show", uri)
    assert shown.returncode == 0 and '"rate": 0.2' in shown.stdout


def test_ingest_wiki_on_real_file(wiki_mat, tmp_path):
    r = _run(
        "jobs.ingest",
        "wiki-mat",
        "--input",
        str(wiki_mat),
        "--store",
        str(tmp_path),
        "--name",
        "wiki",
        "--noise-rate",
        "0.4",
        "--noise-seed",
        "2",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "wiki" / "v1")


def test_ingest_missing_file_exits_2_and_writes_nothing(tmp_path):
    r = _run(
        "jobs.ingest",
        "wiki-mat",
        "--input",
        str(tmp_path / "missing.mat"),
        "--store",
        str(tmp_path / "store"),
        "--name",
        "w",
    )
    assert r.returncode == 2
    assert "missing.mat' does not exist" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "store").exists()


def test_train_bad_gamma_exits_2_before_any_work(tmp_path):
    r = _run("jobs.train", "--dataset", str(tmp_path), "--gamma", "0", cwd=tmp_path)
    assert r.returncode == 2
    assert "'gamma' = 0.0: the learning pace γ must be > 0" in r.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_train_missing_dataset_exits_2(tmp_path):
    r = _run("jobs.train", "--dataset", str(tmp_path / "nope" / "v1"), cwd=tmp_path)
    assert r.returncode == 2
    assert "has no manifest.json" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "mlflow.db").exists()
