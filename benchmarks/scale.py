"""Scale benchmark: Reversible's state and hypergradient cost against the number of devices.

`revlearn.train(..., method=Reversible())` splits its reversible state (the packed
fixed-point weights W, the optimiser's moments, each information buffer's x, bounds,
heads and word stacks) over every device of the mesh that params0 lives on
(`src/revlearn/_sharding.py`, device-major layout `exact/_layout.py`). This script
measures, on meshes of 1, 2, 4, 8 devices (one axis "d", explicit axes, `jax.set_mesh`):

1. memory: the bytes each device holds of that state after the forward pass (the
   largest addressable shard of every array of `_reversible.forward`'s output, as
   `tests/test_sharding.py` does), split into the part per weight (W, moments, x,
   bounds, heads) and the word stacks (per weight per step), for a 784-1024-1024-10
   tanh MLP (1.86M weights, so the layout's padding to whole rows per device is
   negligible), momentum and Adam, T = 100; the stacks' growth per step from their
   shapes at T = 10^3 and 10^5 (`jax.eval_shape`: a stack holds whole 32-bit words, so
   at T = 100 one word per weight holds every step's bits); and XLA's buffer plan of the
   jitted hypergradient per device (`compiled.memory_analysis()`);
2. time: one hypergradient (jit(grad) of the validation NLL w.r.t. params0, the
   per-layer per-step lr, the momentum or b1 and the per-weight L2) against plain
   training (jit of `revlearn.train(..., method=Unrolled())`, no grad, same sharded
   inputs), timed in paired rounds in this one process after a warm-up run
   (compilation excluded), for a 784-256-256-10 MLP, batch 64, T = 50, data-parallel (batch split,
   weights replicated) and model-parallel (hidden units split: the first layer by
   columns, the next by rows with a reduce-scatter, the last by rows with an
   all-reduce; the data replicated). The issue's target: on 8 devices the ratio
   hypergradient / plain training within 1.15x of the same ratio on one device;
3. a scale table "on paper": the weights x steps one hypergradient can reach per
   device count for a given memory per device, from the measured bytes per weight and
   per weight per step.

Without --device the script re-launches itself with
XLA_FLAGS=--xla_force_host_platform_device_count=8: eight CPU "devices" that share
this machine's cores (2 here), so the time columns show overhead and correctness of
the sharded program, not speed-up. With --device it uses jax.devices() as they are
(e.g. several GPUs) and meshes of 1, 2, 4, ... up to their number.

Usage:
    .venv/bin/python benchmarks/scale.py                      # ~8 min on 2 CPU cores
    .venv/bin/python benchmarks/scale.py --quick              # T = 20, 3 rounds (smoke check)
    .venv/bin/python benchmarks/scale.py --device             # real accelerators, every visible one
    .venv/bin/python benchmarks/scale.py --steps 100 --rounds 7 --memory-gb 80 141
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS, fmt, init_params, machine_info, num_weights, save

FORCE = "--xla_force_host_platform_device_count=8"
MEM_SIZES = [784, 1024, 1024, 10]
TIME_SIZES = [784, 256, 256, 10]
MEM_BATCH = 8            # the state's size does not depend on the batch
TIME_BATCH = 64
N_BATCHES = 8            # minibatches cycled through (t mod N_BATCHES)
N_VAL = 64
LR, MOMENTUM = 0.05, 0.9
ADAM_LR, B1, B2, EPS = 1e-3, 0.9, 0.999, 1e-8
L2 = 1e-4
RULES = ("momentum", "adam")
KINDS = ("data", "model")
TARGET = 1.15


# ============================================================================ the problem

def make_problem(sizes, batch, seed=0):
    """Synthetic MNIST-like data as in `_common.make_data`, in N_BATCHES fixed minibatches
    [N_BATCHES, batch, in] (one-hot labels), a validation set and the init (numpy)."""
    import numpy as np
    from _common import make_data
    X, y, Xv, yv = make_data(N_BATCHES * batch, N_VAL, sizes[0], sizes[-1], seed)
    eye = np.eye(sizes[-1])
    return {"X": X.reshape(N_BATCHES, batch, -1), "Y": y.reshape(N_BATCHES, batch), "n_out": sizes[-1],
            "Xv": Xv, "Yv": eye[yv], "params0": init_params(sizes)}


def layer_specs(n_layers, kind):
    """Per layer (W spec, b spec, out_sharding of x @ W or None)."""
    from jax.sharding import PartitionSpec as P
    if kind == "data":
        return [(P(), P(), None)] * n_layers
    out = [(P(None, "d"), P("d"), None)]                       # columns: output split, no collective
    for i in range(1, n_layers):
        last = i == n_layers - 1                               # rows: contraction over the split axis
        out.append((P("d", None), P() if last else P("d"), P() if last else P(None, "d")))
    return out


def build(prob, S, kind, rule, T, devices):
    """Everything one (S, kind, rule) cell needs, placed on a mesh of the first S devices."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from _jaxprob import method_of
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import revlearn

    mesh = jax.make_mesh((S,), ("d",), axis_types=(AxisType.Explicit,), devices=devices[:S])
    put = lambda a, spec: jax.device_put(jnp.asarray(a), NamedSharding(mesh, spec))
    specs = layer_specs(len(prob["params0"]), kind)
    params0 = [(put(W, sw), put(b, sb)) for (W, b), (sw, sb, _) in zip(prob["params0"], specs)]
    l2 = [(put(jnp.full(W.shape, L2), sw), put(jnp.full(b.shape, L2), sb))
          for (W, b), (sw, sb, _) in zip(prob["params0"], specs)]
    # the data are hyperparameters (closed-over arrays on an explicit mesh cannot enter the
    # auto-axes region Reversible runs in): pixels as uint8 and labels as int32, so that no
    # method spends work on a cotangent for them
    X = put(np.round(prob["X"] * 255).astype(np.uint8), P(None, "d", None) if kind == "data" else P())
    Y = put(prob["Y"], P(None, "d") if kind == "data" else P())
    vspec = P("d", None) if kind == "data" else P()
    Xv, Yv = put(prob["Xv"], vspec), put(prob["Yv"], vspec)
    outs = [o for _, _, o in specs]

    def mlp(params, x):
        # under an explicit mesh a contraction over a split axis states its output's sharding;
        # under auto axes (where Reversible runs the loss) the same placement is a constraint
        m = jax.sharding.get_abstract_mesh()
        explicit = not m.empty and AxisType.Explicit in tuple(m.axis_types)
        h = x
        for i, ((W, b), o) in enumerate(zip(params, outs)):
            if explicit or o is None or m.empty:
                h = jnp.matmul(h, W, out_sharding=o if explicit else None)
            else:
                h = jax.lax.with_sharding_constraint(jnp.matmul(h, W), o)
            h = h + b
            if i < len(params) - 1:
                h = jnp.tanh(h)
        return jax.nn.log_softmax(h)

    def loss_fn(params, hypers, step):
        i = step % N_BATCHES
        x = hypers["x"][i].astype(jnp.float64) / 255.0
        y = jax.nn.one_hot(hypers["y"][i], prob["n_out"], dtype=jnp.float64)
        nll = -jnp.mean(jnp.sum(mlp(params, x) * y, axis=-1))
        reg = sum(jnp.sum(l * w * w) for l, w in zip(jax.tree_util.tree_leaves(hypers["l2"]),
                                                    jax.tree_util.tree_leaves(params)))
        return nll + reg

    def val_loss(params):
        return -jnp.mean(jnp.sum(mlp(params, Xv) * Yv, axis=-1))

    lr0 = ADAM_LR if rule == "adam" else LR
    lr = [jnp.full((T,), lr0) for _ in params0]                 # per layer, per step
    decay = jnp.asarray(B1 if rule == "adam" else MOMENTUM)

    def opt(lr, decay):
        if rule == "adam":
            return revlearn.optim.adam(lr, b1=decay, b2=B2, eps=EPS)
        return revlearn.optim.momentum(lr, decay)

    def train(method):
        return lambda p0, lr, d, l2, x, y: revlearn.train(
            loss_fn, p0, {"l2": l2, "x": x, "y": y}, optimizer=opt(lr, d), steps=T, method=method)

    rev = method_of("reversible", T, rule)
    hyper = jax.jit(jax.grad(lambda p0, lr, d, l2, x, y: val_loss(train(rev)(p0, lr, d, l2, x, y)),
                             argnums=(0, 1, 2, 3)))
    return {"mesh": mesh, "args": (params0, lr, decay, l2, X, Y), "hyper": hyper,
            "plain": jax.jit(train(method_of("unrolled", T, rule))), "rev_forward": jax.jit(train(rev)),
            "loss_fn": loss_fn, "opt": opt, "method": rev, "T": T}


