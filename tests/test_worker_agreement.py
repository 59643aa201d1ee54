"""Workers of a multi-worker job compare their prepared data before step 1.

Two local worker processes (MultiWorkerMirroredStrategy over loopback, or two
Horovod ranks) each open a prepared folder; with equal tokens they go on, with
different tokens both stop with the same one-line error naming both folders.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from prepared_folder import write_prepared

WORKER = """
import sys
from dist_rnn.data.agreement import check_workers_agree
from dist_rnn.data.prepared import PreparedCorpus
from dist_rnn.distribution import MultiWorkerBackend
from dist_rnn.errors import UserError

backend = MultiWorkerBackend(timeout_seconds=30)
try:
    check_workers_agree(backend, PreparedCorpus.open(sys.argv[1]))
except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
print("agreed", backend.worker_index)
"""


def free_ports(n: int) -> str:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = ",".join(f"127.0.0.1:{s.getsockname()[1]}" for s in socks)
    for s in socks:
        s.close()
    return ports


def run_two_workers(folders: list) -> list[subprocess.CompletedProcess]:
    ports = free_ports(2)
    procs = []
    for index, folder in enumerate(folders):
        env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3",
               "TF_CONFIG": json.dumps({"cluster": {"worker": ports.split(",")},
                                        "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(folder)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


@pytest.mark.slow
def test_two_workers_stop_before_step_one_when_their_prepared_data_differs(tmp_path):
    ids = {"train": np.arange(500) % 11, "valid": np.arange(50) % 11}
    same = [write_prepared(tmp_path / f"host{i}" / "prepared", ids, 11, created=f"2026-01-0{i + 1}") for i in range(2)]
    agreed = run_two_workers(same)
    assert [r.returncode for r in agreed] == [0, 0], [r.stderr[-2000:] for r in agreed]
    assert [r.stdout.split() for r in agreed] == [["agreed", "0"], ["agreed", "1"]]

    other = write_prepared(tmp_path / "host1b" / "prepared", {**ids, "train": np.arange(499) % 11}, 11)
    refused = run_two_workers([same[0], other])
    for r in refused:
        assert r.returncode == 2, r.stderr[-2000:]
        line = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert len(line) == 1 and "Traceback" not in r.stderr
        assert "the workers read different prepared data" in line[0]
        assert f"{same[0]}" in line[0] and f"{other}" in line[0] and "worker 1 has" in line[0]


HOROVOD_WORKER = """
import sys
from dist_rnn.data.agreement import check_workers_agree
from dist_rnn.data.prepared import PreparedCorpus
from dist_rnn.distribution import HorovodBackend
from dist_rnn.errors import UserError

backend = HorovodBackend()
try:
    check_workers_agree(backend, PreparedCorpus.open(sys.argv[1 + backend.worker_index]))
except UserError as e:
    print(f"error: {e}")
    sys.exit(2)
print("agreed", backend.worker_index)
"""


@pytest.mark.slow
def test_two_horovod_ranks_stop_when_their_prepared_data_differs(tmp_path):
    pytest.importorskip("horovod.tensorflow", reason="install Horovod with tools/install_horovod.sh")
    ids = {"train": np.arange(500) % 11}
    folders = [write_prepared(tmp_path / "rank0", ids, 11),
               write_prepared(tmp_path / "rank1", {"train": ids["train"][:-1]}, 11)]
    script = tmp_path / "worker.py"
    script.write_text(HOROVOD_WORKER, encoding="utf-8")
    horovodrun = Path(sys.executable).with_name("horovodrun")
    proc = subprocess.run([str(horovodrun), "-np", "2", "--gloo", sys.executable, str(script), *map(str, folders)],
                          env={**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stdout.splitlines() if "error: the workers read different prepared data" in line]
    assert proc.returncode != 0 and len(errors) == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert all(f"{folders[0]}" in line and f"{folders[1]}" in line for line in errors)
