"""Restarts a distributed training job after a lost worker.

``launch/multiworker.sh`` and ``launch/horovod.sh`` hand over to this module
when given ``--max-restarts N`` (N > 0). It runs the job (its workers, or
horovodrun), watches how each worker ends and, on a failure a restart can fix,
stops the survivors (SIGTERM, then SIGKILL after a grace period), records the
restart in ``RUN_DIR/restarts.jsonl`` and runs ``dist-rnn train`` again on the
same run directory, which resumes from the newest complete checkpoint (exactly,
even on another replica count; the global batch is the config's).

Which failures are restarted (:func:`classify`): a worker killed by a signal,
and a worker that exits with :data:`~dist_rnn.errors.LOST_PEER_EXIT_CODE` (its
collective failed because a peer died or hung: a hung worker is declared lost
after ``distribute.timeout_seconds`` of silence, or the Gloo timeout under
Horovod). Anything else (exit 2: bad config, data or checkpoint; exit 1: a
non-finite loss or a crash) would fail again: the job stops after that first
failure with its message.

A worker that cannot come back is one that is the first to fail again in the
next attempt before a new checkpoint completed (e.g. it dies at start-up).
With local workers (``-n``) the job then continues on one worker fewer, down to
``--min-workers``; with ``--hosts`` (one supervisor per host, a fixed cluster)
it cannot shrink and stops. Only the module has no TensorFlow import: it reads
the newest checkpoint's step from the ``checkpoint`` index file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dist_rnn.errors import LOST_PEER_EXIT_CODE
from dist_rnn.run_dir import RunDirectory

GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class WorkerExit:
    """How one worker (or Horovod rank) ended.

    Attributes:
        worker: Its index, or None when unknown.
        returncode: As ``subprocess`` reports it: negative for a signal;
            shell-style ``128 + n`` is read as signal ``n`` too.
    """

    worker: int | None
    returncode: int

    @property
    def signal(self) -> int | None:
        """The signal that killed the worker, or None."""
        if self.returncode < 0:
            return -self.returncode
        if 128 < self.returncode < 128 + 65:
            return self.returncode - 128
        return None

    @property
    def status(self) -> str:
        """``SIGKILL``-style name of the signal, else ``exit N``."""
        if self.signal is not None:
            try:
                return signal.Signals(self.signal).name
            except ValueError:
                return f"signal {self.signal}"
        return f"exit {self.returncode}"

    def describe(self) -> str:
        """One phrase: which worker, how it ended and what that means."""
        who = f"worker {self.worker}" if self.worker is not None else "a worker"
        if self.signal is not None:
            return f"{who} was killed by {self.status}"
        if self.returncode == LOST_PEER_EXIT_CODE:
            return f"{who} lost a peer (exit {LOST_PEER_EXIT_CODE}: a collective operation failed)"
        return f"{who} failed with exit {self.returncode}"


def classify(returncode: int) -> str:
    """``"ok"``, ``"restartable"`` (killed by a signal, or lost a peer) or ``"fatal"``."""
    if returncode == 0:
        return "ok"
    exit_ = WorkerExit(None, returncode)
    return "restartable" if exit_.signal is not None or returncode == LOST_PEER_EXIT_CODE else "fatal"


@dataclass(frozen=True)
class Attempt:
    """One run of the job.

    Attributes:
        workers: Workers it started.
        failure: The first worker to fail, or None if all finished.
        checkpoint_step: Step of the newest complete checkpoint after it ended.
    """

    workers: int
    failure: WorkerExit | None
    checkpoint_step: int | None


@dataclass(frozen=True)
class Decision:
    """What to do after an attempt: ``workers`` to restart on (None: stop), and why."""

    workers: int | None
    reason: str


def decide(history: list[Attempt], max_restarts: int, min_workers: int) -> Decision:
    """Decides whether and on how many workers to restart after the last attempt.

    Args:
        history: Every attempt so far, oldest first (the last just ended).
        max_restarts: Restarts allowed in all.
        min_workers: Fewest workers to continue on; equal to the attempt's
            workers when the cluster cannot shrink (``--hosts``).

    Returns:
        The decision; ``workers`` is None when the job ends.
    """
    last = history[-1]
    if last.failure is None:
        return Decision(None, "finished")
    if classify(last.failure.returncode) != "restartable":
        return Decision(None, f"{last.failure.describe()}, which a restart cannot fix")
    if len(history) - 1 >= max_restarts:
        return Decision(None, f"{last.failure.describe()}, and all {max_restarts} restart(s) are used")
    workers = last.workers
    if len(history) >= 2 and _cannot_come_back(history[-2], last):
        if workers - 1 < max(min_workers, 1):
            return Decision(None, f"{last.failure.describe()} again before a new checkpoint: it cannot come "
                                  f"back, and {workers - 1} worker(s) would be fewer than --min-workers {min_workers}")
        return Decision(workers - 1, f"{last.failure.describe()} again before a new checkpoint: it cannot "
                                     f"come back; continuing on {workers - 1} worker(s)")
    return Decision(workers, last.failure.describe())


def _cannot_come_back(previous: Attempt, last: Attempt) -> bool:
    """Whether the same worker failed first twice with no checkpoint completed in between."""
    a, b = previous.failure, last.failure
    return (a is not None and b is not None and b.worker is not None and a.worker == b.worker
            and b.signal is not None and previous.checkpoint_step == last.checkpoint_step)


def newest_checkpoint_step(run_dir: Path) -> int | None:
    """Step of the newest complete rolling checkpoint (``RUN_DIR/checkpoints/checkpoint``), or None."""
    try:
        text = (Path(run_dir) / "checkpoints" / "checkpoint").read_text()
    except OSError:
        return None
    match = re.search(r'^model_checkpoint_path: ".*?ckpt-(\d+)"', text, re.M)
    return int(match.group(1)) if match else None


def record_restart(run_dir: Path, before: Attempt, workers_after: int, reason: str) -> dict:
    """Appends one line to ``RUN_DIR/restarts.jsonl`` and returns it."""
    entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "reason": reason, "worker": before.failure.worker, "status": before.failure.status,
             "from_step": before.checkpoint_step or 0, "workers_before": before.workers,
             "workers_after": workers_after}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with open(RunDirectory(run_dir).restarts_file, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return entry


def run_dir_of(train_args: list[str]) -> Path | None:
    """The ``--run-dir`` among ``dist-rnn train`` arguments, or None."""
    for i, arg in enumerate(train_args):
        if arg == "--run-dir" and i + 1 < len(train_args):
            return Path(train_args[i + 1])
        if arg.startswith("--run-dir="):
            return Path(arg.split("=", 1)[1])
    return None


# ---------------------------------------------------------------- processes

def _pump(stream, out, prefix: str, on_line=None) -> None:
    """Copies lines of a child's pipe to ``out`` with a prefix."""
    for line in iter(stream.readline, ""):
        out.write(prefix + line)
        out.flush()
        if on_line is not None:
            on_line(line)
    stream.close()


