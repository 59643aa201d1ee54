"""tools/results.py: the numbers it derives from metrics.jsonl, and docs/results.md agreeing with the runs."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "results.py"
RUNS = REPO / "docs" / "results" / "runs"
RESULTS_MD = REPO / "docs" / "results.md"


def _module():
    spec = importlib.util.spec_from_file_location("dist_rnn_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


results = _module()


def write_run(folder: Path, cell: str, seed: int, train: list[tuple], valid: list[tuple],
              batch: int = 2, bptt: int = 5) -> Path:
    """A run folder: ``train`` rows are (step, epoch, loss, time, tokens/s), ``valid`` rows (step, loss, time)."""
    folder.mkdir(parents=True)
    config = {"model": {"cell": cell, "num_layers": 1, "hidden_size": 8, "dropout": 0.0},
              "train": {"seed": seed, "batch_size": batch, "num_steps": bptt}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    lines, previous = [], (0, 0.0)
    for s, e, loss, t, r in train:  # step_time as the trainer logs it: the window's seconds per step
        lines.append({"split": "train", "step": s, "epoch": e, "loss": loss, "time": t, "tokens_per_sec": r,
                      "step_time": (t - previous[1]) / (s - previous[0])})
        previous = (s, t)
    lines += [{"split": "valid", "step": s, "loss": loss, "time": t} for s, loss, t in valid]
    lines.sort(key=lambda r: r["time"])
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def test_epoch_mean_weights_each_logged_window_by_its_steps(tmp_path):
    # Epoch 1 = steps 1-10 logged after 4 and 10; epoch 2 = steps 11-20 logged after 12 and 20.
    run = results.load_run(write_run(tmp_path / "r", "lstm", 0,
                                     [(4, 1, 3.0, 1.0, 100), (10, 1, 2.0, 2.0, 200),
                                      (12, 2, 1.9, 3.0, 300), (20, 2, 1.5, 4.0, 400)],
                                     [(10, 2.5, 2.5), (20, 1.8, 4.5)]))
    losses = run.epoch_train_losses()
    assert losses[1] == pytest.approx((4 * 3.0 + 6 * 2.0) / 10)     # 2.4, not the mean of the logs (2.5)
    assert losses[2] == pytest.approx((2 * 1.9 + 8 * 1.5) / 10)     # 1.58
    assert run.final_epoch_train_loss() == pytest.approx(1.58)
    assert run.steps_per_epoch() == 10
    assert run.final_valid_loss() == 1.8
    assert run.wall_time == 4.5
    assert run.median_tokens_per_sec() == 250
    assert run.training_time() == pytest.approx(4.0)  # the last train log's time: no evaluation in between
    assert run.tokens_trained() == 20 * 2 * 5


def test_resumed_run_sums_session_times_and_drops_replayed_records(tmp_path):
    folder = write_run(tmp_path / "r", "gru", 1, [(5, 1, 3.0, 10.0, 100), (10, 1, 2.0, 20.0, 100)],
                       [(10, 2.2, 21.0)])
    # A second session resumed from step 5: its times restart, its step-10 record replaces the first.
    with open(folder / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"split": "train", "step": 10, "epoch": 1, "loss": 1.0, "time": 8.0,
                            "tokens_per_sec": 100}) + "\n")
        f.write(json.dumps({"split": "valid", "step": 10, "loss": 2.0, "time": 9.0}) + "\n")
    run = results.load_run(folder)
    assert run.wall_time == pytest.approx(21.0 + 9.0)
    assert run.valid[-1]["elapsed"] == pytest.approx(21.0 + 9.0)  # times since the run began
    assert run.epoch_train_losses() == {1: pytest.approx((5 * 3.0 + 5 * 1.0) / 10)}
    assert run.final_valid_loss() == 2.0


def test_compare_table_mean_and_spread_over_seeds(tmp_path):
    root = tmp_path / "runs" / results.COMPARE
    for cell, seed, last, minutes in (("lstm", 0, 2.0, 10), ("lstm", 1, 2.2, 12), ("gru", 0, 1.7, 8)):
        write_run(root / f"{cell}-s{seed}", cell, seed,
                  [(10, 1, 3.0, 30.0, 1000), (20, 2, last, minutes * 60 - 5, 1000)],
                  [(10, 2.9, 31.0), (20, last + 0.1, minutes * 60.0)])
    runs = results.load_experiment(root)
    assert [(r.cell, r.seed) for r in runs] == [("gru", 0), ("lstm", 0), ("lstm", 1)]
    table = results.compare_table(runs).splitlines()
    gru, lstm = table[2].split(" | "), table[3].split(" | ")
    assert gru[0] == "| gru" and gru[2] == "1.700" and gru[3] == "1.75"
    assert lstm[1] == "0, 1" and lstm[2] == "2.100 (2.000-2.200)" and lstm[3] == "2.03"
    assert lstm[4] == "2.200 (2.100-2.300)"
    assert lstm[5] == f"{2.2 / math.log(2):.3f} ({2.1 / math.log(2):.3f}-{2.3 / math.log(2):.3f})"
    assert lstm[6] == "11.0 (10.0-12.0) min"
    # Training time = the train logs' windows (the last ends 5 s before the run): 9.9 and 11.9 min.
    assert lstm[7] == "10.9 (9.9-11.9) min"
    assert gru[9].rstrip(" |") == f"{(8 * 60 - 5) / (0.5 * (595 + 715)):.2f}x"


def test_faithful_runs_get_their_own_tables_with_seen_validation(tmp_path):
    root = tmp_path / "runs"
    for experiment, last in ((results.COMPARE, 2.2), (results.FAITHFUL, 1.9)):
        write_run(root / experiment / "gru-s0", "gru", 0, [(10, 1, 3.0, 30.0, 1000), (20, 2, last, 55.0, 1000)],
                  [(10, 2.9, 31.0), (20, last + 0.1, 60.0)])
    text = results.tables(root)
    markers = [line for line in text.splitlines() if line.startswith("<!-- table:")]
    assert markers == ["<!-- table: experiment 1 -->", "<!-- table: experiment 1, per epoch -->",
                       "<!-- table: experiment 1, faithful -->", "<!-- table: experiment 1, faithful, per epoch -->"]
    faithful = text.split("<!-- table: experiment 1, faithful -->\n")[1].splitlines()
    assert "| valid (seen) loss | valid (seen) bpc |" in faithful[0]
    assert faithful[2].split(" | ")[2] == "1.900" and faithful[2].split(" | ")[4] == "2.000"
    per_epoch = text.split("<!-- table: experiment 1, faithful, per epoch -->\n")[1].splitlines()
    assert per_epoch[2] == "| gru | 3.000 | 1.900 |"


def test_strong_table_finds_the_first_evaluation_at_the_target(tmp_path):
    root = tmp_path / "runs" / results.STRONG
    write_run(root / "big", "gru", 0, [(10, 1, 2.0, 100.0, 500), (20, 2, 1.4, 200.0, 700), (30, 3, 1.3, 300.0, 600)],
              [(10, 1.7, 110.0), (20, 1.49, 210.0), (30, 1.45, 310.0)])
    row = results.strong_table(results.load_experiment(root)).splitlines()[2].split(" | ")
    assert row[2] == "1.450 (step 30)"
    assert row[4] == "step 20 (epoch 2.0)" and row[5] == "3.5 min" and row[6] == "5.2 min"


def test_adaptive_check_compares_perplexities_at_equal_steps(tmp_path):
    root = tmp_path / "runs" / results.ADAPTIVE_CHECK
    # (step, epoch, loss, time, tokens/s): step times 2.0 s (softmax) and 1.5 s (adaptive) a step.
    write_run(root / "softmax", "lstm", 0, [(10, 1, 6.0, 20.0, 100), (20, 1, 5.5, 40.0, 100)],
              [(10, math.log(200.0), 25.0), (20, math.log(150.0), 50.0)])
    write_run(root / "adaptive", "lstm", 0, [(10, 1, 6.0, 15.0, 100), (20, 1, 5.5, 30.0, 100)],
              [(10, math.log(190.0), 18.0), (20, math.log(160.0), 40.0)])
    text = results.tables(tmp_path / "runs")
    per_step = text.split("<!-- table: ptb adaptive check -->\n")[1].splitlines()
    assert per_step[2:4] == ["| 10 | 200.0 | 190.0 | 0.950 |", "| 20 | 150.0 | 160.0 | 1.067 |"]
    summary = text.split("<!-- table: ptb adaptive check, summary -->\n")[1].splitlines()
    assert summary[2] == "| best valid ppl (step) | 150.0 (20) | 160.0 (20) | 1.067 |"
    assert summary[3] == "| final valid ppl (step 20) | 150.0 | 160.0 | 1.067 |"
    assert summary[4] == "| seconds per training step (median) | 2.000 | 1.500 | 0.75 |"
    assert summary[5] == "| wall time | 0.8 min | 0.7 min | 0.80 |"
    (root / "adaptive" / "metrics.jsonl").unlink()
    (root / "adaptive" / "config.yaml").unlink()
    (root / "adaptive").rmdir()
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "runs")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "adaptive" in proc.stderr, proc.stderr


def test_adaptive_check_dropout_pair_gets_its_own_tables(tmp_path):
    root = tmp_path / "runs" / results.ADAPTIVE_CHECK
    for name, ppl in [("softmax", 200.0), ("adaptive", 220.0), ("softmax_dropout", 150.0), ("adaptive_dropout", 153.0)]:
        write_run(root / name, "lstm", 0, [(10, 1, 6.0, 20.0, 100)], [(10, math.log(ppl), 25.0)])
    text = results.tables(tmp_path / "runs")
    first = text.split("<!-- table: ptb adaptive check -->\n")[1].splitlines()
    assert first[2] == "| 10 | 200.0 | 220.0 | 1.100 |"
    second = text.split("<!-- table: ptb adaptive check, dropout 0.5 -->\n")[1].splitlines()
    assert second[2] == "| 10 | 150.0 | 153.0 | 1.020 |"
    summary = text.split("<!-- table: ptb adaptive check, dropout 0.5, summary -->\n")[1].splitlines()
    assert summary[2] == "| best valid ppl (step) | 150.0 (10) | 153.0 (10) | 1.020 |"
    # Half a pair is an error naming the missing run, not a silently dropped table.
    for leftover in (root / "adaptive_dropout").iterdir():
        leftover.unlink()
    (root / "adaptive_dropout").rmdir()
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "runs")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "adaptive_dropout" in proc.stderr, proc.stderr

def test_adaptive_variants_pair_each_cutoff_and_seed_with_the_softmax_run_of_its_seed(tmp_path):
    root = tmp_path / "runs" / results.ADAPTIVE_CHECK
    runs = [("softmax", 0, None, 200.0), ("adaptive", 0, [10, 20], 220.0),
            ("softmax_dropout", 0, None, 150.0), ("adaptive_dropout", 0, [10, 20], 153.0),
            ("softmax_dropout_seed1", 1, None, 160.0), ("adaptive_dropout_seed1", 1, [10, 20], 168.0),
            ("adaptive_dropout_one_tail", 0, [20], 156.0)]
    for name, seed, cutoffs, ppl in runs:
        write_run(root / name, "lstm", seed, [(10, 1, 6.0, 20.0, 100)], [(10, math.log(ppl), 25.0)])
        if cutoffs:
            config = yaml.safe_load((root / name / "config.yaml").read_text())
            config["model"].update(output="adaptive", cutoffs=cutoffs)
            (root / name / "config.yaml").write_text(yaml.safe_dump(config))
    table = results.tables(tmp_path / "runs").split(
        "<!-- table: ptb adaptive check, dropout 0.5, cutoffs and seeds -->\n")[1].splitlines()
    # Final perplexities (step 10), each adaptive run against the softmax run of its own seed.
    assert table[2:5] == ["| [20] | 0 | 10 | 150.0 | 156.0 | 1.040 |",
                          "| [10, 20] | 0 | 10 | 150.0 | 153.0 | 1.020 |",
                          "| [10, 20] | 1 | 10 | 160.0 | 168.0 | 1.050 |"], table
    # An adaptive run without a softmax run of its seed is an error naming it.
    for leftover in (root / "softmax_dropout_seed1").iterdir():
        leftover.unlink()
    (root / "softmax_dropout_seed1").rmdir()
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "runs")], capture_output=True, text=True)
    assert proc.returncode == 2 and "adaptive_dropout_seed1" in proc.stderr and "seed 1" in proc.stderr, proc.stderr



def test_missing_metrics_is_a_one_line_error(tmp_path):
    (tmp_path / "runs" / results.COMPARE / "empty").mkdir(parents=True)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "runs")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:"), proc.stderr


def test_docs_results_tables_are_reproduced_from_the_committed_runs():
    """Every table tools/results.py computes from docs/results/runs appears verbatim in docs/results.md."""
    proc = subprocess.run([sys.executable, str(SCRIPT), str(RUNS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    document = RESULTS_MD.read_text(encoding="utf-8")
    blocks = proc.stdout.split("<!-- table: ")[1:]
    adaptive_pairs = (RUNS / results.ADAPTIVE_CHECK).is_dir() + (RUNS / results.ADAPTIVE_CHECK / "softmax_dropout").is_dir()
    assert len(blocks) == (3 + 2 * (RUNS / results.FAITHFUL).is_dir() + 2 * adaptive_pairs
                           + (RUNS / results.AWD_RECIPE).is_dir()
                           + any((RUNS / results.ADAPTIVE_CHECK).glob("adaptive_dropout?*")))
    for block in blocks:
        name, table = block.split(" -->\n", 1)
        assert f"<!-- table: {name} -->\n{table.strip()}\n" in document, name



@pytest.mark.parametrize("experiment, config_name", [
    ("shakespeare_compare", "shakespeare_compare.yaml"),
    pytest.param("shakespeare_compare_faithful", "shakespeare_compare_faithful.yaml",
                 marks=pytest.mark.skipif(not (RUNS / "shakespeare_compare_faithful").is_dir(),
                                          reason="issue #21's faithful runs are not committed yet")),
    ("shakespeare_char", "shakespeare_char.yaml")])
def test_committed_runs_used_the_shipped_config(experiment, config_name):
    """A run may differ from configs/NAME only in the keys its command line sets (cell, seed, data path, output)."""
    from dist_rnn.config import changed_keys, config_from_dict, load_config

    allowed = {"data.path", "model.cell", "train.seed", "train.sample_length", "logging.progress"}
    shipped = load_config([str(REPO / "configs" / config_name)])
    runs = sorted(p for p in (RUNS / experiment).iterdir() if p.is_dir())
    assert runs
    for run in runs:
        used = config_from_dict(yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")))
        changes = changed_keys(shipped, used)
        assert {change.split(":")[0] for change in changes} <= allowed, (run.name, changes)
