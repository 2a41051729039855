"""``jobs.ingest``: damaged or odd input gives exit 2 and one line; unfinished writes are found
by ``list`` and removed by ``gc``; a killed ingest leaves nothing behind that ``gc`` cannot clean.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from test_ingest import _bad

from feature_store import staging as store_mod
from jobs._cli import run_main
from jobs.ingest import main

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--train", "24", "--valid", "6", "--test", "6", "--image-dim", "6", "--text-dim", "4"]


def _synthetic(store: Path, name: str = "s") -> str:
    assert main(["synthetic", "--store", str(store), "--name", name, *SMALL]) == 0
    return str(store / name)


def _csv(path: Path, labels: list[int]) -> Path:
    rng = np.random.default_rng(0)
    lines = ["split,image,text,label"]
    for i, lab in enumerate(labels):
        img = " ".join(f"{v:.3f}" for v in rng.normal(size=4))
        txt = " ".join(f"{v:.3f}" for v in rng.normal(size=3))
        lines.append(f'{("train", "valid", "test")[i % 3]},"{img}","{txt}",{lab}')
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("command", ["wiki-mat", "xmedia"])
def test_a_mat_file_cut_to_100_bytes(tmp_path, caplog, command):
    full = tmp_path / "full.mat"
    sio.savemat(full, {"a": np.zeros((50, 50))})
    cut = tmp_path / "cut.mat"
    cut.write_bytes(full.read_bytes()[:100])
    msg = _bad(caplog, command, "--input", str(cut), "--store", str(tmp_path / "st"), "--name", "w")
    assert f"'{cut}' is not a readable MATLAB" in msg and "truncated: 100 bytes" in msg
    assert not (tmp_path / "st").exists()


def test_header_only_csv(tmp_path, caplog):
    csv = tmp_path / "h.csv"
    csv.write_text("split,image,text,label\n")
    msg = _bad(caplog, "plain", "--input", str(csv), "--store", str(tmp_path / "st"), "--name", "p")
    assert f"'{csv}' has no data rows" in msg
    assert not (tmp_path / "st").exists()


def test_a_stray_label_is_refused_unless_the_classes_are_declared(tmp_path, caplog, capsys):
    labels = [i % 6 for i in range(30)]
    labels[17] = 99
    csv = _csv(tmp_path / "stray.csv", labels)
    target = ["--store", str(tmp_path / "st"), "--name", "p"]
    msg = _bad(caplog, "plain", "--input", str(csv), *target)
    assert f"'{csv}' column 'label' row 17 has label 99, but no item has class 6" in msg
    assert not (tmp_path / "st").exists()
    # --num-classes says K on purpose: classes without items are then allowed
    assert main(["plain", "--input", str(csv), "--num-classes", "100", *target]) == 0
    uri = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads((Path(uri) / "manifest.json").read_text())["num_classes"] == 100


def test_a_gap_in_the_classes_of_a_mat_layout(tmp_path):
    from feature_store import formats as F
    from feature_store.errors import FeatureStoreError

    with pytest.raises(FeatureStoreError, match=r"'x' row 2 has label 7, but no item has class 3"):
        F.infer_num_classes([("'x'", np.array([0, 1, 7, 2, 7]))], 0)
    assert F.infer_num_classes([("a", np.array([1, 2])), ("b", [np.array([3, 1])])], 1) == 3


@pytest.mark.parametrize("version", [None, "1"])
def test_a_store_under_a_file(tmp_path, caplog, version):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    extra = ["--version", version] if version else []
    store = afile / "sub"
    msg = _bad(caplog, "synthetic", "--store", str(store), "--name", "s", *extra, *SMALL)
    assert f"store '{store}': '{afile}' is a file, not a directory" in msg
    assert afile.read_text() == "not a directory"
    for command in ("list", "gc"):
        msg = _bad(caplog, command, str(afile))
        assert f"store '{afile}' is a file, not a directory" in msg


def test_a_read_only_store(tmp_path, caplog, monkeypatch):
    """Root ignores chmod, so the two ways a read-only store shows are simulated: ``os.access``
    denying write (checked before any work) and a PermissionError at the write itself."""
    store = tmp_path / "st"
    store.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        store_mod.os, "access", lambda p, mode: False if Path(p) == store else real_access(p, mode)
    )
    msg = _bad(caplog, "synthetic", "--store", str(store), "--name", "s", *SMALL)
    assert f"store '{store}' is not writable (no write permission on '{store}'" in msg
    monkeypatch.setattr(store_mod.os, "access", real_access)

    real_mkdir = os.mkdir

    def denied(path, *a, **k):  # the dataset directory is made, its temporary version is not
        if ".tmp-" not in str(path):
            return real_mkdir(path, *a, **k)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(store_mod.os, "mkdir", denied)
    msg = _bad(caplog, "synthetic", "--store", str(store), "--name", "s", *SMALL)
    assert f"store '{store}' is not writable (Permission denied: '{store}/s/.v1.tmp-" in msg
    assert list(store.iterdir()) == []  # the dataset directory it made was removed again


def test_list_reports_an_unreadable_version_and_lists_the_others(tmp_path, caplog, capsys):
    store = tmp_path / "st"
    for _ in range(3):
        _synthetic(store)
    (store / "s" / "v2" / "manifest.json").write_text('{"format": "rshnl-feature-store/2"')
    m3 = json.loads((store / "s" / "v3" / "manifest.json").read_text())
    del m3["files"]
    (store / "s" / "v3" / "manifest.json").write_text(json.dumps(m3))
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as e:
        run_main(lambda: main(["list", str(store)]))
    assert e.value.code == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == ["s/v1"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[0].startswith(f"unreadable version {store}/s/v2: manifest.json is not valid")
    assert warnings[1] == (
        f"unreadable version {store}/s/v3: manifest.json: key 'files' is missing, expected a dict"
    )
    # show of the same version: exit 2 with its reason, no KeyError
    msg = _bad(caplog, "show", str(store / "s" / "v3"))
    assert "manifest.json: key 'files' is missing" in msg


def _fake_tmp(dataset: Path, name: str, hours_idle: float, size: int) -> Path:
    d = dataset / name
    d.mkdir()
    (d / "train.parquet").write_bytes(b"x" * size)
    then = time.time() - hours_idle * 3600
    for p in (d / "train.parquet", d):
        os.utime(p, (then, then))
    return d


def test_gc_removes_only_old_temp_directories(tmp_path, caplog, capsys):
    store = tmp_path / "st"
    dataset = Path(_synthetic(store))
    old = _fake_tmp(dataset, ".v2.tmp-0123abcd", 30, 1000)
    fresh = _fake_tmp(dataset, ".v3.tmp-4567cdef", 1, 10)
    other = _fake_tmp(dataset, ".v4.tmp-notours", 30, 10)  # not the store's naming: not touched
    version = sorted(p.name for p in (dataset / "v1").iterdir())
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["list", str(store)]) == 0
    stale = [r.getMessage() for r in caplog.records if r.getMessage().startswith("unfinished")]
    assert len(stale) == 2 and f"{old} (temporary directory, 1000 bytes, idle 30.0 h)" in stale[0]
    assert str(fresh) in stale[1] and capsys.readouterr().out.startswith("s/v1\t")

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["gc", str(store), "--dry-run"]) == 0
    assert "would remove 1 unfinished write(s), 1000 bytes" in caplog.text and old.exists()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["gc", str(store)]) == 0
    assert f"removed {old} (temporary directory, 1000 bytes" in caplog.text
    assert "removed 1 unfinished write(s), 1000 bytes" in caplog.text
    assert not old.exists() and fresh.exists() and other.exists()
    assert sorted(p.name for p in (dataset / "v1").iterdir()) == version
    assert main(["gc", str(store), "--older-than", "0.5"]) == 0
    assert not fresh.exists() and other.exists() and (dataset / "v1" / "manifest.json").exists()
    assert main(["show", str(dataset / "v1")]) == 0
    msg = _bad(caplog, "gc", str(store), "--older-than", "-1")
    assert "--older-than -1.0 must be >= 0 hours" in msg


_KILLED_WRITER = """
import os, signal, sys
from feature_store import writing
real = writing._write_split
def write_then_die(staging, split, *a, **k):
    out = real(staging, split, *a, **k)
    if split == "train":  # one file written, the others not: killed mid-version
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return out
writing._write_split = write_then_die
from jobs._cli import run_main
from jobs.ingest import main
run_main(lambda: main(sys.argv[2:]))
"""


def _killed_ingest(signame: str, store: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = ["synthetic", "--store", str(store), "--name", "s", *SMALL, "--train", "3000"]
    return subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, signame, *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_a_killed_ingest_is_listed_and_collected(tmp_path, caplog):
    store = tmp_path / "st"
    _synthetic(store)
    r = _killed_ingest("SIGKILL", store)
    assert r.returncode == -9, r.stderr[-2000:]
    debris = [p for p in (store / "s").iterdir() if p.name.startswith(".v2.tmp-")]
    assert len(debris) == 1 and (debris[0] / "train.parquet").stat().st_size > 0
    assert not (store / "s" / "v2").exists()  # no partial version is visible
    size = sum(p.stat().st_size for p in debris[0].iterdir())
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(["list", str(store)]) == 0
        assert main(["gc", str(store), "--older-than", "0"]) == 0
    assert f"unfinished write {debris[0]} (temporary directory, {size} bytes" in caplog.text
    assert f"removed 1 unfinished write(s), {size} bytes" in caplog.text
    assert sorted(p.name for p in (store / "s").iterdir()) == ["v1"]


def test_a_terminated_ingest_removes_its_partial_version(tmp_path):
    store = tmp_path / "st"
    _synthetic(store)
    r = _killed_ingest("SIGTERM", store)
    assert r.returncode == 143, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in (store / "s").iterdir()) == ["v1"]
