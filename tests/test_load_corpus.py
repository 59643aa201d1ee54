"""load_corpus, the one entry point to a run's data, and bits per byte through train, eval and report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import REPO, run_cli
from dist_rnn.config import DataConfig
from dist_rnn.data import PreparedCorpus, load_corpus
from dist_rnn.data.encoding import encode_corpus


def test_load_corpus_prepares_once_then_maps_the_same_tokens(shakespeare_slice, tmp_path):
    config = DataConfig(corpus="file", path=str(shakespeare_slice), split=[0.8, 0.1, 0.1], cache_dir=str(tmp_path))
    corpus = load_corpus(config)
    assert isinstance(corpus, PreparedCorpus) and isinstance(corpus.train, np.memmap)
    manifest = corpus.folder / "manifest.json"
    written = manifest.stat().st_mtime_ns
    again = load_corpus(config)  # a complete folder with unchanged sources is reused, not rewritten
    assert again.folder == corpus.folder and manifest.stat().st_mtime_ns == written
    assert again.data_sha256 == corpus.data_sha256
    encoded = encode_corpus(config)  # the list-based path of earlier versions
    assert corpus.vocab == encoded.vocab
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(corpus.split(split), encoded.split(split))
    text = shakespeare_slice.read_text(encoding="utf-8")
    assert sum(corpus.source_bytes(s) for s in ("train", "valid", "test")) == len(text.encode("utf-8"))


def write_wikitext_standin(folder) -> dict:
    """Files laid out like wikitext-103-raw-v1.zip's, with multi-byte characters so bytes != characters."""
    line = " = Café = \n\n The naïve author wrote 12 @,@ 000 words – in Zürich . \n"
    texts = {"train": line * 120, "valid": " = Été = \n Ça va , señor ? \n" * 6, "test": " = T = \n test ✓ .\n" * 6}
    folder.mkdir(parents=True)
    for split, text in texts.items():
        (folder / f"wiki.{split}.raw").write_text(text, encoding="utf-8")
    return texts


def test_wikitext103_config_trains_and_reports_bits_per_byte(tmp_path, capsys):
    texts = write_wikitext_standin(tmp_path / "wikitext-103-raw")
    run = tmp_path / "run"
    small = ["--set", f"data.path={tmp_path / 'wikitext-103-raw'}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
             "--set", "model={num_layers: 1, hidden_size: 16, embedding_size: 8}",
             "--set", "train={batch_size: 4, num_steps: 10, max_steps: 6, eval_every: 3, eval_batch_size: 2, "
                      "log_every: 3, sample_length: 0}",
             "--set", "optimizer.schedule.warmup_steps=2", "--set", "checkpoint.every_steps=0",
             "--set", "logging={tensorboard: false, progress: 'off'}"]
    code, out, err = run_cli(["train", REPO / "configs" / "wikitext103_char.yaml", "--run-dir", run, *small], capsys)
    assert code == 0, err
    valid_bytes = len(texts["valid"].encode("utf-8"))
    assert valid_bytes > len(texts["valid"])  # multi-byte characters: bits per byte differs from bits per char
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if r["split"] == "valid"]
    assert len(evaluations) == 2
    for r in evaluations:  # the whole split is charged: nats per token * tokens / bytes / ln 2
        assert r["bpb"] == pytest.approx(r["loss"] * len(texts["valid"]) / valid_bytes / math.log(2), rel=1e-9)
        assert f"bpb {r['bpb']:.4f}" in out
    code, out, err = run_cli(["eval", "--run-dir", run, "--split", "test"], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    test_bytes = len(texts["test"].encode("utf-8"))
    assert result["bpb"] == pytest.approx(result["loss"] * len(texts["test"]) / test_bytes / math.log(2), rel=1e-9)
    assert result["bpc"] == pytest.approx(result["loss"] / math.log(2)) and result["bpb"] < result["bpc"]
    data_record = json.loads((run / "data.json").read_text())
    assert data_record["identity"] == "prepared" and len(data_record["sha256"]) == 64
    code, out, err = run_cli(["report", "--run-dir", run, "--out", tmp_path / "r.png"], capsys)
    assert code == 0, err
    assert f"bpb {evaluations[-1]['bpb']:.4f}" in out
