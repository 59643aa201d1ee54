"""Byte- and subword-level runs end to end: train, resume, generate, eval (bits per byte) and an export.

The run directory keeps the tokenizer (``vocab.json``, and ``spm.model`` for
subwords) and an export keeps it beside the SavedModel, so ``generate`` and an
export loaded in a fresh process turn text into text with nothing else.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dist_rnn.data.corpora import split_points

# Keras' own model.save(...) under NumPy 2 (keras/src/backend/tensorflow/core.py, not our code).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SPLIT = [0.8, 0.1, 0.1]
PRIME = "ROMEO: Café"


@pytest.fixture(scope="module")
def corpus_file(shakespeare_slice, tmp_path_factory):
    """30k characters of tiny-shakespeare with a line of multi-byte characters every 25 lines (bytes != chars)."""
    lines = shakespeare_slice.read_text(encoding="utf-8")[:30_000].splitlines(keepends=True)
    text = "".join(line + ("Café – naïve Zürich ✓\n" if i % 25 == 0 else "") for i, line in enumerate(lines))
    path = tmp_path_factory.mktemp("bytes") / "shakespeare_utf8.txt"
    path.write_text(text, encoding="utf-8")
    return path


def train_args(corpus_file, level: str, max_steps: int) -> list:
    data = f"{{corpus: file, path: '{corpus_file}', split: {SPLIT}, level: {level}"
    data += ", vocab_size: 320}" if level == "subword" else "}"
    return ["--set", f"data={data}",
            "--set", "model={cell: lstm, num_layers: 1, hidden_size: 32, embedding_size: 16}",
            "--set", "optimizer={name: adam, learning_rate: 0.01}",
            "--set", f"train={{batch_size: 4, num_steps: 20, max_steps: {max_steps}, max_epochs: null, log_every: 2, "
                     "eval_batch_size: 1, sample_length: 30}",
            "--set", "checkpoint.every_steps=0", "--set", "logging={tensorboard: false, progress: 'off'}"]


@pytest.fixture(scope="module", params=["byte", "subword"])
def run(request, corpus_file, tmp_path_factory):
    """A run of ``level`` trained 4 steps through ``dist-rnn train``, then resumed to step 6."""
    level = request.param
    run_dir = tmp_path_factory.mktemp(f"run-{level}") / "run"
    capture = _Capture()
    code, out, err = capture.cli(["train", "--run-dir", run_dir, *train_args(corpus_file, level, 4)])
    assert code == 0, err
    first = {"out": out, "err": err}
    code, out, err = capture.cli(["train", "--run-dir", run_dir, "--set", "train.max_steps=6"])
    assert code == 0, err
    return {"level": level, "dir": run_dir, "first": first, "resumed": {"out": out, "err": err},
            "capture": capture}


class _Capture:
    """``run_cli`` for module-scoped fixtures (pytest's capsys is function-scoped): stdout/stderr redirected."""

    def cli(self, argv: list) -> tuple[int, str, str]:
        import contextlib

        from dist_rnn.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as e:
                code = e.code
        return code, out.getvalue(), err.getvalue()


def split_text(corpus_file, level: str, split: str) -> bytes:
    """The split's bytes cut from the file as the corpus defines it (bytes at byte level, characters otherwise)."""
    raw = corpus_file.read_bytes()
    units = raw if level == "byte" else raw.decode("utf-8")
    a, b = split_points(len(units), SPLIT)
    part = {"train": units[:a], "valid": units[a:b], "test": units[b:]}[split]
    return part if level == "byte" else part.encode("utf-8")


def test_run_directory_holds_the_tokenizer_and_training_resumed(run, corpus_file):
    files = {p.name for p in run["dir"].iterdir()}
    assert {"vocab.json", "data.json", "config.yaml", "checkpoints", "metrics.jsonl"} <= files
    record = json.loads((run["dir"] / "vocab.json").read_text(encoding="utf-8"))
    assert record["kind"] == run["level"]
    assert ("spm.model" in files) == (run["level"] == "subword")
    steps = [json.loads(line)["step"] for line in (run["dir"] / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == [2, 4, 6]  # the resumed run logged 6 only: it continued from the checkpoint of step 4
    assert "resumed from" in run["resumed"]["err"] + run["resumed"]["out"] + (run["dir"] / "train.log").read_text()
    assert "sample:" in (run["dir"] / "train.log").read_text()
    # No data.cache_dir: the run prepared its corpus under $DIST_RNN_CACHE, which tests/conftest.py points
    # at a temporary folder for the session (not the user's ~/.cache/dist-rnn).
    prepared = [json.loads(m.read_text())["data"] for m in
                (Path(os.environ["DIST_RNN_CACHE"]) / "prepared").glob("*/manifest.json")]
    assert any(d["path"] == str(corpus_file) and d["level"] == run["level"] for d in prepared), prepared


def test_eval_reports_bits_per_byte(run, corpus_file):
    code, out, err = run["capture"].cli(["eval", "--run-dir", run["dir"], "--split", "test"])
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    test_bytes = split_text(corpus_file, run["level"], "test")
    tokens = result["tokens"] + 1  # every token but the first is scored; bpb charges them all
    assert result["bpb"] == pytest.approx(result["loss"] * tokens / len(test_bytes) / math.log(2), rel=1e-9)
    if run["level"] == "byte":
        assert tokens == len(test_bytes)
        assert result["bpb"] == pytest.approx(result["loss"] / math.log(2), rel=1e-12)
        # The loss itself, recomputed from the split's bytes read from the file: one pass of the model
        # from the zero state over the whole split (eval_batch_size 1 carries the state across windows).
        from dist_rnn.inference import load_model_for_inference

        model, _, _, _ = load_model_for_inference(str(run["dir"]))
        ids = np.frombuffer(test_bytes, np.uint8).astype(np.int32)[None, :]
        logits, _ = model(ids[:, :-1], None, training=False)
        logits = np.asarray(logits, np.float64)[0]
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        nats = -log_probs[np.arange(len(ids[0]) - 1), ids[0, 1:]].mean()
        assert result["loss"] == pytest.approx(nats, abs=1e-5)
        assert result["bpb"] == pytest.approx(nats / math.log(2), abs=1e-5)
    else:
        from dist_rnn.data.tokenizers import load_tokenizer

        assert tokens == len(load_tokenizer(run["dir"] / "vocab.json").encode(test_bytes.decode("utf-8")))
        assert result["bpb"] < result["loss"] / math.log(2)  # a piece spans several bytes


def generate_with_app(run_dir, **kwargs):
    from dist_rnn import app

    buf = io.StringIO()
    args = dict(prime=PRIME, length=60, temperature=1.0, top_k=0, top_p=1.0, seed=3, num_samples=1)
    args.update(kwargs)
    texts = app.generate(str(run_dir), stream=buf, **args)
    return texts, buf.getvalue()


def test_generate_turns_text_into_text(run):
    texts, streamed = generate_with_app(run["dir"])
    # What was streamed token by token is the prime and the decoded sample (multi-byte characters whole).
    assert streamed == PRIME + texts[0] + "\n"
    assert len(texts[0]) > 0
    from dist_rnn.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(run["dir"] / "vocab.json")
    ids = tokenizer.encode(texts[0])
    if run["level"] == "byte":
        assert len(texts[0].encode("utf-8", "replace")) >= 1 and len(ids) <= 60 * 3
    code, out, err = run["capture"].cli(["generate", "--run-dir", run["dir"], "--prime", PRIME, "--length", "20",
                                         "--seed", "5"])
    assert code == 0, err
    assert out.startswith(PRIME) and len(out) > len(PRIME) + 1


FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    from dist_rnn.export import ExportedModel

    exported = ExportedModel(sys.argv[1])
    texts = exported.generate(sys.argv[2], length=60, temperature=1.0, seed=3)
    training_code = sorted(m for m in ("dist_rnn.models.model", "dist_rnn.training.trainer", "dist_rnn.app")
                           if m in sys.modules)
    print(json.dumps({"texts": texts, "level": exported.level, "training_code": training_code}))
""")


def test_export_generates_text_in_a_fresh_process(run, tmp_path):
    out_dir = tmp_path / "export"
    code, out, err = run["capture"].cli(["export", "--run-dir", run["dir"], "--out", out_dir])
    assert code == 0, err
    subword = run["level"] == "subword"
    for name in ("vocab.json", "saved_model/assets/vocab.json"):
        assert (out_dir / name).read_bytes() == (run["dir"] / "vocab.json").read_bytes()
    for name in ("spm.model", "saved_model/assets/spm.model"):
        assert (out_dir / name).is_file() == subword
        if subword:
            assert (out_dir / name).read_bytes() == (run["dir"] / "spm.model").read_bytes()
    (out_dir / "spm.model").unlink(missing_ok=True)  # the SavedModel's own assets are enough
    (out_dir / "vocab.json").unlink()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(out_dir), PRIME], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["training_code"] == [] and got["level"] == run["level"]
    expected, _ = generate_with_app(run["dir"])  # the same checkpoint, prime, seed and sampling in this process
    assert got["texts"] == expected


def test_generate_without_the_tokenizer_files_is_a_one_line_error(run, tmp_path, capsys):
    import shutil

    from conftest import assert_one_line_error, run_cli

    copy = tmp_path / "copy"
    shutil.copytree(run["dir"], copy)
    missing = copy / ("spm.model" if run["level"] == "subword" else "vocab.json")
    missing.unlink()
    line = assert_one_line_error(*run_cli(["generate", "--run-dir", copy, "--length", "5"], capsys))
    assert str(missing) in line or (run["level"] == "byte" and "vocab.json" in line)
