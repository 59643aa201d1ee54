"""The parent side of timing: one worker process per row, timed repeats interleaved across a group's rows."""

from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.protocol import PROTOCOL
from bench.systems import SYSTEMS, label

# The worker is the entry script itself (``--worker SPEC``), so it runs with the same sys.path as the parent.
BENCHMARK_SCRIPT = Path(__file__).resolve().parents[1] / "benchmark.py"


class Worker:
    """A running row: a subprocess speaking the ``@@BENCH`` line protocol (``bench.protocol``).

    Args:
        spec: the row (from ``bench.rows.build_rows``).
        timeout: seconds the worker may take to answer one message.
    """

    def __init__(self, spec: dict, timeout: float):
        self.spec = spec
        self.timeout = timeout
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        env.update(SYSTEMS[spec["system"]].env)
        if spec["system"] == "torch" and spec.get("omp_passive"):
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, str(BENCHMARK_SCRIPT), "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     bufsize=0, env=env)
        self.buffer = b""

    def read(self, kind: str) -> dict:
        """Waits for the next protocol message of ``kind`` (other output is ignored)."""
        deadline = time.time() + self.timeout
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                text = line.decode("utf-8", "replace")
                if text.startswith(PROTOCOL):
                    message = json.loads(text[len(PROTOCOL):])
                    if message["kind"] == kind:
                        return message
            if time.time() > deadline:
                raise RuntimeError(f"{label(self.spec)}: no '{kind}' within {self.timeout:.0f} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], 1.0)
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16) if ready else None
            if chunk:
                self.buffer += chunk
            elif ready or self.proc.poll() is not None:
                self.proc.wait()
                raise RuntimeError(f"{label(self.spec)}: worker exited ({self.proc.returncode}):\n{self.error_tail()}")

    def send(self, command: str) -> None:
        """Sends one command line (``run``, ``memory`` or ``quit``)."""
        self.proc.stdin.write((command + "\n").encode())
        self.proc.stdin.flush()

    def error_tail(self, chars: int = 3000) -> str:
        """The last ``chars`` characters the worker wrote to stderr."""
        self.stderr.seek(0)
        return self.stderr.read().decode("utf-8", "replace")[-chars:]

    def close(self) -> None:
        """Asks the worker to quit, waits for it (kills it after 60 s) and drops its stderr."""
        try:
            self.send("quit")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def _start_workers(rows: list[dict], timeout: float, log, notes: list[str], workers: list, results: list) -> None:
    """Starts the rows' workers one at a time (each builds and warms up alone); appends to ``workers``/``results``.

    A row whose worker fails to start is left out with a note.
    """
    for spec in rows:
        log(f"  starting {label(spec)} ...")
        worker = Worker(spec, timeout)
        try:
            ready = worker.read("ready")
        except RuntimeError as e:
            log(f"  {label(spec)} failed to start:\n{e}")
            notes.append(f"{spec['cell']} {spec['precision']}: {label(spec)} failed: {str(e).splitlines()[0]}")
            worker.close()
            continue
        workers.append(worker)
        results.append({"spec": spec, "info": ready.get("info", {}), "warmup_s": ready.get("warmup_s"),
                        "seconds": [], "load": [], "extra": []})


def _time_round(round_index: int, workers: list, results: list) -> None:
    """One timed repeat of every worker, in an order rotated by ``round_index``."""
    order = list(range(len(workers)))
    order = order[round_index % len(order):] + order[:round_index % len(order)]
    for i in order:
        load_before = os.getloadavg()[0]
        workers[i].send("run")
        message = workers[i].read("result")
        results[i]["seconds"].append(message["seconds"])
        results[i]["load"].append(round(load_before, 2))
        results[i]["extra"].append({k: v for k, v in message.items() if k not in ("kind", "seconds", "steps")})


def run_group(rows: list[dict], args, log, notes: list[str]) -> list[dict]:
    """Starts the rows' workers one by one, then interleaves their timed repeats; returns one summary per row."""
    workers, results = [], []
    try:
        _start_workers(rows, args.timeout, log, notes, workers, results)
        if not workers:  # every row failed to start (noted): nothing to interleave
            return []
        for r in range(args.repeats):
            _time_round(r, workers, results)
            log(f"  round {r + 1}/{args.repeats}: " + ", ".join(
                f"{label(res['spec'])} {res['seconds'][-1] / res['spec']['steps'] * 1000:.0f} ms" for res in results))
        for worker, result in zip(workers, results):
            worker.send("memory")
            result["memory"] = worker.read("memory")
    finally:
        for worker in workers:
            worker.close()
    return [summarize(res) for res in results]


def summarize(res: dict) -> dict:
    """One row of ``results.jsonl``: the spec's sizes, every step time, median/best/worst tokens/s, memory."""
    spec = res["spec"]
    step_times = [s / spec["steps"] for s in res["seconds"]]
    tokens = spec["batch"] * spec["bptt"]
    median = statistics.median(step_times)
    memory = {k: round(v, 1) for k, v in res.get("memory", {}).items() if k != "kind"}
    row = {"label": label(spec), **{k: spec[k] for k in ("system", "cell", "hidden", "layers", "embedding", "batch",
                                                        "bptt", "precision", "backend", "replicas", "jit", "steps")},
           "vocab": res["info"].get("vocab", spec["vocab"]),
           "repeats": len(step_times), "step_times_s": [round(t, 7) for t in step_times],
           "median_step_s": round(median, 7), "tokens_per_s": round(tokens / median, 1),
           "best_tokens_per_s": round(tokens / min(step_times), 1),
           "worst_tokens_per_s": round(tokens / max(step_times), 1),
           "load_avg_1min": res["load"], "warmup_s": round(res["warmup_s"] or 0.0, 2), "info": res["info"], **memory}
    trainer_rates = [e.get("trainer_tokens_per_sec") for e in res["extra"] if e.get("trainer_tokens_per_sec")]
    if trainer_rates:
        row["trainer_reported_tokens_per_s"] = round(statistics.median(trainer_rates), 1)
    return row
