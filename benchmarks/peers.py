"""revlearn against peer libraries on one inner problem (issue 7).

Inner problem, defined identically in every library: tanh MLP (784-100-10 or
784-1000-1000-10) on synthetic MNIST-sized data (10,000 training examples,
minibatch 100 taken in order, 1,000 validation examples), SGD with momentum
0.9 for T steps; loss = mean NLL + sum_i l2_i w_i^2; meta-objective = mean
validation NLL at w_T. Hyperparameters: a per-step learning rate alpha [T] and
a per-weight L2 (every weight and bias). Same data and same initial weights
(numpy, seeded) everywhere.

Momentum convention. revlearn: v <- m v - (1 - m) g; w <- w + alpha_t v, with
m rounded to n/65536 (0.9 -> 58982/65536). PyTorch-style (torch manual,
TorchOpt, higher): b <- m b + g (b_1 = g_0, which is the same as b_0 = 0);
w <- w - lr_t b. With v = -(1 - m) b both are the same recursion when
lr_t = alpha_t (1 - m), so every torch-side library gets lr_t = alpha_t (1 - m)
as a differentiable function of alpha and the rounded m. Libraries whose
optimizer holds one lr get it set every step (TorchOpt: `torchopt.sgd(lr=1,
momentum=m)` and the update scaled by lr_t; higher: `diffopt.step(loss,
override={"lr": [lr_t]})`).

Adam (`--optimizer adam`). Same problem, data, init, hyperparameters (a
per-step learning rate lr [T] and the per-weight L2) and meta-objective; the
inner optimizer is Adam as in optax.adam: m <- b1 m + (1 - b1) g;
s <- b2 s + (1 - b2) g^2; k = t + 1; m^ = m / (1 - b1^k); s^ = s / (1 - b2^k);
w <- w - lr_t m^ / (sqrt(s^) + eps), lr_t = ADAM_LR, b1 = 0.9, b2 = 0.999,
eps = 1e-8, no weight decay (the L2 is in the loss). revlearn applies b1 and b2
rounded to n/2^24, so every peer gets those rounded values (B1_Q, B2_Q).
Conventions mapped per library:
  - torch manual: the formula above written out with autograd
    (`create_graph=True`); bias corrections in Python floats.
  - TorchOpt: `torchopt.MetaAdam(net, lr=schedule, betas=(B1_Q, B2_Q), eps)`,
    eps outside the sqrt and eps_root = 0 (same as optax); the schedule returns
    lr[count], a differentiable entry of the lr tensor. TorchOpt computes the
    bias correction 1 - b^count as `pow(b, count)` with an int64 count tensor,
    which lands in torch's *default* dtype (float32) even for float64 moments
    (float32 rounding, up to ~1e-7 relative, in every update; 7e-6 in the
    hypergradient at T = 30); the cell therefore sets
    torch's default dtype to the cell's dtype.
  - higher: `innerloop_ctx(net, torch.optim.Adam(...))`. higher's
    DifferentiableAdam uses the older torch formula
    w <- w - lr sqrt(1 - b2^k) / (1 - b1^k) m / (sqrt(s) + eps), i.e. eps
    effectively eps / sqrt(1 - b2^k) beside sqrt(s^); the cell overrides eps
    every step with eps sqrt(1 - b2^k) (and lr with lr_t):
    `diffopt.step(loss, override={"lr": [lr_t], "eps": [eps_k]})`.
  - optax (JAX, not revlearn): `optax.scale_by_adam` in a `lax.scan`,
    differentiated by `jax.grad` (unrolled).

Every cell computes the hypergradient (d alpha, d l2) and compares it with
the reference, revlearn Unrolled float64 (Checkpointed float64, the same float
arithmetic recomputed, where Unrolled does not fit) with the same optimizer,
on the same data and init:
rel = max(||d alpha - ref|| / ||ref||, ||d l2 - ref|| / ||ref||).

Usage:
    python benchmarks/peers.py --quick             # 784-100-10, T=50, 4 libraries: a smoke check
    python benchmarks/peers.py                     # all cells (long)
    python benchmarks/peers.py --arch small --steps 100 1000
    python benchmarks/peers.py --device gpu        # JAX cells on a GPU (fails if none)
    python benchmarks/peers.py --optimizer adam --arch small --steps 100 1000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from _common import (RESULTS, emit, fmt, init_params, machine_info, make_data, median_time,  # noqa: E402
                     num_weights, peak_rss_mib, run_child, save)

ARCHS = {"small": [784, 100, 10], "large": [784, 1000, 1000, 10]}
BATCH = 100
N_TRAIN = 10_000
N_VAL = 1000
LR = 0.05          # alpha; chaos check: see README
MOMENTUM = 0.9
M_Q = round(MOMENTUM * 65536) / 65536
L2 = 1e-4
LIBS = ["revlearn-reversible-f64", "revlearn-unrolled-f64", "revlearn-checkpointed-f64",
        "revlearn-reversible-f32", "revlearn-unrolled-f32", "revlearn-checkpointed-f32",
        "torch-manual-f64", "torch-manual-f32", "torchopt-f64", "torchopt-f32", "higher-f64", "higher-f32"]
QUICK_LIBS = ["revlearn-reversible-f64", "revlearn-unrolled-f64", "torch-manual-f64", "torchopt-f64"]
# Adam inner loop (--optimizer adam)
ADAM_LR = 1e-3     # lr_t for every t
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8
B1_Q = round(ADAM_B1 * 2**24) / 2**24   # as revlearn applies them (grid n/2^24)
B2_Q = round(ADAM_B2 * 2**24) / 2**24
ADAM_LIBS = ["revlearn-reversible-adam-f64", "revlearn-unrolled-adam-f64", "revlearn-checkpointed-adam-f64",
             "revlearn-unrolled-adam-f32", "revlearn-checkpointed-adam-f32", "optax-adam-f64",
             "torch-manual-adam-f64", "torch-manual-adam-f32", "torchopt-adam-f64", "higher-adam-f64"]
ADAM_QUICK_LIBS = ["revlearn-reversible-adam-f64", "revlearn-unrolled-adam-f64", "torch-manual-adam-f64",
                   "torchopt-adam-f64"]
QUICK_T = 50
GIB = 2**30


# ============================================================================ children

def jax_child(spec):
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import revlearn
    from _jaxprob import Problem, method_of

    if spec["device"] == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit(f"--device gpu: JAX backend is {jax.default_backend()}")
    parts = spec["lib"].split("-")
    dt, adam = parts[-1], "adam" in parts
    dtype = jnp.float64 if dt == "f64" else jnp.float32
    T = spec["T"]
    P = Problem(spec["sizes"], BATCH, N_TRAIN, N_VAL, dtype=dtype)
    alpha = jnp.full((T,), ADAM_LR if adam else LR, dtype)
    l2 = jax.tree_util.tree_map(lambda w: jnp.full(w.shape, L2, dtype), P.params0)

    if parts[0] == "optax":
        import optax
        opt = optax.scale_by_adam(b1=B1_Q, b2=B2_Q, eps=ADAM_EPS)

        def meta(alpha, l2):
            def body(carry, xs):
                w, st = carry
                t, lr_t = xs
                g = jax.grad(P.loss_fn)(w, {"l2": l2}, t)
                u, st = opt.update(g, st, w)
                return (jax.tree_util.tree_map(lambda a, b: a - lr_t * b, w, u), st), None
            (wT, _), _ = jax.lax.scan(body, (P.params0, opt.init(P.params0)), (jnp.arange(T), alpha))
            return P.val_loss(wT)
    elif adam:
        kind = parts[1]
        method = {"reversible": revlearn.Reversible, "unrolled": revlearn.Unrolled,
                  "checkpointed": revlearn.Checkpointed}[kind]()

        def meta(alpha, l2):
            opt = revlearn.optim.adam(alpha, b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS)
            wT = revlearn.train(P.loss_fn, P.params0, {"l2": l2}, optimizer=opt, steps=T, method=method)
            return P.val_loss(wT)
    else:
        method = method_of(parts[1], T)

        def meta(alpha, l2):
            wT = revlearn.sgd(P.loss_fn, P.params0, {"l2": l2}, lr=alpha, momentum=MOMENTUM, steps=T,
                              method=method)
            return P.val_loss(wT)

    f = jax.jit(jax.grad(meta, argnums=(0, 1)))
    setup = peak_rss_mib()
    t0 = time.perf_counter()
    g = jax.block_until_ready(f(alpha, l2))
    first = time.perf_counter() - t0
    t, ts = median_time(lambda: f(alpha, l2), spec["reps"], jax.block_until_ready)
    dalpha = np.asarray(g[0], np.float64)
    dl2 = np.concatenate([np.asarray(l, np.float64).ravel() for l in jax.tree_util.tree_leaves(g[1])])
    extra = {}
    if spec["device"] == "gpu":
        extra["device_peak_mib"] = jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0) / 2**20
    return dalpha, dl2, {"time_s": t, "times_s": ts, "compile_and_first_s": first,
                         "rss_after_setup_mib": setup, **extra}


def torch_child(spec):
    import torch
    torch.set_num_threads(2)
    lib, dt = spec["lib"].rsplit("-", 1)
    dtype = torch.float64 if dt == "f64" else torch.float32
    # TorchOpt's Adam bias correction pow(b, int64 count) is computed in the default dtype
    torch.set_default_dtype(dtype)
    T, sizes = spec["T"], spec["sizes"]
    X, y, Xv, yv = make_data(N_TRAIN, N_VAL, sizes[0], sizes[-1], 0)
    X, Xv = torch.tensor(X, dtype=dtype), torch.tensor(Xv, dtype=dtype)
    y, yv = torch.tensor(y, dtype=torch.long), torch.tensor(yv, dtype=torch.long)
    p0 = [torch.tensor(a, dtype=dtype) for Wb in init_params(sizes) for a in Wb]
    nb = N_TRAIN // BATCH
    m = M_Q

    def mlp(ps, x):
        h = x
        for i in range(0, len(ps), 2):
            h = h @ ps[i] + ps[i + 1]
            if i < len(ps) - 2:
                h = torch.tanh(h)
        return h

    def nll(logits, yy):
        return torch.nn.functional.cross_entropy(logits, yy)

    def batch(t):
        i = (t % nb) * BATCH
        return X[i:i + BATCH], y[i:i + BATCH]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ps = torch.nn.ParameterList([torch.nn.Parameter(p.clone()) for p in p0])

        def forward(self, x):
            return mlp(list(self.ps), x)

    def run():
        alpha = torch.full((T,), ADAM_LR if lib.endswith("-adam") else LR, dtype=dtype, requires_grad=True)
        l2 = [torch.full(p.shape, L2, dtype=dtype, requires_grad=True) for p in p0]
        if lib == "torch-manual-adam":
            ws = [p.clone().requires_grad_(True) for p in p0]
            ms = [torch.zeros_like(p) for p in p0]
            ss = [torch.zeros_like(p) for p in p0]
            for t in range(T):
                xb, yb = batch(t)
                loss = nll(mlp(ws, xb), yb) + sum((l * w * w).sum() for l, w in zip(l2, ws))
                gs = torch.autograd.grad(loss, ws, create_graph=True)
                ms = [B1_Q * m_ + (1 - B1_Q) * g for m_, g in zip(ms, gs)]
                ss = [B2_Q * s_ + (1 - B2_Q) * (g * g) for s_, g in zip(ss, gs)]
                c1, c2 = 1 - B1_Q ** (t + 1), 1 - B2_Q ** (t + 1)
                ws = [w - alpha[t] * ((m_ / c1) / (torch.sqrt(s_ / c2) + ADAM_EPS))
                      for w, m_, s_ in zip(ws, ms, ss)]
            val = nll(mlp(ws, Xv), yv)
        elif lib == "torchopt-adam":
            import torchopt
            net = Net()
            opt = torchopt.MetaAdam(net, lr=lambda count: alpha[count], betas=(B1_Q, B2_Q), eps=ADAM_EPS,
                                    eps_root=0.0)
            for t in range(T):
                xb, yb = batch(t)
                ps = list(net.ps)
                loss = nll(mlp(ps, xb), yb) + sum((l * w * w).sum() for l, w in zip(l2, ps))
                opt.step(loss)
            val = nll(net(Xv), yv)
        elif lib == "higher-adam":
            import higher
            net = Net()
            opt = torch.optim.Adam(net.parameters(), lr=ADAM_LR, betas=(B1_Q, B2_Q), eps=ADAM_EPS)
            with higher.innerloop_ctx(net, opt, copy_initial_weights=True) as (fnet, diffopt):
                for t in range(T):
                    xb, yb = batch(t)
                    ps = list(fnet.parameters())
                    loss = nll(fnet(xb), yb) + sum((l * w * w).sum() for l, w in zip(l2, ps))
                    # higher's eps sits beside sqrt(s), not sqrt(s^): eps sqrt(1 - b2^k) maps it
                    eps_k = ADAM_EPS * math.sqrt(1 - B2_Q ** (t + 1))
                    diffopt.step(loss, override={"lr": [alpha[t]], "eps": [eps_k]})
                val = nll(fnet(Xv), yv)
        elif lib == "torch-manual":
            ws = [p.clone().requires_grad_(True) for p in p0]
            bufs = None
            for t in range(T):
                xb, yb = batch(t)
                loss = nll(mlp(ws, xb), yb) + sum((l * w * w).sum() for l, w in zip(l2, ws))
                gs = torch.autograd.grad(loss, ws, create_graph=True)
                bufs = list(gs) if bufs is None else [m * b + g for b, g in zip(bufs, gs)]
                lr_t = alpha[t] * (1 - m)
                ws = [w - lr_t * b for w, b in zip(ws, bufs)]
            val = nll(mlp(ws, Xv), yv)
        elif lib == "torchopt":
            import torchopt
            ws = tuple(p.clone().requires_grad_(True) for p in p0)
            opt = torchopt.sgd(lr=1.0, momentum=m)         # update = -b; scaled by lr_t below
            state = opt.init(ws)
            for t in range(T):
                xb, yb = batch(t)
                loss = nll(mlp(ws, xb), yb) + sum((l * w * w).sum() for l, w in zip(l2, ws))
                gs = torch.autograd.grad(loss, ws, create_graph=True)
                upd, state = opt.update(gs, state, inplace=False)
                lr_t = alpha[t] * (1 - m)
                ws = tuple(w + lr_t * u for w, u in zip(ws, upd))
            val = nll(mlp(ws, Xv), yv)
        elif lib == "higher":
            import higher
            net = Net()
            opt = torch.optim.SGD(net.parameters(), lr=LR * (1 - m), momentum=m)
            with higher.innerloop_ctx(net, opt, copy_initial_weights=True) as (fnet, diffopt):
                for t in range(T):
                    xb, yb = batch(t)
                    ps = list(fnet.parameters())
                    loss = nll(fnet(xb), yb) + sum((l * w * w).sum() for l, w in zip(l2, ps))
                    diffopt.step(loss, override={"lr": [alpha[t] * (1 - m)]})
                val = nll(fnet(Xv), yv)
        else:
            raise ValueError(lib)
        g = torch.autograd.grad(val, [alpha] + l2)
        return g

    setup = peak_rss_mib()
    t0 = time.perf_counter()
    g = run()
    first = time.perf_counter() - t0
    t, ts = median_time(run, spec["reps"])
    dalpha = g[0].detach().double().numpy()
    dl2 = np.concatenate([x.detach().double().numpy().ravel() for x in g[1:]])
    return dalpha, dl2, {"time_s": t, "times_s": ts, "compile_and_first_s": first, "rss_after_setup_mib": setup}


def child(spec):
    if spec["lib"] == "baseline-jax":
        import jax
        jax.config.update("jax_enable_x64", True)
        from _jaxprob import Problem
        jax.block_until_ready(Problem(spec["sizes"], BATCH, N_TRAIN, N_VAL).X)
        emit({})
        return
    if spec["lib"] == "baseline-torch":
        import torch  # noqa: F401
        make_data(N_TRAIN, N_VAL)
        emit({})
        return
    fn = jax_child if is_jax(spec["lib"]) else torch_child
    dalpha, dl2, out = fn(spec)
    np.savez(spec["out"], dalpha=dalpha, dl2=dl2)
    out["finite"] = bool(np.all(np.isfinite(dalpha)) and np.all(np.isfinite(dl2)))
    emit(out)


# ============================================================================ parent

def is_jax(lib: str) -> bool:
    return lib.startswith(("revlearn", "optax"))


def rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def estimate(prev: dict | None, T: int, base_mib: float):
    """(peak GiB, seconds per run) for T from the same library/arch at a smaller T (linear in T)."""
    if not prev or "time_s" not in prev:
        return None, None
    per_step_mib = max(prev["peak_rss_mib"] - prev["rss_after_setup_mib"], 0) / prev["T"]
    return (base_mib + per_step_mib * T) / 1024, prev["time_s"] * T / prev["T"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="784-100-10 at T=50, 4 libraries, 1 timed run each: a smoke check (~2 min)")
    ap.add_argument("--arch", nargs="+", choices=list(ARCHS), help="architectures (default: both)")
    ap.add_argument("--steps", type=int, nargs="+", help="list of T (default 100 1000 10000)")
    ap.add_argument("--optimizer", choices=["momentum", "adam"], default="momentum",
                    help="inner optimizer: SGD with momentum (default) or Adam (lib names *-adam-*)")
    ap.add_argument("--libs", nargs="+", choices=LIBS + ADAM_LIBS,
                    help="subset of libraries (of the --optimizer's set)")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per cell after the warm-up (median)")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                    help="run the JAX cells on a GPU (torch cells stay on CPU)")
    ap.add_argument("--mem-limit-gib", type=float, default=20.0, help="skip cells estimated above this")
    ap.add_argument("--time-limit-s", type=float, default=600.0, help="skip cells estimated above this")
    ap.add_argument("--name", help="results file stem (default peers, peers_quick, peers_gpu)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(json.loads(a.child))
        return
    env_jax = {}
    if a.device == "gpu":
        import jax
        try:
            gpus = jax.devices("gpu")
        except RuntimeError as e:
            raise SystemExit(f"--device gpu: JAX sees no GPU on this machine ({e}). "
                             f"Visible devices: {jax.devices()}. Run without --device.") from None
        env_jax = {"JAX_PLATFORMS": "cuda"}
        print("GPU:", gpus)
    archs = ["small"] if a.quick else (a.arch or list(ARCHS))
    steps = [QUICK_T] if a.quick else (a.steps or [100, 1000, 10_000])
    if a.quick:
        a.reps = 1
    adam = a.optimizer == "adam"
    all_libs = ADAM_LIBS if adam else LIBS
    libs = a.libs or ((ADAM_QUICK_LIBS if adam else QUICK_LIBS) if a.quick else all_libs)
    if bad := [lib for lib in libs if lib not in all_libs]:
        ap.error(f"--libs {' '.join(bad)} not in the --optimizer {a.optimizer} set: {' '.join(all_libs)}")
    ref_libs = ("revlearn-unrolled-adam-f64", "revlearn-checkpointed-adam-f64") if adam else \
        ("revlearn-unrolled-f64", "revlearn-checkpointed-f64")
    me = os.path.abspath(__file__)
    info = machine_info()
    print(json.dumps(info), flush=True)
    tmp = tempfile.mkdtemp(prefix="revlearn_peers_")
    base = {}
    for b in ("baseline-jax", "baseline-torch"):
        base[b] = run_child(me, {"lib": b, "sizes": ARCHS["small"]}, 600).get("peak_rss_mib")
    print("baselines (MiB)", base, flush=True)
    cells = []
    for arch in archs:
        sizes = ARCHS[arch]
        prev = {}
        for T in sorted(steps):
            ref_path, ref_name = None, None
            order = list(ref_libs) + [l for l in libs if l not in ref_libs]
            for lib in order:
                is_ref_candidate = lib in ref_libs and ref_path is None
                if lib not in libs and not is_ref_candidate:
                    continue
                bmib = base["baseline-jax" if is_jax(lib) else "baseline-torch"] or 0
                est_gib, est_s = estimate(prev.get(lib), T, bmib)
                reps = a.reps
                if est_s is not None and est_s > 60:
                    reps = 1
                cell = {"arch": arch, "sizes": sizes, "P": num_weights(sizes), "T": T, "lib": lib,
                        "est_peak_gib": est_gib, "est_time_s": est_s, "reps": reps}
                if est_gib is not None and est_gib > a.mem_limit_gib:
                    cell["skipped"] = f"estimated peak {est_gib:.1f} GiB > {a.mem_limit_gib:.0f} GiB"
                elif est_s is not None and est_s * (reps + 1) > a.time_limit_s:
                    cell["skipped"] = f"estimated {est_s * (reps + 1):.0f} s > {a.time_limit_s:.0f} s"
                if "skipped" in cell:
                    if lib in libs:
                        cells.append(cell)
                    print(arch, T, lib, cell["skipped"], flush=True)
                    continue
                out = os.path.join(tmp, f"{arch}_{T}_{lib}.npz")
                spec = {"lib": lib, "sizes": sizes, "T": T, "reps": reps, "out": out, "device": a.device}
                r = run_child(me, spec, max(a.time_limit_s * 1.5, 120), env_jax if is_jax(lib) else None)
                cell.update(r)
                if "error" not in r:
                    prev[lib] = {**r, "T": T}
                    g = np.load(out)
                    if ref_path is None and lib in ref_libs:
                        ref_path, ref_name = out, lib
                    if ref_path is not None:
                        h = np.load(ref_path)
                        cell["rel_alpha"] = rel(g["dalpha"], h["dalpha"])
                        cell["rel_l2"] = rel(g["dl2"], h["dl2"])
                        cell["rel"] = max(cell["rel_alpha"], cell["rel_l2"])
                        cell["reference"] = ref_name
                if lib in libs:
                    cells.append(cell)
                if "error" in cell:
                    print(arch, T, lib, "ERROR", cell["error"], flush=True)
                else:
                    print(arch, T, lib, "agreement: rel", fmt(cell.get("rel"), ".2e"), "(alpha",
                          fmt(cell.get("rel_alpha"), ".2e"), "L2", fmt(cell.get("rel_l2"), ".2e"), ") vs",
                          cell.get("reference"), flush=True)
                print(arch, T, lib, {k: v for k, v in cell.items() if k not in ("sizes", "times_s")}, flush=True)
    # ratio to Reversible of the same dtype (float64 where there is none), same arch and T, same run
    for c in cells:
        rev = lambda dt: ("revlearn-reversible-adam-" if adam else "revlearn-reversible-") + dt
        same = [x for x in cells if x["arch"] == c["arch"] and x["T"] == c["T"] and "time_s" in x]
        r = next((x for x in same if x["lib"] == rev(c["lib"].split("-")[-1])), None) or \
            next((x for x in same if x["lib"] == rev("f64")), None)
        if r and "time_s" in c:
            c["time_ratio"] = c["time_s"] / r["time_s"]
            c["mem_ratio"] = c["peak_rss_mib"] / r["peak_rss_mib"]
    frontier = compute_frontier(cells, base, adam)
    name = a.name or ("peers" + ("_adam" if adam else "") + ("_quick" if a.quick else "")
                      + ("_gpu" if a.device == "gpu" else ""))
    png = os.path.join(RESULTS, name + "_memory.png")
    os.makedirs(RESULTS, exist_ok=True)
    plot(cells, base, png, adam)
    md = render(info, base, cells, frontier, png, a)
    print(md)
    paths = save(name, md, {"machine": info, "baselines_mib": base, "cells": cells, "frontier": frontier,
                            "config": {"batch": BATCH, "n_train": N_TRAIN, "l2": L2, "device": a.device,
                                       "optimizer": a.optimizer,
                                       **({"lr": ADAM_LR, "b1": ADAM_B1, "b2": ADAM_B2, "eps": ADAM_EPS,
                                           "b1_applied": B1_Q, "b2_applied": B2_Q} if adam else
                                          {"lr_alpha": LR, "momentum": MOMENTUM, "momentum_applied": M_Q})}})
    print("wrote", *paths, png)


def buffer_bits_per_step(adam: bool) -> float:
    """Information a reversal must store per weight per step: the bits the decays discard."""
    return math.log2(1 / B1_Q) + math.log2(1 / B2_Q) if adam else math.log2(1 / M_Q)


def compute_frontier(cells, base, adam=False):
    """Per library and arch: the largest T within 24 GiB, from the measured per-step memory."""
    out = []
    for arch in sorted({c["arch"] for c in cells}):
        for lib in dict.fromkeys(c["lib"] for c in cells):
            ms = [c for c in cells if c["arch"] == arch and c["lib"] == lib and "peak_rss_mib" in c]
            if not ms:
                continue
            c = max(ms, key=lambda x: x["T"])
            P = c["P"]
            fixed = c["rss_after_setup_mib"]
            if lib.startswith("revlearn-reversible") and not adam:
                # O(P) state + buffer of T log2(1/m) bits per weight
                per_step_mib = P * math.log2(1 / M_Q) / 8 / 2**20
                how = "buffer bits T log2(1/m) per weight (theory), fixed part measured"
            elif "checkpointed" in lib:
                per_step_mib = None
                how = "O(sqrt T) stored states"
            else:
                per_step_mib = max(c["peak_rss_mib"] - fixed, 1e-9) / c["T"]
                how = f"measured per-step memory at T={c['T']}"
            if per_step_mib is None:
                # memory ~ fixed + k sqrt(T): fit k from the largest measured cell
                k = max(c["peak_rss_mib"] - fixed, 1e-9) / math.sqrt(c["T"])
                tmax = ((24 * 1024 - fixed) / k) ** 2
            else:
                tmax = (24 * 1024 - fixed) / per_step_mib
            measured = max(x["T"] for x in ms)
            out.append({"arch": arch, "lib": lib, "P": P, "T_max": tmax, "weights_x_steps": P * tmax,
                        "largest_measured_T": measured, "extrapolated": tmax > measured, "model": how})
    return out


def plot(cells, base, png, adam=False):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arches = sorted({c["arch"] for c in cells})
    fig, axes = plt.subplots(1, len(arches), figsize=(9.5 * len(arches), 5.5), squeeze=False)
    for ax, arch in zip(axes[0], arches):
        P = next(c["P"] for c in cells if c["arch"] == arch)
        Ts = sorted({c["T"] for c in cells if c["arch"] == arch})
        for lib in dict.fromkeys(c["lib"] for c in cells):
            pts = [(c["T"], c["peak_rss_mib"]) for c in cells if c["arch"] == arch and c["lib"] == lib
                   and "peak_rss_mib" in c]
            est = [(c["T"], c["est_peak_gib"] * 1024) for c in cells if c["arch"] == arch and c["lib"] == lib
                   and "skipped" in c and c.get("est_peak_gib")]
            if pts:
                line, = ax.plot(*zip(*pts), "o-", label=lib)
                if est:
                    ax.plot([pts[-1][0]] + [e[0] for e in est], [pts[-1][1]] + [e[1] for e in est], "x--",
                            color=line.get_color(), alpha=0.6)
        Tg = np.logspace(math.log10(min(Ts)), math.log10(max(max(Ts), 10_000)), 50)
        bits = Tg * buffer_bits_per_step(adam) * P
        ax.plot(Tg, bits / 8 / 2**20, "k:", lw=2,
                label="information-theoretic buffer\n(T " + ("(log2(1/b1) + log2(1/b2))" if adam else "log2(1/m)")
                + " bits/weight)")
        ax.plot(Tg, (bits / 8 + (24 if adam else 16) * P) / 2**20, "k-.", lw=1,
                label="buffer + w, m, s in int64 (24 B/weight)" if adam else "buffer + w, v in int64 (16 B/weight)")
        ax.axhline(base.get("baseline-jax") or 0, color="grey", lw=0.8)
        ax.text(Tg[0], (base.get("baseline-jax") or 1) * 1.1, "JAX import + data", color="grey", fontsize=8)
        ax.axhline(24 * 1024, color="red", lw=0.8)
        ax.text(Tg[0], 24 * 1024 * 1.1, "24 GiB", color="red", fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("inner steps T")
        ax.set_ylabel("peak RSS of the process (MiB)")
        ax.set_title(f"{'-'.join(map(str, ARCHS[arch]))} MLP ({P:,} weights); x = estimated, not run")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def render(info, base, cells, frontier, png, a) -> str:
    if a.optimizer == "adam":
        inner = (f"Adam (optax convention: eps {ADAM_EPS} outside the sqrt of the bias-corrected second moment), "
                 f"b1 {ADAM_B1}, b2 {ADAM_B2} (applied as {B1_Q!r}, {B2_Q!r} everywhere), lr_t = {ADAM_LR} per step")
        hyper = "lr [T]"
    else:
        inner = f"momentum {MOMENTUM} (applied as {M_Q!r}), alpha_t = {LR} per step"
        hyper = "alpha [T]"
    L = [f"# revlearn vs peers ({info['date']})", "",
         f"Machine: {info.get('cpu', '?')}, {info['cores']} cores, {info.get('ram_gib', '?')} GiB RAM, "
         f"load average at start {info.get('loadavg_at_start')}; python {info['python']}, jax {info['jax']}, "
         f"torch {info['torch']}, torchopt {info['torchopt']}, higher {info['higher']}, revlearn {info['revlearn']}. "
         f"JAX cells on {a.device}. The 2 cores were shared with other work: timings are noisy.", "",
         f"Inner problem: tanh MLP, minibatch {BATCH}, {inner}, "
         f"per-weight L2 {L2}; hypergradient w.r.t. ({hyper}, L2 [P]) of the validation NLL. "
         f"Time: median of the timed runs after one warm-up run (compile excluded for JAX). Peak RSS: "
         f"fresh process per cell. Baselines: a process that only imports JAX and builds the data: "
         f"{fmt(base.get('baseline-jax'), '.0f')} MiB; same for torch: {fmt(base.get('baseline-torch'), '.0f')} MiB. "
         f"rel = max over ({hyper.split()[0]}, L2) of ||g - g_ref|| / ||g_ref||, g_ref = revlearn Unrolled float64 "
         "(Checkpointed float64 where Unrolled is skipped) with the same optimizer.", "",
         "| arch | T | library | time / hypergradient (s) | x Reversible (same dtype) | peak RSS (MiB) | x Reversible | rel vs reference | note |",
         "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for c in cells:
        arch = "-".join(map(str, c["sizes"]))
        if "time_s" not in c:
            note = c.get("skipped") or c.get("error", "")
            L.append(f"| {arch} | {c['T']} | {c['lib']} | - | - | - | - | - | {note} |")
            continue
        note = f"reps={c['reps']}" + ("" if c.get("finite", True) else ", NON-FINITE")
        if c.get("reference") and c["lib"] == c["reference"]:
            note += ", reference"
        L.append(f"| {arch} | {c['T']} | {c['lib']} | {c['time_s']:.3f} | {fmt(c.get('time_ratio'), '.2f')} | "
                 f"{c['peak_rss_mib']:.0f} | {fmt(c.get('mem_ratio'), '.2f')} | {fmt(c.get('rel'), '.1e')} | {note} |")
    L += ["", "Scale frontier (largest T within 24 GiB at each size; weights x steps):", "",
          "| arch | library | weights | T max | weights x T | largest T run | how |", "|---|---|---:|---:|---:|---:|---|"]
    for f in frontier:
        L.append(f"| {f['arch']} | {f['lib']} | {f['P']:,} | {f['T_max']:.3g} | {f['weights_x_steps']:.3g} | "
                 f"{f['largest_measured_T']} | {'EXTRAPOLATED: ' if f['extrapolated'] else ''}{f['model']} |")
    L += ["", f"Plot: `{os.path.relpath(png, os.path.dirname(RESULTS))}` (peak RSS against T, log-log, with the "
              "information-theoretic buffer line)."]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
