"""Run folders as a small transactional store: one writer at a time, nothing stale ever read,
atomic files, damaged files survived or reported in one line, and resume after SIGKILL
anywhere (including during --overwrite) bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from revlearn.meta import RunDir, RunDirBusy, RunFileError, meta_optimize, save_figure
from _cli import error_line

RECORD = {"experiment": "quickstart", "smoke": True, "config": {"seed": 0}}


def _begun(path, record=RECORD) -> RunDir:
    rd = RunDir(path).lock()
    rd.begin(record, fresh=True)
    return rd


# -- one writer ------------------------------------------------------------------------------

def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    first = RunDir(tmp_path).lock()
    with pytest.raises(RunDirBusy, match=rf"in use by another revlearn process \(PID {os.getpid()}\)"):
        RunDir(tmp_path).lock()
    first.unlock()
    RunDir(tmp_path).lock().unlock()  # free again


# -- nothing stale is read -------------------------------------------------------------------

def test_a_replacement_interrupted_before_clearing_never_reads_the_old_run(tmp_path, monkeypatch):
    old = _begun(tmp_path)
    old.save_arrays("study_r28_n30", {"test_error": np.ones(3)})
    old.append_metrics({"iteration": 0, "meta_loss": 1.0})
    old.unlock()
    # the new run dies right after writing its config.json, before deleting anything
    monkeypatch.setattr(RunDir, "_clear", lambda self, keep: None)
    new = _begun(tmp_path, dict(RECORD, config={"seed": 1}))
    assert new.run_id != old.run_id
    assert not new.has_arrays("study_r28_n30")
    with pytest.raises(RunFileError, match="written by another run"):
        new.load_arrays("study_r28_n30")
    assert new.read_metrics() == []
    # a reader (revlearn plot) takes the run id from config.json too
    assert not RunDir(tmp_path).has_arrays("study_r28_n30")
    monkeypatch.undo()
    new.unlock()
    _begun(tmp_path, dict(RECORD, config={"seed": 1}))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "config.json"]


def test_a_fresh_start_clears_every_file_and_leftover_temporaries(tmp_path):
    rd = _begun(tmp_path)
    rd.save_arrays("results", {"x": np.ones(2)})
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(b"png")
    (tmp_path / "seed-3").mkdir()
    (tmp_path / ".checkpoint.npz.abc123.tmp").write_bytes(b"torn")
    rd.begin(RECORD, fresh=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "config.json"]
    (tmp_path / ".results.npz.x.tmp").write_bytes(b"torn")
    rd.begin(RECORD, fresh=False)  # a resume keeps the files, but not a killed writer's temps
    assert not list(tmp_path.glob("*.tmp"))


def test_files_are_atomic_and_readable_by_others(tmp_path):
    from matplotlib.figure import Figure

    rd = _begun(tmp_path)
    mode = 0o666 & ~_umask()
    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])
    path = save_figure(fig, rd.figures / "f.png", dpi=50)
    assert path.read_bytes()[:4] == b"\x89PNG"
    for f in (path, rd.save_arrays("a", {"x": np.ones(1)}), rd.write_json("s.json", {"a": 1})):
        assert f.stat().st_mode & 0o777 == mode, f
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- damaged files ---------------------------------------------------------------------------

def _toy(theta, i):
    g = {"x": theta["x"] - 3.0 + 0.1 * np.sin(i)}
    return jnp.sum(g["x"] ** 2), g, None


def _meta(rd, n, resume=False):
    return meta_optimize(_toy, {"x": jnp.arange(3.0)}, optax.adam(0.1), n, rd, progress=False,
                         resume=resume)


@pytest.mark.parametrize("damage", ["truncate", "empty", "flip"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    full = _meta(_begun(tmp_path / "full"), 8)
    rd = _begun(tmp_path / "run")
    _meta(rd, 5)
    ckpt = tmp_path / "run" / "checkpoint.npz"
    data = ckpt.read_bytes()
    ckpt.write_bytes({"truncate": data[: len(data) // 2], "empty": b"",
                      "flip": data[:100] + bytes(b ^ 0xFF for b in data[100:])}[damage])
    with pytest.warns(RuntimeWarning, match="checkpoint.npz is damaged.*using the previous"):
        resumed = _meta(rd, 8, resume=True)
    assert resumed.resumed_from == 4
    assert np.asarray(resumed.hypers["x"]).tobytes() == np.asarray(full.hypers["x"]).tobytes()
    assert [r["iteration"] for r in rd.read_metrics()] == list(range(8))


def test_damaged_checkpoints_without_a_good_one_are_one_clear_error(tmp_path):
    rd = _begun(tmp_path)
    _meta(rd, 3)
    for name in ("checkpoint.npz", "checkpoint.prev.npz"):
        (tmp_path / name).write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(RunFileError, match=r"checkpoint\.npz is damaged .*--overwrite") as e:
        _meta(rd, 5, resume=True)
    assert "\n" not in str(e.value)


def test_a_malformed_metrics_line_names_file_and_line(tmp_path):
    rd = _begun(tmp_path)
    rd.append_metrics({"iteration": 0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(RunFileError, match=r"metrics\.jsonl line 2 is not valid JSON.*--overwrite"):
        rd.read_metrics()


def test_the_meta_loop_never_checkpoints_nonfinite_hyperparameters(tmp_path):
    rd = _begun(tmp_path)
    with pytest.raises(FloatingPointError, match="meta-iteration 0: the meta-optimiser's update "
                                                 r"made hypers\['x'\] non-finite"):
        meta_optimize(_toy, {"x": jnp.arange(3.0)}, optax.sgd(float("nan")), 3, rd,
                      progress=False)
    assert not rd.has_arrays("checkpoint")
    with pytest.raises(ValueError, match=r"hypers0 has non-finite values in \['x'\]"):
        meta_optimize(_toy, {"x": jnp.array([0.0, jnp.inf])}, optax.sgd(0.1), 3, rd,
                      progress=False)


# -- the command line ------------------------------------------------------------------------

def test_plot_refuses_results_of_another_run(tmp_path, capsys, monkeypatch):
    rd = _begun(tmp_path)
    rd.save_arrays("results", {"x": np.ones(2)})
    rd.unlock()
    monkeypatch.setattr(RunDir, "_clear", lambda self, keep: None)  # killed before clearing
    _begun(tmp_path, dict(RECORD, config={"seed": 1})).unlock()
    line = error_line(capsys, ["plot", str(tmp_path)])
    assert "written by another run" in line and "nothing was plotted" in line


def test_environment_errors_are_one_line(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("x")
    smoke = ["run", "quickstart", "--smoke", "--no-progress"]
    assert "is a file" in error_line(capsys, smoke + ["--out", str(file)])
    assert "part of the path is a file" in error_line(capsys, smoke + ["--out", str(file / "run")])
    line = error_line(capsys, smoke + ["--out", "/proc/revlearn-cannot-write-here"])
    assert "cannot create the run folder /proc/revlearn-cannot-write-here" in line
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert "is not empty and holds no revlearn run" in error_line(
        capsys, smoke + ["--out", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert "exclude each other" in error_line(
        capsys, smoke + ["--out", str(tmp_path / "r"), "--resume", "--overwrite"])
    assert not (tmp_path / "r").exists()


# -- real runs: concurrent writers, SIGKILL anywhere ----------------------------------------------

ARGS = ["run", "quickstart", "--smoke", "--no-progress", "--set", "meta_iterations=12"]


def _env(cache: Path) -> dict:
    # Restarted runs share compiled programs through JAX's persistent cache, so each restart
    # costs an import rather than a compilation.
    return dict(os.environ, PYTHONWARNINGS="ignore", JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _launch(argv, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "revlearn.cli", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def _wait_for(cond, proc, what, timeout=240.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stdout.read().decode()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.01)


def test_two_concurrent_writers(tmp_path, capsys):
    out = tmp_path / "run"
    proc = _launch(ARGS + ["--set", "meta_iterations=400", "--out", str(out)], _env(tmp_path / "c"))
    try:
        _wait_for(lambda: (out / "metrics.jsonl").exists(), proc, "a metrics line")
        for extra in (["--resume"], ["--overwrite"], []):
            line = error_line(capsys, ARGS + ["--set", "meta_iterations=400", "--out", str(out)]
                               + extra)
            # the lock is taken before anything else is looked at, so every writer meets it
            assert f"in use by another revlearn process (PID {proc.pid})" in line, line
        assert f"PID {proc.pid}" in error_line(capsys, ["plot", str(out)])
    finally:
        proc.kill()
        proc.wait()
    iterations = [r["iteration"] for r in RunDir(out).read_metrics()]
    assert iterations == list(range(len(iterations)))  # one writer: no line twice


def _results(folder: Path) -> dict:
    """Every saved array (checkpoints excluded), the metrics without timings, and the numbers
    of summary.json without timings: what must be bit-identical after resuming."""
    out = {}
    for f in sorted(folder.rglob("*.npz")):
        if "checkpoint" in f.name:
            continue
        sub = RunDir(f.parent)
        for k, v in sub.load_arrays(f.name).items():
            out[f"{f.relative_to(folder)}:{k}"] = (v.dtype.str, v.shape, v.tobytes())
    for f in sorted(folder.rglob("metrics.jsonl")):
        out[str(f.relative_to(folder))] = [
            {k: v for k, v in r.items() if k != "wall_time_s"} for r in RunDir(f.parent).read_metrics()]
    for f in sorted(folder.rglob("summary.json")):
        out[str(f.relative_to(folder))] = {k: v for k, v in json.loads(f.read_text()).items()
                                           if "time" not in k}
    return out


def _flag(out: Path) -> list[str]:
    """How to continue in `out`: --resume if it holds this run (seed 0), --overwrite if it
    still holds the run being replaced (seed 5), nothing if it holds no run yet."""
    if not (out / "config.json").exists():
        return []
    saved = json.loads((out / "config.json").read_text())
    first = saved["seeds"][0] if "seeds" in saved else saved["config"]["seed"]
    return ["--resume"] if first == 0 else ["--overwrite"]


def _kill_and_resume(tmp_path, argv, kills: int, seed: int, overwrite_first: bool):
    """Run `argv` uninterrupted (the reference), then the same run killed by SIGKILL at
    `kills` random moments, each time continued (`_flag`; if `overwrite_first` it starts as
    an --overwrite of a finished run of other seeds), and compare."""
    env = _env(tmp_path / "cache")
    ref = tmp_path / "reference"
    proc = _launch(argv + ["--out", str(ref)], env)
    t0 = time.monotonic()
    assert proc.wait(timeout=600) == 0, proc.stdout.read().decode()
    duration = time.monotonic() - t0
    out = tmp_path / "killed"
    rng = random.Random(seed)
    if overwrite_first:  # a finished run of other seeds is being replaced
        assert subprocess.run([sys.executable, "-m", "revlearn.cli", *argv, "--seed", "5",
                               "--out", str(out)], env=env, capture_output=True).returncode == 0
    moments = []
    for k in range(kills):
        proc = _launch(argv + ["--out", str(out)] + _flag(out), env)
        moment = rng.uniform(0.0, duration)
        try:
            proc.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        moments.append(round(moment, 2))
    final = _launch(argv + ["--out", str(out)] + _flag(out), env)
    assert final.wait(timeout=600) == 0, final.stdout.read().decode()
    a, b = _results(ref), _results(out)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], f"{key} differs after kills at {moments} s"
    return moments


def test_sigkill_anywhere_including_overwrite_resumes_bit_identically(tmp_path):
    _kill_and_resume(tmp_path, ARGS, kills=3, seed=0, overwrite_first=True)


@pytest.mark.slow
@pytest.mark.parametrize("seeds", [1, 2])
def test_sigkill_at_ten_random_moments(tmp_path, seeds):
    argv = ARGS + (["--seeds", "2"] if seeds == 2 else [])
    moments = _kill_and_resume(tmp_path, argv, kills=10, seed=seeds, overwrite_first=True)
    print(f"killed at {moments} s")


@pytest.mark.slow
def test_interrupted_overwrite_never_reuses_study_cells(tmp_path):
    """The reported defect: canonical-examples (which caches its study cells), a finished
    seed-0 run, then --seed 1 --overwrite killed after its first metrics line, then --resume:
    every cell must equal a clean seed-1 run's."""
    env = _env(tmp_path / "cache")
    base = ["run", "canonical-examples", "--smoke", "--no-progress"]
    out, clean = tmp_path / "ce", tmp_path / "clean"
    assert subprocess.run([sys.executable, "-m", "revlearn.cli", *base, "--out", str(out)],
                          env=env, capture_output=True).returncode == 0
    proc = _launch(base + ["--seed", "1", "--out", str(out), "--overwrite"], env)

    def first_line_of_seed_1():
        saved = json.loads((out / "config.json").read_text())
        return saved["config"]["seed"] == 1 and len(RunDir(out).read_metrics()) >= 1

    _wait_for(first_line_of_seed_1, proc, "a metrics line of the seed-1 run")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert subprocess.run([sys.executable, "-m", "revlearn.cli", *base, "--seed", "1", "--out",
                           str(out), "--resume"], env=env, capture_output=True).returncode == 0
    assert subprocess.run([sys.executable, "-m", "revlearn.cli", *base, "--seed", "1", "--out",
                           str(clean)], env=env, capture_output=True).returncode == 0
    a, b = _results(clean), _results(out)
    assert a.keys() == b.keys() and any("study_r28" in k for k in a)
    for key in a:
        assert a[key] == b[key], key

