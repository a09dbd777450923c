"""Every update rule under every method: exact reversal, hypergradients three ways, optax
agreement, state chaining, faults. Momentum's own cases are in test_reversal.py and
test_hypergradients.py; here Adam, AdamW and RMSProp with momentum, beside momentum."""

import dataclasses

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

import revlearn
from revlearn import optim
from _problems import make

RULES = {
    "momentum": lambda lr=0.2: optim.momentum(lr, 0.9),
    "adam": lambda lr=0.01: optim.adam(lr),
    "adamw": lambda lr=0.01: optim.adam(lr, weight_decay=0.05),
    "rmsprop": lambda lr=0.002: optim.rmsprop_momentum(lr, decay=0.95, momentum=0.8),
}


# every rule, model and dtype in the default run, the rest of the matrix with -m slow (each
# case compiles its own program)
_DEFAULT = {("adam", "logistic", "float64"), ("adam", "mlp", "float32"), ("adam", "convnet", "float64"),
            ("adam", "convnet", "float32"), ("adamw", "mlp", "float64"),
            ("rmsprop", "logistic", "float32"), ("rmsprop", "convnet", "float64")}


@pytest.mark.parametrize("rule, model, dtype", [
    pytest.param(r, m, getattr(jnp, d), marks=() if (r, m, d) in _DEFAULT else pytest.mark.slow,
                 id=f"{r}-{m}-{d}")
    for r in ("adam", "adamw", "rmsprop") for m in ("logistic", "mlp", "convnet")
    for d in ("float64", "float32")])
def test_bit_exact_reversal_every_rule_and_model(rule, model, dtype):
    loss_fn, _, params0, hypers = make(model, dtype)
    steps = 20
    lr = jnp.linspace(1.0, 0.5, steps) * RULES[rule]().lr      # a per-step schedule
    opt = dataclasses.replace(RULES[rule](), lr=lr)
    rc = revlearn.check_reversal(loss_fn, params0, hypers, optimizer=opt, steps=steps)
    assert rc.passed and rc.max_weight_error_ulps == 0, rc


def _meta(loss_fn, meta_fn, params0, steps):
    def f(p0, hyp, opt, method):
        return meta_fn(revlearn.train(loss_fn, p0, hyp, optimizer=opt, steps=steps, method=method))
    return f


@pytest.mark.parametrize("rule", ["adam", "adamw", "rmsprop"])
def test_hypergradients_reversible_match_unrolled_every_hyperparameter(rule):
    """d/d(params0, data and per-weight L2, every hyperparameter of the rule: lr per step and
    per layer, decays per step, eps, weight decay per weight) agree to 1e-7 in float64."""
    loss_fn, meta_fn, params0, hypers = make("mlp")
    steps = 15
    ramp = jnp.linspace(1.0, 0.6, steps)
    base = RULES[rule]()
    lr = [{"w": base.lr * ramp, "b": base.lr * 0.5} for _ in params0]
    if rule == "rmsprop":
        opt = optim.rmsprop_momentum(lr, decay=jnp.full(steps, 0.95), momentum=[{"w": 0.8, "b": jnp.full(steps, 0.7)},
                                                                              {"w": 0.85, "b": 0.8}], eps=1e-6)
        bounds = {"decay": 0.9, "momentum": 0.6}
    else:
        wd = ([{"w": jnp.full(p["w"].shape, 0.05), "b": 0.01} for p in params0]
              if rule == "adamw" else 0.0)
        opt = optim.adam(lr, b1=[{"w": jnp.full(steps, 0.9), "b": 0.85} for _ in params0],
                         b2=0.99, eps=1e-6, weight_decay=wd)
        bounds = {"b1": 0.8, "b2": 0.98, "decoupled_decay": 0.99}
    f = _meta(loss_fn, meta_fn, params0, steps)
    got = jax.jit(jax.grad(lambda p, h, o: f(p, h, o, revlearn.Reversible(min_decay=bounds)),
                           argnums=(0, 1, 2)))(params0, hypers, opt)
    want = jax.grad(lambda p, h, o: f(p, h, o, revlearn.Unrolled()), argnums=(0, 1, 2))(
        params0, hypers, opt)
    flat_g, flat_w = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(flat_g) == len(flat_w)
    for g, w in zip(flat_g, flat_w):
        scale = float(jnp.max(jnp.abs(w)))
        assert scale > 0 or float(jnp.max(jnp.abs(g))) == 0
        assert float(jnp.max(jnp.abs(g - w))) <= 1e-7 * max(scale, 1e-300), (g, w)
    # every hyperparameter of the rule gets a nonzero hypergradient
    for name in opt.hyper_kinds:
        if name == "weight_decay" and rule != "adamw":
            continue
        leaves = jax.tree_util.tree_leaves(getattr(got[2], name))
        assert any(float(jnp.max(jnp.abs(l))) > 0 for l in leaves), name


