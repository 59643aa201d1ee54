"""Restart after a lost worker: the supervisor's decisions, the rewind of run output, and real jobs.

The process tests run the 24-step comparison run of ``equivalence.py`` through
``launch/multiworker.sh`` / ``launch/horovod.sh --max-restarts``, hurt a worker
mid-run, and check that the job finishes with the weights of an uninterrupted
run, one ``restarts.jsonl`` line per restart and each step logged once.
"""

from __future__ import annotations

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from equivalence import ARGS, assert_close_variables, data_args, train, variables
from dist_rnn import supervisor
from dist_rnn.errors import LOST_PEER_EXIT_CODE
from dist_rnn.supervisor import Attempt, WorkerExit, classify, decide

# ------------------------------------------------------------------ decisions


@pytest.mark.parametrize("code, kind", [
    (0, "ok"), (-9, "restartable"), (137, "restartable"), (-15, "restartable"), (143, "restartable"),
    (LOST_PEER_EXIT_CODE, "restartable"), (2, "fatal"), (1, "fatal"), (3, "fatal")])
def test_classify_restarts_signals_and_lost_peers_only(code, kind):
    assert classify(code) == kind


def test_worker_exit_names_worker_and_signal():
    assert WorkerExit(1, -9).describe() == "worker 1 was killed by SIGKILL"
    assert WorkerExit(1, 137).status == "SIGKILL"
    assert "lost a peer" in WorkerExit(0, 75).describe()
    assert WorkerExit(None, 2).describe() == "a worker failed with exit 2"


def test_decide_restarts_on_the_same_workers_after_a_kill():
    d = decide([Attempt(2, WorkerExit(1, -9), 8)], max_restarts=2, min_workers=1)
    assert d.workers == 2


def test_decide_never_restarts_a_fatal_failure():
    for code in (1, 2):
        d = decide([Attempt(2, WorkerExit(0, code), 8)], max_restarts=5, min_workers=1)
        assert d.workers is None and "cannot fix" in d.reason


def test_decide_stops_when_the_restarts_are_used():
    history = [Attempt(2, WorkerExit(1, -9), 4), Attempt(2, WorkerExit(0, 75), 8)]
    assert decide(history, max_restarts=2, min_workers=1).workers == 2
    assert decide(history, max_restarts=1, min_workers=1).workers is None


def test_decide_drops_a_worker_that_fails_again_before_a_new_checkpoint():
    history = [Attempt(2, WorkerExit(1, -9), 8), Attempt(2, WorkerExit(1, -9), 8)]
    d = decide(history, max_restarts=3, min_workers=1)
    assert d.workers == 1 and "cannot" in d.reason
    assert decide(history, max_restarts=3, min_workers=2).workers is None  # not below --min-workers


def test_decide_keeps_a_worker_that_failed_again_after_progress():
    history = [Attempt(2, WorkerExit(1, -9), 8), Attempt(2, WorkerExit(1, -9), 16)]
    assert decide(history, max_restarts=3, min_workers=1).workers == 2
    # A lost-peer exit blames no one: the hung or dead peer is another worker.
    history = [Attempt(2, WorkerExit(0, 75), 8), Attempt(2, WorkerExit(0, 75), 8)]
    assert decide(history, max_restarts=3, min_workers=1).workers == 2


def test_newest_checkpoint_step_reads_the_index_file(tmp_path):
    assert supervisor.newest_checkpoint_step(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-12"\nall_model_checkpoint_paths: "ckpt-6"\n'
        'all_model_checkpoint_paths: "ckpt-12"\n')
    assert supervisor.newest_checkpoint_step(tmp_path) == 12


def test_horovod_output_names_the_first_rank_to_fail():
    out = supervisor.HorovodOutput()
    for line in ["[0]<stdout>:step 4", "Process 1 exit with status code 137.",
                 "Terminating remaining workers after failure of Process 1.",
                 "Process 0 exit with status code 75.", "RuntimeError: Horovod detected that one or more",
                 "Process name: 1", "Exit code: 137"]:
        out.feed(line)
    assert (out.rank, out.code) == (1, 137)


