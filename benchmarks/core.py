"""Core benchmark: cost of one hypergradient by each revlearn method, for a given update rule.

Problem: 784-50-50-50-10 tanh MLP, float64 (or `--dtype float32`), minibatch 200 of 10,000 synthetic
MNIST-sized examples, per-layer per-step learning rates, a per-weight L2
hyperparameter, meta-objective the validation NLL at w_T. Inner optimiser
(`--optimizer`): momentum 0.9 with lr 0.05 (the default), or Adam (b1 0.9,
b2 0.999, eps 1e-8) with lr 1e-3. The hypergradient is jit(grad) w.r.t.
(params0, lr schedules, momentum or b1, L2).

For each T and method, one fresh child process compiles (warm-up excluded),
then alternates runs of the hypergradient and of plain training
(`revlearn.train(..., method=Unrolled())` without grad, same model, rule and
steps) and reports the ratio of the medians, plus its own peak RSS. A
separate child that only imports JAX and builds the data gives the baseline
RSS.

Usage:
    python benchmarks/core.py              # T in 100, 1000, 10000 + the large run
    python benchmarks/core.py --quick      # T in 100, 1000, no large run
    python benchmarks/core.py --steps 100 300 --no-large
    python benchmarks/core.py --steps 1000 10000 --no-cells --no-large --xla-memory   # XLA buffer plans only
    python benchmarks/core.py --optimizer adam --steps 100 1000 --no-large --name core_adam
    python benchmarks/core.py --dtype float32 --steps 1000 --no-large --name core_f32
    python benchmarks/core.py --steps 1000 --no-large --methods unrolled checkpointed \
        --budgets 0 0.1 0.5 1 --no-profile --name core_budget   # the time-memory curve
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import emit, fmt, machine_info, median_time, num_weights, peak_rss_mib, run_child, save  # noqa: E402

SIZES = [784, 50, 50, 50, 10]
BATCH = 200
N_TRAIN = 10_000
LR = 0.05
MOMENTUM = 0.9
ADAM_LR = 1e-3
B1, B2, EPS = 0.9, 0.999, 1e-8
L2 = 1e-4
LARGE_SIZES = [784, 1000, 200, 10]
LARGE_BATCH = 10
LARGE_T = 10_000
METHODS = ["reversible", "unrolled", "checkpointed"]
GIB = 2**30


# ============================================================================ child

def rule(optimizer: str, lr, decay):
    """The inner optimiser with the differentiated hyperparameters lr and decay (momentum, b1)."""
    import revlearn
    if optimizer == "adam":
        return revlearn.optim.adam(lr, b1=decay, b2=B2, eps=EPS)
    return revlearn.optim.momentum(lr, decay)


def _setup(sizes, batch, T, optimizer="momentum", dtype="float64"):
    import jax
    import jax.numpy as jnp
    import revlearn
    from _jaxprob import Problem, method_of

    P = Problem(sizes, batch, N_TRAIN, dtype=jnp.dtype(dtype))
    lr0 = ADAM_LR if optimizer == "adam" else LR
    lr = [jnp.full((T,), lr0) for _ in P.params0]            # per layer, per step
    l2 = jax.tree_util.tree_map(lambda w: jnp.full(w.shape, L2, w.dtype), P.params0)
    mom = jnp.asarray(B1 if optimizer == "adam" else MOMENTUM)

    def train(method):
        def f(p0, lr, mom, l2):
            return revlearn.train(P.loss_fn, p0, {"l2": l2}, optimizer=rule(optimizer, lr, mom),
                                  steps=T, method=method)
        return f

    def hyper(method):
        f = train(method)
        return jax.jit(jax.grad(lambda p0, lr, mom, l2: P.val_loss(f(p0, lr, mom, l2)), argnums=(0, 1, 2, 3)))

    args = (P.params0, lr, mom, l2)
    return P, args, train, hyper, method_of


def _autodiff(P, T, p0, l2, isolate: bool, vjp: bool):
    """The autodiff work of Reversible's two passes with everything else trivial: T steps of
    the gradient (and, with `vjp`, its VJP, the reverse pass's work), computed exactly as
    Reversible computes it (`revlearn.methods._reversible.gradient`): isolated, with this
    backend's default placement of the VJP, or inline; the weights move a little every step
    (so nothing is loop-invariant)."""
    import jax
    import jax.numpy as jnp
    import revlearn
    from revlearn._problem import split_inexact
    from revlearn._train import prepare
    from revlearn.methods._reversible import gradient

    p = prepare(P.loss_fn, p0, {"l2": l2}, lr=LR, momentum=MOMENTUM, steps=T)
    thf, tho = split_inexact(p.theta)
    how = revlearn.Reversible(isolate_gradient=isolate)

    def step(c, t):
        w, dw, dth = c
        (g, _), vjp_out, _ = gradient(how, p.problem, w, thf, tho, t,
                                      (lambda out: ((dw, jnp.zeros(())), None)) if vjp else None)
        if vjp:
            hw, hth = vjp_out
            dw = jax.tree_util.tree_map(lambda a, b: 0.9 * a + 1e-3 * b, dw, hw)
            dth = jax.tree_util.tree_map(jnp.add, dth, hth)
        return (jax.tree_util.tree_map(lambda a, b: a - 1e-12 * b, w, g), dw, dth), None

    init = (p.params0, jax.tree_util.tree_map(jnp.ones_like, p.params0),
            jax.tree_util.tree_map(jnp.zeros_like, thf))
    return jax.lax.scan(step, init, jnp.arange(T, dtype=jnp.int32))[0]


def child(spec: dict) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    kind = spec["kind"]
    if kind == "baseline":
        from _jaxprob import Problem
        P = Problem(SIZES, BATCH, N_TRAIN)
        jax.block_until_ready(P.X)
        emit({"kind": kind})
        return

    T, sizes, batch, reps = spec["T"], spec["sizes"], spec["batch"], spec["reps"]
    optimizer = spec.get("optimizer", "momentum")
    P, args, train, hyper, method_of = _setup(sizes, batch, T, optimizer, spec.get("dtype", "float64"))
    jax.block_until_ready(P.X)
    out = {"kind": kind, "T": T, "sizes": sizes, "batch": batch, "P": num_weights(sizes),
           "rss_after_setup_mib": peak_rss_mib()}
    block = jax.block_until_ready
    name = spec["method"]
    method = method_of(name, T, optimizer)

    if kind == "xla_memory":                               # XLA's own buffer plan for the hypergradient
        t0 = time.perf_counter()
        ma = hyper(method).lower(*args).compile().memory_analysis()
        out["compile_s"] = time.perf_counter() - t0
        out["xla_temp_mib"] = ma.temp_size_in_bytes / 2**20
        out["xla_args_out_mib"] = (ma.argument_size_in_bytes + ma.output_size_in_bytes) / 2**20
        emit(out)
        return

    if kind == "large":
        t0 = time.perf_counter()
        hg = hyper(method).lower(*args).compile()
        out["compile_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        g = block(hg(*args))
        out["hyper_s"] = time.perf_counter() - t0
        out["finite"] = bool(all(np.all(np.isfinite(np.asarray(l))) for l in jax.tree_util.tree_leaves(g)))
        emit(out)
        return

    plain = jax.jit(train(method_of("unrolled", T, optimizer)))
    hg = hyper(method)
    # the recomputation floor's extra work: T steps of the gradient and its VJP, isolated as
    # Reversible runs them (the floor is plain training plus these)
    hvps = jax.jit(lambda p0, l2: _autodiff(P, T, p0, l2, True, True)) if spec.get("floor") else None
    t0 = time.perf_counter()
    block(plain(*args))
    block(hg(*args))                                       # warm-up: compile + first run
    out["compile_and_first_run_s"] = time.perf_counter() - t0
    if hvps is not None:
        block(hvps(args[0], args[3]))
    ph, hh, fh = [], [], []
    for _ in range(reps):                                  # interleaved: same load for all
        ph.append(median_time(lambda: plain(*args), 1, block)[0])
        hh.append(median_time(lambda: hg(*args), 1, block)[0])
        if hvps is not None:
            fh.append(median_time(lambda: hvps(args[0], args[3]), 1, block)[0])
    out["plain_s"], out["hyper_s"] = float(np.median(ph)), float(np.median(hh))
    if fh:
        ph_, hh_, fh_ = map(np.asarray, (ph, hh, fh))
        out["floor_s"] = float(np.median(ph_ + fh_))
        out["x_floor"] = float(np.median(hh_ / (ph_ + fh_)))   # per round, then the median
        out["floor_hvps_all_s"] = fh
    stats = jax.devices()[0].memory_stats()                # accelerators only; None on CPU
    if stats and "peak_bytes_in_use" in stats:
        out["device_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
    out["plain_all_s"], out["hyper_all_s"] = ph, hh
    out["ratio"] = out["hyper_s"] / out["plain_s"]

    if name == "reversible" and T <= spec.get("profile_max_steps", 10**9) and spec.get("profile", True):
        # Where the time goes. Every part runs T steps; all are timed in the same rounds as
        # plain training and the hypergradient (interleaved, one run each per round), so the
        # machine's load drifts equally into all of them.
        import revlearn
        from revlearn.exact import _buffer, _grid

        fwd = jax.jit(train(method))                       # Reversible forward only (fixed point + buffer)

        # buffer ops alone: T steps of X <- X*d for each decay of the rule on every params leaf
        # (one value per leaf)
        shapes = [np.shape(l) for l in jax.tree_util.tree_leaves(P.params0)]
        decays = ([(MOMENTUM, _grid.MOMENTUM)] if optimizer == "momentum"
                  else [(B1, _grid.FINE), (B2, _grid.FINE)])

        @jax.jit
        def buf_only(Vs):
            heads = []
            for value, g in decays:
                n = round(value * g.denominator)
                coding = _buffer.coding(jnp.int64(n), g)
                cap = _buffer.capacity_words(T * int(_buffer.increments_np(n, g)), g)

                def step(c, _, coding=coding, g=g):
                    out = [_buffer.multiply(V, coding, b, g) for V, b in zip(*c)]
                    return ([o[0] for o in out], [o[1] for o in out]), None
                (Vs, bufs), _ = jax.lax.scan(
                    step, (Vs, [_buffer.empty(s, (), cap, g) for s in shapes]), None, length=T)
                heads += [b.head for b in bufs]
            return Vs, heads

        rng = np.random.default_rng(0)
        V0 = [jnp.asarray(rng.integers(-2**50, 2**50, s), jnp.int64) for s in shapes]

        parts = {"rev_forward_s": (fwd, args), "buffer_mul_only_s": (buf_only, (V0,))}
        for key, iso, vjp in (("grads_only_s", False, False), ("hvps_only_s", False, True),
                              ("iso_grads_only_s", True, False), ("iso_hvps_only_s", True, True)):
            parts[key] = ((hvps if iso and vjp and hvps is not None else   # the cell's floor, compiled
                           jax.jit(lambda p0, l2, iso=iso, vjp=vjp: _autodiff(P, T, p0, l2, iso, vjp))),
                          (args[0], args[3]))
        for f, a in parts.values():
            block(f(*a))
        rounds = {k: [] for k in ["plain_s", "hyper_s", *parts]}
        for _ in range(reps):
            rounds["plain_s"].append(median_time(lambda: plain(*args), 1, block)[0])
            rounds["hyper_s"].append(median_time(lambda: hg(*args), 1, block)[0])
            for k, (f, a) in parts.items():
                rounds[k].append(median_time(lambda: f(*a), 1, block)[0])
        prof = {k: float(np.median(v)) for k, v in rounds.items()}
        out["profile"] = prof
        out["rev_forward_s"] = prof["rev_forward_s"]
        out["rev_reverse_s"] = prof["hyper_s"] - prof["rev_forward_s"]
        for k in parts:
            if k != "rev_forward_s":
                out[k] = prof[k]
        out["floor_ratio"] = (prof["iso_grads_only_s"] + prof["iso_hvps_only_s"]) / prof["plain_s"]
        out["inline_floor_ratio"] = (prof["grads_only_s"] + prof["hvps_only_s"]) / prof["plain_s"]
        # the forward pass as it runs plus the reverse pass's autodiff alone: no work on the
        # reverse pass's fixed-point and buffer steps can bring the hypergradient below this.
        # Median of the per-round ratios: each round's parts ran within seconds of each other,
        # so this pairs them against the machine's drift
        pr = {k: np.asarray(v) for k, v in rounds.items()}
        out["reverse_bound_ratio"] = float(np.median(
            (pr["rev_forward_s"] + pr["iso_hvps_only_s"]) / pr["plain_s"]))
        out["round_ratios"] = {k: float(np.median(v / pr["plain_s"])) for k, v in pr.items()}
        # the recomputation floor: plain training plus T steps of the gradient and its VJP
        # (isolated, as Reversible runs them), and the hypergradient over it, per round
        out["recompute_floor_ratio"] = float(np.median((pr["plain_s"] + pr["iso_hvps_only_s"]) / pr["plain_s"]))
        out["hyper_over_floor"] = float(np.median(pr["hyper_s"] / (pr["plain_s"] + pr["iso_hvps_only_s"])))

        bu_fn = getattr(revlearn, "buffer_usage", None)
        if bu_fn is not None:
            bu = bu_fn(P.loss_fn, P.params0, {"l2": args[3]}, steps=T, method=method,
                       optimizer=rule(optimizer, args[1], float(args[2])))
            out["buffer"] = {"bits_per_weight_per_step": bu.bits_per_weight_per_step,
                             "ideal": bu.ideal_bits_per_weight_per_step, "ratio": bu.ratio,
                             "capacity_words": bu.capacity_words, "max_words_used": bu.max_words_used,
                             "per_decay": [list(x) for x in bu.per_decay],
                             "via": "revlearn.buffer_usage"}
        else:
            out["buffer"] = {"error": "revlearn.buffer_usage not available"}
    emit(out)


# ============================================================================ parent

def unrolled_estimate_gib(measured: dict, T_new: int, baseline_mib: float) -> float:
    """Linear extrapolation of (peak - setup RSS) in T from a measured Unrolled cell."""
    per_step = (measured["peak_rss_mib"] - measured["rss_after_setup_mib"]) / measured["T"]
    return (baseline_mib + per_step * T_new) / 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T in {100, 1000} and no large run")
    ap.add_argument("--steps", type=int, nargs="+", help="override the list of T")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per cell (median reported)")
    ap.add_argument("--no-large", action="store_true", help="skip the ~10^6-weight Reversible run")
    ap.add_argument("--large-steps", type=int, default=LARGE_T, help="steps of the large run")
    ap.add_argument("--mem-limit-gib", type=float, default=20.0,
                    help="skip a cell whose estimated peak RSS exceeds this")
    ap.add_argument("--no-cells", action="store_true", help="skip the timed cells (e.g. with --xla-memory)")
    ap.add_argument("--xla-memory", action="store_true",
                    help="also report XLA's buffer plan (temp bytes) of each hypergradient program")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS,
                    help="methods to time (default all three)")
    ap.add_argument("--profile-max-steps", type=int, default=10**9,
                    help="profile Reversible only at T up to this")
    ap.add_argument("--optimizer", choices=["momentum", "adam"], default="momentum",
                    help="inner optimiser (default momentum, the paper's)")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                    help="the model's dtype (params, data, gradient); Reversible's state is fixed point either way")
    ap.add_argument("--budgets", type=float, nargs="+", default=[],
                    help="also time Reversible(budget=round(f T)) for each fraction f (e.g. 0 0.1 0.5 1), "
                         "and draw their time-memory curve")
    ap.add_argument("--no-floor", action="store_true",
                    help="skip timing the recomputation floor beside every cell")
    ap.add_argument("--no-profile", action="store_true", help="skip Reversible's where-the-time-goes rounds")
    ap.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="MLP layer sizes of the cells")
    ap.add_argument("--batch", type=int, default=BATCH, help="minibatch of the cells")
    ap.add_argument("--name", help="results file stem (default core, or core_quick with --quick)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(json.loads(a.child))
        return

    steps = a.steps or ([100, 1000] if a.quick else [100, 1000, 10_000])
    large = not (a.quick or a.no_large)
    me = os.path.abspath(__file__)
    info = machine_info()
    print(json.dumps(info), flush=True)
    base = run_child(me, {"kind": "baseline"}, 600)
    print("baseline", base, flush=True)
    base_mib = base.get("peak_rss_mib", float("nan"))
    cells = []
    measured_unrolled = None
    methods = a.methods + [f"reversible@{f:g}" for f in a.budgets]
    for T in ([] if a.no_cells else sorted(steps)):
        for m in methods:
            spec = {"kind": "cell", "method": m, "T": T, "sizes": a.sizes, "batch": a.batch, "reps": a.reps,
                    "optimizer": a.optimizer, "profile_max_steps": a.profile_max_steps,
                    "dtype": a.dtype, "floor": not a.no_floor, "profile": not a.no_profile}
            if m == "unrolled" and measured_unrolled is not None:
                est = unrolled_estimate_gib(measured_unrolled, T, base_mib)
                if est > a.mem_limit_gib:
                    r = {"skipped": f"estimated peak RSS {est:.1f} GiB > {a.mem_limit_gib:.0f} GiB "
                                    f"(linear in T from the T={measured_unrolled['T']} cell)",
                         "estimated_peak_gib": est}
                    cells.append({**spec, **r})
                    print(T, m, r, flush=True)
                    continue
            r = run_child(me, spec, 3000)
            if m == "unrolled" and "error" not in r:
                measured_unrolled = r
            cells.append({**spec, **r})
            print(T, m, {k: v for k, v in r.items() if not k.endswith("_all_s")}, flush=True)

    xla = []
    if a.xla_memory:
        for T in sorted(steps):
            for m in a.methods:
                spec = {"kind": "xla_memory", "method": m, "T": T, "sizes": a.sizes, "batch": a.batch, "reps": 1,
                        "optimizer": a.optimizer}
                xla.append({**spec, **run_child(me, spec, 3000)})
                print("xla", xla[-1], flush=True)

    large_r = None
    if large:
        P = num_weights(LARGE_SIZES)
        spec = {"kind": "large", "method": "reversible", "T": a.large_steps, "sizes": LARGE_SIZES,
                "batch": LARGE_BATCH, "reps": 1, "optimizer": a.optimizer}
        large_r = {**spec, **run_child(me, spec, 5400)}
        # Unrolled would store, per step, at least w and v (2 x 8 bytes per weight) plus the
        # gradient residuals (tanh activations, minibatch); count just w and v: a lower bound.
        large_r["unrolled_lower_bound_gib"] = a.large_steps * P * 16 / GIB
        print("large", large_r, flush=True)

    name = a.name or ("core" + ("_quick" if a.quick else ""))
    png = plot_budget(cells, name) if a.budgets else None
    md = render(info, base, cells, large_r, xla, a.optimizer, a.dtype, png, a.sizes, a.batch)
    print(md)
    paths = save(name, md,
                 {"machine": info, "baseline": base, "cells": cells, "large": large_r, "xla_memory": xla,
                  "config": {"sizes": a.sizes, "batch": a.batch, "n_train": N_TRAIN, "optimizer": a.optimizer,
                             "lr": ADAM_LR if a.optimizer == "adam" else LR,
                             "momentum": MOMENTUM, "b1": B1, "b2": B2, "eps": EPS, "l2": L2, "reps": a.reps,
                             "dtype": a.dtype}})
    print("wrote", *paths)


def _kept(method: str):
    """The budget fraction of a "reversible@f" cell, else None."""
    return float(method.split("@")[1]) if method.startswith("reversible@") else None


def plot_budget(cells, name: str) -> str:
    """Time against memory of Reversible(budget=f T) per T, with Unrolled and Checkpointed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    Ts = sorted({c["T"] for c in cells if _kept(c["method"]) is not None and "hyper_s" in c})
    fig, axes = plt.subplots(1, len(Ts), figsize=(5.2 * len(Ts), 4.2), squeeze=False)
    for ax, T in zip(axes[0], Ts):
        ok = [c for c in cells if c["T"] == T and "hyper_s" in c]
        mem = lambda c: c["peak_rss_mib"] - c["rss_after_setup_mib"]
        kept = sorted((c for c in ok if _kept(c["method"]) is not None), key=lambda c: _kept(c["method"]))
        ax.plot([mem(c) for c in kept], [c["hyper_s"] for c in kept], "o-", color="C0",
                label="Reversible(budget = f T)")
        for c in kept:
            ax.annotate(f"{_kept(c['method']):.0%}", (mem(c), c["hyper_s"]), textcoords="offset points",
                        xytext=(6, 4), fontsize=9, color="C0")
        for m, style in (("unrolled", "s"), ("checkpointed", "^")):
            for c in (c for c in ok if c["method"] == m):
                ax.plot(mem(c), c["hyper_s"], style, color="C3" if m == "unrolled" else "C2",
                        label=m.capitalize())
        floors = [c["floor_s"] for c in ok if "floor_s" in c]
        if floors:
            ax.axhline(float(np.median(floors)), color="0.5", ls="--", lw=1,
                       label="recomputation floor")
        ax.set_xscale("log")
        ax.set_xlabel("peak RSS above setup (MiB, log scale)")
        ax.set_ylabel("one hypergradient (s)")
        ax.set_title(f"T = {T}")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    png = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name + "_budget.png")
    fig.savefig(png, dpi=110)
    return png


