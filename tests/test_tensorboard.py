"""TensorBoard output read back from the event files."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import tensorflow as tf

from dist_rnn.cli import main


def read_events(folder) -> dict[str, list[tuple[int, object]]]:
    """tag -> [(step, value)] for every event file directly in ``folder``."""
    out = defaultdict(list)
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor) if value.HasField("tensor") else value.simple_value
                out[value.tag].append((event.step, tensor))
    return out


@pytest.fixture(scope="module")
def run(shakespeare_slice, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tb") / "run"
    code = main(["train", "--run-dir", str(run_dir),
                 "--set", f"data={{corpus: file, path: {shakespeare_slice}, split: [0.8, 0.1, 0.1]}}",
                 "--set", "model={hidden_size: 16, embedding_size: 8}",
                 "--set", "optimizer={learning_rate: 0.01, clip_norm: 0.2, schedule: {name: exponential, "
                          "decay_rate: 0.5, decay_steps: 10, staircase: true}}",
                 "--set", "train={batch_size: 4, num_steps: 16, max_steps: 20, max_epochs: null, log_every: 5, "
                          "eval_every: 10, sample_length: 20}",
                 "--set", "logging={progress: 'off', profile_steps: [3, 4], histograms_every: 10}",
                 "--set", "checkpoint.every_steps=0"])
    assert code == 0
    return run_dir


def test_training_scalars_have_sensible_values(run):
    train = read_events(run / "train")
    for tag in ["loss", "perplexity", "bpc", "learning_rate", "grad_norm", "clip_ratio", "tokens_per_sec",
                "tokens_per_sec_per_replica", "step_time", "peak_host_memory_mib"]:
        assert [s for s, _ in train[tag]] == [5, 10, 15, 20], tag
    for (_, loss), (_, ppl), (_, bpc) in zip(train["loss"], train["perplexity"], train["bpc"]):
        assert math.isclose(float(ppl), math.exp(float(loss)), rel_tol=1e-5)
        assert math.isclose(float(bpc), float(loss) / math.log(2), rel_tol=1e-5)
    assert float(train["loss"][0][1]) < math.log(70)  # below uniform over the vocabulary after 5 steps
    lrs = [float(v) for _, v in train["learning_rate"]]
    # The rate logged at step N is the one the N-th step used (0-based step N-1):
    # staircase halving after 10 steps gives 0.01 for steps 1-10, 0.005 for 11-20.
    assert lrs == pytest.approx([0.01, 0.01, 0.005, 0.005])
    for (_, norm), (_, ratio) in zip(train["grad_norm"], train["clip_ratio"]):
        assert float(ratio) == pytest.approx(min(1.0, 0.2 / float(norm)), rel=1e-5)
    assert all(float(v) > 0 for _, v in train["tokens_per_sec"])
    assert all(float(v) > 50 for _, v in train["peak_host_memory_mib"])


def test_validation_test_text_hparams_histograms_and_profile(run):
    valid = read_events(run / "valid")
    assert [s for s, _ in valid["perplexity"]] == [10, 20]
    assert float(valid["perplexity"][1][1]) < float(valid["perplexity"][0][1]) * 1.05
    assert "bpc" in valid and "loss" in valid
    assert len(valid["sample"]) == 2 and len(valid["sample"][0][1].item().decode()) == 20
    test = read_events(run / "test")
    assert [s for s, _ in test["perplexity"]] == [20]
    train = read_events(run / "train")
    assert "```" in train["config"][0][1].item().decode()
    assert "kernel: dist-rnn fused recurrence (no GPU visible)" in train["kernels"][0][1].item().decode()
    hist_tags = [t for t in train if t.startswith("weights/") or t.startswith("gradients/")]
    assert any(t.startswith("gradients/") for t in hist_tags) and any(t.startswith("weights/") for t in hist_tags)
    assert all(s == 10 or s == 20 for t in hist_tags for s, _ in train[t])
    root = read_events(run)
    assert "_hparams_/experiment" in root and "_hparams_/session_start_info" in root
    traces = list((run / "train" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000


def test_float16_run_logs_loss_scale_and_skipped_steps(shakespeare_slice, tmp_path):
    run_dir = tmp_path / "fp16"
    code = main(["train", "--run-dir", str(run_dir),
                 "--set", f"data={{corpus: file, path: {shakespeare_slice}}}",
                 "--set", "model={hidden_size: 16, embedding_size: 8}",
                 "--set", "train={batch_size: 4, num_steps: 8, max_steps: 4, max_epochs: null, log_every: 2, "
                          "sample_length: 0, precision: mixed_float16, loss_scale: {initial: 1.0e+12, "
                          "max_scale: 1.0e+12, backoff: 1.0e-4}}",
                 "--set", "logging.progress=off", "--set", "checkpoint.every_steps=0"])
    try:
        assert code == 0
        train = read_events(run_dir / "train")
        scales = [float(v) for _, v in train["loss_scale"]]
        skipped = [int(v) for _, v in train["skipped_steps"]]
        assert scales[0] < 1e12 and skipped[0] >= 1  # overflowed at 1e12, backed off
        assert skipped == sorted(skipped)
    finally:
        from dist_rnn.runtime import set_precision

        set_precision("float32")
