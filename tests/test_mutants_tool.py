"""tools/mutants.py's own machinery (fast: no mutant's tests are run here)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("mutants", REPO / "tools" / "mutants.py")
mutants = importlib.util.module_from_spec(spec)
sys.modules["mutants"] = mutants
spec.loader.exec_module(mutants)


def fake_repo(tmp_path):
    repo = tmp_path / "work" / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "mod.py").write_text("def f(x):\n    return x / 2\n\n\ndef g(x):\n    return x + 1\n")
    (repo / ".git").mkdir()
    (repo / ".git" / "HEAD").write_text("ref: x\n")
    (tmp_path / "work" / "shared").mkdir()
    return repo


def test_mutation_is_applied_to_a_copy_only(tmp_path):
    repo = fake_repo(tmp_path)
    mutant = mutants.Mutant("half", "halves wrongly", "pkg/mod.py", "x / 2", "x * 2", ("tests",))
    workspace = tmp_path / "ws"
    workspace.mkdir()
    copy = mutants.mutated_copy(mutant, repo, workspace)
    assert (copy / "pkg" / "mod.py").read_text().startswith("def f(x):\n    return x * 2\n")
    assert "x / 2" in (repo / "pkg" / "mod.py").read_text()  # the original is untouched
    assert not (copy / ".git").exists()
    assert (workspace / "shared").resolve() == (repo.parent / "shared").resolve()  # ../shared still resolves


@pytest.mark.parametrize("old,found", [("x - 2", 0), ("return x", 2)])
def test_old_text_not_found_exactly_once_is_stale(tmp_path, old, found):
    repo = fake_repo(tmp_path)
    mutant = mutants.Mutant("bad", "", "pkg/mod.py", old, "y", ("tests",))
    outcome = mutants.run_mutant(mutant, repo)
    assert outcome.status == "stale" and f"found {found} times" in outcome.detail
    table = mutants.format_table([outcome])
    assert "bad" in table and "stale" in table and table.endswith("1 stale of 1")


def test_catalogue_matches_the_current_code():
    # Fails when code under a mutant changes: update the catalogue with it.
    names = [m.name for m in mutants.CATALOGUE]
    assert len(names) == len(set(names)) >= 12
    for m in mutants.CATALOGUE:
        assert (REPO / m.file).read_text(encoding="utf-8").count(m.old) == 1, m.name
        assert m.old != m.new and m.tests, m.name
        for test in m.tests:
            assert (REPO / test.split("::")[0]).is_file(), (m.name, test)


def test_cli_lists_and_rejects_unknown_names():
    tool = [sys.executable, str(REPO / "tools" / "mutants.py")]
    listed = subprocess.run([*tool, "--list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "fp16-not-unscaled: " in listed.stdout
    unknown = subprocess.run([*tool, "no-such-mutant"], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: unknown mutant(s) no-such-mutant")
