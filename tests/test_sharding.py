"""Sharded training and reversal: params and data on a mesh of 1, 2, 4 and 8 forced host
devices, data-parallel and model-parallel. Reversal stays bit-exact, hypergradients equal
the single-device ones to 1e-12, outputs keep the input shardings, and each device holds
1/S of the reversible state and buffer.

The cases run in one subprocess (XLA's device count is fixed when JAX starts), which
prints its measurements as JSON; the tests below assert on them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent('''
    import json, math, os, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import revlearn
    from revlearn import optim
    from revlearn._train import prepare
    from revlearn.methods import _reversible

    COUNTS = tuple(int(c) for c in sys.argv[1].split(","))
    STEPS, N, D, H, C = 6, 64, 128, 256, 8
    kx, ky, kw1, kw2, kv = jax.random.split(jax.random.PRNGKey(0), 5)
    X = jax.random.normal(kx, (N, D))
    Y = jax.nn.one_hot(jax.random.randint(ky, (N,), 0, C), C)
    W0 = {"w1": 0.3 * jax.random.normal(kw1, (D, H)), "b1": jnp.zeros(H),
          "w2": 0.3 * jax.random.normal(kw2, (H, C)), "b2": jnp.zeros(C)}
    XV = jax.random.normal(kv, (32, D))
    YV = jax.nn.one_hot(jnp.arange(32) % C, C)

    def apply(p, x):
        # under an explicit mesh a contraction over a sharded axis states its output's sharding
        mesh = jax.sharding.get_abstract_mesh()
        z = jnp.matmul(jnp.tanh(x @ p["w1"] + p["b1"]), p["w2"],
                       out_sharding=None if mesh.empty else P())
        return jax.nn.log_softmax(z + p["b2"])

    def loss(p, h, t):
        nll = -jnp.mean(jnp.sum(apply(p, h["x"]) * h["y"], -1))
        return nll + jnp.exp(h["log_l2"]) * jnp.sum(p["w1"] ** 2)

    def meta(p):
        return -jnp.mean(jnp.sum(apply(p, XV) * YV, -1))

    def place(S, kind):
        """(params0, hypers, mesh) on a mesh of the first S devices, or unplaced for S = 0."""
        h = {"x": X, "y": Y, "log_l2": jnp.asarray(-4.0)}
        if S == 0:
            return W0, h, None
        mesh = jax.make_mesh((S,), ("d",), axis_types=(AxisType.Explicit,),
                             devices=jax.devices()[:S])
        put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
        if kind == "data":      # batch split, weights replicated
            w = {k: put(v, P()) for k, v in W0.items()}
            h = {"x": put(X, P("d", None)), "y": put(Y, P("d", None)),
                 "log_l2": put(h["log_l2"], P())}
        else:                   # hidden units split (weights sharded), data replicated
            w = {"w1": put(W0["w1"], P(None, "d")), "b1": put(W0["b1"], P("d")),
                 "w2": put(W0["w2"], P("d", None)), "b2": put(W0["b2"], P())}
            h = {k: put(v, P()) for k, v in h.items()}
        return w, h, mesh

    def opt(rule, lr):
        return (optim.momentum(lr, 0.9) if rule == "momentum"
                else optim.adam(0.05 * lr, b1=0.9, b2=0.99))

    def hypergrads(w, h, rule, method=None):
        """(hypergradients w.r.t. params0, hypers and lr; w_T)"""
        lr = jnp.full(STEPS, 0.3)
        def f(w, h, lr):
            wT = revlearn.train(loss, w, h, optimizer=opt(rule, lr), steps=STEPS, method=method)
            return meta(wT), wT
        return jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))(w, h, lr)

    def flat(tree):
        return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree_util.tree_leaves(tree)])

    @revlearn._sharding.with_auto_axes
    def state_bytes_per_device(loss, w, h, rule):
        """Bytes one device holds of the reversible state after the forward pass: W, the
        moments, each buffer's x, bounds, heads and word stacks (the addressable shard)."""
        p = prepare(loss, w, h, optimizer=opt(rule, jnp.full(STEPS, 0.3)), steps=STEPS)
        method = revlearn.Reversible()
        cap = method.capacity(p)
        from revlearn._problem import decay_values, split_inexact
        th_f, th_o = split_inexact(p.theta)
        names = [m.name for m in p.rule.moments]
        leaves = lambda t: [jnp.asarray(a) for a in jax.tree_util.tree_leaves(t)]
        fw = jax.jit(lambda w0, s0, th_f: _reversible.forward(
            p, method, cap, w0, s0, p.state0.get("count", jnp.int32(0)), th_f, th_o, p.hypers,
            decay_values(p)))(leaves(p.params0), {n: leaves(p.state0[n]) for n in names}, th_f)
        state = (fw.W, fw.X, fw.x, fw.m, fw.head, fw.stacks)
        total = per_device = 0
        for a in jax.tree_util.tree_leaves(state):
            total += a.nbytes
            per_device += max(s.data.nbytes for s in a.addressable_shards)
        return total, per_device

    def measure(w, h, rule):
        g, wT = hypergrads(w, h, rule)
        rel = float(np.linalg.norm(flat(g) - ref[rule]) / np.linalg.norm(ref[rule]))
        gu = flat(hypergrads(w, h, rule, revlearn.Unrolled())[0])
        rel_unrolled = float(np.linalg.norm(gu - ref_u[rule]) / np.linalg.norm(ref_u[rule]))
        rel_methods = float(np.linalg.norm(flat(g) - gu) / np.linalg.norm(gu))
        # the last half of the steps kept (Reversible(budget=...)): their residuals sharded too
        gb = flat(hypergrads(w, h, rule, revlearn.Reversible(budget=STEPS // 2))[0])
        rel_budget = float(np.linalg.norm(gb - flat(g)) / np.linalg.norm(flat(g)))
        rc = revlearn.check_reversal(loss, w, h, optimizer=opt(rule, jnp.full(STEPS, 0.3)),
                                     steps=STEPS)
        same = lambda a, b: a.sharding.is_equivalent_to(b.sharding, a.ndim)
        leaves = jax.tree_util.tree_leaves
        total, per_dev = state_bytes_per_device(loss, w, h, rule)
        return dict(rel=rel, rel_unrolled=rel_unrolled, rel_methods=rel_methods,
                    rel_budget=rel_budget, exact=rc.passed,
                    keeps=all(same(a, b) for a, b in zip(leaves(wT), leaves(w))),
                    grad_keeps=all(same(a, b) for a, b in zip(leaves(g[0]), leaves(w))),
                    total=total, per_device=per_dev)

    out = {"cases": []}
    ref, ref_u = {}, {}
    for rule in ("momentum", "adam"):
        w, h, _ = place(0, "data")
        ref[rule] = flat(hypergrads(w, h, rule)[0])
        ref_u[rule] = flat(hypergrads(w, h, rule, revlearn.Unrolled())[0])
        out["single_rel_methods_" + rule] = float(np.linalg.norm(ref[rule] - ref_u[rule])
                                                  / np.linalg.norm(ref_u[rule]))
        out["single_total_bytes_" + rule] = state_bytes_per_device(loss, w, h, rule)[0]
    for kind in ("data", "model"):
        for S in COUNTS:
            for rule in ("momentum", "adam"):
                w, h, mesh = place(S, kind)
                with jax.set_mesh(mesh):
                    case = measure(w, h, rule)
                out["cases"].append(dict(kind=kind, S=S, rule=rule, **case))

    # bad meshes
    errors = {}
    mesh8 = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
    mesh4 = jax.make_mesh((4,), ("d",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:4])
    try:
        bad = {"w": jax.device_put(jnp.ones((6, 3)), NamedSharding(mesh4, P("d", None)))}
        revlearn.sgd(lambda p, h, t: jnp.sum(p["w"] ** 2), bad, None, lr=0.1, momentum=0.9, steps=2)
    except Exception as e:
        errors["indivisible"] = f"{type(e).__name__}: {e}"
    try:
        w = {"w": jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh8, P("d", None)))}
        x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh4, P("d", None)))
        revlearn.sgd(lambda p, h, t: jnp.sum(p["w"] * h), w, x, lr=0.1, momentum=0.9, steps=2)
    except Exception as e:
        errors["two_meshes"] = f"{type(e).__name__}: {e}"
    out["errors"] = errors
    print("RESULT " + json.dumps(out))
