"""Shared helpers for the benchmarks: data, models, machine info, child processes.

Every measurement that reports memory runs in a fresh child process (this
file's `run_child`), which prints one JSON line starting with `RESULT ` and
its peak RSS (`ru_maxrss`, read at the end of the child).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


# ----------------------------------------------------------------------------- data

def make_data(n_train: int, n_val: int, n_in: int = 784, n_out: int = 10, seed: int = 0):
    """MNIST-sized synthetic data with structure (not pure noise).

    Pixels are sigmoid(Z A) for a 20-dimensional latent Z, so they are
    correlated and lie in (0, 1) like MNIST; the label is the argmax of a
    linear function of Z plus a little noise, so the task is learnable and
    the training dynamics at a moderate learning rate are not chaotic.
    """
    rng = np.random.default_rng(seed)
    d = 20
    A = rng.normal(size=(d, n_in)) / np.sqrt(d) * 2.0
    B = rng.normal(size=(d, n_out))

    def draw(n):
        Z = rng.normal(size=(n, d))
        X = 1.0 / (1.0 + np.exp(-(Z @ A)))
        y = np.argmax(Z @ B + 0.3 * rng.normal(size=(n, n_out)), axis=1)
        return X.astype(np.float64), y.astype(np.int32)

    X, y = draw(n_train)
    Xv, yv = draw(n_val)
    return X, y, Xv, yv


def init_params(sizes, seed: int = 1):
    """[(W [in, out], b [out])] with W ~ N(0, 1/in), b = 0, float64 numpy."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(a, b)) / np.sqrt(a), np.zeros((b,))) for a, b in zip(sizes[:-1], sizes[1:])]


def num_weights(sizes) -> int:
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


# ----------------------------------------------------------------------------- timing

def median_time(fn, reps: int, block=None):
    """Median wall time of `fn()` over `reps` runs (call it once before to warm up)."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        if block is not None:
            block(out)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def peak_rss_mib() -> float:
    """Peak resident set size of this process image, MiB.

    Reads VmHWM from /proc/self/status. Not ru_maxrss: Linux carries the
    parent's RSS high-water mark into a child's ru_maxrss across fork/vfork +
    exec, so a child of a big parent would report at least the parent's RSS.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- machine

def machine_info() -> dict:
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "platform": platform.platform(),
            "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    info["ram_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    try:
        import jax
        d = jax.devices()[0]
        info["jax_device"] = f"{jax.default_backend()}: {d.device_kind} x{len(jax.devices())}"
        stats = d.memory_stats() or {}
        if "bytes_limit" in stats:
            info["jax_device_gib"] = round(stats["bytes_limit"] / 2**30, 1)
    except Exception as e:  # noqa: BLE001 - report whatever went wrong
        info["jax_device"] = f"unknown: {type(e).__name__}"
    from importlib import metadata
    for mod in ("jax", "jaxlib", "numpy", "torch", "torchopt", "higher", "revlearn", "matplotlib"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", None) or metadata.version(mod)
        except Exception as e:  # noqa: BLE001 - report whatever went wrong
            info[mod] = f"not importable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return info


# ----------------------------------------------------------------------------- children

def run_child(script: str, spec: dict, timeout: float, env_extra: dict | None = None) -> dict:
    """Run `python script --child JSON` in a fresh process; return its RESULT dict."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    if env_extra:
        env.update(env_extra)
    cmd = [sys.executable, script, "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            r["child_wall_s"] = time.perf_counter() - t0
            return r
    tail = (p.stderr or p.stdout).strip().splitlines()[-6:]
    return {"error": f"child exited {p.returncode}: " + " | ".join(tail)[-1500:],
            "child_wall_s": time.perf_counter() - t0}


def emit(result: dict) -> None:
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


def save(name: str, markdown: str, payload: dict) -> tuple[str, str]:
    os.makedirs(RESULTS, exist_ok=True)
    md = os.path.join(RESULTS, name + ".md")
    js = os.path.join(RESULTS, name + ".json")
    with open(md, "w") as f:
        f.write(markdown)
    with open(js, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    return md, js


def fmt(x, spec=".3g", none="-"):
    if x is None:
        return none
    if isinstance(x, str):
        return x
    return format(x, spec)
