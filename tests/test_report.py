"""``dist-rnn report``: summary numbers, the PNG, resumed runs, errors, and one real tiny run."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from conftest import shakespeare_prefix
from dist_rnn import report
from dist_rnn.cli import main
from dist_rnn.config import Config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A char-level run: train log points every 10 steps, validation every 25.
# The validation loss rises again at the end, so best (step 75) != last (step 100).
TRAIN_LOSSES = [4.1, 3.2, 2.7, 2.4, 2.2, 2.05, 1.95, 1.88, 1.83, 1.79]
TOKENS_PER_SEC = [2100.0, 9800.0, 10150.0, 9900.0, 10400.0, 10020.0, 9750.0, 10300.0, 10080.0, 9950.0]
VALID_LOSSES = {25: 2.31, 50: 1.98, 75: 1.86, 100: 1.87}


def _train_record(step, loss, rate, time, lr, replicas=1):
    return {"split": "train", "step": step, "time": time, "epoch": 1, "loss": loss,
            "perplexity": math.exp(loss), "bpc": loss / math.log(2), "learning_rate": lr,
            "grad_norm": 1.5 - step / 200, "tokens_per_sec": rate, "tokens_per_sec_per_replica": rate / replicas,
            "step_time": 3200 / rate}


def _eval_record(step, loss, time, split="valid"):
    return {"split": split, "step": step, "time": time, "loss": loss, "perplexity": math.exp(loss),
            "bpc": loss / math.log(2), "tokens": 4800}


def synthetic_metrics(replicas: int = 1) -> list[dict]:
    """Train points at steps 10..100, valid at 25, 50, 75, 100, in the order the trainer writes them."""
    events = [(10 * (i + 1), "train", i) for i in range(len(TRAIN_LOSSES))] + [(s, "valid", s) for s in VALID_LOSSES]
    events.sort(key=lambda e: (e[0], e[1] != "train"))
    records, time = [], 0.0
    for step, split, key in events:
        if split == "train":
            rate = TOKENS_PER_SEC[key]
            time = round(time + 10 * 3200 / rate, 3)
            records.append(_train_record(step, TRAIN_LOSSES[key], rate, time, 0.002 * 0.5 ** (step // 50), replicas))
        else:
            time = round(time + 0.4, 3)
            records.append(_eval_record(step, VALID_LOSSES[key], time))
    return records


def write_run(root: Path, records: list[dict], config: Config | None = None) -> Path:
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text((config or Config()).to_yaml(), encoding="utf-8")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (run_dir / "kernels.txt").write_text("layer 0 lstm: generic kernel\n", encoding="utf-8")
    return run_dir


def run_cli(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err) -> str:
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err + out
    return lines[0]


def read_png(path: Path) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    import matplotlib.image

    return matplotlib.image.imread(str(path))


# ====================================================================== summary numbers


def test_synthetic_records_are_what_the_tests_assume():
    records = synthetic_metrics()
    assert [r["step"] for r in records if r["split"] == "valid"] == [25, 50, 75, 100]
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)
    assert all(b["time"] > a["time"] for a, b in zip(records, records[1:]))


def test_summarize_numbers():
    records = synthetic_metrics()
    s = report.summarize(Config(), records)
    assert s["best_valid"] == {"step": 75, "loss": 1.86, "perplexity": math.exp(1.86), "bpc": 1.86 / math.log(2)}
    assert s["last_valid"] == {"step": 100, "loss": 1.87, "perplexity": math.exp(1.87), "bpc": 1.87 / math.log(2)}
    assert s["last_train"]["step"] == 100 and s["last_train"]["loss"] == 1.79
    assert s["last_train"]["perplexity"] == math.exp(1.79)
    assert s["last_test"] is None
    # Median of 10 rates: mean of the 5th and 6th of the sorted list (the slow first point does not drag it).
    assert s["median_tokens_per_sec"] == (9950.0 + 10020.0) / 2 == statistics.median(TOKENS_PER_SEC)
    assert s["steps"] == 100 and s["epoch"] == 1 and s["sessions"] == 1
    assert s["wall_time"] == records[-1]["time"]
    assert s["train_points"] == 10 and s["valid_points"] == 4
    d = Config()
    assert (s["corpus"], s["level"], s["cell"], s["num_layers"], s["hidden_size"]) == (
        d.data.corpus, d.data.level, d.model.cell, d.model.num_layers, d.model.hidden_size)
    assert (s["optimizer"], s["batch_size"], s["num_steps"], s["backend"], s["replicas"]) == (
        d.optimizer.name, d.train.batch_size, d.train.num_steps, "none", 1)


def test_summarize_accepts_the_plain_config_mapping_and_replicas_from_throughput():
    config = Config()
    config.distribute.backend = "mirrored"
    s = report.summarize(config.to_dict(), synthetic_metrics(replicas=4))
    assert s["backend"] == "mirrored" and s["replicas"] == 4
    assert s["median_tokens_per_sec_per_replica"] == statistics.median(TOKENS_PER_SEC) / 4


def test_resumed_run_drops_replayed_records_and_sums_session_times():
    first = synthetic_metrics()[:7]  # up to the train point at step 50 and its valid, then a crash
    assert (first[-1]["split"], first[-1]["step"]) == ("valid", 50)
    stale = _train_record(60, 9.99, 1.0, first[-1]["time"] + 5, 0.001)  # logged after the last checkpoint (40)
    # Resumed from the checkpoint at step 40: time restarts from zero and step 50 is trained again.
    second = [_train_record(50, 2.21, 9000.0, 4.0, 0.001), _eval_record(50, 1.97, 4.5),
              _train_record(60, 2.06, 9500.0, 8.0, 0.001), _train_record(70, 1.97, 9600.0, 12.0, 0.001)]
    s = report.summarize(Config(), first + [stale] + second)
    assert s["sessions"] == 2
    assert s["wall_time"] == pytest.approx(stale["time"] + 12.0)
    assert s["last_valid"]["step"] == 50 and s["last_valid"]["loss"] == 1.97  # the replayed eval wins
    assert s["best_valid"]["loss"] == 1.97
    assert s["last_train"] == {"step": 70, "loss": 1.97, "perplexity": math.exp(1.97), "bpc": 1.97 / math.log(2)}
    kept = report.effective_records(first + [stale] + second)
    assert 9.99 not in [r["loss"] for r in kept]
    assert [r["step"] for r in kept if r["split"] == "train"] == [10, 20, 30, 40, 50, 60, 70]


def test_word_level_has_no_bpc(tmp_path, capsys):
    config = Config()
    config.data.level = "word"
    records = [{k: v for k, v in r.items() if k != "bpc"} for r in synthetic_metrics()]
    s = report.summarize(config, records)
    assert s["best_valid"]["bpc"] is None
    text = report.format_summary(s)
    assert "bpc" not in text and "word level" in text


def test_format_summary_lines():
    s = report.summarize(Config(), synthetic_metrics())
    text = report.format_summary(s, "runs/x", "runs/x/report.png")
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    assert f"ppl {math.exp(1.86):.2f}" in lines["valid best"] and "at step 75" in lines["valid best"]
    assert f"loss 1.8700  ppl {math.exp(1.87):.2f}  bpc {1.87 / math.log(2):.4f}  at step 100" in lines["valid last"]
    assert "loss 1.7900" in lines["train last"]
    assert "9,985 median" in lines["tokens/s"]
    assert "2 x lstm 256, embedding 256" in lines["model"]
    assert "adam lr 0.002 (constant), clip 5" in lines["optimizer"]
    assert "none, 1 replica" in lines["backend"]
    assert lines["plot"].endswith("runs/x/report.png")


# ====================================================================== CLI and PNG


def test_report_command_prints_summary_and_writes_png(tmp_path, capsys):
    run_dir = write_run(tmp_path, synthetic_metrics())
    code, out, err = run_cli(["report", "--run-dir", run_dir], capsys)
    assert code == 0, err
    assert f"ppl {math.exp(1.86):.2f}" in out and "at step 75" in out
    assert f"ppl {math.exp(1.87):.2f}" in out and "at step 100" in out
    assert "stdlib (char level)" in out and "9,985 median" in out
    png = run_dir / "report.png"
    assert png.is_file() and str(png) in out
    image = read_png(png)
    height, width = image.shape[:2]
    assert width > 400 and height > 300
    assert image.var() > 0
    rgb = image[..., :3]
    assert (rgb.min(axis=-1) < 0.9).mean() > 0.02  # a real amount of ink, not a near-blank canvas
    # The curve colours are there: tab:blue (train) and tab:orange (valid).
    for colour in ((0.12, 0.47, 0.71), (1.0, 0.50, 0.05)):
        assert (np.abs(rgb - colour).max(axis=-1) < 0.05).sum() > 50, colour


def test_report_out_option(tmp_path, capsys):
    run_dir = write_run(tmp_path, synthetic_metrics())
    out_png = tmp_path / "plots" / "curves.png"
    code, out, err = run_cli(["report", "--run-dir", run_dir, "--out", out_png], capsys)
    assert code == 0, err
    assert out_png.read_bytes()[:8] == PNG_MAGIC
    assert not (run_dir / "report.png").exists()


def test_report_with_only_train_points(tmp_path, capsys):
    run_dir = write_run(tmp_path, [r for r in synthetic_metrics() if r["split"] == "train"][:1])
    code, out, err = run_cli(["report", "--run-dir", run_dir], capsys)
    assert code == 0, err
    valid_line = next(line for line in out.splitlines() if line.startswith("valid last"))
    assert valid_line.split()[-1] == "-"
    assert read_png(run_dir / "report.png").var() > 0


# ====================================================================== errors


def test_missing_run_dir(tmp_path, capsys):
    line = assert_one_line_error(*run_cli(["report", "--run-dir", tmp_path / "nope"], capsys))
    assert line == f"error: run directory not found: {tmp_path / 'nope'}"


def test_missing_metrics_file(tmp_path, capsys):
    run_dir = write_run(tmp_path, [])
    (run_dir / "metrics.jsonl").unlink()
    line = assert_one_line_error(*run_cli(["report", "--run-dir", run_dir], capsys))
    assert str(run_dir / "metrics.jsonl") in line


def test_missing_config(tmp_path, capsys):
    run_dir = write_run(tmp_path, synthetic_metrics())
    (run_dir / "config.yaml").unlink()
    line = assert_one_line_error(*run_cli(["report", "--run-dir", run_dir], capsys))
    assert "config.yaml" in line


def test_empty_metrics_file(tmp_path, capsys):
    run_dir = write_run(tmp_path, [])
    line = assert_one_line_error(*run_cli(["report", "--run-dir", run_dir], capsys))
    assert str(run_dir / "metrics.jsonl") in line and "no metrics" in line
    assert not (run_dir / "report.png").exists()


@pytest.mark.parametrize("bad, what", [
    ('{"split": "train", "step": 30, "loss": 2.7', "malformed JSON"),
    ("[1, 2, 3]", "expected a JSON object"),
    ('{"step": 30, "loss": 2.7}', "'split'"),
])
def test_bad_metrics_line_names_file_and_line(tmp_path, capsys, bad, what):
    run_dir = write_run(tmp_path, synthetic_metrics())
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    lines[4] = bad
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    line = assert_one_line_error(*run_cli(["report", "--run-dir", run_dir], capsys))
    assert f"{run_dir / 'metrics.jsonl'}:5: " in line and what in line
    assert not (run_dir / "report.png").exists()


def test_unwritable_out(tmp_path, capsys):
    run_dir = write_run(tmp_path, synthetic_metrics())
    blocker = tmp_path / "a_file"
    blocker.write_text("x", encoding="utf-8")
    line = assert_one_line_error(*run_cli(["report", "--run-dir", run_dir, "--out", blocker / "r.png"], capsys))
    assert f"cannot write {blocker / 'r.png'}" in line


def test_run_dir_is_required(capsys):
    line = assert_one_line_error(*run_cli(["report"], capsys))
    assert "--run-dir" in line


def test_report_module_does_not_import_tensorflow():
    import subprocess
    import sys

    code = ("import sys, dist_rnn.report as r, dist_rnn.cli; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ====================================================================== a real run


def test_report_on_a_real_tiny_run(tmp_path, capsys):
    data = shakespeare_prefix(tmp_path, 20_000)
    run_dir = tmp_path / "run"
    settings = [
        "data.corpus=file", f"data.path={data}",
        "model.hidden_size=16", "model.embedding_size=8",
        "train.batch_size=4", "train.num_steps=16", "train.max_steps=20", "train.log_every=5",
        "train.eval_every=10", "train.sample_length=0",
        'logging.progress="off"', "logging.tensorboard=false", "checkpoint.every_steps=0",
    ]
    code, _, err = run_cli(["train", "--run-dir", run_dir, *sum((["--set", s] for s in settings), [])], capsys)
    assert code == 0, err

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [r for r in records if r["split"] == "train"]
    valid = [r for r in records if r["split"] == "valid"]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    assert [r["step"] for r in valid] == [10, 20]

    code, out, err = run_cli(["report", "--run-dir", run_dir], capsys)
    assert code == 0, err
    valid_line = next(line for line in out.splitlines() if line.startswith("valid last"))
    assert f"ppl {valid[-1]['perplexity']:.2f}" in valid_line and "at step 20" in valid_line
    assert f"{statistics.median(r['tokens_per_sec'] for r in train):,.0f} median" in out
    assert "file (char level)" in out and "2 x lstm 16, embedding 8" in out
    assert "20 of 20" in out
    image = read_png(run_dir / "report.png")
    assert image.shape[1] > 400 and image.var() > 0
