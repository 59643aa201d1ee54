"""The worker process of one row: runs the row's system (``bench.systems``) in a scratch directory."""

from __future__ import annotations

import importlib
import shutil
import tempfile
from pathlib import Path

from bench.protocol import Quit
from bench.systems import SYSTEMS


def worker_main(spec: dict) -> None:
    """Runs ``spec``'s system until the parent says ``quit``; removes its scratch directory afterwards."""
    module_name, function = SYSTEMS[spec["system"]].worker.rsplit(".", 1)
    work = getattr(importlib.import_module(f"bench.{module_name}"), function)
    workdir = Path(tempfile.mkdtemp(prefix="dist-rnn-bench-"))
    try:
        work(spec, workdir)
    except Quit:
        pass
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
