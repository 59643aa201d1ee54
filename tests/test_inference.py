"""Loading a run for eval/generate/export goes through the checkpoint restore of training resume.

:func:`dist_rnn.inference.load_model_for_inference` restores with
:meth:`~dist_rnn.training.checkpoints.Checkpointer.restore`: a checkpoint of
another run or an unreadable one gives training's one-line errors, and the
restored weights are the saved ones.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli

from dist_rnn.cli import main

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
SETTINGS = ["model.num_layers=1", "model.hidden_size=8", "model.embedding_size=8", "train.batch_size=4",
            "train.num_steps=8", "train.max_steps=2", "train.max_epochs=null", "train.log_every=1",
            "train.sample_length=0", "logging.tensorboard=false", "logging.progress=\"off\""]


def _train(root: Path, name: str, text: str, extra: tuple[str, ...] = ()) -> Path:
    data = root / f"{name}.txt"
    data.write_text(text, encoding="utf-8")
    cfg = root / f"{name}.yaml"
    cfg.write_text(f"data:\n  corpus: file\n  path: {data}\n", encoding="utf-8")
    run = root / name
    assert main(["train", str(cfg), "--run-dir", str(run), *sum((["--set", s] for s in SETTINGS + list(extra)), [])]) == 0
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs with different vocabularies."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"needs {SHAKESPEARE}")
    root = tmp_path_factory.mktemp("inference")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    return _train(root, "a", text[:6000]), _train(root, "b", text[6000:12000].lower())


def test_restored_weights_are_the_checkpoints(runs):
    import tensorflow as tf

    from dist_rnn.inference import load_model_for_inference
    from dist_rnn.models.model import build_model

    model, vocab, config, path = load_model_for_inference(str(runs[0]))
    assert path.endswith("ckpt-2")
    reader = tf.train.load_checkpoint(path)
    # Keras 3 tracks some layer weights outside the "model/" prefix: compare with every saved tensor.
    saved = [reader.get_tensor(name) for name, _ in tf.train.list_variables(path)]
    fresh = build_model(config.model, len(vocab), config.train.seed)
    fresh(np.zeros((1, 2), np.int32))
    assert len(model.weights) == len(fresh.weights) > 0
    for restored, initial in zip(model.weights, fresh.weights):
        value = restored.numpy()
        assert any(isinstance(s, np.ndarray) and s.shape == value.shape and np.array_equal(s, value)
                   for s in saved), restored.name
        assert not np.array_equal(value, initial.numpy()) or not value.any(), restored.name  # trained, not init


def test_checkpoint_of_another_run_is_refused(runs, capsys):
    other = runs[1] / "checkpoints" / "ckpt-2"
    line = assert_one_line_error(*run_cli(["generate", "--run-dir", runs[0], "--checkpoint", other,
                                           "--length", "3"], capsys))
    assert "was written by another run" in line and str(other) in line


def test_truncated_checkpoint_is_one_line_error_naming_its_files(runs, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(runs[0], run)
    data = next((run / "checkpoints").glob("ckpt-2.data-*"))
    data.write_bytes(data.read_bytes()[:40])
    line = assert_one_line_error(*run_cli(["generate", "--run-dir", run, "--length", "3"], capsys))
    assert "is unreadable" in line and str(data) in line
