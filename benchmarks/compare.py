"""Paired comparison of this tree's Reversible against another git revision's, in one process.

The revision's `src/revlearn` is exported (`git archive`) to a temporary folder as the
package `revlearn_base`, and both hypergradients of the core benchmark's problem
(784-50-50-50-10 tanh MLP, float64, batch 200, momentum 0.9, per-layer per-step lr,
per-weight L2; jit(grad) w.r.t. params0, lr, momentum and L2, through `revlearn.sgd`, which
both revisions have) are timed in interleaved rounds beside plain training, so the
machine's drift falls on both alike. Reports each round's ratio base/plain, this/plain and
this/base (medians), and the largest relative difference of the two hypergradients.

Usage:
    python benchmarks/compare.py beebf10                 # T = 1000, 7 rounds
    python benchmarks/compare.py beebf10 --steps 300 --rounds 9 --name compare_T300
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine_info, save  # noqa: E402


def export(rev: str, root: str) -> str:
    """`git archive` of rev's src/revlearn into root/revlearn_base; returns root."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tar = subprocess.run(["git", "-C", repo, "archive", rev, "src/revlearn"], check=True,
                         capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", root], input=tar, check=True)
    os.rename(os.path.join(root, "src", "revlearn"), os.path.join(root, "revlearn_base"))
    return root


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rev", help="git revision to compare against (e.g. beebf10)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--name", help="results file stem (default compare_<rev>_T<steps>)")
    a = ap.parse_args(argv)
    info = machine_info()
    root = export(a.rev, tempfile.mkdtemp(prefix="revlearn_base_"))
    sys.path.insert(0, root)

    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    import revlearn
    import revlearn_base
    from _jaxprob import Problem

    T = a.steps
    P = Problem([784, 50, 50, 50, 10], 200, 10_000)
    lr = [jnp.full((T,), 0.05) for _ in P.params0]
    l2 = jax.tree_util.tree_map(lambda w: jnp.full(w.shape, 1e-4), P.params0)
    args = (P.params0, lr, jnp.asarray(0.9), l2)

    def train(mod, method):
        return lambda p0, lr, m, l2: mod.sgd(P.loss_fn, p0, {"l2": l2}, lr=lr, momentum=m, steps=T,
                                             method=method)

    def hyper(mod):
        f = train(mod, mod.Reversible(min_momentum=0.9))
        return jax.jit(jax.grad(lambda *x: P.val_loss(f(*x)), argnums=(0, 1, 2, 3)))

    fs = {"plain": jax.jit(train(revlearn, revlearn.Unrolled())), "base": hyper(revlearn_base),
          "this": hyper(revlearn)}
    out = {k: jax.block_until_ready(f(*args)) for k, f in fs.items()}
    diff = max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(x)))
               for x, y in zip(jax.tree_util.tree_leaves(out["base"]), jax.tree_util.tree_leaves(out["this"])))
    times = {k: [] for k in fs}
    for _ in range(a.rounds):
        for k, f in fs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[k].append(time.perf_counter() - t0)
    t = {k: np.asarray(v) for k, v in times.items()}
    r = {"base_over_plain": float(np.median(t["base"] / t["plain"])),
         "this_over_plain": float(np.median(t["this"] / t["plain"])),
         "this_over_base": float(np.median(t["this"] / t["base"])),
         "median_s": {k: float(np.median(v)) for k, v in t.items()}, "rounds": times,
         "max_rel_diff": diff}
    md = "\n".join([
        f"# Reversible hypergradient: this tree against {a.rev} ({info['date']})", "",
        f"Machine: {info.get('cpu', '?')}, {info['cores']} cores, load average at start "
        f"{info.get('loadavg_at_start')}; jax {info['jax']}. Core benchmark problem, momentum 0.9, "
        f"T = {T}; {a.rounds} interleaved rounds (plain training, {a.rev}, this tree), compilation "
        "excluded; medians of each round's ratios.", "",
        "| | median (s) | / plain training |", "|---|---:|---:|",
        f"| plain training | {r['median_s']['plain']:.3f} | 1.00 |",
        f"| Reversible, {a.rev} | {r['median_s']['base']:.3f} | {r['base_over_plain']:.2f} |",
        f"| Reversible, this tree | {r['median_s']['this']:.3f} | {r['this_over_plain']:.2f} |", "",
        f"This tree / {a.rev}, per round: **{r['this_over_base']:.3f}x**. The two hypergradients "
        f"differ by at most {diff:.1e} (relative, per leaf)."]) + "\n"
    print(md)
    print("wrote", *save(a.name or f"compare_{a.rev}_T{T}", md, {"machine": info, "rev": a.rev,
                                                                   "steps": T, **r}))


if __name__ == "__main__":
    main()