@pytest.mark.parametrize("rule", ["adam", "rmsprop"])
def test_check_hypergradients_passes_for_every_rule(rule):
    """The shipped checker: Reversible vs Unrolled vs central finite differences, for
    params0, the data/L2 hypers and each of the rule's hyperparameters."""
    loss_fn, meta_fn, params0, hypers = make("logistic", n=32)
    gc = revlearn.check_hypergradients(loss_fn, meta_fn, params0, hypers,
                                       optimizer=RULES[rule](), steps=10)
    assert set(gc.names) >= {"params0", "hypers", "lr", "eps"}
    assert gc.passed, str(gc)


def test_adam_and_adamw_follow_optax():
    """With b1, b2 and lr * weight_decay on their grids, revlearn's Adam/AdamW is optax's:
    the same trajectory to rounding, through every method."""
    loss_fn, _, params0, hypers = make("mlp")
    steps = 12
    b1, b2 = 0.875, 1 - 2.0 ** -9                      # exactly on the 2^-24 grid
    lr, wd = 2.0 ** -6, 2.0 ** -4                      # lr * wd = 2^-10, on the 2^-32 grid
    for ours, theirs in ((optim.adam(lr, b1, b2, 1e-7), optax.adam(lr, b1, b2, 1e-7)),
                         (optim.adam(lr, b1, b2, 1e-7, weight_decay=wd),
                          optax.adamw(lr, b1, b2, 1e-7, weight_decay=wd))):
        want = revlearn.train(loss_fn, params0, hypers, optimizer=theirs, steps=steps,
                              method=revlearn.Unrolled())
        # the storing methods compute optax's arithmetic; Reversible rounds m to steps of
        # 2^-52 (s is held in 128 bits), which moves w by ~1e-11 over these steps
        for method, tol in ((revlearn.Unrolled(), 1e-13), (revlearn.Checkpointed(every=5), 1e-13),
                            (revlearn.Reversible(), 1e-9)):
            got = revlearn.train(loss_fn, params0, hypers, optimizer=ours, steps=steps, method=method)
            for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
                assert jnp.allclose(g, w, rtol=0, atol=tol), (method, float(jnp.max(jnp.abs(g - w))))