def state_bytes(c, shapes_only=False):
    """Bytes of Reversible's state after the forward pass, in total and on the fullest device,
    per part (W, moments, buffers' x, bounds, heads, word stacks). With `shapes_only`, the
    totals from the shapes alone (`jax.eval_shape`: nothing runs)."""
    import jax
    import jax.numpy as jnp

    import revlearn
    from revlearn._problem import decay_values, split_inexact
    from revlearn._train import prepare
    from revlearn.methods import _reversible

    params0, lr, decay, l2, X, Y = c["args"]

    @revlearn._sharding.with_auto_axes
    def run(loss_fn, w, h):
        p = prepare(loss_fn, w, h, optimizer=c["opt"](lr, float(decay)), steps=c["T"])
        cap = c["method"].capacity(p)
        th_f, th_o = split_inexact(p.theta)
        names = [m.name for m in p.rule.moments]
        leaves = lambda t: [jnp.asarray(a) for a in jax.tree_util.tree_leaves(t)]
        f = jax.jit(lambda w0, s0, th_f: _reversible.forward(
            p, c["method"], cap, w0, s0, p.state0.get("count", jnp.int32(0)), th_f, th_o, p.hypers,
            decay_values(p)))
        fargs = (leaves(p.params0), {n: leaves(p.state0[n]) for n in names}, th_f)
        out = {}
        if shapes_only:
            fw = jax.eval_shape(f, *fargs)
            for part in ("W", "X", "x", "m", "head", "stacks"):
                out[part] = {"total": int(sum(math.prod(a.shape) * a.dtype.itemsize
                                              for a in jax.tree_util.tree_leaves(getattr(fw, part))))}
            return out
        fw = f(*fargs)
        for part in ("W", "X", "x", "m", "head", "stacks"):
            arrs = jax.tree_util.tree_leaves(getattr(fw, part))
            out[part] = {"total": int(sum(a.nbytes for a in arrs)),
                         "per_device": int(sum(max(s.data.nbytes for s in a.addressable_shards)
                                               for a in arrs)),
                         "sharded": all(len({str(s.index) for s in a.addressable_shards}) == len(a.addressable_shards)
                                        for a in arrs if a.ndim >= 2)}
        out["fault"] = int(fw.fault.code) != 0
        return out

    with jax.set_mesh(c["mesh"]):
        return run(c["loss_fn"], params0, {"l2": l2, "x": X, "y": Y})


