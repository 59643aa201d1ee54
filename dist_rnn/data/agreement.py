"""Workers of one job agree on their prepared data before step 1.

Each worker opens its own prepared folder (on storage the hosts share, or
prepared per host). If the folders hold different tokens, replicas would
train on different streams while all-reducing as if they were one: the job
stops instead, on every worker, with one line naming the folders.
"""

from __future__ import annotations

import json
import socket

from dist_rnn.errors import UserError


def check_workers_agree(backend, corpus) -> None:
    """Compares the prepared data's identity (``corpus.data_sha256``) across the job's workers.

    Args:
        backend: The distribution backend (its ``gather_text`` is a collective
            every worker must reach).
        corpus: This worker's :class:`~dist_rnn.data.prepared.PreparedCorpus`.

    Raises:
        UserError: On every worker, if any worker's identity differs from
            worker 0's.
    """
    if backend.num_workers == 1:
        return
    mine = {"sha256": corpus.data_sha256, "folder": str(getattr(corpus, "folder", "")), "host": socket.gethostname()}
    seen = [json.loads(text) for text in backend.gather_text(json.dumps(mine))]
    differ = [i for i, other in enumerate(seen) if other["sha256"] != seen[0]["sha256"]]
    if differ:
        i = differ[0]
        raise UserError(
            f"the workers read different prepared data: worker 0 has {seen[0]['sha256'][:12]}... in "
            f"{seen[0]['host']}:{seen[0]['folder']}, worker {i} has {seen[i]['sha256'][:12]}... in "
            f"{seen[i]['host']}:{seen[i]['folder']} ({len(differ)} of {len(seen)} workers differ from worker 0); "
            f"prepare once on storage all hosts share (data.cache_dir) or from identical sources on every host")