def test_optax_transforms_run_under_storing_methods_and_get_hypergradients():
    """Any optax GradientTransformation runs under Unrolled/Checkpointed; hyperparameters
    closed over or injected (optax.inject_hyperparams) get hypergradients; Reversible refuses
    it with the names of the reversible rules."""
    loss_fn, meta_fn, params0, hypers = make("logistic", n=32)
    steps = 8

    def closed(lr, method):
        return meta_fn(revlearn.train(loss_fn, params0, hypers, optimizer=optax.lion(lr),
                                      steps=steps, method=method))
    g_u = jax.grad(closed)(1e-3, revlearn.Unrolled())
    g_c = jax.grad(closed)(1e-3, revlearn.Checkpointed())
    assert float(jnp.abs(g_u)) > 0 and jnp.allclose(g_u, g_c, rtol=1e-10)

    tx = optax.inject_hyperparams(optax.adam)(learning_rate=0.01)

    def injected(lr):
        s0 = tx.init(params0)
        s0.hyperparams["learning_rate"] = lr
        return meta_fn(revlearn.train(loss_fn, params0, hypers, optimizer=tx, steps=steps,
                                      state0=s0, method=revlearn.Unrolled()))
    h = 1e-6
    fd = (injected(0.01 + h) - injected(0.01 - h)) / (2 * h)
    assert jnp.allclose(jax.grad(injected)(0.01), fd, rtol=1e-5)
    # optax.adam with on-grid decays is revlearn's adam: the same hypergradient w.r.t. lr
    ours = jax.grad(lambda lr: meta_fn(revlearn.train(
        loss_fn, params0, hypers, optimizer=optim.adam(lr), steps=steps)))(0.01)
    theirs = jax.grad(lambda lr: meta_fn(revlearn.train(
        loss_fn, params0, hypers, optimizer=optax.adam(lr, b1=float(optim.applied(0.9, optim.FINE)),
                                                        b2=float(optim.applied(0.999, optim.FINE))),
        steps=steps, method=revlearn.Unrolled())))(0.01)
    assert jnp.allclose(ours, theirs, rtol=1e-8), (ours, theirs)
    with pytest.raises(TypeError, match=r"optax GradientTransformation.*revlearn\.optim\.adam"):
        revlearn.train(loss_fn, params0, hypers, optimizer=optax.adam(0.01), steps=2)


@pytest.mark.parametrize("rule", [pytest.param("momentum", marks=pytest.mark.slow), "adam",
                                  pytest.param("rmsprop", marks=pytest.mark.slow)])
def test_state_chaining_equals_one_run(rule):
    """train(T1, return_state=True) then train(T2, state0=...) is one run of T1 + T2 steps
    (Adam's count continues its bias corrections), and the hypergradient through the two
    windows is the one through the single run."""
    loss_fn, meta_fn, params0, hypers = make("logistic", n=32)
    opt = RULES[rule]()

    def shifted(t0):    # the second window sees the minibatches of steps T1 .. T1 + T2 - 1
        return lambda p, h, t: loss_fn(p, h, t + t0)

    def one(p0, method):
        return revlearn.train(loss_fn, p0, hypers, optimizer=opt, steps=10, method=method,
                              return_state=True)

    def two(p0, method):
        w, s = revlearn.train(loss_fn, p0, hypers, optimizer=opt, steps=4, method=method,
                              return_state=True)
        return revlearn.train(shifted(4), w, hypers, optimizer=opt, steps=6, method=method,
                              state0=s, return_state=True)

    for method in (revlearn.Reversible(), revlearn.Unrolled()):
        (w1, s1), (w2, s2) = one(params0, method), two(params0, method)
        for a, b in zip(jax.tree_util.tree_leaves((w1, s1)), jax.tree_util.tree_leaves((w2, s2))):
            assert jnp.allclose(a, b, rtol=0, atol=1e-13)
        if rule == "adam":
            assert int(s2.count) == 10
        g1 = jax.grad(lambda p: meta_fn(one(p, method)[0]))(params0)
        g2 = jax.grad(lambda p: meta_fn(two(p, method)[0]))(params0)
        for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
            assert jnp.allclose(a, b, rtol=1e-9, atol=1e-13)


def test_final_state_is_differentiable():
    """A meta-objective that reads the final optimiser state (Adam's moments) gets the same
    hypergradient from Reversible and Unrolled; so does a state0 it starts from."""
    loss_fn, _, params0, hypers = make("logistic", n=32)

    def f(lr, m0, method):
        s0 = optim.adam(lr).init(params0)._replace(m=m0)
        _, s = revlearn.train(loss_fn, params0, hypers, optimizer=optim.adam(lr), steps=8,
                              method=method, state0=s0, return_state=True)
        return sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves((s.m, s.s)))

    m0 = jax.tree_util.tree_map(lambda p: 1e-3 * jnp.ones_like(p), params0)
    got = jax.grad(f, argnums=(0, 1))(0.01, m0, revlearn.Reversible())
    want = jax.grad(f, argnums=(0, 1))(0.01, m0, revlearn.Unrolled())
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-9 * float(jnp.max(jnp.abs(b))), (a, b)


