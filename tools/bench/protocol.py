"""The line protocol between the benchmark's parent process and one row's worker process.

The parent writes one command per line to the worker's stdin: ``run`` (time one
repeat), ``memory`` (report peak memory) or ``quit`` (closing stdin also quits).
The worker answers on stdout with lines ``@@BENCH {json}``; the JSON's ``kind``
is ``ready`` (built and warmed up, with ``info`` on what was built), ``result``
(one repeat: ``seconds`` for ``steps`` steps) or ``memory``. The parent ignores
every other line, so libraries may print what they like.
"""

from __future__ import annotations

import json
import sys
import time

PROTOCOL = "@@BENCH "


def emit(kind: str, **payload) -> None:
    """Writes one protocol message of ``kind`` to stdout and flushes it."""
    sys.stdout.write(PROTOCOL + json.dumps({"kind": kind, **payload}) + "\n")
    sys.stdout.flush()


def peak_rss_mib() -> float:
    """This process' peak resident set size so far, in MiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Quit(Exception):
    """The parent said ``quit`` or closed the worker's stdin."""


class Commands:
    """Reads the parent's commands from stdin; answers ``memory`` itself.

    Args:
        memory_fn: returns the worker's memory figures (a dict of MiB values).
    """

    def __init__(self, memory_fn):
        self.memory_fn = memory_fn

    def next(self) -> str:
        """Blocks until the next command other than ``memory``; raises ``Quit`` on ``quit``/EOF."""
        while True:
            line = sys.stdin.readline()
            if not line or line.strip() == "quit":
                raise Quit()
            command = line.strip()
            if command == "memory":
                emit("memory", **self.memory_fn())
                continue
            return command


def serve(spec: dict, run, memory, info: dict, profile=None) -> None:
    """Warms up (and profiles, if asked), says ready, then answers ``run`` commands with one timed repeat each.

    Args:
        spec: the row (``warmup``, ``steps``, ``profile`` are read).
        run: ``run(n) -> seconds``: times ``n`` training steps.
        memory: returns the worker's memory figures for a ``memory`` command.
        info: what was built; sent with ``ready`` and shown in the report.
        profile: optional ``profile(run, steps) -> list of op rows``, run when ``spec["profile"]``.
    """
    start = time.perf_counter()
    for _ in range(spec["warmup"]):
        run(spec["steps"])
    if profile is not None and spec.get("profile"):
        info["profile"] = profile(run, 3)
    emit("ready", warmup_s=time.perf_counter() - start, info=info)
    commands = Commands(memory)
    try:
        while True:
            commands.next()
            emit("result", seconds=run(spec["steps"]), steps=spec["steps"])
    except Quit:
        return
