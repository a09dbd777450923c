"""Bit-exactness of the reversal on this machine's JAX device, per placement of the VJP.

For the core benchmark's MLP (784-50-50-50-10, batch 200) and the large one
(784-1000-200-10, batch 10), float64: `revlearn.check_reversal` (train T steps
in fixed point, reverse them, compare with the start bit for bit) with
`Reversible(vjp_in_branch=True)` (the gradient's VJP inside the isolated
branch) and `False` (the branch is the forward pass's gradient alone).

Usage: python benchmarks/exactness.py [--steps 300]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import machine_info, save  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    a = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import revlearn
    from _jaxprob import Problem

    info = machine_info()
    rows = []
    for sizes, batch in (([784, 50, 50, 50, 10], 200), ([784, 1000, 200, 10], 10)):
        P = Problem(sizes, batch, 10_000)
        l2 = jax.tree_util.tree_map(lambda w: jnp.full(w.shape, 1e-4), P.params0)
        for in_branch in (True, False):
            rc = revlearn.check_reversal(P.loss_fn, P.params0, {"l2": l2}, lr=0.05, momentum=0.9,
                                         steps=a.steps,
                                         method=revlearn.Reversible(vjp_in_branch=in_branch))
            rows.append({"sizes": sizes, "batch": batch, "T": a.steps, "vjp_in_branch": in_branch,
                         "weights_exact": rc.weights_exact, "velocity_exact": rc.velocity_exact,
                         "buffer_empty": rc.buffer_empty, "max_weight_error_units": rc.max_weight_error_ulps})
            print(rows[-1], flush=True)
    L = [f"# Reversal exactness on {info.get('jax_device')} ({info['date']})", "",
         f"jax {info['jax']}, revlearn {info['revlearn']}; float64, lr 0.05, momentum 0.9, "
         f"per-weight L2 1e-4, T = {a.steps}.", "",
         "| net | batch | vjp_in_branch | weights exact | velocity exact | buffer empty | max weight error (units of 2^-52) |",
         "|---|---:|---|---|---|---|---:|"]
    for r in rows:
        L.append(f"| {'-'.join(map(str, r['sizes']))} | {r['batch']} | {r['vjp_in_branch']} | "
                 f"{r['weights_exact']} | {r['velocity_exact']} | {r['buffer_empty']} | "
                 f"{r['max_weight_error_units']} |")
    md = "\n".join(L) + "\n"
    print(md)
    backend = info.get("jax_device", "cpu").split(":")[0]
    print("wrote", *save(f"exactness_{backend}", md, {"machine": info, "rows": rows}))


if __name__ == "__main__":
    main()