@pytest.mark.parametrize("rule", ["adam", "adamw", "rmsprop"])
def test_buffer_within_one_percent_of_the_minimum(rule):
    loss_fn, _, params0, hypers = make("mlp")
    use = revlearn.buffer_usage(loss_fn, params0, hypers, optimizer=RULES[rule](), steps=200)
    assert 1.0 < use.ratio <= 1.01, use
    assert use.max_words_used <= use.capacity_words
    names = {n for n, _, _ in use.per_decay}
    assert names == {d.name for d in RULES[rule]().decays()}


def test_grids_apply_what_the_user_asked_for():
    assert optim.applied(0.999, optim.FINE) == 16760439 / 2 ** 24
    assert abs(optim.applied(0.999, optim.FINE) - 0.999) < 3e-8
    assert abs(optim.applied(0.9999, optim.FINE) - 0.9999) < 3e-8
    assert abs((1 - optim.applied(1 - 1e-7, optim.FINEST)) - 1e-7) < 1.2e-10
    assert optim.applied(0.9, optim.MOMENTUM) == 58982 / 65536
    for g in (optim.MOMENTUM, optim.FINE, optim.FINEST):
        # the reserved slot rounding covers the coder's worst case
        assert g.slack_bits >= np.log2(1 + 2.0 ** (g.slot_bits - g.low))
        assert g.high + g.bits == 63 and g.word_bits <= g.bits


@pytest.mark.parametrize("kw, match", [
    (dict(b1=1.0), r"b1 must lie inside \(0, 1\) on its grid .*n/2\^24"),
    (dict(b2=0.0), r"b2 must lie inside \(0, 1\)"),
    (dict(b1=0.001), r"b1 must lie inside .*0.0078125"),
    (dict(eps=0.0), r"eps must be > 0, got \[0.0\]"),
    (dict(eps=-1e-8), r"eps must be > 0"),
    (dict(weight_decay=-0.1), r"weight_decay must be >= 0"),
    (dict(lr=float("nan")), r"lr contains non-finite values"),
    (dict(lr=100.0, weight_decay=0.1), r"weight-decay factor 1 - lr \* weight_decay must lie inside"),
])
def test_bad_adam_hyperparameters_name_the_argument(kw, match):
    loss_fn, _, params0, hypers = make("logistic", n=32)
    args = dict(lr=0.01)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        revlearn.train(loss_fn, params0, hypers, optimizer=optim.adam(**args), steps=3)


def test_traced_faults_stop_with_the_name_and_step():
    loss_fn, _, params0, hypers = make("logistic", n=32)

    def run(b1, eps, method):
        return revlearn.train(loss_fn, params0, hypers, steps=5, method=method,
                              optimizer=optim.adam(0.01, b1=b1, eps=eps))[0]["w"]

    for method in (revlearn.Reversible(min_decay={"b1": 0.5}), revlearn.Unrolled()):
        with pytest.raises(Exception, match=r"b1 at step 0 rounds to n/2\^24 with n outside"):
            jax.block_until_ready(jax.jit(lambda b: run(b, 1e-8, method))(1.5))
        with pytest.raises(Exception, match=r"eps at step 0 is not finite and > 0"):
            jax.block_until_ready(jax.jit(lambda e: run(0.9, e, method))(-1.0))
    with pytest.raises(ValueError, match=r"cannot size the information buffer of b1.*min_decay=\{'b1': 0.5\}"):
        jax.jit(lambda b: run(b, 1e-8, revlearn.Reversible()))(0.9)
    with pytest.raises(ValueError, match=r"min_decay=\{'decoupled_decay': 0.999\}"):
        jax.jit(lambda lr: revlearn.train(loss_fn, params0, hypers, steps=3,
                                          optimizer=optim.adam(lr, weight_decay=0.1))[0]["w"])(0.01)


