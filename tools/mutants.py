#!/usr/bin/env python3
"""Mutation check: plant realistic one-line bugs and see the tests catch each one.

Each mutant is an exact (file, old text, new text) replacement in a temporary
copy of the repository, and names the tests that must catch it. The tool runs
those tests (``pytest -x``) on the mutated copy and prints a table of killed
and survived mutants with the killing test. A mutant whose old text is not
found exactly once is reported ``stale``: the code changed under it and the
catalogue needs updating.

Usage::

    python tools/mutants.py                 # the whole catalogue
    python tools/mutants.py NAME [NAME ...] # some mutants
    python tools/mutants.py --list          # the catalogue, nothing run
    python tools/mutants.py --jobs 2        # two mutants at a time

Exit code 0 only if every mutant run was killed. On demand, not in CI: the
whole catalogue trains many small models.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    """One planted bug.

    Attributes:
        name: Short unique name (command-line argument).
        bug: What the bug is, in words.
        file: Path relative to the repository root.
        old: Text that must occur exactly once in ``file``.
        new: Its replacement.
        tests: pytest node ids that must fail on the mutated code.
    """

    name: str
    bug: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


CATALOGUE: tuple[Mutant, ...] = (
    # ---- the six bugs of the original issue
    Mutant("fp16-not-unscaled", "float16 gradients never divided by the loss scale",
           "dist_rnn/training/steps.py",
           "grads = [gradients.map_values(lambda v: v / scale, g) for g in grads]",
           "grads = [gradients.map_values(lambda v: v, g) for g in grads]",
           ("tests/test_gradient_numbers.py::test_float16_reports_and_applies_the_unscaled_gradient",)),
    Mutant("clip-per-replica", "each replica's gradient clipped before the all-reduce",
           "dist_rnn/training/steps.py",
           "grads = self.backend.all_reduce_sum(grads)",
           "grads = self.backend.all_reduce_sum(gradients.clip_by_global_norm(grads, self.clip_norm, "
           "gradients.global_norm(grads)))",
           ("tests/test_fast_mirrored.py",)),
    Mutant("epoch-state-not-reset", "carried state not reset at the start of an epoch",
           "dist_rnn/training/trainer.py",
           "            if pos.index == 0:\n                states = self._zero_states(t.batch_size)",
           "            if pos.index < 0:\n                states = self._zero_states(t.batch_size)",
           ("tests/test_epochs.py::test_state_is_zero_at_each_epoch_start_and_carried_within",)),
    Mutant("temperature-multiplies", "sampling temperature multiplies the logits instead of dividing",
           "dist_rnn/generation.py",
           "logits = logits / temperature",
           "logits = logits * temperature",
           ("tests/test_generation.py::test_empirical_frequencies_match_softmax",)),
    Mutant("window-off-by-one", "training windows start one token late",
           "dist_rnn/data/batching.py",
           "return self.read(self.offset(epoch) + index * self.num_steps, self.num_steps)",
           "return self.read(self.offset(epoch) + index * self.num_steps + 1, self.num_steps)",
           ("tests/test_memmap_batching.py::test_training_windows_equal_the_list_based_ones",)),
    Mutant("carried-state-not-saved", "the checkpoint keeps zeros instead of the carried state",
           "dist_rnn/training/trainer.py",
           "            var.assign(value)",
           "            var.assign(tf.zeros_like(value))",
           ("tests/test_epochs.py::test_resume_across_epochs_is_bitwise_identical[sigint-before-last-batch]",)),
    # ---- gradient path
    Mutant("optimizer-sums-again", "Keras' optimizer all-reduces the already reduced gradient again",
           "dist_rnn/training/optimizers.py",
           "    optimizer._all_reduce_sum_gradients = lambda grads_and_vars: list(grads_and_vars)",
           "    pass",
           ("tests/test_fast_mirrored.py",)),
    Mutant("norm-logged-after-clip", "the logged gradient norm is the clipped one",
           "dist_rnn/training/steps.py",
           "        grads = gradients.clip_by_global_norm(grads, self.clip_norm, grad_norm)",
           "        grads = gradients.clip_by_global_norm(grads, self.clip_norm, grad_norm)\n"
           "        grad_norm = gradients.global_norm(grads)",
           ("tests/test_training.py::test_clipped_update_equals_hand_computed_reference",)),
    Mutant("overflow-applied-on-replicas", "a non-finite step is applied on the replicas instead of skipped",
           "dist_rnn/distribution.py",
           "            tf.cond(finite, apply, lambda: tf.constant(False))",
           "            tf.cond(tf.constant(True), apply, lambda: tf.constant(False))",
           ("tests/test_fast_mirrored.py",)),
    Mutant("scale-ignores-max", "the loss scale grows past train.loss_scale.max_scale",
           "dist_rnn/training/gradients.py",
           "tf.minimum(self.scale * 2.0, c.max_scale)",
           "self.scale * 2.0",
           ("tests/test_gradient_numbers.py::test_loss_scale_doubles_after_growth_interval_up_to_max_scale",)),
    # ---- state carrying
    Mutant("train-state-not-carried", "the training loop drops the new state (every batch starts from zero)",
           "dist_rnn/training/trainer.py",
           "loss_sum, states, grad_norm, finite = self.steps.train_step(x, y, states, seed, step_length)",
           "loss_sum, _, grad_norm, finite = self.steps.train_step(x, y, states, seed, step_length)",
           ("tests/test_epochs.py::test_state_is_zero_at_each_epoch_start_and_carried_within",)),
    Mutant("eval-state-not-carried", "evaluation restarts every window from a zero state",
           "dist_rnn/training/evaluation.py",
           "loss_sum, states = steps.eval_step(*backend.shard((inputs, targets, weights)), states)",
           "loss_sum, _ = steps.eval_step(*backend.shard((inputs, targets, weights)), states)",
           ("tests/test_epochs.py::test_evaluation_carries_state_and_counts_the_scored_tokens",)),
    # ---- checkpoint contents
    Mutant("loss-scale-not-saved", "the float16 loss scale is left out of the checkpoint",
           "dist_rnn/training/factory.py",
           '        objects["loss_scale"] = loss_scale',
           "        pass",
           ("tests/test_gradient_numbers.py::test_float16_stop_and_resume_is_bitwise_identical_and_restores_the_scale",)),
    # ---- evaluation token counting
    Mutant("eval-scores-one-past-row-end", "evaluation also scores the position after each row's last target",
           "dist_rnn/data/batching.py",
           "weights[local] = np.arange(start, end)[None, :] < self.lengths[local, None]",
           "weights[local] = np.arange(start, end)[None, :] <= self.lengths[local, None]",
           ("tests/test_evaluation.py::test_evaluation_scores_every_valid_token_once_and_equals_per_row_oracle",)),
    # ---- sampling
    Mutant("sampling-state-not-threaded", "generation restarts the state at every new token",
           "dist_rnn/generation.py",
           "logits, states = self.step_fn(tf.constant(nxt[:, None], tf.int32), states)",
           "logits, states = self.step_fn(tf.constant(nxt[:, None], tf.int32), None)",
           ("tests/test_generation.py::test_greedy_follows_the_model_and_threads_state",)),
    Mutant("stream-splits-utf8", "streamed generation writes a multi-byte character's bytes before it is complete",
           "dist_rnn/data/tokenizers.py",
           "and len(pending) < 4:",
           "and len(pending) < 1:",
           ("tests/test_tokenizers.py::test_text_stream_writes_each_character_once_complete",)),
    # ---- distribution row ownership
    Mutant("rows-interleaved", "replica r gets rows r, r+n, ... instead of its contiguous block",
           "dist_rnn/distribution.py",
           "return tensor[replica * per:(replica + 1) * per]",
           "return tensor[replica::num_replicas]",
           ("tests/test_fast_mirrored.py",)),
    Mutant("dropout-rows-per-replica", "dropout masks drawn by local row (every replica draws rows 0..b-1)",
           "dist_rnn/training/steps.py",
           "rows = tf.stack([self.backend.replica_id() * local_rows, tf.constant(self.global_batch, tf.int32)])",
           "rows = tf.stack([0 * local_rows, tf.constant(self.global_batch, tf.int32)])",
           ("tests/test_fast_mirrored.py",)),
    # ---- this round's correctness fixes
    Mutant("recurrent-mask-per-local-row", "recurrent-dropout masks drawn by local row (every replica draws rows 0..b-1)",
           "dist_rnn/models/dropout.py",
           "keep = uniform[rows[0]:rows[0] + batch] >= rate",
           "keep = uniform[0:batch] >= rate",
           ("tests/test_recurrent_dropout.py::test_mask_of_a_row_does_not_depend_on_the_replica_layout",)),
    Mutant("weights-share-one-seed", "every weight's initializer seeded with the model seed alone",
           "dist_rnn/models/model.py",
           "    return int.from_bytes(digest[:4], \"little\") & 0x7FFFFFFF",
           "    return seed",
           ("tests/test_initializers.py::test_no_two_weights_share_values",)),
    Mutant("sequence-loss-per-token", "the PTB per-sequence loss divided by every token (20-35x too small a step)",
           "dist_rnn/training/steps.py",
           "    if loss_normalization == \"sequence\":\n        return float(global_batch)",
           "    if loss_normalization == \"sequence\":\n        return float(global_batch * num_steps)",
           ("tests/test_loss_normalization.py::test_sequence_gradient_is_num_steps_times_token_gradient",)),
)

IGNORED = shutil.ignore_patterns(".git", ".venv*", "runs", "__pycache__", ".pytest_cache", "*.egg-info")


class StaleMutant(Exception):
    """The mutant's old text is not in its file exactly once."""