def test_supervisor_requires_a_run_dir(capsys):
    assert supervisor.main(["--kind", "multiworker", "-n", "2", "--max-restarts", "1", "--", "c.yaml"]) == 2
    assert capsys.readouterr().err.startswith("error: --max-restarts needs --run-dir")


# ------------------------------------------------------------------- rewind


def test_rewind_drops_metrics_and_events_after_the_resumed_step(tmp_path):
    import tensorflow as tf

    from dist_rnn.rewind import rewind_run_output

    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 11):
            f.write(json.dumps({"split": "train", "step": step, "loss": 1.0}) + "\n")
        f.write('{"split": "train", "st')  # cut by the crash
    writer = tf.summary.create_file_writer(str(tmp_path / "train"))
    with writer.as_default():
        for step in range(1, 11):
            tf.summary.scalar("loss", float(step), step=step)
    writer.close()
    dropped = rewind_run_output(tmp_path, 6)
    assert dropped == {"metrics": 5, "events": 4}
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert tensorboard_steps(tmp_path / "train", "loss") == [1, 2, 3, 4, 5, 6]
    assert rewind_run_output(tmp_path, 6) == {"metrics": 0, "events": 0}


def tensorboard_steps(folder: Path, tag: str) -> list[int]:
    """Steps of the scalar ``tag`` in every event file of ``folder``, in file order."""
    import tensorflow as tf

    steps = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


# ------------------------------------------------------------ real processes

RESTART_ARGS = [*ARGS, "--set", "train.log_every=2", "--set", "train.deterministic=true",
                "--set", "checkpoint={every_steps: 6, keep: 10}"]


@pytest.fixture(scope="module")
def reference_run(shakespeare_slice, tmp_path_factory):
    """The uninterrupted 24-step run (one device; same global batch)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(run_dir, shakespeare_slice, "--set", "train.deterministic=true")
    return run_dir


def children_of(pid: int) -> list[int]:
    """Every descendant process id of ``pid``."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                child = int(stat.parent.name)
                out.append(child)
                todo.append(child)
    return out


def worker_pid(root: int, marker: str) -> int:
    """The training process under ``root`` whose environment contains ``marker``."""
    for pid in children_of(root):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if b"dist_rnn\x00train" in cmdline and marker.encode() in environ:
            return pid
    raise AssertionError(f"no training process with {marker} under {root}")


def run_and_hurt(cmd: list[str], chief_line: str, hurt, env: dict | None = None, timeout: float = 600):
    """Runs a launch command; when the chief prints ``chief_line``, calls ``hurt(launcher_pid)``.

    Returns:
        (exit code, stdout, stderr, seconds from the hurt to the end).
    """
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHON": sys.executable, **(env or {})})
    lines, hurt_at = [], None
    try:
        for line in proc.stdout:
            lines.append(line)
            if hurt_at is None and chief_line in line:
                hurt(proc.pid)
                hurt_at = time.monotonic()
        stderr = proc.stderr.read()
        code = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert hurt_at is not None, "".join(lines)[-3000:]
    return code, "".join(lines), stderr, time.monotonic() - hurt_at


def logged_train_steps(out: str) -> list[int]:
    """Steps of the chief's training log lines (``[w0] step       8  epoch ...``) in ``out``."""
    return [int(m) for m in re.findall(r"^\[w0\] step +(\d+)  epoch", out, flags=re.MULTILINE)]


