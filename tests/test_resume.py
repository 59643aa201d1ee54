"""Resume, best checkpoint and checkpoint choice: what a resume may change, and what eval/generate/export read.

Every run is a real ``dist-rnn`` command, in-process, on 20k characters of
tiny-shakespeare with a one-layer LSTM of 16 units.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import assert_one_line_error, run_cli, shakespeare_prefix

from dist_rnn.training.checkpoints import Checkpointer, TrainingState, fingerprint
from dist_rnn.config import load_config
from dist_rnn.errors import UserError


def settings(data: Path, **train) -> list[str]:
    """``--set`` arguments of a tiny run on ``data`` (35 batches per epoch, random offsets on)."""
    t = {"batch_size": 16, "num_steps": 32, "max_steps": 3, "max_epochs": None, "log_every": 1,
         "sample_length": 0, **train}
    train_yaml = ", ".join(f"{k}: {'null' if v is None else v}" for k, v in t.items())
    return ["--set", f"data={{corpus: file, path: {data}, random_offset: true}}",
            "--set", "model={num_layers: 1, hidden_size: 16, embedding_size: 16}",
            "--set", f"train={{{train_yaml}}}",
            "--set", "checkpoint.every_steps=0",
            "--set", "logging={tensorboard: false, progress: 'off'}"]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def variables(prefix: str) -> dict[str, np.ndarray]:
    reader = tf.train.load_checkpoint(prefix)
    return {n: reader.get_tensor(n) for n, _ in tf.train.list_variables(prefix)
            if n.endswith("VARIABLE_VALUE") and not n.startswith("save_counter")}


def eval_json(capsys, *args) -> dict:
    code, out, err = run_cli(["eval", *args], capsys)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return shakespeare_prefix(tmp_path_factory.mktemp("resume_data"), 20_000)


@pytest.fixture(scope="module")
def stopped_run(data, tmp_path_factory) -> Path:
    from dist_rnn.cli import main

    run_dir = tmp_path_factory.mktemp("stopped") / "run"
    assert main(["train", "--run-dir", str(run_dir), *settings(data)]) == 0
    return run_dir


@pytest.fixture
def run(stopped_run, tmp_path) -> Path:
    """A copy of a run stopped after 3 steps, in the middle of its first epoch."""
    return Path(shutil.copytree(stopped_run, tmp_path / "run"))


# ------------------------------------------------------ seed and offset mid-epoch


@pytest.mark.parametrize("change, key", [("train.seed=1", "train.seed"),
                                         ("data.random_offset=false", "data.random_offset")])
def test_seed_or_offset_change_mid_epoch_is_refused(run, capsys, change, key):
    before = snapshot(run)
    line = assert_one_line_error(*run_cli(["train", "--run-dir", run, "--set", "train.max_steps=5",
                                           "--set", change], capsys))
    assert "cannot resume" in line and "in the middle of epoch 1 (after its batch 3)" in line
    assert key in line
    assert snapshot(run) == before


def test_seed_change_at_an_epoch_boundary_applies_from_the_next_epoch(data, tmp_path, capsys):
    run_dir = tmp_path / "boundary"
    code, _, err = run_cli(["train", "--run-dir", run_dir, *settings(data, max_steps=None, max_epochs=1)], capsys)
    assert code == 0, err
    position = variables(tf.train.latest_checkpoint(str(run_dir / "checkpoints")))
    assert position["training_state/epoch/.ATTRIBUTES/VARIABLE_VALUE"] == 2
    assert position["training_state/batch_in_epoch/.ATTRIBUTES/VARIABLE_VALUE"] == 0
    code, out, err = run_cli(["train", "--run-dir", run_dir, "--set", "train.seed=1",
                              "--set", "train.max_epochs=null", "--set", "train.max_steps=37"], capsys)
    assert code == 0, err
    assert "config change on resume: train.seed: 0 -> 1" in out


# ---------------------------------------------------------------- precision


def test_resume_across_precisions(run, capsys):
    code, out, err = run_cli(["train", "--run-dir", run, "--set", "train.max_steps=5",
                              "--set", "train.precision=mixed_float16"], capsys)
    assert code == 0, err
    assert "has no loss scale (saved in another train.precision): the loss scale starts fresh" in out
    saved = variables(tf.train.latest_checkpoint(str(run / "checkpoints")))
    assert saved["training_state/step/.ATTRIBUTES/VARIABLE_VALUE"] == 5
    assert saved["loss_scale/scale/.ATTRIBUTES/VARIABLE_VALUE"] == 32768.0  # fresh, no overflow in 2 steps
    code, out, err = run_cli(["train", "--run-dir", run, "--set", "train.max_steps=6",
                              "--set", "train.precision=float32"], capsys)
    assert code == 0, err
    assert "resumed from" in out and "(step 5)" in out


# ------------------------------------------------------------- moved data


def moved_copy(data: Path, tmp_path: Path) -> Path:
    moved = tmp_path / "elsewhere" / "renamed.txt"
    moved.parent.mkdir()
    shutil.copy(data, moved)
    return moved


def test_moved_identical_data_resumes(run, data, tmp_path, capsys):
    moved = moved_copy(data, tmp_path)
    code, out, err = run_cli(["train", "--run-dir", run, "--set", f"data.path={moved}",
                              "--set", "train.max_steps=4"], capsys)
    assert code == 0, err
    assert "resumed from" in out and f"config change on resume: data.path: '{data}' -> '{moved}'" in out
    assert f"path: {moved}" in (run / "config.yaml").read_text(encoding="utf-8")


def test_eval_and_generate_read_moved_data(run, data, tmp_path, capsys):
    before = eval_json(capsys, "--run-dir", run)
    moved = moved_copy(data, tmp_path)
    at_new_path = eval_json(capsys, "--run-dir", run, "--set", f"data.path={moved}")
    assert at_new_path["loss"] == before["loss"] and at_new_path["step"] == 3
    code, out, err = run_cli(["generate", "--run-dir", run, "--set", f"data.path={moved}", "--length", "5"], capsys)
    assert code == 0, err


def test_moved_data_with_other_text_is_refused(run, data, tmp_path, capsys):
    other = tmp_path / "other.txt"
    text = data.read_text(encoding="utf-8")
    other.write_text(text[:5000] + text[5000:5100].upper() + text[5100:], encoding="utf-8")  # same length, same chars
    before = snapshot(run)
    line = assert_one_line_error(*run_cli(["train", "--run-dir", run, "--set", f"data.path={other}",
                                           "--set", "train.max_steps=4"], capsys))
    assert line.startswith(f"error: cannot resume {run}: the data read from data.path {other} is not the data")
    assert snapshot(run) == before
    line = assert_one_line_error(*run_cli(["eval", "--run-dir", run, "--set", f"data.path={other}"], capsys))
    assert "cannot evaluate" in line and "data.path" in line


def test_run_without_data_record_is_checked_by_its_vocabulary(run, data, tmp_path, capsys):
    (run / "data.json").unlink()  # a run written before data.json existed
    other = tmp_path / "other.txt"
    other.write_text("\u00a7" + data.read_text(encoding="utf-8"), encoding="utf-8")  # one new character
    line = assert_one_line_error(*run_cli(["train", "--run-dir", run, "--set", f"data.path={other}",
                                           "--set", "train.max_steps=4"], capsys))
    assert f"the data read from data.path {other} gives another vocabulary than {run / 'vocab.json'}" in line
    assert not (run / "data.json").exists()
    assert eval_json(capsys, "--run-dir", run, "--set", f"data.path={moved_copy(data, tmp_path)}")["step"] == 3


def test_eval_set_may_change_only_where_the_data_is(run, capsys):
    line = assert_one_line_error(*run_cli(["eval", "--run-dir", run, "--set", "model.hidden_size=32"], capsys))
    assert "eval --set may change only where the data is read from" in line and "model.hidden_size: 16 -> 32" in line


# ------------------------------------------------------ best checkpoint, --checkpoint


@pytest.fixture(scope="module")
def evaluated_run(data, tmp_path_factory):
    """A run evaluated every 2 steps and checkpointed every 2 steps, with a copy of ``best/`` after each new best."""
    import _pytest.monkeypatch

    root = tmp_path_factory.mktemp("best")
    run_dir, copies = root / "run", root / "best_copies"
    original = Checkpointer.save_best

    def save_best_and_copy(self, step, record):
        path = original(self, step, record)
        shutil.copytree(self.best_directory, copies / str(step))
        return path

    with _pytest.monkeypatch.MonkeyPatch.context() as patch:
        patch.setattr(Checkpointer, "save_best", save_best_and_copy)
        from dist_rnn.cli import main

        code = main(["train", "--run-dir", str(run_dir), *settings(data, max_steps=6, eval_every=2),
                     "--set", "checkpoint={every_steps: 2, keep: 10}"])
    assert code == 0
    return run_dir, copies


def test_best_checkpoint_holds_the_state_of_its_evaluation(evaluated_run):
    run_dir, copies = evaluated_run
    mid_run = sorted(int(p.name) for p in copies.iterdir() if int(p.name) < 6)
    assert 2 in mid_run  # the first evaluation is always a new best
    for step in mid_run:
        best = variables(str(copies / str(step) / f"ckpt-{step}"))
        rolling = variables(str(run_dir / "checkpoints" / f"ckpt-{step}"))
        assert best["training_state/step/.ATTRIBUTES/VARIABLE_VALUE"] == step
        assert best["training_state/batch_in_epoch/.ATTRIBUTES/VARIABLE_VALUE"] == step
        assert np.abs(best["training_state/carried/0/.ATTRIBUTES/VARIABLE_VALUE"]).sum() > 0
        assert best.keys() == rolling.keys()
        for name in best:  # the same moment: weights, optimizer, position and carried state
            assert np.array_equal(best[name], rolling[name]), name


def test_eval_checkpoint_best_gives_the_recorded_validation_loss(evaluated_run, capsys):
    run_dir, _ = evaluated_run
    record = json.loads((run_dir / "best" / "best.json").read_text())
    best = eval_json(capsys, "--run-dir", run_dir, "--checkpoint", "best")
    assert best["step"] == record["step"]
    assert math.isclose(best["loss"], record["loss"], rel_tol=1e-12)
    assert best["checkpoint"] == str(run_dir / "best" / record["checkpoint"])
    latest = eval_json(capsys, "--run-dir", run_dir)
    assert latest["step"] == 6 and latest["checkpoint"].endswith("ckpt-6")
    by_path = eval_json(capsys, "--run-dir", run_dir, "--checkpoint", run_dir / "checkpoints" / "ckpt-2")
    assert by_path["step"] == 2
    step_2 = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if m["split"] == "valid" and m["step"] == 2][0]
    assert math.isclose(by_path["loss"], step_2["loss"], rel_tol=1e-12)


def test_generate_and_export_take_a_checkpoint(evaluated_run, tmp_path, capsys):
    run_dir, _ = evaluated_run
    args = ["--run-dir", run_dir, "--length", "40", "--temperature", "0"]
    code, from_2, err = run_cli(["generate", *args, "--checkpoint", run_dir / "checkpoints" / "ckpt-2"], capsys)
    assert code == 0, err
    code, from_6, err = run_cli(["generate", *args, "--checkpoint", "latest"], capsys)
    assert code == 0, err
    assert from_2 != from_6  # greedy text of two different weights
    record = json.loads((run_dir / "best" / "best.json").read_text())
    code, out, err = run_cli(["export", "--run-dir", run_dir, "--out", tmp_path / "export", "--checkpoint", "best"],
                             capsys)
    assert code == 0, err
    info = json.loads(out.strip().splitlines()[-1])
    assert info["step"] == record["step"] and info["source_checkpoint"].startswith(str(run_dir / "best"))


@pytest.mark.parametrize("command", ["eval", "generate", "export"])
def test_bad_checkpoint_choice_is_one_line_error(evaluated_run, tmp_path, capsys, command):
    run_dir, _ = evaluated_run
    extra = ["--out", tmp_path / "export"] if command == "export" else []
    missing = tmp_path / "no" / "ckpt-9"
    line = assert_one_line_error(*run_cli([command, "--run-dir", run_dir, "--checkpoint", missing, *extra], capsys))
    assert f"--checkpoint {missing}: no checkpoint there" in line
    without_best = tmp_path / "without_best"
    shutil.copytree(run_dir, without_best)
    shutil.rmtree(without_best / "best")
    line = assert_one_line_error(*run_cli([command, "--run-dir", without_best, "--checkpoint", "best", *extra], capsys))
    assert f"--checkpoint best: {without_best} has no best checkpoint yet" in line
    assert not (tmp_path / "export").exists()


def test_generate_checkpoint_with_an_export_is_refused(evaluated_run, tmp_path, capsys):
    line = assert_one_line_error(*run_cli(["generate", "--model", tmp_path, "--checkpoint", "best"], capsys))
    assert "--checkpoint and --set apply to --run-dir" in line


def test_checkpoint_of_another_run_is_refused(evaluated_run, data, tmp_path, capsys):
    run_dir, _ = evaluated_run
    other = tmp_path / "other"  # same shapes, another vocabulary: the weights would load silently
    shutil.copytree(run_dir, other)
    vocab = json.loads((other / "vocab.json").read_text(encoding="utf-8"))
    vocab["tokens"][1], vocab["tokens"][2] = vocab["tokens"][2], vocab["tokens"][1]
    (other / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    for command in (["generate", "--length", "5"], ["eval"]):
        line = assert_one_line_error(*run_cli([*command, "--run-dir", other], capsys))
        assert "was written by another run" in line and "train.batch_size" in line


# ------------------------------------------------- resume-invariant keys, fingerprint


def test_resume_refusal_lists_the_keys_a_resume_may_not_change(run, capsys):
    from dist_rnn.config import RESUME_INVARIANT_KEYS

    line = assert_one_line_error(*run_cli(["train", "--run-dir", run, "--set", "train.batch_size=8"], capsys))
    assert "cannot resume" in line and "train.batch_size: 16 -> 8" in line
    assert "a resume may not change " + ", ".join(RESUME_INVARIANT_KEYS) in line
    assert "data.path" not in RESUME_INVARIANT_KEYS and "optimizer.name" in RESUME_INVARIANT_KEYS


def test_checkpoint_with_the_fingerprint_of_older_versions_is_accepted_and_upgraded(tmp_path, data):
    from dist_rnn.training.checkpoints import accepted_fingerprints
    from dist_rnn.config import LATER_INVARIANT_DEFAULTS, RESUME_INVARIANT_KEYS

    config = load_config([], [f"data.path={data}", "data.corpus=file"])
    vocab = ["<unk>", "a", "b"]
    current, legacy = accepted_fingerprints(config, vocab)
    flat = {"data.path": str(data), "data.train_file": None}
    # Those versions had no output-layer keys (#18); at their defaults the keys stay out of the fingerprint.
    for key in [k for k in RESUME_INVARIANT_KEYS if k not in LATER_INVARIANT_DEFAULTS]:
        section, name = key.split(".", 1)
        flat[key] = getattr(getattr(config, section), name)
    assert legacy == fingerprint(flat, vocab) != current  # what versions with data.path in the keys saved
    state = TrainingState([(2, 3)], legacy)
    Checkpointer(tmp_path / "ckpt", 1, training_state=state).save(1)
    restored = TrainingState([(2, 3)])
    checkpointer = Checkpointer(tmp_path / "ckpt", 1, training_state=restored)
    checkpointer.restore_latest(expected_fingerprint=(current, legacy), state=restored)
    assert restored.fingerprint.numpy().decode() == current
    with pytest.raises(UserError, match="was written by another run"):  # another vocabulary
        checkpointer.restore_latest(expected_fingerprint=accepted_fingerprints(config, ["<unk>", "b", "a"]),
                                    state=restored)