def test_state_faults():
    loss_fn, _, params0, hypers = make("logistic", n=32)
    opt = optim.adam(0.01)
    s0 = opt.init(params0)
    neg = s0._replace(s=jax.tree_util.tree_map(lambda x: x - 1.0, s0.s))
    with pytest.raises(Exception, match=r"optimiser state s is a mean square but holds negative"):
        jax.block_until_ready(revlearn.train(loss_fn, params0, hypers, optimizer=opt, steps=3,
                                             state0=neg))
    with pytest.raises(ValueError, match=r"state0 must be a AdamState\(.*for revlearn.optim.adam"):
        revlearn.train(loss_fn, params0, hypers, optimizer=opt, steps=3,
                       state0=optim.MomentumState(params0))

    def huge(p, h, t):   # gradient 1e3 per weight: s = 1e3 after step 0, 1.999e3 after step 1
        return 1e3 * sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(p))
    with pytest.raises(Exception, match=r"optimiser state s or its update left the fixed-point "
                                        r"range \|s\| < 1024 at step 1 \(frac_bits=52\)"):
        jax.block_until_ready(revlearn.train(huge, params0, hypers, optimizer=opt, steps=3))
    # a wider range (fewer fractional bits) runs it
    out = revlearn.train(huge, params0, hypers, optimizer=opt, steps=3,
                         method=revlearn.Reversible(frac_bits=40))
    assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree_util.tree_leaves(out))


def test_exhausted_buffer_names_the_decay():
    loss_fn, _, params0, hypers = make("logistic", n=32)
    f = jax.jit(lambda b1: revlearn.train(loss_fn, params0, hypers, steps=300,
                                          optimizer=optim.adam(0.01, b1=b1),
                                          method=revlearn.Reversible(min_decay={"b1": 0.95}))[0]["w"])
    with pytest.raises(Exception, match=r"information buffer of b1 is exhausted at step \d+ "
                                        r"\(capacity \d+ words of 8 bits per weight, sized for "
                                        r"b1 >= 0.95\).*min_decay=\{'b1': ...\}"):
        jax.block_until_ready(f(0.5))


def _generated(draw_shapes, T, dtype):
    shapes = draw_shapes
    keys = jax.random.split(jax.random.PRNGKey(len(shapes) * 31 + T), len(shapes) + 1)
    p0 = {f"p{i}": (0.5 * jax.random.normal(k, s)).astype(dtype) for i, (k, s) in enumerate(zip(keys, shapes))}
    target = {n: jnp.cos(jnp.arange(np.prod(v.shape), dtype=dtype).reshape(v.shape)) for n, v in p0.items()}

    def loss(p, h, t):    # a bowl with a step-dependent ripple: bounded gradients
        return sum(jnp.sum(h * (p[n] - target[n]) ** 2
                           * (1 + 0.1 * jnp.sin(t + jnp.arange(p[n].size).reshape(p[n].shape))))
                   for n in p)
    return p0, loss


