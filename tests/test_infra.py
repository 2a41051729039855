"""Cluster configs: the launcher YAML passes Ray's own schema, the RayJob manifest is well formed,
and both entrypoints are commands our jobs accept."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from jobs import train

CLUSTER = Path(__file__).resolve().parent.parent / "infra" / "cluster"


def submit_command(text: str) -> str:
    """The first `ray job submit` command in comment or shell text, continuation lines joined."""
    lines = [ln.lstrip("#").strip() for ln in text.splitlines()]
    start = next(i for i, ln in enumerate(lines) if "ray job submit" in ln)
    parts = []
    for ln in lines[start:]:
        parts.append(ln.rstrip("\\").strip())
        if not ln.endswith("\\"):
            break
    return " ".join(parts)


def _train_args(command: str) -> list[str]:
    words = shlex.split(command)
    i = words.index("jobs.train")
    assert words[i - 2 : i] == ["python", "-m"]
    return words[i + 1 :]


def test_cluster_launcher_yaml_validates_against_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = (CLUSTER / "aws-gpu.yaml").read_text()
    cfg = yaml.safe_load(text)
    validate_config(prepare_config(cfg))  # Ray's own schema; raises on a violation
    assert cfg["available_node_types"]["head"]["resources"]["CPU"] == 0
    assert cfg["head_node_type"] == "head"
    assert any("pip install" in c for c in cfg["setup_commands"])
    header = (CLUSTER / "aws-gpu.yaml").read_text().split("cluster_name")[0]
    submit = " ".join(
        line.lstrip("# ").rstrip("\\ ")
        for line in header.splitlines()
        if "jobs.train" in line or line.lstrip("# ").startswith("python") or "--workers" in line
    )
    args = train.build_parser().parse_args(_train_args(submit))
    assert args.use_gpu and args.workers == 4 and args.max_failures == 2


def test_rayjob_manifest_is_well_formed():
    job = yaml.safe_load((CLUSTER / "rayjob-train.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265}
    workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    gpu = workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    args = train.build_parser().parse_args(_train_args(spec["entrypoint"]))
    assert args.workers == workers["replicas"] * int(gpu)  # one training worker per GPU
    assert args.use_gpu and args.storage_path.startswith("s3://")
