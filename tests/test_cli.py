"""The `revlearn` command line: every experiment's smoke run through the real
entry point, plot, multi-seed runs, and one-line usage errors (exit status 2)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import revlearn
from revlearn import experiments
from revlearn.cli import main
from revlearn.experiments import ConfigError, parse_value
from _cli import error_line


def test_list_shows_every_experiment(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for exp in experiments.all_experiments():
        assert exp.name in out and exp.description in out


@pytest.mark.parametrize("name", experiments.names())
def test_smoke_run_and_replot(name, tmp_path, capsys):
    out_dir = tmp_path / name
    assert main(["run", name, "--smoke", "--out", str(out_dir), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert str(out_dir) in stdout
    for f in ("config.json", "env.json", "metrics.jsonl", "summary.json"):
        assert (out_dir / f).is_file(), f
    saved = json.loads((out_dir / "config.json").read_text())
    assert saved["experiment"] == name and saved["smoke"] is True
    assert saved["config"] == experiments.config_to_dict(experiments.get(name).smoke)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary and all(isinstance(k, str) for k in summary)
    figures = sorted((out_dir / "figures").glob("*.png"))
    assert figures
    for f in figures:
        f.unlink()
    assert main(["plot", str(out_dir)]) == 0
    assert sorted((out_dir / "figures").glob("*.png")) == figures


def test_seeds_report_mean_and_std(tmp_path, capsys):
    out_dir = tmp_path / "multi"
    argv = ["run", "quickstart", "--smoke", "--seeds", "2", "--seed", "3", "--set",
            "meta_iterations=2", "--out", str(out_dir), "--no-progress"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "±" in stdout
    agg = json.loads((out_dir / "seeds_summary.json").read_text())
    assert agg["seeds"] == [3, 4] and agg["n"] == 2
    per = [json.loads((out_dir / f"seed-{s}" / "summary.json").read_text()) for s in (3, 4)]
    k = "valid_loss_learned"
    assert agg["mean"][k] == pytest.approx((per[0][k] + per[1][k]) / 2)
    assert agg["std"][k] == pytest.approx(abs(per[0][k] - per[1][k]) / 2 ** 0.5)
    assert json.loads((out_dir / "seed-4" / "config.json").read_text())["config"]["seed"] == 4
    assert main(["plot", str(out_dir)]) == 0
    # resuming a finished multi-seed run recomputes nothing and succeeds
    assert main(argv + ["--resume"]) == 0


def test_parse_value_types():
    assert parse_value("none", float | None) is None
    assert parse_value("0.5", float | None) == 0.5
    assert parse_value("784,100,10", tuple[int, ...]) == (784, 100, 10)
    assert parse_value("True", bool) is True and parse_value("no", bool) is False
    with pytest.raises(ConfigError, match="is not a bool"):
        parse_value("maybe", bool)
    with pytest.raises(ConfigError, match="not an int"):
        parse_value("1.5", int)


# -- one-line errors, exit status 2 ----------------------------------------------------------

def test_unknown_experiment(capsys):
    line = error_line(capsys, ["run", "no-such-thing"])
    assert "unknown experiment 'no-such-thing'" in line and "quickstart" in line


def test_unknown_set_key(capsys, tmp_path):
    line = error_line(capsys, ["run", "quickstart", "--set", "stepz=3", "--out", str(tmp_path)])
    assert "'stepz'" in line and "valid keys:" in line and "steps" in line


def test_ill_typed_value(capsys, tmp_path):
    line = error_line(capsys, ["run", "quickstart", "--set", "steps=ten", "--out", str(tmp_path)])
    assert "steps='ten' is not an int" in line
    line = error_line(capsys, ["run", "quickstart", "--set", "data=cifar"])
    assert "embedded" in line and "mnist" in line
    line = error_line(capsys, ["run", "quickstart", "--set", "steps=0"])
    assert "steps=0 must be >= 1" in line
    line = error_line(capsys, ["run", "quickstart", "--set", "steps"])
    assert "key=value" in line


def test_missing_run_folder_for_plot(capsys, tmp_path):
    line = error_line(capsys, ["plot", str(tmp_path / "nope")])
    assert "no run folder at" in line
    line = error_line(capsys, ["plot", str(tmp_path)])
    assert "not a run folder (no config.json)" in line


def _fake_run(path: Path, **changes):
    config = dataclasses.replace(experiments.get("quickstart").smoke, **changes)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(
        {"experiment": "quickstart", "smoke": True, "config": experiments.config_to_dict(config)}))


def test_incompatible_resume(capsys, tmp_path):
    line = error_line(capsys, ["run", "quickstart", "--smoke", "--resume",
                                "--out", str(tmp_path / "empty")])
    assert "nothing to resume" in line
    _fake_run(tmp_path / "run", steps=7)
    line = error_line(capsys, ["run", "quickstart", "--smoke", "--resume",
                                "--out", str(tmp_path / "run")])
    assert "config differs in steps (saved 7, now 10)" in line
    line = error_line(capsys, ["run", "quickstart", "--smoke", "--out", str(tmp_path / "run")])
    assert "already holds a run" in line and "--resume" in line
    line = error_line(capsys, ["run", "quickstart", "--smoke", "--seeds", "2", "--resume",
                                "--out", str(tmp_path / "run")])
    assert "it holds a one-seed run, not a run over seeds [0, 1]" in line


def test_argparse_errors_are_one_line(capsys):
    line = error_line(capsys, ["frobnicate"])
    assert "invalid choice" in line
    error_line(capsys, ["run", "quickstart", "--data", "cifar"])
    error_line(capsys, ["run", "quickstart", "--seeds", "0"])


def test_error_from_a_real_process_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "revlearn.cli", "run", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "unknown experiment 'nope'" in proc.stderr


# -- check -------------------------------------------------------------------------------------

class _Report:
    def __init__(self, passed):
        self.passed = passed

    def __str__(self):
        return f"self-check: {'passed' if self.passed else 'FAILED'}"


@pytest.mark.parametrize("passed, code", [(True, 0), (False, 1)])
def test_check(monkeypatch, capsys, passed, code):
    monkeypatch.setattr(revlearn, "self_check", lambda: _Report(passed), raising=False)
    assert main(["check"]) == code
    assert str(_Report(passed)) in capsys.readouterr().out


def test_check_without_self_check(monkeypatch, capsys):
    monkeypatch.delattr(revlearn, "self_check", raising=False)
    assert "self_check" in error_line(capsys, ["check"])
