"""``dist-rnn export`` and ``generate --model``: the export matches the checkpoint it came from.

A tiny run is trained once and exported once (module fixture). The export is
then loaded in a fresh Python process, which must not import the model code,
and its logits and samples are compared with the checkpoint's.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli, shakespeare_prefix

from dist_rnn.cli import main

# Keras' own model.save(...) under NumPy 2 (keras/src/backend/tensorflow/core.py, not our code).
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


TINY_SETTINGS = [
    "model.cell=lstm", "model.num_layers=2", "model.hidden_size=16", "model.embedding_size=8",
    "train.batch_size=4", "train.num_steps=16", "train.max_steps=5", "train.max_epochs=null",
    "train.sample_length=0", "checkpoint.every_steps=0",
    "logging.tensorboard=false", "logging.progress=\"off\"",
]
PRIME = "ROMEO:"
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak."
SAMPLE_ARGS = dict(length=60, temperature=0.8, top_k=0, top_p=0.95, seed=1234, num_samples=2)




@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A run trained for 5 steps and its export (through the CLI)."""
    root = tmp_path_factory.mktemp("export")
    data = shakespeare_prefix(root, 20_000)
    cfg = root / "tiny.yaml"
    cfg.write_text(f"data:\n  corpus: file\n  path: {data}\n", encoding="utf-8")
    run = root / "run"
    assert main(["train", str(cfg), "--run-dir", str(run), *sum((["--set", s] for s in TINY_SETTINGS), [])]) == 0
    assert any((run / "checkpoints").glob("ckpt-5*"))
    out = root / "export"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["export", "--run-dir", str(run), "--out", str(out)]) == 0
    info = json.loads(stdout.getvalue().strip().splitlines()[-1])
    return {"root": root, "run": run, "out": out, "info": info}


@pytest.fixture(scope="module")
def reference(exported):
    """The checkpoint's model, vocabulary and fixed test tokens (in-process, via the training code)."""
    from dist_rnn.inference import load_model_for_inference

    model, vocab, config, checkpoint = load_model_for_inference(str(exported["run"]))
    ids = vocab.encode(TEXT)
    tokens = np.stack([ids[:40], ids[5:45]]).astype(np.int32)
    return {"model": model, "vocab": vocab, "config": config, "checkpoint": checkpoint, "tokens": tokens}


def test_export_layout_and_description(exported, reference):
    out, info = exported["out"], exported["info"]
    for path in ("saved_model/saved_model.pb", "saved_model/assets/vocab.json", "model.keras", "vocab.json",
                 "export.json"):
        assert (out / path).is_file(), path
    assert json.loads((out / "export.json").read_text(encoding="utf-8")) == {k: v for k, v in info.items()
                                                                             if k != "path"}
    run_vocab = (exported["run"] / "vocab.json").read_text(encoding="utf-8")
    assert (out / "vocab.json").read_text(encoding="utf-8") == run_vocab
    assert (out / "saved_model" / "assets" / "vocab.json").read_text(encoding="utf-8") == run_vocab
    assert info["format"] == "dist-rnn-export"
    assert info["level"] == "char"
    assert info["vocab_size"] == reference["vocab"].size
    assert info["num_state_tensors"] == 4  # two LSTM layers, h and c each
    assert info["hidden_size"] == 16
    assert info["step"] == 5
    assert info["source_checkpoint"] == str(Path(reference["checkpoint"]).resolve())
    assert info["dist_rnn_version"]
    assert not [p.name for p in exported["root"].iterdir() if ".export-" in p.name]  # staging folder removed


