"""Prepare throughput per tokenizer on synthetic Zipfian text made here.

Writes a text of ``--mb`` megabytes (words drawn from a Zipf distribution
over a synthetic vocabulary, a few with non-ASCII letters, lines of 5 to 30
words), prepares it once per tokenizer into a fresh cache, and prints one JSON
line per tokenizer: MB/s over the whole prepare (wall clock and process CPU
time, which is what a loaded machine distorts least), the CPU seconds of
fitting the tokenizer (for subwords, training SentencePiece on the sample: a
fixed cost) and MB/s without it, and the wall seconds of each pass.

Ends with a Markdown table of MB/s per tokenizer against the targets of
:data:`TARGETS_MB_S` and the machine's load.

Usage (through the benchmark's entry point)::

    python tools/benchmark.py --prepare --mb 50
    python tools/benchmark.py --prepare --mb 2 --levels char,byte   # a quick check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for dist_rnn

from dist_rnn.config import DataConfig  # noqa: E402
from dist_rnn.data import prepare  # noqa: E402

LEVELS = ("byte", "char", "word", "subword")
# Prepare throughput goals of issue #17 on the 2-core development machine (SentencePiece alone encodes ~10 MB/s).
TARGETS_MB_S = {"byte": 50.0, "char": 50.0, "word": 10.0, "subword": 5.0}
_PASS_LINE = re.compile(r"^(\w+): .* MB, ([\d.]+) MB/s, ([\d.]+) s$")


def zipf_text(megabytes: float, seed: int = 0, vocab: int = 50_000) -> str:
    """Synthetic text of about ``megabytes`` MB: Zipf-distributed words in lines."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    accented = np.array(list("éèàüößçñøå"))
    lengths = rng.integers(1, 11, size=vocab)
    words = []
    for i, n in enumerate(lengths):
        word = "".join(rng.choice(letters, size=n))
        if i % 20 == 7:  # one word in 20 carries a non-ASCII letter
            word += str(rng.choice(accented))
        words.append(word)
    weights = 1.0 / np.arange(1, vocab + 1)
    weights /= weights.sum()
    target = int(megabytes * 1e6)
    lines, size = [], 0
    while size < target:
        ids = rng.choice(vocab, size=100_000, p=weights)
        cut = np.cumsum(rng.integers(5, 31, size=10_000))
        block = np.split(np.array(words, dtype=object)[ids], cut[cut < len(ids)])
        for line_words in block:
            line = " ".join(line_words) + "\n"
            lines.append(line)
            size += len(line.encode("utf-8"))
            if size >= target:
                break
    return "".join(lines)


class _PassTimes(logging.Handler):
    """Collects the pass lines (``encoding: ... MB/s, 1.2 s``) that prepare logs at the end of each pass."""

    def __init__(self):
        super().__init__()
        self.seconds = {}

    def emit(self, record):
        match = _PASS_LINE.match(record.getMessage())
        if match:
            self.seconds[match.group(1)] = float(match.group(3))


def measure(path: Path, level: str, cache: Path, vocab_size: int, sample_chars: int) -> dict:
    """Prepares ``path`` at ``level`` into a new folder under ``cache``; returns the timings."""
    extra = {"vocab_size": vocab_size, "subword_sample_chars": sample_chars} if level == "subword" else {}
    cache = Path(tempfile.mkdtemp(dir=cache))
    config = DataConfig(corpus="file", path=str(path), level=level, cache_dir=str(cache), **extra)
    logger = logging.getLogger("dist_rnn")
    handler = _PassTimes()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    fit_cpu = [0.0]
    real_fit = prepare.fit_tokenizer

    def timed_fit(*args):
        start = time.process_time()
        try:
            return real_fit(*args)
        finally:
            fit_cpu[0] += time.process_time() - start

    prepare.fit_tokenizer = timed_fit
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        prepare.prepare_corpus(config, progress="log")
    finally:
        logger.removeHandler(handler)
        prepare.fit_tokenizer = real_fit
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    mb = path.stat().st_size / 1e6
    passes = {k: round(v, 2) for k, v in handler.seconds.items()}
    return {"level": level, "mb": round(mb, 2), "seconds": round(wall, 4), "mb_per_s": round(mb / wall, 1),
            "cpu_seconds": round(cpu, 2), "mb_per_cpu_s": round(mb / max(cpu, 1e-9), 1),
            # Fitting (the subword model's training above all) costs the same for any corpus size:
            # the rest is what grows with the corpus.
            "fit_cpu_seconds": round(fit_cpu[0], 2),
            "mb_per_cpu_s_without_fit": round(mb / max(cpu - fit_cpu[0], 1e-9), 1), "passes": passes}


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the benchmark; prints and returns one result per tokenizer."""
    parser = argparse.ArgumentParser(prog="tools/benchmark.py --prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="size of the synthetic text in MB")
    parser.add_argument("--levels", default=",".join(LEVELS), help="comma-separated tokenizers")
    parser.add_argument("--vocab-size", type=int, default=8000, help="subword pieces")
    parser.add_argument("--sample-chars", type=int, default=2_000_000,
                        help="characters the subword model is trained on")
    parser.add_argument("--repeat", type=int, default=1,
                        help="prepare this many times per tokenizer and keep the fastest (a loaded machine is noisy)")
    args = parser.parse_args(argv)
    logging.getLogger("dist_rnn").propagate = False
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "zipf.txt"
        path.write_text(zipf_text(args.mb), encoding="utf-8")
        cache = Path(tmp) / "cache"
        cache.mkdir()
        for level in args.levels.split(","):
            runs = [measure(path, level, cache, args.vocab_size, args.sample_chars) for _ in range(args.repeat)]
            result = min(runs, key=lambda r: r["cpu_seconds"])
            print(json.dumps(result), flush=True)
            results.append(result)
    print()
    given = argv if argv is not None else sys.argv[1:]
    print(markdown_table(results, " ".join(["python tools/benchmark.py --prepare", *given])))
    return results


def markdown_table(results: list[dict], command: str) -> str:
    """The results as a Markdown table against :data:`TARGETS_MB_S`, with the machine, load and command."""
    lines = [f"machine: {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} "
             f"(1-minute average at the end), python {platform.python_version()}", f"command: `{command}`", "",
             "| tokenizer | MB | wall s | MB/s (wall) | MB/s (CPU) | MB/s (CPU, without fitting) | target MB/s | met |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        target = TARGETS_MB_S.get(r["level"])
        met = "" if target is None else ("yes" if r["mb_per_cpu_s"] >= target else "no")
        lines.append(f"| {r['level']} | {r['mb']} | {r['seconds']} | {r['mb_per_s']} | {r['mb_per_cpu_s']} | "
                     f"{r['mb_per_cpu_s_without_fit']} | {target if target is not None else ''} | {met} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
