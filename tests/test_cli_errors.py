"""The CLI in-process: bad input gives one 'error:' line and exit code 2, nothing written.

A tiny run is trained once (session fixture) for the commands that need an
existing run directory, and for eval/generate/resume behaviour.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli, shakespeare_prefix

from dist_rnn.cli import build_parser, main

TINY_SETTINGS = [
    "model.num_layers=1", "model.hidden_size=16", "model.embedding_size=16",
    "train.batch_size=4", "train.num_steps=16", "train.max_steps=3", "train.max_epochs=null",
    "train.log_every=1", "train.sample_length=0",
    "logging.tensorboard=false", "logging.progress=\"off\"",
]




def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A config file, its data file and a run directory trained for 3 steps."""
    root = tmp_path_factory.mktemp("tiny")
    data = shakespeare_prefix(root, 20_000)
    cfg = root / "tiny.yaml"
    cfg.write_text(f"data:\n  corpus: file\n  path: {data}\n", encoding="utf-8")
    run_dir = root / "run"
    code = main(["train", str(cfg), "--run-dir", str(run_dir), *sum((["--set", s] for s in TINY_SETTINGS), [])])
    assert code == 0
    assert (run_dir / "config.yaml").is_file() and (run_dir / "vocab.json").is_file()
    assert any((run_dir / "checkpoints").glob("ckpt-3*"))
    return {"root": root, "cfg": cfg, "data": data, "run": run_dir}


# ====================================================================== train: bad config


def test_unknown_key_in_config_file(tmp_path, capsys):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("model:\n  hiden_size: 16\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    line = assert_one_line_error(*run_cli(["train", cfg, "--run-dir", run_dir], capsys))
    assert "'model.hiden_size'" in line and "'model.hidden_size'" in line
    assert not run_dir.exists()


@pytest.mark.parametrize("override, key", [
    ("train.num_steps=0", "train.num_steps"),
    ("optimizer.learning_rate=-1", "optimizer.learning_rate"),
    ("model.cell=lstn", "model.cell"),
    ("train.batch_size=\"32\"", "train.batch_size"),
])
def test_bad_set_override_with_config(tiny, tmp_path, capsys, override, key):
    run_dir = tmp_path / "run"
    line = assert_one_line_error(*run_cli(["train", tiny["cfg"], "--run-dir", run_dir, "--set", override], capsys))
    assert f"config key '{key}'" in line
    assert not run_dir.exists()


def test_set_without_equals(tiny, tmp_path, capsys):
    run_dir = tmp_path / "run"
    line = assert_one_line_error(*run_cli(["train", tiny["cfg"], "--run-dir", run_dir,
                                           "--set", "train.num_steps"], capsys))
    assert "--set train.num_steps" in line and "KEY=VALUE" in line
    assert not run_dir.exists()


def test_missing_config_file(tmp_path, capsys):
    run_dir = tmp_path / "run"
    missing = tmp_path / "nope.yaml"
    line = assert_one_line_error(*run_cli(["train", missing, "--run-dir", run_dir], capsys))
    assert line == f"error: config file not found: {missing}"
    assert not run_dir.exists()


def test_file_corpus_without_path(tmp_path, capsys):
    cfg = tmp_path / "nopath.yaml"
    cfg.write_text("data:\n  corpus: file\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    line = assert_one_line_error(*run_cli(["train", cfg, "--run-dir", run_dir], capsys))
    assert "'data.path'" in line
    assert not run_dir.exists()


def test_file_corpus_with_missing_file(tmp_path, capsys):
    missing = tmp_path / "no_such_corpus.txt"
    cfg = tmp_path / "missing.yaml"
    cfg.write_text(f"data:\n  corpus: file\n  path: {missing}\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    line = assert_one_line_error(*run_cli(["train", cfg, "--run-dir", run_dir, *sum(
        (["--set", s] for s in TINY_SETTINGS), [])], capsys))
    assert "data.path" in line and str(missing) in line
    assert not run_dir.exists()


@pytest.mark.parametrize("data, keys", [
    ("{path: DATA}", ["data.path", "data.corpus 'stdlib'"]),  # the default corpus reads no file
    ("{corpus: file, path: DATA, valid_file: DATA}", ["data.valid_file", "data.train_file"]),
    ("{corpus: file, path: DATA, test_file: DATA}", ["data.test_file", "data.train_file"]),
    ("{corpus: file, path: DATA, train_file: DATA}", ["data.path", "data.train_file"]),
])
def test_data_keys_that_would_be_ignored_are_refused(tiny, tmp_path, capsys, data, keys):
    run_dir = tmp_path / "run"
    line = assert_one_line_error(*run_cli(["train", "--run-dir", run_dir, "--set",
                                           "data=" + data.replace("DATA", str(tiny["data"])),
                                           *sum((["--set", s] for s in TINY_SETTINGS), [])], capsys))
    assert line.startswith(f"error: config key '{keys[0]}'") and keys[1] in line and "(from --set)" in line
    assert not run_dir.exists()