def xla_plan(compiled):
    try:
        ma = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - not every backend has it
        return {"error": f"{type(e).__name__}: {e}"}
    if ma is None:
        return {"error": "memory_analysis() returned None"}
    return {k: int(getattr(ma, k + "_in_bytes")) for k in
            ("temp_size", "argument_size", "output_size", "alias_size", "generated_code_size")
            if hasattr(ma, k + "_in_bytes")}


# ============================================================================ measurements

def stack_rates(T_far, devices, log):
    """Per rule, the word stacks' bytes per weight at two large T from the shapes alone
    (whole words per weight: at small T one word holds every step's bits, so the slope
    shows only far out): slope b (bytes per weight per step) and intercept c."""
    prob = make_problem(MEM_SIZES, MEM_BATCH)
    P = num_weights(MEM_SIZES)
    out = {}
    for rule in RULES:
        pts = {}
        for T in T_far:
            b = state_bytes(build(prob, 1, "model", rule, T, devices), shapes_only=True)
            pts[T] = b["stacks"]["total"] / P
        (t0, s0), (t1, s1) = min(pts.items()), max(pts.items())
        slope = (s1 - s0) / (t1 - t0)
        out[rule] = {"stacks_bytes_per_weight": {str(k): v for k, v in pts.items()},
                     "slope": slope, "intercept": s1 - slope * t1}
        log(f"stacks {rule:8}: " + ", ".join(f"T={k}: {v:.3f} B/weight" for k, v in pts.items())
            + f"; slope {slope:.5f} B/weight/step")
    return out


