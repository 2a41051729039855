"""Shared plumbing of the job entry points: logging, summary files and exit codes."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from feature_store.errors import FeatureStoreError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
log = logging.getLogger("jobs")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def write_json_atomic(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_main(main: Callable[[], int]) -> None:
    """Run a job's main; map bad input to exit 2 with one clear line, failures to exit 1."""
    from pipeline.config import ConfigError  # lazily: jobs that never train need no torch

    try:
        code = main()
    except (ConfigError, FeatureStoreError) as e:
        log.error("bad input: %s", e)
        code = EXIT_BAD_INPUT
    except KeyboardInterrupt:
        log.error("interrupted")
        code = 130
    except Exception as e:
        log.exception("failed: %s", e)
        code = EXIT_FAILED
    sys.exit(code)