class Job:
    """Child processes of one attempt, watched together.

    Args:
        commands: ``(argv, env, prefix)`` per worker.
    """

    def __init__(self, commands: list[tuple[list[str], dict, str]], on_line=None):
        self.exits: queue.Queue = queue.Queue()
        self.procs: list[subprocess.Popen] = []
        self.threads: list[threading.Thread] = []
        for index, (argv, env, prefix) in enumerate(commands):
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    bufsize=1, start_new_session=False)
            self.procs.append(proc)
            for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                t = threading.Thread(target=_pump, args=(stream, out, prefix, on_line), daemon=True)
                t.start()
                self.threads.append(t)
            threading.Thread(target=lambda i=index, p=proc: self.exits.put((i, p.wait())), daemon=True).start()

    def first_failure(self, stopping: threading.Event) -> tuple[int, int] | None:
        """Waits until all exited 0 (returns None) or one failed (returns its index and code)."""
        remaining = len(self.procs)
        while remaining:
            try:
                index, code = self.exits.get(timeout=0.5)
            except queue.Empty:
                continue
            remaining -= 1
            if code != 0:
                return index, code
        return None

    def stop(self, grace: float) -> None:
        """SIGTERM to the processes still running, SIGKILL to those alive after ``grace`` seconds."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for t in self.threads:
            t.join(timeout=5)

    def signal_all(self, signum: int) -> None:
        """Forwards a signal to every running process."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)