''')


# CI: 8 devices (against the unplaced one-device reference); -m slow: every count, including a
# mesh of one device
@pytest.fixture(scope="module", params=[(8,), pytest.param((1, 2, 4, 8), marks=pytest.mark.slow)],
                ids=["8", "1-2-4-8"])
def results(request):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONWARNINGS="ignore")
    counts = ",".join(map(str, request.param))
    proc = subprocess.run([sys.executable, "-c", WORKER, counts], capture_output=True,
                          text=True, env=env, timeout=1500)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(line[0][len("RESULT "):])
    out["counts"] = request.param
    for c in out["cases"]:  # shown with pytest -s
        print(f"{c['kind']:5} S={c['S']} {c['rule']:8} vs 1 device {c['rel']:.1e} (Unrolled "
              f"{c['rel_unrolled']:.1e}), vs Unrolled {c['rel_methods']:.1e}, exact "
              f"{c['exact']}, state bytes/device {c['per_device']} of {c['total']}")
    return out


def test_reversal_is_bit_exact_on_every_mesh(results):
    bad = [c for c in results["cases"] if not c["exact"]]
    assert not bad and len(results["cases"]) == 4 * len(results["counts"])


def test_hypergradients_equal_the_single_device_ones(results):
    """Momentum: within 1e-12 of the single-device hypergradient. Adam: a sum over a batch
    split across devices is added in another order, and Adam's g / sqrt(s) carries that
    rounding along the trajectory (sharded Unrolled moves ~1e-12 too); in Reversible it also
    moves which way m and s round to their fixed points, so there the change must stay 10x
    below Reversible's own distance from float Adam on one device (~5e-9 here, from m's
    64-bit fixed point): sharding adds nothing beyond the method's accuracy."""
    for c in results["cases"]:
        bound = 1e-12 if c["rule"] == "momentum" else max(
            1e-12, 10 * c["rel_unrolled"], 0.1 * results["single_rel_methods_" + c["rule"]])
        assert c["rel"] <= bound, c
        # Adam's m is 64-bit fixed point: it follows float Adam to ~1e-8 here, on one device too
        assert c["rel_methods"] <= (1e-9 if c["rule"] == "momentum" else 1e-7), c


def test_kept_steps_give_the_same_hypergradients_on_every_mesh(results):
    """Reversible(budget=T/2) against the budget-0 method on the same mesh: the kept steps'
    gradients are computed inline rather than isolated, so Adam's fixed-point rounding may
    move as it does under sharding (see above); momentum's may not move at all."""
    for c in results["cases"]:
        assert c["rel_budget"] <= (1e-10 if c["rule"] == "momentum" else 1e-7), c


def test_outputs_keep_the_input_shardings(results):
    assert all(c["keeps"] and c["grad_keeps"] for c in results["cases"]), results["cases"]


def test_each_device_holds_its_share_of_the_state(results):
    for c in results["cases"]:
        single = results["single_total_bytes_" + c["rule"]]
        # the layout rounds each leaf up to whole rows per device: within 10% at 8 devices
        assert c["per_device"] <= 1.1 * single / c["S"], c


def test_bad_meshes_are_clear_errors(results):
    e = results["errors"]
    # JAX itself refuses an uneven split, before revlearn sees the array
    assert "does not evenly divide the dimension size 6" in e["indivisible"], e
    assert "put every array of one training run on one mesh" in e["two_meshes"], e
