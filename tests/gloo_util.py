"""Shared teardown for tests that spawn gloo process groups by hand."""

from __future__ import annotations

import os

import torch.distributed as dist


def finish_worker() -> None:
    """Barrier, destroy the group and leave the process without running static destructors.

    gloo in this torch build can abort in a destructor at interpreter exit after all work is done;
    ``os._exit(0)`` keeps a finished worker from reporting SIGABRT to ``mp.spawn``.
    """
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)
