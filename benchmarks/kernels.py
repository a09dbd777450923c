"""Kernels per training step: how many XLA kernels (thunks) each pass of a hypergradient
runs per step, and their summed time, from one profiled run (`jax.profiler.trace`).

Problem: the core benchmark's (`core.py`: 784-50-50-50-10 tanh MLP, batch 200, momentum
0.9, hypergradient w.r.t. params0, lr, momentum, L2). Each kernel the profiler records is
matched, by name, to its instruction in the compiled program, whose op name says which
pass it belongs to: the forward scan (`jvp()/while`), the reverse scan
(`transpose(jvp())/while`), or outside both. Kernels inside the gradient's isolating
branch (`cond/branch`) are counted apart: they are the autodiff work, the rest of a pass's
kernels are the fixed-point, buffer and bookkeeping work. Summed kernel time is not wall
time (large products run on several threads and overlap other kernels); the counts are
exact.

Usage:
    python benchmarks/kernels.py                       # T = 100, f64, reversible and unrolled
    python benchmarks/kernels.py --dtype float32 --budget 0.5 --name kernels_f32
    python benchmarks/kernels.py --sizes 784 1000 1000 10 --batch 100 --steps 20 \
        --dtype float32 --name kernels_large_f32      # the peers' large net

Each method's row also gives the wall time per step of the hypergradient and of plain
training (the median of 3 timed runs after the warm-up).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine_info, save  # noqa: E402

SKIP = ("$", "PjitFunction", "ThunkExecutor", "ExecuteReplicated", "CommonPjRt", "Slinky")


def op_names(hlo_text: str) -> dict:
    """Instruction name -> its op_name metadata, from a compiled program's text."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}", line)
        if m:
            on = re.search(r'op_name="([^"]*)"', m.group(2))
            out[m.group(1)] = on.group(1) if on else ""
    return out


def where(op: str) -> tuple[str, str]:
    """(pass, part) of a kernel from its op name."""
    pas = ("reverse" if "transpose(jvp())/while" in op else "forward" if "jvp()/while" in op
           else "outside the loops")
    return pas, "autodiff (isolated branch)" if "cond/branch" in op else "rest"


def wall_ms_per_step(fn, args, T: int) -> float:
    """Median wall time of 3 runs of fn(*args) after a warm-up run, per step (ms)."""
    import statistics
    import time

    import jax
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) / T * 1e3


def profile(fn, args, T: int) -> dict:
    """Per (pass, part): kernels per step and summed kernel time per step (us)."""
    import jax
    jax.block_until_ready(fn(*args))
    names = op_names(fn.lower(*args).compile().as_text())
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            jax.block_until_ready(fn(*args))
        path = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)[0]
        events = json.load(gzip.open(path))["traceEvents"]
    count, time_us = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e["name"].startswith(SKIP) or e["name"] not in names:
            continue
        if e["name"].startswith(("cond", "while")):          # control flow, not a kernel
            continue
        key = where(names[e["name"]])
        count[key] += 1
        time_us[key] += e["dur"]
    return {f"{p} / {q}": {"kernels_per_step": count[(p, q)] / T,
                           "kernel_us_per_step": time_us[(p, q)] / T} for p, q in sorted(count)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    ap.add_argument("--budget", type=float, default=None,
                    help="also profile Reversible(budget=round(f T))")
    ap.add_argument("--sizes", type=int, nargs="+", help="MLP layer sizes (default core.py's)")
    ap.add_argument("--batch", type=int, help="minibatch (default core.py's)")
    ap.add_argument("--name", default="kernels")
    a = ap.parse_args(argv)

    import core
    import jax
    T, sizes, batch = a.steps, a.sizes or core.SIZES, a.batch or core.BATCH
    P, args, train, hyper, method_of = core._setup(sizes, batch, T, "momentum", a.dtype)
    methods = ["reversible", "unrolled"] + ([f"reversible@{a.budget:g}"] if a.budget is not None else [])
    info = machine_info()
    plain = jax.jit(train(method_of("unrolled", T)))
    rows, wall = {}, {}
    for m in methods:
        fn = hyper(method_of(m, T))
        wall[m] = {"hypergradient_ms_per_step": wall_ms_per_step(fn, args, T),
                   "plain_ms_per_step": wall_ms_per_step(plain, args, T)}
        rows[m] = profile(fn, args, T)
    L = [f"# Kernels per step ({info['date']})", "",
         f"Machine: {info.get('cpu', '?')}, {info['cores']} cores; JAX device {info.get('jax_device')}; "
         f"jax {info['jax']}. Problem: core.py's problem on a {'-'.join(map(str, sizes))} MLP "
         f"({core.num_weights(sizes):,} weights), batch {batch}, {a.dtype}, T = {T}; one profiled run "
         "of the jit-compiled hypergradient after a warm-up run.", "",
         "| method | hypergradient (ms / step) | plain training (ms / step) |", "|---|---:|---:|"]
    L += [f"| {m} | {w['hypergradient_ms_per_step']:.2f} | {w['plain_ms_per_step']:.2f} |" for m, w in wall.items()]
    L += ["", "| method | pass / part | kernels per step | summed kernel time per step (us) |",
          "|---|---|---:|---:|"]
    for m, r in rows.items():
        for k, v in r.items():
            L.append(f"| {m} | {k} | {v['kernels_per_step']:.1f} | {v['kernel_us_per_step']:.0f} |")
    md = "\n".join(L) + "\n"
    print(md)
    print("wrote", *save(a.name, md, {"machine": info, "steps": T, "dtype": a.dtype, "sizes": sizes,
                                      "batch": batch, "wall": wall, "rows": rows}))


if __name__ == "__main__":
    main()
