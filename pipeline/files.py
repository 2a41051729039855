"""Writing result files so that a reader never sees half of one (no Ray, no MLflow, no torch)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """JSON (indented, sorted keys, ``str`` for what JSON cannot hold), written atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))