def free_ports(n: int) -> list[str]:
    """``127.0.0.1:port`` addresses free at the moment of asking."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]
    for s in socks:
        s.close()
    return ports


def tf_config(workers: list[str], index: int) -> str:
    """The ``TF_CONFIG`` of worker ``index`` of a cluster."""
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def _train_argv(python: str, train_args: list[str], backend: str) -> list[str]:
    return [python, "-u", "-m", "dist_rnn", "train", *train_args, "--set", f"distribute.backend={backend}"]


def _gpu_blocks(gpus: str, workers: int) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` per local worker: equal consecutive blocks of ``gpus`` (None: leave alone).

    After the job shrank, a GPU count the workers do not divide leaves some GPUs idle.
    """
    if not gpus:
        return None
    ids = gpus.split(",")
    if len(ids) < workers:
        return None
    per = len(ids) // workers
    return [",".join(ids[i * per:(i + 1) * per]) for i in range(workers)]


def local_multiworker(python: str, train_args: list[str], gpus: str = ""):
    """Command factory: ``workers`` local MultiWorkerMirroredStrategy workers on fresh loopback ports."""
    def commands(workers: int):
        ports = free_ports(workers)
        blocks = _gpu_blocks(gpus, workers)
        out = []
        for i in range(workers):
            env = {**os.environ, "TF_CONFIG": tf_config(ports, i)}
            if blocks is not None:
                env["CUDA_VISIBLE_DEVICES"] = blocks[i]
            out.append((_train_argv(python, train_args, "multiworker"), env, f"[w{i}] "))
        return out, {i: i for i in range(workers)}
    return commands


def host_multiworker(python: str, train_args: list[str], hosts: str, index: int):
    """Command factory: worker ``index`` of a fixed multi-host cluster (one supervisor per host)."""
    def commands(workers: int):
        env = {**os.environ, "TF_CONFIG": tf_config(hosts.split(","), index)}
        return [(_train_argv(python, train_args, "multiworker"), env, "")], {0: index}
    return commands


class HorovodOutput:
    """Finds, in horovodrun's output, the first rank to fail and its exit code."""

    FIRST = re.compile(r"Process name: (\d+)")
    CODE = re.compile(r"Exit code: (-?\d+)")
    EACH = re.compile(r"Process (\d+) exit with status code (-?\d+)")

    def __init__(self):
        self.rank: int | None = None
        self.code: int | None = None
        self._first: int | None = None
        self._lock = threading.Lock()

    def feed(self, line: str) -> None:
        """Reads one output line."""
        with self._lock:
            if m := self.FIRST.search(line):
                self._first = int(m.group(1))
            elif (m := self.CODE.search(line)) and self._first is not None:
                self.rank, self.code = self._first, int(m.group(1))
            elif (m := self.EACH.search(line)) and self.rank is None:
                self.rank, self.code = int(m.group(1)), int(m.group(2))


def horovod(python: str, train_args: list[str], hvdrun: list[str], parser_box: list):
    """Command factory: one horovodrun job of ``workers`` ranks (``hvdrun``: horovodrun and its options)."""
    def commands(workers: int):
        parser_box[:] = [HorovodOutput()]
        argv = [*hvdrun, "-np", str(workers), *_train_argv(python, train_args, "horovod")]
        return [(argv, dict(os.environ), "")], {0: None}
    return commands