def test_signatures_shapes(exported):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(exported["out"] / "saved_model"))
    assert set(loaded.signatures) == {"serve", "step"}
    step = loaded.signatures["step"]
    inputs = step.structured_input_signature[1]
    assert set(inputs) == {"tokens", "state_0", "state_1", "state_2", "state_3"}
    assert inputs["tokens"].dtype == tf.int32 and inputs["state_0"].shape.as_list() == [None, 16]
    assert set(step.structured_outputs) == {"logits", "state_0", "state_1", "state_2", "state_3"}
    serve = loaded.signatures["serve"]
    assert set(serve.structured_input_signature[1]) == {"tokens"}
    assert serve.structured_outputs["logits"].shape.as_list() == [None, exported["info"]["vocab_size"]]
    assert Path(loaded.vocabulary.asset_path.numpy().decode()).is_file()


FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import numpy as np
    from dist_rnn.export import ExportedModel

    out, tokens, prime, sample_args = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    exported = ExportedModel(out)
    logits = exported.logits(np.array(tokens, np.int32))
    ids = exported.sampler().generate(prime, **sample_args)
    training_code = sorted(m for m in ("dist_rnn.models.model", "dist_rnn.training.trainer", "dist_rnn.models", "dist_rnn.app")
                           if m in sys.modules)
    print(json.dumps({"logits": logits.tolist(), "ids": ids, "texts": [exported.tokenizer.decode(r) for r in ids],
                      "training_code": training_code}))
