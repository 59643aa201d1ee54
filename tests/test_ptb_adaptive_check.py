"""configs/ptb_adaptive_check.yaml (issue #18's adaptive-softmax accuracy check): it loads as documented,
both of its runs train through the CLI at a tiny size, and the committed runs used it.

The numbers of the check itself are in docs/results.md, section 5, rebuilt from the committed runs by
tools/results.py (tests/test_results.py checks that the tables match).
"""

from __future__ import annotations

import json
import math

import pytest
import yaml

from conftest import PTB, REPO, run_cli
from dist_rnn.config import changed_keys, config_from_dict, load_config

CONFIG = REPO / "configs" / "ptb_adaptive_check.yaml"
RUNS = REPO / "docs" / "results" / "runs" / "ptb_adaptive_check"
# The adaptive run's overrides, as the config's header gives them.
ADAPTIVE = ["model.output=adaptive", "model.cutoffs=[2000, 4000]", "model.div_value=4"]
# The second pair of runs adds this to both (Zaremba et al.'s dropout on non-recurrent connections).
DROPOUT = "model.dropout=0.5"


def test_config_is_the_documented_tied_softmax_baseline_and_the_adaptive_overrides_validate():
    header = CONFIG.read_text(encoding="utf-8")
    for override in ADAPTIVE:
        assert f"--set '{override}'" in header or f"--set {override}" in header, override
    softmax = load_config([str(CONFIG)])
    d, m, t = softmax.data, softmax.model, softmax.train
    assert (d.corpus, d.level, d.train_file, d.valid_file) == (
        "file", "word", "../shared/data/ptb/ptb.valid.txt", "../shared/data/ptb/ptb.test.txt")
    assert (m.output, m.tie_embeddings, m.num_layers, m.hidden_size, m.embedding_size) == ("softmax", True, 2, 200, 200)
    assert (t.batch_size, t.num_steps, t.max_steps, t.eval_every) == (20, 35, 840, 105)
    adaptive = load_config([str(CONFIG)], ADAPTIVE)
    assert (adaptive.model.output, adaptive.model.cutoffs, adaptive.model.div_value) == ("adaptive", [2000, 4000], 4.0)
    # The two runs differ only in the output layer (div_value 4 is also the default).
    assert sorted(c.split(":")[0] for c in changed_keys(softmax, adaptive)) == ["model.cutoffs", "model.output"]
    assert f"--set {DROPOUT} --set train.max_steps=1260" in header
    assert (softmax.model.dropout, load_config([str(CONFIG)], [DROPOUT, *ADAPTIVE]).model.dropout) == (0.0, 0.5)


@pytest.mark.parametrize("overrides", [[], ADAPTIVE], ids=["softmax", "adaptive"])
def test_both_runs_train_three_steps_at_a_tiny_size(tmp_path, capsys, overrides):
    if not (PTB / "ptb.valid.txt").is_file():
        pytest.skip(f"needs {PTB} (CI always has ../shared)")
    # The whole training text (its 6,022-word vocabulary is what the cutoffs assume); 40 validation lines.
    valid = tmp_path / "valid.txt"
    valid.write_text("".join((PTB / "ptb.test.txt").read_text(encoding="utf-8").splitlines(True)[:40]),
                     encoding="utf-8")
    run_dir = tmp_path / "run"
    argv = ["train", CONFIG, "--run-dir", run_dir,
            "--set", f"data.train_file={PTB / 'ptb.valid.txt'}", "--set", f"data.valid_file={valid}",
            "--set", "model={hidden_size: 16, embedding_size: 16}",
            "--set", "train={batch_size: 4, num_steps: 10, max_steps: 3, eval_every: 3, log_every: 1}",
            "--set", "logging={progress: off, tensorboard: false}"]
    for override in overrides:
        argv += ["--set", override]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err[-3000:]
    vocab = len(json.loads((run_dir / "vocab.json").read_text())["tokens"])
    assert vocab == 6022
    assert ("adaptive softmax, cutoffs [2000, 4000], div_value 4" in out) == bool(overrides), out
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    valid_losses = [r["loss"] for r in records if r["split"] == "valid"]
    assert [r["step"] for r in train] == [1, 2, 3]
    # Both outputs are exact normalized distributions: the untrained model is near uniform, ln(6022) = 8.70.
    assert abs(train[0]["loss"] - math.log(vocab)) < 0.3, train[0]
    assert len(valid_losses) == 1 and math.isfinite(valid_losses[0]) and valid_losses[0] < math.log(vocab) + 0.3


def test_committed_runs_used_the_shipped_config_and_differ_only_in_the_output():
    if not RUNS.is_dir():
        pytest.skip("docs/results/runs/ptb_adaptive_check is not committed")
    shipped = load_config([str(CONFIG)])
    expected = {"softmax": set(), "adaptive": {"model.cutoffs", "model.output"},
                # The diagnostic run of section 5: wider tail projections, half the steps.
                "adaptive_div2": {"model.cutoffs", "model.output", "model.div_value", "train.max_steps",
                                  "train.eval_every"},
                # The second pair: the same two runs with dropout, resumed from 840 to 1260 steps.
                "softmax_dropout": {"model.dropout", "train.max_steps"},
                "adaptive_dropout": {"model.dropout", "model.cutoffs", "model.output", "train.max_steps"},
                # One tail cluster ([4000]) instead of two, and both cutoffs again with seed 1.
                "adaptive_dropout_4000": {"model.dropout", "model.cutoffs", "model.output", "train.max_steps"},
                "adaptive_dropout_4000_seed1": {"model.dropout", "model.cutoffs", "model.output", "train.max_steps",
                                                "train.seed"},
                "adaptive_dropout_seed1": {"model.dropout", "model.cutoffs", "model.output", "train.max_steps",
                                           "train.seed"},
                "softmax_dropout_seed1": {"model.dropout", "train.max_steps", "train.seed"}}
    assert sorted(p.name for p in RUNS.iterdir() if p.is_dir()) == sorted(expected)
    for name, keys in expected.items():
        used = config_from_dict(yaml.safe_load((RUNS / name / "config.yaml").read_text(encoding="utf-8")))
        changes = {c.split(":")[0] for c in changed_keys(shipped, used)} - {"logging.progress"}
        assert changes == keys, (name, changes)