def render(info, base, cells, large_r, xla=(), optimizer="momentum", dtype="float64", png=None,
           sizes=SIZES, batch=BATCH) -> str:
    inner = (f"Adam (b1 {B1}, b2 {B2}, eps {EPS}), per-layer per-step lr {ADAM_LR}"
             if optimizer == "adam" else f"momentum {MOMENTUM}, per-layer per-step lr {LR}")
    wrt = "b1" if optimizer == "adam" else "momentum"
    L = [f"# revlearn core benchmark ({info['date']})", "",
         f"Machine: {info.get('cpu', '?')}, {info['cores']} cores, {info.get('ram_gib', '?')} GiB RAM; "
         f"load average at start {info.get('loadavg_at_start')}; "
         f"python {info['python']}, jax {info['jax']}, jaxlib {info['jaxlib']}, revlearn {info['revlearn']}; "
         f"JAX device {info.get('jax_device', '?')}. "
         "The cores are shared with other work, so timings carry noise.", "",
         f"Problem: {'-'.join(map(str, sizes))} tanh MLP ({num_weights(sizes):,} weights), {dtype}, batch {batch}, "
         f"{inner}, per-weight L2 {L2}; hypergradient = "
         f"jit(grad) of the validation NLL w.r.t. (params0, lr, {wrt}, L2). Plain training = "
         "jit of `revlearn.train(..., method=Unrolled())` without grad. Times are medians of "
         "interleaved runs after a warm-up run (compilation excluded).", "",
         f"Baseline RSS (child that imports JAX and builds the data): "
         f"{fmt(base.get('peak_rss_mib'), '.0f')} MiB."]
    if cells:
        L += ["", "floor = plain training + T steps of the gradient and its VJP (isolated, as Reversible "
              "runs them), timed in the same rounds as the cell; x floor = the median over rounds of "
              "hypergradient / floor. `reversible@f`: `Reversible(budget=round(f T))`.", "",
              "| T | method | hypergradient (s) | plain training (s) | ratio | floor (s) | x floor "
              "| peak RSS (MiB) | peak - setup RSS (MiB) | note |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for c in cells:
            if "skipped" in c or "error" in c:
                L.append(f"| {c['T']} | {c['method']} | - | - | - | - | - | - | - | {c.get('skipped') or c.get('error')} |")
                continue
            L.append(f"| {c['T']} | {c['method']} | {c['hyper_s']:.3f} | {c['plain_s']:.3f} | {c['ratio']:.2f} | "
                     f"{fmt(c.get('floor_s'), '.3f')} | {fmt(c.get('x_floor'), '.3f')} | "
                     f"{c['peak_rss_mib']:.0f} | {c['peak_rss_mib'] - c['rss_after_setup_mib']:.0f} | "
                     + (f"device peak {c['device_peak_mib']:,.0f} MiB |" if "device_peak_mib" in c else "|"))
        if png:
            L += ["", f"Time against memory of the budgets: `{os.path.basename(png)}`."]
        L += ["", "Memory ratio Unrolled / Reversible (peak RSS; and peak minus the child's RSS after setup):", ""]
        for T in sorted({c["T"] for c in cells}):
            r = next((c for c in cells if c["T"] == T and c["method"] == "reversible" and "peak_rss_mib" in c), None)
            u = next((c for c in cells if c["T"] == T and c["method"] == "unrolled"), None)
            if r and u and "peak_rss_mib" in u:
                L.append(f"- T={T}: {u['peak_rss_mib'] / r['peak_rss_mib']:.1f}x total, "
                         f"{(u['peak_rss_mib'] - u['rss_after_setup_mib']) / max(r['peak_rss_mib'] - r['rss_after_setup_mib'], 1):.1f}x above setup")
            elif r and u:
                L.append(f"- T={T}: Unrolled not run ({u.get('skipped') or u.get('error')})")
        L += ["", "Buffer size (Reversible forward pass, `revlearn.buffer_usage`):", "",
              "| T | bits / weight / step | minimum mean_t sum_decays log2(1/d_t) | ratio | capacity words | max words used |",
              "|---:|---:|---:|---:|---:|---:|"]
        for c in cells:
            b = c.get("buffer")
            if b and "ratio" in b:
                L.append(f"| {c['T']} | {b['bits_per_weight_per_step']:.5f} | {b['ideal']:.5f} | {b['ratio']:.4f} | "
                         f"{b['capacity_words']} | {b['max_words_used']} |")
            elif b:
                L.append(f"| {c['T']} | {b.get('error')} | | | | |")
        L += ["", "Where Reversible's time goes (seconds for T steps; one more round of runs in the same "
              "child, every part timed once per round beside plain training and the hypergradient; "
              "medians):", "",
              "| T | plain training | Rev. hypergradient | Rev. forward only | Rev. reverse (hypergradient - forward) "
              "| buffer V*gamma only | gradients | gradient+VJP | gradients, isolated | gradient+VJP, isolated "
              "| floor, inline | floor, isolated | bound | Rev. hypergradient / plain |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in cells:
            pr = c.get("profile") if c["method"] == "reversible" else None
            if pr:
                L.append(f"| {c['T']} | {pr['plain_s']:.3f} | {pr['hyper_s']:.3f} | {pr['rev_forward_s']:.3f} | "
                         f"{pr['hyper_s'] - pr['rev_forward_s']:.3f} | {pr['buffer_mul_only_s']:.3f} | "
                         f"{pr['grads_only_s']:.3f} | {pr['hvps_only_s']:.3f} | {pr['iso_grads_only_s']:.3f} | "
                         f"{pr['iso_hvps_only_s']:.3f} | {c['inline_floor_ratio']:.2f}x | {c['floor_ratio']:.2f}x | "
                         f"{fmt(c.get('reverse_bound_ratio'), '.2f')}{'x' if 'reverse_bound_ratio' in c else ''} | "
                         f"{pr['hyper_s'] / pr['plain_s']:.2f}x |")
        L += ["", "The autodiff parts run T steps of the loss gradient (and of the gradient plus the VJP "
              "of the gradient, the reverse pass's autodiff work) with a trivial update, inline or "
              "\"isolated\" as Reversible runs them (`isolate_gradient=True`: the gradient inside a "
              "`lax.cond`, the reverse pass's VJP inside it on CPU and beside it elsewhere). "
              "floor = (gradients + gradient+VJP) / plain "
              "training: what the hypergradient would cost if the fixed-point and buffer work were "
              "free. bound = (Rev. forward only + gradient+VJP, isolated) / plain training, the median "
              "over rounds of each round's ratio: the forward pass as it runs plus the reverse "
              "pass's autodiff alone, a floor for any work on the reverse pass's fixed-point and "
              "buffer steps."]
    fl = [c for c in cells if c["method"] == "reversible" and "hyper_over_floor" in c]
    if fl:
        L += ["", "Against the recomputation floor (plain training + T steps of the gradient and its "
              "VJP, isolated as Reversible runs them; medians of per-round ratios):", "",
              "| T | floor / plain training | Rev. hypergradient / plain | Rev. hypergradient / floor |",
              "|---:|---:|---:|---:|"]
        for c in fl:
            L.append(f"| {c['T']} | {c['recompute_floor_ratio']:.2f}x | {c['round_ratios']['hyper_s']:.2f}x | "
                     f"{c['hyper_over_floor']:.3f}x |")
    rr = [c for c in cells if c["method"] == "reversible" and c.get("round_ratios")]
    if rr:
        L += ["", "The same rounds as ratios to plain training, each round's parts divided by that "
              "round's plain training (medians over rounds):", "",
              "| T | Rev. hypergradient | Rev. forward only | gradients, isolated | "
              "gradient+VJP, isolated | buffer V*gamma only | bound |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
        for c in rr:
            r = c["round_ratios"]
            L.append(f"| {c['T']} | {r['hyper_s']:.2f}x | {r['rev_forward_s']:.2f}x | "
                     f"{r['iso_grads_only_s']:.2f}x | {r['iso_hvps_only_s']:.2f}x | "
                     f"{r['buffer_mul_only_s']:.3f}x | {c['reverse_bound_ratio']:.2f}x |")
    if xla:
        L += ["", "XLA buffer plan of the compiled hypergradient (`compiled.memory_analysis()`, MiB):", "",
              "| T | method | temp buffers | arguments + outputs |", "|---:|---|---:|---:|"]
        for x in xla:
            L.append(f"| {x['T']} | {x['method']} | {fmt(x.get('xla_temp_mib'), '.1f')} | "
                     f"{fmt(x.get('xla_args_out_mib'), '.1f')} |")
    if large_r:
        L += ["", f"Largest run: Reversible, {'-'.join(map(str, large_r['sizes']))} MLP "
                  f"({num_weights(large_r['sizes']):,} weights), batch {large_r['batch']}, T={large_r['T']}: "]
        if "error" in large_r:
            L.append(f"failed: {large_r['error']}")
        else:
            L.append(f"one hypergradient {large_r['hyper_s']:.1f} s (compile {large_r['compile_s']:.1f} s, excluded), "
                     f"peak RSS {large_r['peak_rss_mib']:.0f} MiB (RSS after setup {large_r['rss_after_setup_mib']:.0f} MiB), "
                     f"finite: {large_r['finite']}.")
        L.append(f"Unrolled at this size would need at least {large_r['unrolled_lower_bound_gib']:.0f} GiB "
                 "(w and v, 8 bytes each, per weight per step; residuals of the gradient come on top), "
                 f"against {info.get('ram_gib', '?')} GiB of RAM"
                 + (f" and {info['jax_device_gib']} GiB of device memory" if info.get("jax_device_gib") else "")
                 + " here; not attempted.")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