def assert_resumed_like_reference(reference, run_dir, restarts: int):
    records = [json.loads(line) for line in (run_dir / "restarts.jsonl").read_text().splitlines()]
    assert len(records) == restarts, records
    train_steps = [m["step"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                   if m["split"] == "train"]
    assert train_steps == list(range(2, 25, 2))  # each step once, in order
    assert tensorboard_steps(run_dir / "train", "loss") == list(range(2, 25, 2))
    # save_counter counts the checkpoints written, which restarts and cadence change.
    ref, got = ({k: v for k, v in variables(d).items() if not k.startswith("save_counter")} for d in (reference, run_dir))
    assert_close_variables(ref, got)
    return records


def multiworker_cmd(run_dir, data, *launcher_args, extra=()):
    return [str(REPO / "launch" / "multiworker.sh"), "-n", "2", *launcher_args, "--",
            "--run-dir", str(run_dir), *data_args(data), *RESTART_ARGS, *extra]


@pytest.mark.slow
def test_multiworker_restarts_after_a_killed_worker(reference_run, shakespeare_slice, tmp_path):
    run_dir = tmp_path / "run"
    code, out, err, _ = run_and_hurt(
        multiworker_cmd(run_dir, shakespeare_slice, "--max-restarts", "2"), "[w0] step       8",
        lambda root: os.kill(worker_pid(root, '"index": 1}'), signal.SIGKILL))
    assert code == 0, err[-3000:]
    records = assert_resumed_like_reference(reference_run, run_dir, restarts=1)
    # The job runs on while the kill is on its way (a step takes tens of milliseconds): usually the
    # newest checkpoint is step 6, on a slow machine it can be step 12.
    resumed = records[0]["from_step"]
    assert resumed in (6, 12) and records[0]["workers_before"] == records[0]["workers_after"] == 2
    assert f"supervisor: worker 1 was killed by SIGKILL (SIGKILL); newest complete checkpoint: step {resumed}" in err
    # Every step logged after that checkpoint before the kill was trained again, so its record was
    # dropped; a record can also be written and the chief stopped before it printed the line.
    first_session = out.split(f"resuming at step {resumed}: dropped ")
    assert len(first_session) == 2, out[-3000:]
    dropped = int(first_session[1].split(" metrics.jsonl record(s)")[0])
    printed_later = [step for step in logged_train_steps(first_session[0]) if step > resumed]
    assert len(printed_later) >= 1 and dropped - len(printed_later) in (0, 1), (dropped, printed_later)


@pytest.mark.slow
def test_multiworker_continues_on_fewer_workers_when_one_cannot_come_back(reference_run, shakespeare_slice, tmp_path):
    run_dir, gone = tmp_path / "run", tmp_path / "worker1-gone"
    # Worker 1's "host" is lost for good once `gone` exists: it dies at start-up.
    wrapper = tmp_path / "python"
    wrapper.write_text(f"#!/bin/sh\ncase \"$TF_CONFIG\" in *'\"index\": 1}}'*) [ -e {gone} ] && kill -9 $$ ;; esac\n"
                       f"exec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)

    def lose_worker_1(root):
        gone.touch()
        os.kill(worker_pid(root, '"index": 1}'), signal.SIGKILL)

    code, out, err, _ = run_and_hurt(
        multiworker_cmd(run_dir, shakespeare_slice, "--max-restarts", "3", "--min-workers", "1"),
        "[w0] step       8", lose_worker_1, env={"PYTHON": str(wrapper)})
    assert code == 0, err[-3000:]
    records = assert_resumed_like_reference(reference_run, run_dir, restarts=2)
    assert [(r["workers_before"], r["workers_after"]) for r in records] == [(2, 2), (2, 1)]
    assert "cannot come back" in records[1]["reason"]
    assert "[w0] backend         multiworker: 1 replica(s), 1 worker(s)" in out
    assert "[w0] batch           global 8 x 20 steps" in out


@pytest.mark.slow
def test_multiworker_recovers_from_a_hung_worker(reference_run, shakespeare_slice, tmp_path):
    run_dir, timeout = tmp_path / "run", 10
    code, out, err, elapsed = run_and_hurt(
        multiworker_cmd(run_dir, shakespeare_slice, "--max-restarts", "1",
                        extra=["--set", f"distribute.timeout_seconds={timeout}",
                               "--set", "checkpoint={every_steps: 0, every_seconds: 0.001, keep: 30}"]),
        "[w0] step       8", lambda root: os.kill(worker_pid(root, '"index": 1}'), signal.SIGSTOP))
    assert code == 0, err[-3000:]
    assert "supervisor: worker 0 lost a peer" in err
    records = assert_resumed_like_reference(reference_run, run_dir, restarts=1)
    # every_seconds: saved at each agreed stop check (every 2 steps): the newest is step 6 or 8,
    # depending on whether worker 1 passed step 8's save before it was stopped.
    assert records[0]["from_step"] in (6, 8), records
    print("seconds from SIGSTOP to the end of the job:", elapsed)


@pytest.mark.slow
def test_a_failure_a_restart_cannot_fix_is_not_restarted(shakespeare_slice, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(multiworker_cmd(run_dir, shakespeare_slice, "--max-restarts", "3",
                                          extra=["--set", "train.batch_size=7"]),
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: " in proc.stderr and "does not divide by the 2 replicas" in proc.stderr
    assert proc.stderr.count("supervisor:") == 1 and "cannot fix" in proc.stderr
    assert not (run_dir / "restarts.jsonl").exists()


@pytest.mark.slow
def test_horovod_restarts_after_a_killed_rank(reference_run, shakespeare_slice, tmp_path):
    pytest.importorskip("horovod.tensorflow")
    run_dir = tmp_path / "run"
    cmd = [str(REPO / "launch" / "horovod.sh"), "-n", "2", "--max-restarts", "2", "--",
           "--run-dir", str(run_dir), *data_args(shakespeare_slice), *RESTART_ARGS]
    code, out, err, _ = run_and_hurt(cmd, "step       8",
                                     lambda root: os.kill(worker_pid(root, "HOROVOD_RANK=1\x00"), signal.SIGKILL),
                                     env={"HOROVOD_GLOO_TIMEOUT_SECONDS": "20"})
    assert code == 0, (out + err)[-3000:]
    assert "supervisor: worker 1 was killed by SIGKILL" in err
    records = assert_resumed_like_reference(reference_run, run_dir, restarts=1)
    assert records[0]["workers_after"] == 2


def test_report_shows_the_restarts(tmp_path, capsys):
    from conftest import run_cli
    from test_report import synthetic_metrics, write_run

    run_dir = write_run(tmp_path, synthetic_metrics())
    supervisor.record_restart(run_dir, Attempt(2, WorkerExit(1, -9), 40), 1, "worker 1 was killed by SIGKILL")
    code, out, err = run_cli(["report", "--run-dir", run_dir], capsys)
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("restarts"))
    assert line.endswith("from step 40 on 2 -> 1 worker(s): worker 1 was killed by SIGKILL"), line
    (run_dir / "restarts.jsonl").write_text("[1]\n")
    code, out, err = run_cli(["report", "--run-dir", run_dir], capsys)
    assert code == 2 and "restarts.jsonl line 1: not a JSON object" in err


def test_checkpoint_every_seconds_is_validated(shakespeare_slice):
    from conftest import tiny_config
    from dist_rnn.errors import UserError

    with pytest.raises(UserError, match="checkpoint.every_seconds"):
        tiny_config(shakespeare_slice, checkpoint={"every_steps": 0, "every_seconds": -1})


def test_checkpoint_every_seconds_saves_by_time(shakespeare_slice, tmp_path):
    # Any step is past 1 ms after the last save: one process checks (and saves) after every step.
    run_dir = tmp_path / "run"
    train(run_dir, shakespeare_slice, "--set", "train.max_steps=5",
          "--set", "checkpoint={every_steps: 0, every_seconds: 0.001, keep: 10}")
    saved = sorted(int(p.name[len("ckpt-"):-len(".index")]) for p in (run_dir / "checkpoints").glob("ckpt-*.index"))
    assert saved == [1, 2, 3, 4, 5]