def memory_cells(counts, T, devices, log):
    import jax
    prob = make_problem(MEM_SIZES, MEM_BATCH)
    P = num_weights(MEM_SIZES)
    cells = []
    for rule in RULES:
        for S in counts:
            t0 = time.perf_counter()
            c = build(prob, S, "model", rule, T, devices)
            b = state_bytes(c)
            with jax.set_mesh(c["mesh"]):
                plan = xla_plan(c["hyper"].lower(*c["args"]).compile())
            tot = {k: sum(v[k] for p, v in b.items() if isinstance(v, dict)) for k in ("total", "per_device")}
            fixed = {k: tot[k] - b["stacks"][k] for k in tot}
            cell = {"rule": rule, "S": S, "T": T, "P": P, "parts": b, "total": tot["total"],
                    "per_device": tot["per_device"], "fixed_per_device": fixed["per_device"],
                    "stacks_per_device": b["stacks"]["per_device"],
                    "bytes_per_weight": fixed["total"] / P,
                    "bytes_per_weight_per_step": b["stacks"]["total"] / (P * T),
                    "xla": plan, "wall_s": time.perf_counter() - t0}
            cells.append(cell)
            log(f"memory {rule:8} S={S}: {tot['per_device']/2**20:8.2f} MiB/device of "
                f"{tot['total']/2**20:8.2f} MiB (fixed {fixed['per_device']/2**20:.2f}, stacks "
                f"{b['stacks']['per_device']/2**20:.2f}); XLA temp "
                f"{plan.get('temp_size', float('nan'))/2**20:.1f} MiB, args "
                f"{plan.get('argument_size', float('nan'))/2**20:.1f} MiB; fault {b['fault']} "
                f"({cell['wall_s']:.0f} s)")
    return cells


def time_cells(counts, T, rounds, devices, log, rules=RULES):
    import jax
    import numpy as np
    prob = make_problem(TIME_SIZES, TIME_BATCH)
    block = jax.block_until_ready
    flat = lambda g: np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree_util.tree_leaves(g)])
    cells, ref = [], {}
    for rule in rules:
        for kind in KINDS:
            for S in counts:
                c = build(prob, S, kind, rule, T, devices)
                a = c["args"]
                with jax.set_mesh(c["mesh"]):
                    t0 = time.perf_counter()
                    hyper = c["hyper"].lower(*a).compile()
                    plain = c["plain"].lower(*a).compile()
                    fwd = c["rev_forward"].lower(*a).compile()
                    compile_s = time.perf_counter() - t0
                    g = block(hyper(*a))                       # warm-up runs
                    block(plain(*a))
                    block(fwd(*a))
                    ts = {"plain": [], "hyper": [], "rev_forward": []}
                    for _ in range(rounds):                    # paired: one run of each per round
                        for k, f in (("plain", plain), ("hyper", hyper), ("rev_forward", fwd)):
                            t1 = time.perf_counter()
                            block(f(*a))
                            ts[k].append(time.perf_counter() - t1)
                gf = flat(g)
                if S == counts[0]:
                    ref[(rule, kind)] = gf
                r = ref[(rule, kind)]
                pr = {k: np.asarray(v) for k, v in ts.items()}
                cell = {"rule": rule, "kind": kind, "S": S, "T": T, "compile_s": compile_s,
                        **{k + "_s": float(np.median(v)) for k, v in pr.items()},
                        "times": ts,
                        "ratio": float(np.median(pr["hyper"] / pr["plain"])),
                        "fwd_ratio": float(np.median(pr["rev_forward"] / pr["plain"])),
                        "rel_diff_vs_S1": float(np.linalg.norm(gf - r) / np.linalg.norm(r)),
                        "finite": bool(np.all(np.isfinite(gf))),
                        "grad_sharded_like_params": all(
                            x.sharding.is_equivalent_to(y.sharding, x.ndim)
                            for x, y in zip(jax.tree_util.tree_leaves(g[0]), jax.tree_util.tree_leaves(a[0])))}
                cells.append(cell)
                log(f"time {rule:8} {kind:5} S={S}: hyper {cell['hyper_s']:.3f} s, plain "
                    f"{cell['plain_s']:.3f} s, ratio {cell['ratio']:.2f} (Rev. forward "
                    f"{cell['fwd_ratio']:.2f}); vs S={counts[0]} {cell['rel_diff_vs_S1']:.1e}; "
                    f"compile {compile_s:.0f} s")
    # ratio at S over the ratio at the first S, per (rule, kind)
    for cell in cells:
        base = next(x for x in cells if x["rule"] == cell["rule"] and x["kind"] == cell["kind"]
                    and x["S"] == counts[0])
        cell["ratio_over_S1"] = cell["ratio"] / base["ratio"]
    return cells


