#!/usr/bin/env python3
"""Peak memory and time to the first step of ``dist-rnn train`` as the corpus grows.

For each size (default 10, 100 and 1000 MB of text) the script writes a
synthetic Zipfian character corpus (one random 16 MiB block of characters
drawn from a Zipf distribution over 95 printable characters, repeated to the
size) and its prepared folder directly (token files, tokenizer and manifest
as ``dist-rnn prepare`` writes them, recording the text file as the source so
``train`` reuses the folder instead of preparing). It then starts
``python -m dist_rnn train`` on it (a small LSTM), waits for the log line of
step 1 and kills the process: the time to that line and the process' peak
RSS (``wait4``'s ``ru_maxrss``) are the figures.

"today" runs the list-based code of commit 0f4b454 (``encode_corpus``: the
whole text as a Python string, then a token list, then an int32 copy per
epoch) on the same text, extracted with ``git archive`` to a temporary
folder. It is skipped above ``--today-max-mb`` (default 100): at about 13
bytes per character it would need ~13 GB at 1 GB.

Usage:
    python tools/bench_corpus_memory.py [--sizes-mb 10,100,1000] [--work DIR] [--today-max-mb 100]

Prints one line per run while it goes and a Markdown table at the end
(``--json FILE`` also writes the rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TODAY_COMMIT = "0f4b454"
BLOCK = 16 << 20
CHARS = [chr(c) for c in range(32, 127)]
SPLIT = [0.9, 0.05, 0.05]
FIRST_STEP = re.compile(r"^step\s+1\s")
TRAIN = {"model": {"cell": "lstm", "num_layers": 1, "hidden_size": 128, "embedding_size": 32},
         "optimizer": {"name": "adam", "learning_rate": 0.002},
         "train": {"batch_size": 32, "num_steps": 64, "max_steps": 1000, "max_epochs": None, "log_every": 1,
                   "eval_every": 0, "sample_length": 0},
         "checkpoint": {"every_steps": 0},
         "logging": {"tensorboard": False, "progress": "off"}}


def zipf_block(seed: int = 0) -> np.ndarray:
    """16 MiB of character ids 1..95 (0 is ``<unk>``), id k drawn with probability ~ 1/k."""
    p = 1.0 / np.arange(1, len(CHARS) + 1)
    return (np.random.default_rng(seed).choice(len(CHARS), BLOCK, p=p / p.sum()) + 1).astype(np.uint8)


def write_repeated(path: Path, block: bytes, size: int) -> None:
    """Writes ``block`` repeatedly up to ``size`` bytes."""
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[:left])
            left -= len(block)


def make_corpus(work: Path, size_mb: int, block: np.ndarray) -> tuple[dict, Path]:
    """Writes the text file and its prepared folder; returns the data section and the text path."""
    from dist_rnn.config import DataConfig
    from dist_rnn.data.layouts import corpus_layout
    from dist_rnn.data.prepare import FORMAT_VERSION, MANIFEST, prepared_key
    from dist_rnn.data.tokenizers import VocabularyTokenizer
    from dist_rnn.data.vocab import UNK, Vocabulary

    size = size_mb * 1_000_000
    text = work / f"zipf_{size_mb}mb.txt"
    table = np.frombuffer(("\0" + "".join(CHARS)).encode("ascii"), np.uint8)
    write_repeated(text, table[block].tobytes(), size)  # ASCII: one byte per character
    data = {"corpus": "file", "path": str(text), "split": SPLIT, "cache_dir": str(work / "cache")}
    config = DataConfig(**data)
    folder = work / "cache" / "prepared" / prepared_key(config)
    if (folder / MANIFEST).is_file():
        return data, text
    folder.mkdir(parents=True, exist_ok=True)
    bounds = [0, round(size * SPLIT[0]), round(size * SPLIT[0]) + round(size * SPLIT[1]), size]
    ids = block.tobytes()  # ids in Zipf rank order = the frequency order prepare gives them
    splits = {}
    for name, start, end in zip(("train", "valid", "test"), bounds, bounds[1:]):
        block_at = start % len(ids)
        rotated = ids[block_at:] + ids[:block_at]
        write_repeated(folder / f"{name}.bin", rotated, end - start)
        splits[name] = {"file": f"{name}.bin", "tokens": end - start, "source_bytes": end - start}
    files = VocabularyTokenizer(Vocabulary([UNK] + CHARS, "char")).save(folder)
    manifest = {"format_version": FORMAT_VERSION, "key": folder.name, "data": dataclasses.asdict(config),
                "tokenizer": {"kind": "char", "files": files}, "vocab_size": len(CHARS) + 1, "dtype": "uint8",
                "splits": splits, "sources": [s.describe() for s in corpus_layout(config).sources()],
                "dist_rnn_version": "bench", "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return data, text


def today_code(work: Path) -> Path:
    """The list-based code of :data:`TODAY_COMMIT`, extracted with ``git archive``."""
    target = work / f"today-{TODAY_COMMIT}"
    if not (target / "dist_rnn").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", TODAY_COMMIT, "dist_rnn"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def first_step(code: Path, config: dict, run_dir: Path, timeout: float) -> dict:
    """Starts ``dist-rnn train``, kills it at the log line of step 1; returns seconds and peak RSS."""
    import yaml

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    config_file = run_dir.parent / f"{run_dir.name}.yaml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(code), "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "dist_rnn", "train", str(config_file), "--run-dir", str(run_dir)],
                            cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds, tail = None, []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-5:]
        if FIRST_STEP.match(line):
            seconds = time.perf_counter() - start
            break
        if time.perf_counter() - start > timeout:
            break
    proc.send_signal(signal.SIGKILL)
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = status
    if seconds is None:
        raise RuntimeError(f"no step 1 within {timeout:.0f} s: " + " | ".join(tail))
    return {"first_step_s": seconds, "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", default="10,100,1000", help="corpus sizes in MB of text (default 10,100,1000)")
    parser.add_argument("--work", help="folder for corpora and runs (default: a temporary folder, removed)")
    parser.add_argument("--today-max-mb", type=int, default=100, help="largest size run with today's code")
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell; the table shows the minimum time")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for step 1")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-corpus-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
          f"python {platform.python_version()}; work folder {work}", flush=True)
    block = zipf_block()
    rows = []
    try:
        for size in sizes:
            started = time.perf_counter()
            data, _ = make_corpus(work, size, block)
            print(f"{size} MB corpus written in {time.perf_counter() - started:.1f} s", flush=True)
            for label, code in (("memmap", REPO), ("today", None)):
                if label == "today" and size > args.today_max_mb:
                    rows.append({"size_mb": size, "code": label, "skipped": f"above --today-max-mb {args.today_max_mb}"})
                    print(f"{size:>5} MB  {label:<7} skipped (list-based: ~13 bytes per character)", flush=True)
                    continue
                code = code or today_code(work)
                runs = [first_step(code, {**TRAIN, "data": data}, work / "runs" / f"{label}-{size}", args.timeout)
                        for _ in range(args.repeats)]
                row = {"size_mb": size, "code": label, "first_step_s": min(r["first_step_s"] for r in runs),
                       "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "load": os.getloadavg()[0]}
                rows.append(row)
                print(f"{size:>5} MB  {label:<7} first step {row['first_step_s']:7.1f} s  peak RSS "
                      f"{row['peak_rss_mb']:7.0f} MB  (load {row['load']:.1f})", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| corpus | code | time to step 1 (s) | peak RSS (MB) |\n|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['size_mb']} MB | {r['code']} | skipped ({r['skipped']}) | |")
        else:
            print(f"| {r['size_mb']} MB | {r['code']} | {r['first_step_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    base = next((r for r in rows if r["code"] == "memmap" and "skipped" not in r), None)
    for r in rows:
        if base and r["code"] == "memmap" and r is not base:
            print(f"memmap {r['size_mb']} MB / {base['size_mb']} MB: RSS {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x, "
                  f"time to step 1 {r['first_step_s'] / base['first_step_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