def supervise(commands, workers: int, run_dir: Path, max_restarts: int, min_workers: int,
              write_record: bool = True, horovod_box: list | None = None, grace: float = GRACE_SECONDS) -> int:
    """Runs attempts until the job finishes or a failure cannot be restarted; returns the exit code.

    Args:
        commands: ``commands(workers) -> ([(argv, env, prefix)], {process: worker index})``.
        workers: Workers of the first attempt.
        run_dir: The run directory (its newest checkpoint and ``restarts.jsonl``).
        max_restarts: Restarts allowed in all.
        min_workers: Fewest workers to continue on.
        write_record: Whether this supervisor writes ``restarts.jsonl`` (one per job).
        horovod_box: For horovodrun jobs: holds the :class:`HorovodOutput` of
            the current attempt, which names the rank that failed.
        grace: Seconds between SIGTERM and SIGKILL when stopping survivors.
    """
    stopping = threading.Event()
    current: list[Job] = []

    def forward(signum, frame):
        stopping.set()
        for job in current:
            job.signal_all(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    history: list[Attempt] = []
    try:
        while True:
            argvs, worker_of = commands(workers)
            on_line = horovod_box[0].feed if horovod_box else None
            job = Job(argvs, on_line)
            current[:] = [job]
            failed = job.first_failure(stopping)
            if failed is not None:
                job.stop(grace)
            failure = None
            if failed is not None:
                index, code = failed
                failure = WorkerExit(worker_of[index], code)
                if horovod_box and horovod_box[0].rank is not None:
                    failure = WorkerExit(horovod_box[0].rank, horovod_box[0].code)
            history.append(Attempt(workers, failure, newest_checkpoint_step(run_dir)))
            if failure is None:
                return 0
            code = failure.returncode if failure.returncode > 0 else 128 - failure.returncode
            if stopping.is_set():
                _say(f"stopped by a signal: {failure.describe()}; not restarting")
                return code
            decision = decide(history, max_restarts, min_workers)
            step = history[-1].checkpoint_step
            at = f"newest complete checkpoint: step {step}" if step is not None else "no checkpoint yet"
            if decision.workers is None:
                _say(f"{decision.reason}; {at}; giving up")
                return code
            if write_record:
                record_restart(run_dir, history[-1], decision.workers, decision.reason)
            _say(f"{decision.reason} ({failure.status}); {at}; restarting on {decision.workers} worker(s) "
                 f"(restart {len(history)} of {max_restarts})")
            workers = decision.workers
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _say(message: str) -> None:
    sys.stderr.write(f"supervisor: {message}\n")
    sys.stderr.flush()


def _error(message: str) -> int:
    sys.stderr.write(f"error: {message}\n")
    return 2


def main(argv: list[str] | None = None) -> int:
    """``python -m dist_rnn.supervisor``: called by the launch scripts (see their help)."""
    parser = argparse.ArgumentParser(prog="python -m dist_rnn.supervisor")
    parser.add_argument("--kind", choices=["multiworker", "horovod"], required=True)
    parser.add_argument("-n", type=int, help="workers (local multiworker) or ranks (horovod)")
    parser.add_argument("--hosts", help="multiworker: the cluster's host:port list; horovod: horovodrun -H")
    parser.add_argument("--index", type=int, help="multiworker --hosts: this host's worker index")
    parser.add_argument("--hvdrun", help="horovod: the horovodrun executable")
    parser.add_argument("--controller", default="--gloo", help="horovod: horovodrun's controller options")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the workers")
    parser.add_argument("--max-restarts", type=int, default=0)
    parser.add_argument("--min-workers", type=int, default=None)
    parser.add_argument("--gpus", default="", help="multiworker -n: this host's GPU ids to share out")
    parser.add_argument("--grace-seconds", type=float, default=GRACE_SECONDS)
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    python = args.python
    run_dir = run_dir_of(train_args)
    if run_dir is None:
        return _error("--max-restarts needs --run-dir among the train arguments (every restart resumes that run)")
    if args.kind == "multiworker" and args.hosts is not None:
        workers = len(args.hosts.split(","))
        return supervise(host_multiworker(python, train_args, args.hosts, args.index), workers, run_dir,
                         args.max_restarts, workers, write_record=args.index == 0, grace=args.grace_seconds)
    min_workers = args.n if args.min_workers is None else args.min_workers
    if not 1 <= min_workers <= args.n:
        return _error(f"--min-workers must be between 1 and -n ({args.n}), got {min_workers}")
    if args.kind == "multiworker":
        return supervise(local_multiworker(python, train_args, args.gpus), args.n, run_dir, args.max_restarts, min_workers,
                         grace=args.grace_seconds)
    box: list = []
    hvdrun = [args.hvdrun, "-H", args.hosts or f"localhost:{args.n}", *args.controller.split()]
    return supervise(horovod(python, train_args, hvdrun, box), args.n, run_dir, args.max_restarts,
                     min_workers, horovod_box=box, grace=args.grace_seconds)


if __name__ == "__main__":
    sys.exit(main())