def apply_mutant(mutant: Mutant, root: Path) -> None:
    """Replaces the mutant's old text by its new text in ``root / mutant.file``.

    Raises:
        StaleMutant: If the file is missing or the old text occurs 0 or 2+ times.
    """
    path = root / mutant.file
    if not path.is_file():
        raise StaleMutant(f"{mutant.file} does not exist")
    text = path.read_text(encoding="utf-8")
    count = text.count(mutant.old)
    if count != 1:
        raise StaleMutant(f"old text found {count} times in {mutant.file}")
    path.write_text(text.replace(mutant.old, mutant.new), encoding="utf-8")


def mutated_copy(mutant: Mutant, repo: Path, workspace: Path) -> Path:
    """Copies ``repo`` into ``workspace/repo`` and applies the mutant there.

    The copy sits beside a link to ``repo``'s sibling ``shared`` folder, so
    the tests find their data at the same relative place (``../shared``).
    """
    shared = repo.parent / "shared"
    if shared.exists():
        (workspace / "shared").symlink_to(shared)
    copy = workspace / "repo"
    shutil.copytree(repo, copy, ignore=IGNORED)
    apply_mutant(mutant, copy)
    return copy


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed | survived | stale | error
    detail: str
    seconds: float


def run_mutant(mutant: Mutant, repo: Path = REPO, timeout: float = 1200) -> Outcome:
    """Runs the mutant's tests on a mutated copy; killed means a test failed."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        try:
            copy = mutated_copy(mutant, repo, Path(tmp))
        except StaleMutant as e:
            return Outcome(mutant, "stale", str(e), time.monotonic() - start)
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfEs", "-p", "no:cacheprovider", *mutant.tests]
        env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Outcome(mutant, "error", f"tests timed out after {timeout:.0f} s", time.monotonic() - start)
    seconds = time.monotonic() - start
    out = proc.stdout
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    if proc.returncode == 1 and failed:
        return Outcome(mutant, "killed", failed[0], seconds)
    if proc.returncode == 0:
        skipped = re.findall(r"^SKIPPED .*", out, re.M)
        return Outcome(mutant, "survived", "all passed" + (f" ({len(skipped)} skipped)" if skipped else ""), seconds)
    last = (out.strip().splitlines() or proc.stderr.strip().splitlines() or ["?"])[-1]
    return Outcome(mutant, "error", f"pytest exit {proc.returncode}: {last}", seconds)


def format_table(outcomes: list[Outcome]) -> str:
    """The result table: mutant, status, seconds, killing test or reason."""
    width = max(len(o.mutant.name) for o in outcomes)
    lines = [f"{'mutant':<{width}}  {'status':<8}  {'time':>6}  killed by / detail",
             f"{'-' * width}  {'-' * 8}  {'-' * 6}  {'-' * 19}"]
    lines += [f"{o.mutant.name:<{width}}  {o.status:<8}  {o.seconds:5.0f}s  {o.detail}" for o in outcomes]
    counts = {s: sum(o.status == s for o in outcomes) for s in ("killed", "survived", "stale", "error")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" of {len(outcomes)}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="print the catalogue and exit")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at the same time (default 1)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per mutant's tests (default 1200)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs the selected mutants and prints the table; returns the exit code."""
    args = parse_args(argv)
    by_name = {m.name: m for m in CATALOGUE}
    if args.list:
        for m in CATALOGUE:
            print(f"{m.name}: {m.bug}\n    {m.file}\n    tests: {' '.join(m.tests)}")
        return 0
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        print(f"error: unknown mutant(s) {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    selected = [by_name[n] for n in args.names] or list(CATALOGUE)

    def run(mutant: Mutant) -> Outcome:
        outcome = run_mutant(mutant, timeout=args.timeout)
        print(f"{mutant.name}: {outcome.status} ({outcome.detail})", flush=True)
        return outcome

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        outcomes = list(pool.map(run, selected))
    print(format_table(outcomes))
    return 0 if all(o.status == "killed" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