def paper_coeffs(mem, rates, rule):
    """(a, b, c): state bytes per weight = a + c + b T (a: the fixed part, measured at the
    largest device count, padding included; b, c: the stacks' slope and intercept)."""
    big = max((x for x in mem if x["rule"] == rule), key=lambda x: x["S"])
    return big["bytes_per_weight"], rates[rule]["slope"], rates[rule]["intercept"]


def paper_table(mem, rates, memory_gb, counts_paper=(1, 8, 64, 512)):
    """Largest T per (per-device memory, device count, weights), from the measured bytes per
    weight (fixed) and per weight per step (stacks), state split evenly over the devices."""
    out = []
    for rule in RULES:
        a, b, c0 = paper_coeffs(mem, rates, rule)
        a = a + max(c0, 0.0)
        for gb in memory_gb:
            for S in counts_paper:
                budget = gb * 1e9 * S
                for P in (1e8, 1e9, 1e10, 1e11):
                    T = (budget - a * P) / (b * P) if budget > a * P else 0.0
                    out.append({"rule": rule, "memory_gb": gb, "S": S, "P": P, "max_T": T,
                                "weight_steps": T * P, "max_P_alone": budget / a})
    return out


# ============================================================================ report

def _round_range(c):
    r = [h / p for h, p in zip(c["times"]["hyper"], c["times"]["plain"])]
    return min(r), max(r)