""")


def test_fresh_process_export_matches_checkpoint(exported, reference):
    from dist_rnn.generation import Sampler, model_step_fn

    tokens = reference["tokens"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(exported["out"]), json.dumps(tokens.tolist()),
                           PRIME, json.dumps(SAMPLE_ARGS)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["training_code"] == []

    model, vocab = reference["model"], reference["vocab"]
    expected_logits = model(tokens, training=False)[0].numpy()[:, -1, :]
    np.testing.assert_allclose(np.array(got["logits"], np.float32), expected_logits, rtol=0, atol=1e-5)
    expected_ids = Sampler(model_step_fn(model), vocab).generate(PRIME, **SAMPLE_ARGS)
    assert got["ids"] == expected_ids
    assert got["texts"] == [vocab.decode(row) for row in expected_ids]
    assert all(len(row) == SAMPLE_ARGS["length"] for row in got["ids"])
    assert got["ids"][0] != got["ids"][1]  # the two samples of the batch differ


def test_step_token_by_token_equals_serve(exported, reference):
    from dist_rnn.export import ExportedModel

    model = ExportedModel(exported["out"])
    assert (model.num_state_tensors, model.hidden_size) == (4, 16)
    tokens = reference["tokens"]
    whole = model.logits(tokens)
    assert whole.shape == (2, reference["vocab"].size)

    states = None
    for t in range(tokens.shape[1]):
        logits, states = model.step(tokens[:, t:t + 1], states)
    np.testing.assert_allclose(logits.numpy(), whole, rtol=0, atol=1e-5)
    assert len(states) == 4 and all(s.shape == (2, 16) for s in states)

    # Two chunks with the state carried between them give the same as one.
    _, first = model.step(tokens[:, :17])
    logits, _ = model.step(tokens[:, 17:], first)
    np.testing.assert_allclose(logits.numpy(), whole, rtol=0, atol=1e-5)
    # The state matters: the second chunk from zeros is different.
    assert np.abs(model.logits(tokens[:, 17:]) - whole).max() > 1e-4

    # The carried state equals the checkpoint model's final state.
    _, ref_states = reference["model"](tokens, training=False)
    _, exp_states = model.step(tokens)
    for a, b in zip(exp_states, ref_states):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-5)

    # Sampler step function: logits with a time axis of 1.
    logits, _ = model.step_fn(tokens[:, :3], None)
    assert logits.shape == (2, 1, reference["vocab"].size)


def test_keras_file_reloads_with_the_same_logits(exported, reference):
    import keras

    import dist_rnn.models.model  # registers the custom classes

    reloaded = keras.saving.load_model(exported["out"] / "model.keras")
    assert isinstance(reloaded, dist_rnn.models.model.LanguageModel)
    assert reloaded.num_state_tensors == 4
    tokens = reference["tokens"]
    got, got_states = reloaded(tokens, training=False)
    want, want_states = reference["model"](tokens, training=False)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-5)
    for a, b in zip(got_states, want_states):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-5)


def test_generate_from_export_is_reproducible_and_matches_run(exported, capsys):
    argv = ["generate", "--prime", PRIME, "--length", 80, "--seed", 7, "--temperature", 0.9]
    code, first, err = run_cli([*argv, "--model", exported["out"]], capsys)
    assert code == 0, err
    code, second, _ = run_cli([*argv, "--model", exported["out"]], capsys)
    assert code == 0
    assert first == second
    # 80 tokens (an untrained model may emit <unk>, printed as 5 characters).
    assert first.startswith(PRIME) and first.endswith("\n") and len(first) >= len(PRIME) + 80 + 1
    code, from_run, _ = run_cli([*argv, "--run-dir", exported["run"]], capsys)
    assert code == 0
    assert from_run == first
    code, other_seed, _ = run_cli(["generate", "--prime", PRIME, "--length", 80, "--seed", 8, "--temperature", 0.9,
                                   "--model", exported["out"]], capsys)
    assert code == 0 and other_seed != first


def test_generate_needs_exactly_one_source(exported, capsys):
    line = assert_one_line_error(*run_cli(["generate", "--length", 5], capsys))
    assert "--run-dir" in line and "--model" in line
    line = assert_one_line_error(*run_cli(["generate", "--length", 5, "--run-dir", exported["run"],
                                           "--model", exported["out"]], capsys))
    assert "--run-dir" in line and "--model" in line


def test_generate_model_on_a_run_dir_is_refused(exported, capsys):
    line = assert_one_line_error(*run_cli(["generate", "--model", exported["run"], "--length", 5], capsys))
    assert "not a dist-rnn export" in line and "--run-dir" in line
    missing = exported["root"] / "nope"
    line = assert_one_line_error(*run_cli(["generate", "--model", missing, "--length", 5], capsys))
    assert str(missing) in line


def test_export_refuses_a_non_empty_unrelated_folder(exported, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me", encoding="utf-8")
    line = assert_one_line_error(*run_cli(["export", "--run-dir", exported["run"], "--out", out], capsys))
    assert str(out) in line and "not empty" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text(encoding="utf-8") == "keep me"
    # The run directory itself is such a folder.
    before = sorted(p.name for p in exported["run"].iterdir())
    assert_one_line_error(*run_cli(["export", "--run-dir", exported["run"], "--out", exported["run"]], capsys))
    assert sorted(p.name for p in exported["run"].iterdir()) == before
    assert list(tmp_path.iterdir()) == [out]  # no staging folder left


def test_export_of_a_missing_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    line = assert_one_line_error(*run_cli(["export", "--run-dir", tmp_path / "no_run", "--out", out], capsys))
    assert "no_run" in line
    assert list(tmp_path.iterdir()) == []


def test_re_export_over_a_previous_export(exported, reference, tmp_path, capsys):
    out = tmp_path / "again"
    code, stdout, err = run_cli(["export", "--run-dir", exported["run"], "--out", out], capsys)
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["path"] == str(out)
    (out / "README.txt").write_text("mine", encoding="utf-8")
    (out / "saved_model" / "stale.txt").write_text("old", encoding="utf-8")
    code, _, err = run_cli(["export", "--run-dir", exported["run"], "--out", out], capsys)
    assert code == 0, err
    assert (out / "README.txt").read_text(encoding="utf-8") == "mine"  # not an export entry: kept
    assert not (out / "saved_model" / "stale.txt").exists()  # the SavedModel was replaced whole
    from dist_rnn.export import ExportedModel

    np.testing.assert_allclose(ExportedModel(out).logits(reference["tokens"]),
                               ExportedModel(exported["out"]).logits(reference["tokens"]), rtol=0, atol=0)
