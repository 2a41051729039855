"""Shared plumbing of the job entry points: logging, summary files and exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from feature_store.errors import FeatureStoreError
from pipeline.files import write_json_atomic as write_json_atomic  # re-exported for the jobs

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
log = logging.getLogger("jobs")


def passive_openmp() -> None:
    """Idle OpenMP threads sleep instead of spinning: on a shared, busy machine spinning threads
    slow faiss searches down many times over. Call before faiss or torch load their runtime."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def job_parser(job: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of ``python -m jobs.<job>``, described by the job's docstring as written."""
    return argparse.ArgumentParser(
        prog=f"python -m jobs.{job}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


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