def render(info, a, counts, mem, tim, paper, rates):
    L = [f"# revlearn scale benchmark ({info['date']})", "",
         f"Machine: {info.get('cpu', '?')}, {info['cores']} cores, {info.get('ram_gib', '?')} GiB RAM; "
         f"load average at start {info.get('loadavg_at_start')}; python {info['python']}, "
         f"jax {info['jax']}, jaxlib {info['jaxlib']}, revlearn {info['revlearn']}; "
         f"JAX devices: {info.get('jax_device', '?')}.", ""]
    if info.get("forced_host_devices"):
        L += [f"**The {max(counts)} devices are forced host devices** (`XLA_FLAGS={FORCE}`): "
              f"CPU \"devices\" that share this machine's {info['cores']} cores, with other work "
              "running beside. The time columns show the overhead and correctness of the sharded "
              "programs, not a speed-up: the same arithmetic is split into more pieces on the "
              "same cores, plus the collectives.", ""]
    L += ["Command: `" + " ".join(["python", "benchmarks/scale.py", *info["argv"]]) + "`", ""]
    if mem:
        P = mem[0]["P"]
        L += [f"## Memory: Reversible's state per device ({'-'.join(map(str, MEM_SIZES))} tanh MLP, "
              f"{P:,} weights, model-parallel placement, T = {mem[0]['T']})", "",
              "Bytes each device holds of the state after the forward pass (largest addressable "
              "shard of W, the moments, each buffer's x, bounds, heads and word stacks), and XLA's "
              "buffer plan of the jitted hypergradient (`compiled.memory_analysis()`, per device).", "",
              "| rule | devices | state / device (MiB) | x 1/S of one device | fixed part (MiB) | word stacks (MiB) "
              "| total over devices (MiB) | XLA temp / device (MiB) | XLA arguments / device (MiB) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in mem:
            one = next(x for x in mem if x["rule"] == c["rule"] and x["S"] == counts[0])
            L.append(f"| {c['rule']} | {c['S']} | {c['per_device']/2**20:.2f} | "
                     f"{c['per_device'] / (one['per_device'] / c['S']):.4f} | "
                     f"{c['fixed_per_device']/2**20:.2f} | {c['stacks_per_device']/2**20:.2f} | "
                     f"{c['total']/2**20:.2f} | {fmt(c['xla'].get('temp_size', None) and c['xla']['temp_size']/2**20, '.1f')} | "
                     f"{fmt(c['xla'].get('argument_size', None) and c['xla']['argument_size']/2**20, '.1f')} |")
        L += ["", "\"x 1/S of one device\": state per device over (state on one device / S); 1 is a "
              "perfect split, above 1 is the layout's padding of each leaf to whole rows per device "
              "(or something not split).", "",
              "Bytes per weight, all devices together: the fixed part (W, moments, x, bounds, heads, "
              f"padding included) at {max(counts)} devices, and the word stacks: measured at T = "
              f"{mem[0]['T']} (whole 32-bit words per weight and leaf, so at small T one word holds every "
              "step's bits and stacks / T overstates the rate), and their slope in T from the stacks' "
              "shapes at two large T (`jax.eval_shape` of the forward pass, nothing run):", "",
              "| rule | fixed bytes / weight (a) | stacks bytes / weight at T = " + str(mem[0]["T"])
              + " | same / T | stacks bytes / weight at large T | slope: bytes / weight / step (b) | "
              "ideal: sum_decays log2(1/d) / 8 |", "|---|---:|---:|---:|---|---:|---:|"]
        for rule in RULES:
            c = max((x for x in mem if x["rule"] == rule), key=lambda x: x["S"])
            r = rates.get(rule, {})
            far = ", ".join(f"T={k}: {v:.2f}" for k, v in r.get("stacks_bytes_per_weight", {}).items())
            ideal = (math.log2(1 / B1) + math.log2(1 / B2) if rule == "adam" else math.log2(1 / MOMENTUM)) / 8
            L.append(f"| {rule} | {c['bytes_per_weight']:.3f} | {c['bytes_per_weight_per_step'] * c['T']:.3f} | "
                     f"{c['bytes_per_weight_per_step']:.5f} | {far} | {fmt(r.get('slope'), '.5f')} | {ideal:.5f} |")
    if tim:
        L += ["", f"## Time: hypergradient / plain training against devices "
                  f"({'-'.join(map(str, TIME_SIZES))} tanh MLP, {num_weights(TIME_SIZES):,} weights, "
                  f"batch {TIME_BATCH}, T = {tim[0]['T']})", "",
              "Hypergradient: jit(grad) of the validation NLL w.r.t. (params0, per-layer per-step lr, "
              "momentum or b1, per-weight L2) through `revlearn.train(..., method=Reversible())`. Plain "
              "training: jit of `revlearn.train(..., method=Unrolled())` without grad on the same sharded "
              "inputs. Rev. forward: jit of the Reversible `train` without grad. One warm-up run each "
              f"(compilation excluded), then {a.rounds} rounds of one run each (paired); ratios are the "
              "median of the per-round ratios. data: batch split over the devices, weights replicated; "
              "model: hidden units split, data replicated. In both the reversible state is split over "
              "all devices. \"vs 1 device\": relative L2 difference of the whole hypergradient from "
              "the 1-device one.", "",
              "| rule | placement | devices | hypergradient (s) | plain training (s) | ratio | Rev. forward / plain "
              "| hypergradient / on 1 device | plain / on 1 device "
              "| ratio / ratio on 1 device | target | vs 1 device | grad sharded like params0 |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for c in tim:
            tgt = f"<= {TARGET}" if c["S"] == max(counts) else ""
            one = next(x for x in tim if x["rule"] == c["rule"] and x["kind"] == c["kind"] and x["S"] == counts[0])
            L.append(f"| {c['rule']} | {c['kind']} | {c['S']} | {c['hyper_s']:.3f} | {c['plain_s']:.3f} | "
                     f"{c['ratio']:.2f} | {c['fwd_ratio']:.2f} | {c['hyper_s'] / one['hyper_s']:.2f} | "
                     f"{c['plain_s'] / one['plain_s']:.2f} | {c['ratio_over_S1']:.3f} | {tgt} | "
                     f"{c['rel_diff_vs_S1']:.1e} | {c['grad_sharded_like_params']} |")
        Smax = max(counts)
        L += ["", f"Target (issue): on {Smax} devices, hypergradient / plain training within {TARGET}x of the "
                  "same ratio on one device.", "",
              "| rule | placement | ratio on 1 device | per-round range | ratio on " + str(Smax)
              + " | per-round range | measured | target | met |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        rng = lambda c: "{:.2f}-{:.2f}".format(*_round_range(c))
        for c in tim:
            if c["S"] == Smax:
                one = next(x for x in tim if x["rule"] == c["rule"] and x["kind"] == c["kind"] and x["S"] == counts[0])
                L.append(f"| {c['rule']} | {c['kind']} | {one['ratio']:.2f} | {rng(one)} | {c['ratio']:.2f} | "
                         f"{rng(c)} | {c['ratio_over_S1']:.3f}x | {TARGET}x | "
                         f"{'yes' if c['ratio_over_S1'] <= TARGET else 'no'} |")
        L += ["", "Per-round range: the smallest and largest of the rounds' hypergradient / plain training "
              "ratios (the machine's other work moves single rounds). In the data-parallel rows the ratio "
              "falls with the device count because plain training slows more than the hypergradient "
              "(see the columns \"/ on 1 device\"), likely because with the weights replicated every "
              "forced device repeats Unrolled's whole weight update on the same cores, while "
              "Reversible's state, split over the devices, is updated once in total (not profiled)."]
    if paper:
        L += ["", "## On paper: how far one hypergradient reaches", "",
              "Largest T for P weights with the state split evenly over S devices of the given memory "
              "each: T = (S M - (a + c) P) / (b P), a = fixed bytes per weight, b = the stacks' bytes "
              "per weight per step and c their intercept (< one word per weight and leaf), as measured "
              "above; M in units of 10^9 bytes. Reversible's state only: the model's activations, the gradient's "
              "temporaries (XLA temp above), the data and the runtime come on top, and a real run "
              "keeps a margin.", ""]
        for rule in RULES:
            rows = [p for p in paper if p["rule"] == rule]
            Ps = sorted({p["P"] for p in rows})
            pa, pb, pc = paper_coeffs(mem, rates, rule)
            L += [f"{rule} (a = {pa:.2f}, b = {pb:.5f}, c = {pc:.2f} bytes):", "",
                  "| memory / device | devices | " + " | ".join(f"max T, P = {P:.0e}" for P in Ps)
                  + " | max P (T = 0) |",
                  "|---:|---:|" + "---:|" * (len(Ps) + 1)]
            for gb in sorted({p["memory_gb"] for p in rows}):
                for S in sorted({p["S"] for p in rows}):
                    cs = [p for p in rows if p["memory_gb"] == gb and p["S"] == S]
                    L.append(f"| {gb:g} GB | {S} | " + " | ".join(
                        f"{p['max_T']:.3g}" if p["max_T"] > 0 else "-" for p in cs)
                        + f" | {cs[0]['max_P_alone']:.3g} |")
            L.append("")
    return "\n".join(L) + "\n"


def figure(path, counts, mem, tim, forced=False):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for rule, col in zip(RULES, ("C0", "C1")):
        cs = [c for c in mem if c["rule"] == rule]
        if not cs:
            continue
        S = [c["S"] for c in cs]
        ax1.plot(S, [c["per_device"] / 2**20 for c in cs], "o-", color=col, label=f"{rule}: state / device")
        ax1.plot(S, [cs[0]["per_device"] / 2**20 / s for s in S], ":", color="k", lw=1.2, zorder=3)
        xt = [c["xla"].get("temp_size") for c in cs]
        if all(x is not None for x in xt):
            ax1.plot(S, [x / 2**20 for x in xt], "s--", color=col, alpha=0.6, label=f"{rule}: XLA temp / device (hypergrad.)")
    ax1.plot([], [], ":", color="k", label="(dotted, under the solid lines: 1/S of one device)")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xticks(counts, [str(c) for c in counts])
    ax1.set_xlabel("devices")
    ax1.set_ylabel("MiB per device")
    if mem:
        ax1.set_title(f"Reversible state, {'-'.join(map(str, MEM_SIZES))}, T={mem[0]['T']}")
    ax1.legend(fontsize=7, loc="lower left")
    for (rule, kind), (col, ls) in zip([(r, k) for r in RULES for k in KINDS],
                                       [("C0", "-"), ("C0", "--"), ("C1", "-"), ("C1", "--")]):
        cs = [c for c in tim if c["rule"] == rule and c["kind"] == kind]
        if cs:
            ax2.plot([c["S"] for c in cs], [c["ratio"] for c in cs], ("o" if kind == "data" else "s") + ls,
                     color=col, label=f"{rule}, {kind}")
            ax2.plot([max(counts)], [cs[0]["ratio"] * TARGET], "v", color=col, alpha=0.5)
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(counts, [str(c) for c in counts])
    ax2.set_xlabel("devices" + (f" (forced host devices sharing {os.cpu_count()} cores)" if forced else ""))
    ax2.set_ylabel("hypergradient / plain training")
    if tim:
        ax2.set_title(f"time ratio, {'-'.join(map(str, TIME_SIZES))}, T={tim[0]['T']}  (v: target {TARGET}x of 1 device)")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ============================================================================ main

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", action="store_true",
                    help="use jax.devices() as they are (real accelerators), no forced host devices")
    ap.add_argument("--quick", action="store_true", help="T = 20, 3 rounds, momentum only for time")
    ap.add_argument("--steps", type=int, default=100, help="T of the memory part (default 100)")
    ap.add_argument("--time-steps", type=int, default=50, help="T of the time part (default 50)")
    ap.add_argument("--far-steps", type=int, nargs=2, default=[1000, 100000],
                    help="two T for the stacks' slope from shapes alone (default 1000 100000)")
    ap.add_argument("--rounds", type=int, default=5, help="paired timing rounds per cell (default 5)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--memory-gb", type=float, nargs="+", default=[80.0],
                    help="per-device memory for the table on paper (default 80)")
    ap.add_argument("--from-json", help="re-render the table and figure of a saved run (no measurement)")
    ap.add_argument("--name", help="results file stem (default scale; scale_quick with --quick, "
                                   "scale_<backend> with --device)")
    a = ap.parse_args(argv)

    if a.from_json:
        with open(a.from_json) as f:
            d = json.load(f)
        info, counts, cfg = d["machine"], d["counts"], d["config"]
        a.rounds = cfg["rounds"]
        md = render(info, a, counts, d["memory"], d["time"], d["paper"], d["stack_rates"])
        md += f"\nWhole run: {info['wall_s']:.0f} s.\n"
        stem = os.path.splitext(a.from_json)[0]
        with open(stem + ".md", "w") as f:
            f.write(md)
        figure(stem + ".png", counts, d["memory"], d["time"], forced=info.get("forced_host_devices"))
        print(md)
        print("wrote", stem + ".md", stem + ".png")
        return 0

    if not a.device and FORCE not in os.environ.get("XLA_FLAGS", ""):
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + FORCE).strip(),
                   PYTHONWARNINGS="ignore")
        return subprocess.run([sys.executable, os.path.abspath(__file__), *argv], env=env, check=False).returncode

    import jax
    jax.config.update("jax_enable_x64", True)
    devices = jax.devices()
    n = len(devices)
    counts = [1 << i for i in range(int(math.log2(n)) + 1)] if n > 1 else [1]
    if not a.device:
        counts = [c for c in counts if c <= 8]
    info = machine_info()
    info["argv"] = argv
    info["forced_host_devices"] = not a.device
    info["device_counts"] = counts
    T = 20 if a.quick else a.steps
    T_time = 20 if a.quick else a.time_steps
    rounds = 3 if a.quick else a.rounds
    a.rounds = rounds
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    log(json.dumps({k: info.get(k) for k in ("cpu", "cores", "loadavg_at_start", "jax", "jax_device")}))
    mem = [] if a.no_memory else memory_cells(counts, T, devices, log)
    rates = {} if a.no_memory else stack_rates(a.far_steps, devices, log)
    tim = [] if a.no_time else time_cells(counts, T_time, rounds, devices, log,
                                          rules=("momentum",) if a.quick else RULES)
    paper = paper_table(mem, rates, a.memory_gb) if mem else []
    info["wall_s"] = time.perf_counter() - t_start
    md = render(info, a, counts, mem, tim, paper, rates)
    md += f"\nWhole run: {info['wall_s']:.0f} s.\n"
    print(md)
    name = a.name or ("scale_quick" if a.quick else f"scale_{jax.default_backend()}" if a.device else "scale")
    paths = save(name, md, {"machine": info, "counts": counts, "memory": mem, "stack_rates": rates,
                            "time": tim, "paper": paper,
                            "config": {"mem_sizes": MEM_SIZES, "time_sizes": TIME_SIZES, "mem_batch": MEM_BATCH,
                                       "time_batch": TIME_BATCH, "n_batches": N_BATCHES, "T": T,
                                       "T_time": T_time, "far_steps": a.far_steps,
                                       "rounds": rounds, "lr": LR, "momentum": MOMENTUM, "adam_lr": ADAM_LR,
                                       "b1": B1, "b2": B2, "eps": EPS, "l2": L2, "target": TARGET}})
    png = os.path.join(RESULTS, name + ".png")
    figure(png, counts, mem, tim, forced=not a.device)
    print("wrote", *paths, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