@settings(max_examples=6, deadline=None, derandomize=True, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_generated_problems_reverse_exactly_and_agree(data):
    """Random pytrees (0-d and empty leaves), float32/float64, per-step or scalar lr, and
    decays anywhere on their grids, including their limits. (Fixed seed, 10 examples, no
    shrinking: each example compiles three programs (more with -m slow: see `test_generated_problems_many`); a failure prints its draws. It found
    that a one-step loop let XLA fold the isolating conditional away, fixed in
    `_problem.isolated`.)"""
    rule = data.draw(st.sampled_from(["adam", "adamw", "rmsprop"]))
    dtype = data.draw(st.sampled_from([jnp.float64, jnp.float32]))
    shapes = data.draw(st.lists(st.sampled_from([(), (3,), (2, 3), (0, 2), (5,)]), min_size=1, max_size=3))
    T = data.draw(st.integers(1, 9))
    g = optim.FINE
    decay = st.sampled_from([g.smallest(), 0.5, 0.9, 0.999, 1 - 2.0 ** -20, g.largest()])
    d1, d2 = data.draw(decay), data.draw(decay)
    lr = data.draw(st.sampled_from([0.01, "schedule"]))
    lr = jnp.linspace(0.02, 0.005, T) if lr == "schedule" else lr
    if rule == "rmsprop":
        opt = optim.rmsprop_momentum(lr, decay=d1, momentum=d2, eps=1e-6)
    else:
        opt = optim.adam(lr, b1=d1, b2=d2, eps=1e-6, weight_decay=0.1 if rule == "adamw" else 0.0)
    p0, loss = _generated(shapes, T, dtype)
    h = jnp.asarray(0.7, dtype)
    rc = revlearn.check_reversal(loss, p0, h, optimizer=opt, steps=T)
    assert rc.passed, (rule, shapes, T, d1, d2, rc)

    def meta(p, h, method):
        w = revlearn.train(loss, p, h, optimizer=opt, steps=T, method=method)
        return sum(jnp.sum(jnp.sin(x)) for x in jax.tree_util.tree_leaves(w))
    got = jax.grad(meta, argnums=(0, 1))(p0, h, revlearn.Reversible())
    want = jax.grad(meta, argnums=(0, 1))(p0, h, revlearn.Unrolled())
    tol = 1e-7 if dtype == jnp.float64 else 2e-3
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert jnp.allclose(a, b, rtol=tol, atol=tol * 1e-2), (rule, shapes, T, d1, d2, a, b)


@pytest.mark.parametrize("scale, tol", [(1e-4, 1e-7), (1e-7, 1e-7), (1e-9, 1e-5)])
def test_adam_with_tiny_gradients_follows_float_adam(scale, tol):
    """Adam reads s relatively (g / sqrt(s)): weights whose gradients are 1e-7 or 1e-9 (rarely
    lit pixels) move by lr per step all the same. The second moment is held in 128 bits, so
    the trajectory and the hypergradient stay those of float Adam (a 64-bit s rounded
    s = 1e-17 to nothing and moved such weights 10x too far). m stays in the weights' 64-bit
    fixed point (steps of 2^-52): at gradients of 1e-9 it holds ~7 digits, and Reversible
    follows float Adam to ~3e-7 there (the looser tolerance)."""
    p0 = {"w": jnp.linspace(-1.0, 1.0, 6)}

    def loss(p, h, t):
        return scale * jnp.sum(h * (p["w"] - 0.3) ** 2 + jnp.sin(3 * p["w"] + t))

    def meta(lr, h, method):
        w = revlearn.train(loss, p0, h, optimizer=optim.adam(lr, eps=1e-10), steps=30, method=method)
        return jnp.sum(w["w"] ** 3)
    args = (jnp.full(30, 0.01), jnp.asarray(2.0))
    assert jnp.allclose(meta(*args, revlearn.Reversible()), meta(*args, revlearn.Unrolled()),
                        rtol=tol)
    got = jax.grad(meta, argnums=(0, 1))(*args, revlearn.Reversible())
    want = jax.grad(meta, argnums=(0, 1))(*args, revlearn.Unrolled())
    for a, b in zip(got, want):
        assert float(jnp.max(jnp.abs(a - b))) <= tol * float(jnp.max(jnp.abs(b))), (a, b)


@pytest.mark.parametrize("rule", ["momentum", "rmsprop"])
def test_one_step_runs_reverse_exactly(rule):
    """A one-step loop is unrolled by XLA, which then knew the isolating conditional's
    predicate and inlined the gradient into each pass differently (RMSProp's s drifted by an
    ulp; found by the generated problems). The predicate now passes an optimisation barrier."""
    p0 = {"a": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.linspace(0.5, 2.0, 6).reshape(2, 3)}

    def loss(p, h, t):
        return sum(jnp.sum(h * jnp.cosh(x - 0.3) * (1 + 0.1 * jnp.sin(t + jnp.arange(6.0).reshape(2, 3))))
                   for x in p.values())
    opt = (optim.momentum(jnp.full(1, 0.02), 0.9) if rule == "momentum"
           else optim.rmsprop_momentum(jnp.full(1, 0.02), decay=0.5, momentum=0.9, eps=1e-6))
    rc = revlearn.check_reversal(loss, p0, jnp.asarray(0.7), optimizer=opt, steps=1)
    assert rc.passed, rc


@pytest.mark.slow
@settings(max_examples=60, deadline=None, derandomize=True, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_generated_problems_many(data):
    test_generated_problems_reverse_exactly_and_agree.hypothesis.inner_test(data)
