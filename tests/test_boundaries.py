"""The architecture as tests: who may import what, thin jobs, and a README layout that lists
every module. Imports are read from the source (every ``import`` statement, including those inside
functions), so a lazy import cannot slip past."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jobs", "pipeline", "feature_store")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            rel = p.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = p
    return out


MODULES = _modules()


def imports_of(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports (``from a import b`` counts as a and a.b)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _top(name: str) -> str:
    return name.split(".")[0]


def _under(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _violations(prefixes: tuple[str, ...], banned: tuple[str, ...], *, outside: bool = False):
    """Imports of ``banned`` by the modules under ``prefixes`` (with ``outside``: by all others)."""
    out = []
    for mod, path in MODULES.items():
        if _under(mod, prefixes) == outside:
            continue
        for name in sorted(imports_of(path)):
            if any(name == b or name.startswith(b + ".") for b in banned):
                out.append(f"{mod} imports {name}")
    return out


def test_the_import_reader_sees_lazy_and_from_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\ndef f():\n    from ray import train\n    import mlflow.pyfunc\n")
    assert {"os", "ray", "ray.train", "mlflow.pyfunc"} <= imports_of(src)


def test_the_math_imports_neither_ray_nor_mlflow():
    math = ("pipeline.method", "pipeline.retrieval", "pipeline.config", "pipeline.files")
    assert _violations(math, ("ray", "mlflow")) == []


def test_config_loads_without_torch():
    assert _violations(("pipeline.config", "pipeline.method.bounds"), ("torch",)) == []


def test_only_the_tracking_package_imports_mlflow():
    assert _violations(("pipeline.tracking",), ("mlflow",), outside=True) == []


def test_ray_train_and_ray_tune_stay_in_their_packages():
    assert _violations(("pipeline.training",), ("ray.train",), outside=True) == []
    assert _violations(("pipeline.experiments.tune",), ("ray.tune",), outside=True) == []


def test_ray_only_in_training_and_experiments():
    allowed = ("pipeline.training", "pipeline.experiments")
    assert _violations(allowed, ("ray",), outside=True) == []
    # the steps the in-process executor shares with the Ray worker stay free of Ray
    shared = tuple(
        f"pipeline.training.{m}" for m in ("step", "epoch", "inprocess", "guards", "final_eval")
    )
    assert _violations(shared, ("ray", "mlflow")) == []


def test_ray_train_workers_do_not_talk_to_mlflow():
    """Per-epoch metrics travel in the report; the driver's callback logs them."""
    assert _violations(("pipeline.training.train_loop",), ("mlflow", "pipeline.tracking")) == []


def test_floors_import_only_the_floors_below():
    assert _violations(("feature_store",), ("pipeline", "jobs", "ray", "mlflow", "torch")) == []
    assert _violations(("pipeline",), ("jobs",)) == []


# inside pipeline: which concern may use which (config and files are shared by all)
LAYERS = {
    "pipeline.retrieval": ("pipeline.retrieval",),
    "pipeline.method": ("pipeline.retrieval", "pipeline.method"),
    "pipeline.tracking": ("pipeline.method", "pipeline.retrieval", "pipeline.tracking"),
    "pipeline.training": (
        "pipeline.method",
        "pipeline.retrieval",
        "pipeline.tracking",
        "pipeline.training",
    ),
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_concerns_inside_pipeline_depend_downwards(layer):
    shared = ("pipeline.config", "pipeline.files", "pipeline.method.bounds")
    bad = []
    for mod, path in MODULES.items():
        if not _under(mod, (layer,)):
            continue
        for name in imports_of(path):
            if _top(name) != "pipeline" or name == "pipeline" or _under(name, shared):
                continue
            if not any(name == a or name.startswith(a + ".") for a in LAYERS[layer]):
                bad.append(f"{mod} imports {name}")
    assert bad == []


THIN_JOB_IMPORTS = ("numpy", "torch", "ray", "mlflow", "pyarrow", "pandas", "faiss", "scipy")


def test_jobs_are_thin_doors():
    """jobs/ parse arguments, set up logging, map errors to exit codes and call one pipeline or
    store function: no numeric or service libraries, no classes beyond error types."""
    assert _violations(("jobs",), THIN_JOB_IMPORTS) == []
    bad = []
    for mod, path in MODULES.items():
        if not _under(mod, ("jobs",)):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if not any(b.endswith(("Error", "Exception")) for b in bases):
                    bad.append(f"{mod}.{node.name} is a class")
            if isinstance(node, ast.FunctionDef) and node.name != "build_parser":
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > 60:
                    bad.append(f"{mod}.{node.name} has {lines} lines")
    assert bad == []


def readme_layout_paths(text: str) -> set[str]:
    """Dotted module paths the README's layout block names, folders nesting by indentation."""
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    stack: list[str] = []
    out = set()
    for line in block.splitlines():
        m = re.match(r"^( *)([a-z_]+)(/?)(?:\s|$)", line)
        if not m or len(m[1]) % 2 or len(m[1]) > 6:  # blank, or a continuation line
            continue
        depth = len(m[1]) // 2
        stack = [*stack[:depth], m[2]]
        out.add(".".join(stack))
    return out


def test_readme_layout_paths_nest_by_indentation():
    text = "## Layout\n```\na/   x\n  b    y\n       more\n  c/   z\n    d  w\ne/\n```\n"
    assert readme_layout_paths(text) == {"a", "a.b", "a.c", "a.c.d", "e"}


def test_readme_layout_lists_every_module():
    listed = readme_layout_paths((ROOT / "README.md").read_text())
    missing = sorted(m for m, p in MODULES.items() if p.name != "__init__.py" and m not in listed)
    assert missing == [], f"README layout does not list: {missing}"
    stale = sorted(
        p for p in listed if _top(p) in PACKAGES and p not in MODULES and p.count(".") > 0
    )
    assert stale == [], f"README layout lists modules that do not exist: {stale}"