def test_corpus_too_small_for_batch(tiny, tmp_path, capsys):
    run_dir = tmp_path / "run"
    line = assert_one_line_error(*run_cli(["train", tiny["cfg"], "--run-dir", run_dir,
                                           "--set", "train.batch_size=64", "--set", "train.num_steps=400",
                                           "--set", "logging.tensorboard=false"], capsys))
    assert "split" in line and "train.batch_size 64" in line
    assert not run_dir.exists()


def test_unknown_flag(tiny, tmp_path, capsys):
    run_dir = tmp_path / "run"
    line = assert_one_line_error(*run_cli(["train", tiny["cfg"], "--run-dir", run_dir, "--bogus-flag"], capsys))
    assert "--bogus-flag" in line
    assert not run_dir.exists()


def test_unknown_generate_flag(tiny, capsys):
    before = snapshot(tiny["run"])
    line = assert_one_line_error(*run_cli(["generate", "--run-dir", tiny["run"], "--tempreature", "0.5"], capsys))
    assert "--tempreature" in line
    assert snapshot(tiny["run"]) == before


# ====================================================================== eval / generate: bad input


def test_eval_missing_run_dir(tmp_path, capsys):
    run_dir = tmp_path / "missing_run"
    line = assert_one_line_error(*run_cli(["eval", "--run-dir", run_dir], capsys))
    assert str(run_dir) in line and "not found" in line
    assert not run_dir.exists()


def test_generate_missing_run_dir(tmp_path, capsys):
    run_dir = tmp_path / "missing_run"
    line = assert_one_line_error(*run_cli(["generate", "--run-dir", run_dir], capsys))
    assert str(run_dir) in line
    assert not run_dir.exists()


def test_generate_dir_without_config(tmp_path, capsys):
    run_dir = tmp_path / "empty"
    run_dir.mkdir()
    line = assert_one_line_error(*run_cli(["generate", "--run-dir", run_dir], capsys))
    assert "no config.yaml" in line
    assert list(run_dir.iterdir()) == []


def test_generate_dir_without_checkpoints(tiny, tmp_path, capsys):
    run_dir = tmp_path / "nockpt"
    run_dir.mkdir()
    shutil.copy(tiny["run"] / "config.yaml", run_dir)
    shutil.copy(tiny["run"] / "vocab.json", run_dir)
    before = snapshot(run_dir)
    line = assert_one_line_error(*run_cli(["generate", "--run-dir", run_dir, "--length", "5"], capsys))
    assert "holds no checkpoint" in line and str(run_dir / "checkpoints") in line
    assert snapshot(run_dir) == before


def test_eval_dir_without_checkpoints(tiny, tmp_path, capsys):
    run_dir = tmp_path / "nockpt"
    run_dir.mkdir()
    shutil.copy(tiny["run"] / "config.yaml", run_dir)
    shutil.copy(tiny["run"] / "vocab.json", run_dir)
    before = snapshot(run_dir)
    line = assert_one_line_error(*run_cli(["eval", "--run-dir", run_dir], capsys))
    assert "holds no checkpoint" in line
    assert snapshot(run_dir) == before


def test_eval_bogus_split(tiny, capsys):
    before = snapshot(tiny["run"])
    line = assert_one_line_error(*run_cli(["eval", "--run-dir", tiny["run"], "--split", "bogus"], capsys))
    assert "bogus" in line and "--split" in line
    assert snapshot(tiny["run"]) == before


@pytest.mark.parametrize("args, flag", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "-2"], "--top-k"),
    (["--num-samples", "0"], "--num-samples"),
    (["--length", "-5"], "--length"),
])
def test_generate_bad_sampling_args(tiny, capsys, args, flag):
    before = snapshot(tiny["run"])
    code, out, err = run_cli(["generate", "--run-dir", tiny["run"], *args], capsys)
    line = assert_one_line_error(code, out, err)
    assert line.startswith(f"error: {flag} ")
    assert out == ""  # nothing generated
    assert snapshot(tiny["run"]) == before


def test_generate_non_numeric_temperature(tiny, capsys):
    line = assert_one_line_error(*run_cli(["generate", "--run-dir", tiny["run"], "--temperature", "hot"], capsys))
    assert "--temperature" in line and "'hot'" in line


# ====================================================================== the tiny run


def test_eval_prints_json_last_line(tiny, capsys):
    code, out, err = run_cli(["eval", "--run-dir", tiny["run"]], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["split"] == "valid"
    assert result["step"] == 3
    vocab_size = len(json.loads((tiny["run"] / "vocab.json").read_text(encoding="utf-8"))["tokens"])
    # Three steps barely move an untrained model: the loss is close to ln(vocab).
    assert abs(result["loss"] - math.log(vocab_size)) < 0.2
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    assert result["bpc"] == pytest.approx(result["loss"] / math.log(2), rel=1e-12)
    # valid = 5% of 20,000 chars = 1000 tokens: every one but the first is scored.
    assert result["tokens"] == 999
    # The same checkpoint evaluates to the same number again.
    code, out2, _ = run_cli(["eval", "--run-dir", tiny["run"]], capsys)
    assert json.loads(out2.strip().splitlines()[-1])["loss"] == pytest.approx(result["loss"], rel=1e-9)


def test_eval_test_split(tiny, capsys):
    code, out, err = run_cli(["eval", "--run-dir", tiny["run"], "--split", "test"], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["split"] == "test"
    assert result["tokens"] == 999
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)


def generate_text(tiny, *args: str) -> str:
    """Runs the ``generate`` command's code (dist_rnn.app.generate) into a buffer."""
    from dist_rnn import app

    parser = build_parser()
    ns = parser.parse_args(["generate", "--run-dir", str(tiny["run"]), "--length", "40", *args])
    buf = io.StringIO()
    app.generate(ns.run_dir, ns.prime, ns.length, ns.temperature, ns.top_k, ns.top_p, ns.seed, ns.num_samples,
                 stream=buf)
    return buf.getvalue()


def test_generate_same_seed_same_text_different_seed_differs(tiny):
    a = generate_text(tiny, "--seed", "1", "--prime", "MENENIUS:")
    b = generate_text(tiny, "--seed", "1", "--prime", "MENENIUS:")
    c = generate_text(tiny, "--seed", "2", "--prime", "MENENIUS:")
    assert a == b
    assert a != c
    assert a.startswith("MENENIUS:") and a.endswith("\n")
    assert len(a) >= len("MENENIUS:") + 40 + 1


def test_generate_greedy_ignores_seed(tiny):
    a = generate_text(tiny, "--temperature", "0", "--seed", "1")
    b = generate_text(tiny, "--temperature", "0", "--seed", "2")
    assert a == b
    assert len(a) >= 40 + 1


def test_generate_num_samples(tiny):
    out = generate_text(tiny, "--num-samples", "3", "--seed", "4", "--prime", "MEN")
    headers = [line for line in out.splitlines() if line.startswith("--- sample ")]
    assert headers == ["--- sample 0 ---", "--- sample 1 ---", "--- sample 2 ---"]


def test_generate_unknown_prime_char_warns_once(tiny, capsys):
    from dist_rnn import app

    buf = io.StringIO()
    texts = app.generate(str(tiny["run"]), "KZ", 10, 1.0, 0, 1.0, 0, 1, stream=buf)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "'K'" in warnings[0] and "'Z'" in warnings[0]  # not in the 18k-char train split
    assert buf.getvalue().startswith("KZ") and len(texts) == 1


def test_generate_cli_prints_to_current_stdout(tiny, capsys):
    code, out, err = run_cli(["generate", "--run-dir", tiny["run"], "--length", "20", "--prime", "MEN",
                              "--seed", "3"], capsys)
    assert code == 0, err
    assert out.startswith("MEN") and out.endswith("\n") and len(out) >= 3 + 20 + 1
    code, out2, _ = run_cli(["generate", "--run-dir", tiny["run"], "--length", "20", "--prime", "MEN",
                             "--seed", "3"], capsys)
    assert out2 == out


def test_resume_with_model_change_is_refused(tiny, capsys):
    config_before = (tiny["run"] / "config.yaml").read_bytes()
    before = snapshot(tiny["run"])
    line = assert_one_line_error(*run_cli(["train", tiny["cfg"], "--run-dir", tiny["run"],
                                           "--set", "model.hidden_size=32"], capsys))
    assert "model.hidden_size: 16 -> 32" in line
    assert "cannot resume" in line
    assert (tiny["run"] / "config.yaml").read_bytes() == config_before
    assert snapshot(tiny["run"]) == before


def test_bare_resume_with_model_change_is_refused(tiny, capsys):
    before = snapshot(tiny["run"])
    line = assert_one_line_error(*run_cli(["train", "--run-dir", tiny["run"],
                                           "--set", "model.cell=gru"], capsys))
    assert "model.cell: 'lstm' -> 'gru'" in line
    assert snapshot(tiny["run"]) == before
