"""Model libraries as JAX users bring them: an Equinox module as params0 (and in hypers), a
Flax linen `params` dict, a Flax nnx model through `nnx.split`/`nnx.merge`, optax inner and
meta-optimisers. Each through Reversible and Unrolled: w_T comes back in the user's type,
the hypergradients agree (relative 1e-9 in float64), the reversal is bit-exact.

The libraries are test extras, never core dependencies: each test skips without its library.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
import pytest

import revlearn
from revlearn import optim

STEPS, BATCH = 8, 6
_kx, _ky, _kv = jax.random.split(jax.random.PRNGKey(0), 3)
X = jax.random.normal(_kx, (24, 3))
Y = jnp.tanh(X @ jnp.array([[1.0, -0.5], [0.3, 0.8], [-0.7, 0.2]]))
XV = jax.random.normal(_kv, (12, 3))
YV = jnp.tanh(XV @ jnp.array([[1.0, -0.5], [0.3, 0.8], [-0.7, 0.2]]))


def batch(step):
    i = (step * BATCH) % X.shape[0]
    return (jax.lax.dynamic_slice_in_dim(X, i, BATCH), jax.lax.dynamic_slice_in_dim(Y, i, BATCH))


def sq_norm(tree):
    return sum(jnp.sum(l ** 2) for l in jax.tree_util.tree_leaves(tree))


def rel_err(a, b) -> float:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb) and la
    num = sum(float(jnp.sum((jnp.asarray(x) - jnp.asarray(y)) ** 2)) for x, y in zip(la, lb))
    den = sum(float(jnp.sum(jnp.asarray(y) ** 2)) for y in lb)
    return (num / max(den, 1e-300)) ** 0.5


RULES = {"momentum": lambda lr: optim.momentum(lr, 0.9),
         "adam": lambda lr: optim.adam(0.2 * lr, b1=0.8, b2=0.99)}


# ---------------------------------------------------------------- Equinox

def _eqx_problem():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(3, 2, 5, depth=1, activation=jnp.tanh, dtype=jnp.float64,
                       key=jax.random.PRNGKey(1))

    def loss_fn(m, hypers, step):
        xb, yb = batch(step)
        penalty = jnp.exp(hypers["log_l2"]) * sq_norm(eqx.filter(m, eqx.is_inexact_array))
        return jnp.mean((jax.vmap(m)(xb) - yb) ** 2) + penalty

    def meta_fn(m):
        return jnp.mean((jax.vmap(m)(XV) - YV) ** 2)

    return eqx, model, loss_fn, meta_fn, {"log_l2": jnp.asarray(-4.0)}


@pytest.mark.parametrize("rule", ["momentum", pytest.param("adam", marks=pytest.mark.slow)])
def test_equinox_mlp_reversible_matches_unrolled(rule):
    """The user's way: differentiate w.r.t. the module's arrays (eqx.partition), the lr and
    hypers; w_T is the module's type with its functions carried."""
    eqx, model, loss_fn, meta_fn, hypers = _eqx_problem()
    trained, static = eqx.partition(model, eqx.is_inexact_array)

    def grads(method):
        def f(p, lr, hypers):
            w_T = revlearn.train(loss_fn, eqx.combine(p, static), hypers, steps=STEPS,
                                 optimizer=RULES[rule](lr), method=method)
            assert type(w_T) is type(model)
            assert (w_T.activation, w_T.final_activation) == (model.activation,
                                                              model.final_activation)
            return meta_fn(w_T)
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(trained, 0.3, hypers)

    (v_rev, g_rev), (v_unr, g_unr) = grads(revlearn.Reversible()), grads(revlearn.Unrolled())
    assert abs(float(v_rev) - float(v_unr)) <= 1e-9 * abs(float(v_unr))
    assert float(v_rev) < float(meta_fn(model))         # its arrays were trained
    for a, b in zip(g_rev, g_unr):
        assert rel_err(a, b) <= 1e-9
    assert float(jnp.abs(g_rev[1])) > 0 and float(jnp.abs(g_rev[2]["log_l2"])) > 0
    assert revlearn.check_reversal(loss_fn, model, hypers, optimizer=RULES[rule](0.3),
                                   steps=STEPS).passed


@pytest.mark.slow
def test_equinox_mlp_checkers():
    """check_hypergradients (Reversible vs Unrolled vs finite differences) and buffer_usage
    take the module as they take any params0."""
    eqx, model, loss_fn, meta_fn, hypers = _eqx_problem()
    opt = optim.momentum(0.3, 0.9)
    gc = revlearn.check_hypergradients(loss_fn, meta_fn, model, hypers, optimizer=opt,
                                       steps=STEPS, rtol_unrolled=1e-9)
    assert gc.passed and gc.names == ("params0", "hypers", "lr", "momentum"), str(gc)
    usage = revlearn.buffer_usage(loss_fn, model, hypers, optimizer=opt, steps=STEPS)
    assert usage.max_words_used <= usage.capacity_words


def test_equinox_state_and_per_weight_hyperparameters():
    """state0 and per-weight hyperparameters take the shape of the module's trained part."""
    eqx, model, loss_fn, _, hypers = _eqx_problem()
    trained = eqx.filter(model, eqx.is_inexact_array)
    # per weight (a leaf per array) and per layer (a prefix: one entry per layer)
    lr_w = jax.tree_util.tree_map(lambda a: jnp.full(a.shape, 0.05), trained)
    lr_layer = eqx.tree_at(lambda m: m.layers, trained,
                           tuple(jnp.asarray(0.05) for _ in trained.layers))
    opt = optim.momentum(lr_w, 0.9)
    w_a = revlearn.train(loss_fn, model, hypers, optimizer=opt, steps=STEPS)
    w_b = revlearn.train(loss_fn, model, hypers, optimizer=optim.momentum(lr_layer, 0.9),
                         steps=STEPS)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(w_a),
                                                    jax.tree_util.tree_leaves(w_b)))
    # optimizer.init(module) is shaped like the trained part; train's state chains windows
    state0 = opt.init(model)
    assert jax.tree_util.tree_structure(state0.v) == jax.tree_util.tree_structure(trained)
    w_h, s_h = revlearn.train(loss_fn, model, hypers, optimizer=opt, steps=STEPS // 2,
                              state0=state0, return_state=True)
    assert type(w_h) is type(model) and type(s_h.v) is type(model)
    w_2 = revlearn.train(loss_fn, w_h, hypers, optimizer=opt, steps=STEPS // 2, state0=s_h,
                         method=revlearn.Unrolled())
    assert type(w_2) is type(model)
    # a moment shaped like something else: one line naming it and the fix
    adam = optim.adam(0.01)
    bad = adam.init(model)._replace(m={"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"state0.m must have the same structure .* Equinox "
                                         r"module, like its trained part"):
        revlearn.train(loss_fn, model, hypers, optimizer=adam, steps=STEPS, state0=bad)
    with pytest.raises(ValueError, match=r"v0 must have the same structure"):
        revlearn.sgd(loss_fn, model, hypers, lr=0.1, momentum=0.9, steps=STEPS, v0=[1.0])
    # a hyperparameter spec that is not a prefix of the trained part: named, with the fix
    with pytest.raises(ValueError, match="lr is a dict whose structure is not a prefix"):
        revlearn.train(loss_fn, model, hypers, optimizer=optim.adam({"w": 0.1}), steps=STEPS)


def test_equinox_carried_leaves_and_module_hypers():
    """Non-array leaves of a module (Python numbers, ints, functions, strings) are carried
    unchanged in params0 and in hypers; the module's arrays in hypers get hypergradients.
    Outside a module the old rules stand (a string in a dict of hypers is refused)."""
    eqx = pytest.importorskip("equinox")

    class Affine(eqx.Module):
        w: jax.Array
        scale: float            # a Python float: carried, not trained (eqx's convention)
        shift: jax.Array        # an integer array: carried
        act: object             # a function: carried
        name: str

        def __call__(self, x):
            return self.act(self.scale * x @ self.w + self.shift)

    class Teacher(eqx.Module):   # hypers: its targets' map, with a function and a string
        a: jax.Array
        fn: object
        tag: str

    model = Affine(0.3 * jnp.ones((3, 2)), 0.5, jnp.asarray(1, jnp.int32), jnp.tanh, "aff")
    teacher = Teacher(jnp.array([[1.0, -0.5], [0.3, 0.8], [-0.7, 0.2]]), jnp.sin, "t")

    def loss_fn(m, h, step):
        xb, _ = batch(step)
        return jnp.mean((m(xb) - h.fn(xb @ h.a)) ** 2)

    def meta_fn(m):
        return jnp.mean((m(XV) - YV) ** 2)

    opt = optim.momentum(0.2, 0.9)
    w_T = revlearn.train(loss_fn, model, teacher, optimizer=opt, steps=STEPS)
    assert (w_T.scale, w_T.act, w_T.name) == (0.5, jnp.tanh, "aff")
    assert w_T.shift is model.shift
    assert not np.array_equal(w_T.w, model.w)

    def f(a, method):
        h = eqx.tree_at(lambda t: t.a, teacher, a)
        return meta_fn(revlearn.train(loss_fn, model, h, optimizer=opt, steps=STEPS,
                                      method=method))
    g_rev = jax.jit(jax.grad(f), static_argnums=1)(teacher.a, revlearn.Reversible())
    g_unr = jax.jit(jax.grad(f), static_argnums=1)(teacher.a, revlearn.Unrolled())
    assert rel_err(g_rev, g_unr) <= 1e-9 and float(jnp.max(jnp.abs(g_rev))) > 0
    assert revlearn.check_reversal(loss_fn, model, teacher, optimizer=opt, steps=STEPS).passed
    with pytest.raises(TypeError, match=r"hypers\['name'\] is a str"):
        revlearn.train(lambda p, h, t: jnp.sum(p ** 2), jnp.ones(3), {"name": "abc"},
                       optimizer=opt, steps=STEPS)


# ---------------------------------------------------------------- Flax

def _flax_check(loss_fn, meta_fn, params0, hypers):
    """Reversible vs Unrolled hypergradients w.r.t. params0, the lr and hypers; bit-exact
    reversal."""
    def grads(method):
        def f(p, lr, h):
            return meta_fn(revlearn.train(loss_fn, p, h, optimizer=optim.momentum(lr, 0.9),
                                          steps=STEPS, method=method))
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(params0, 0.3, hypers)
    g_rev, g_unr = grads(revlearn.Reversible()), grads(revlearn.Unrolled())
    for a, b in zip(g_rev, g_unr):
        assert rel_err(a, b) <= 1e-9
    assert revlearn.check_reversal(loss_fn, params0, hypers, optimizer=optim.momentum(0.3, 0.9),
                                   steps=STEPS).passed


def test_flax_linen_params():
    nn = pytest.importorskip("flax.linen")

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = jnp.tanh(nn.Dense(6, param_dtype=jnp.float64)(x))
            return nn.Dense(2, param_dtype=jnp.float64)(x)

    model = MLP()
    params0 = model.init(jax.random.PRNGKey(1), X[:1])["params"]

    def loss_fn(p, h, step):
        xb, yb = batch(step)
        return jnp.mean((model.apply({"params": p}, xb) - yb) ** 2) + jnp.exp(h) * sq_norm(p)

    def meta_fn(p):
        return jnp.mean((model.apply({"params": p}, XV) - YV) ** 2)

    w_T = revlearn.train(loss_fn, params0, jnp.asarray(-4.0), optimizer=optim.momentum(0.3, 0.9),
                         steps=STEPS)
    assert jax.tree_util.tree_structure(w_T) == jax.tree_util.tree_structure(params0)
    _flax_check(loss_fn, meta_fn, params0, jnp.asarray(-4.0))


def test_flax_nnx_split_merge():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 6, param_dtype=jnp.float64, rngs=rngs)
            self.l2 = nnx.Linear(6, 2, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    graphdef, params0, rest = nnx.split(MLP(nnx.Rngs(1)), nnx.Param, ...)

    def loss_fn(p, h, step):
        xb, yb = batch(step)
        model = nnx.merge(graphdef, p, rest)
        return jnp.mean((model(xb) - yb) ** 2) + jnp.exp(h) * sq_norm(p)

    def meta_fn(p):
        return jnp.mean((nnx.merge(graphdef, p, rest)(XV) - YV) ** 2)

    w_T = revlearn.train(loss_fn, params0, jnp.asarray(-4.0), optimizer=optim.momentum(0.3, 0.9),
                         steps=STEPS)
    trained = nnx.merge(graphdef, w_T, rest)
    assert isinstance(trained, MLP) and float(meta_fn(w_T)) < float(meta_fn(params0))
    _flax_check(loss_fn, meta_fn, params0, jnp.asarray(-4.0))


# ---------------------------------------------------------------- optax

def test_optax_inner_optimiser_on_an_equinox_module():
    """An optax GradientTransformation as the inner optimiser (a storing method), its state
    built the Equinox way: optax.sgd with momentum is revlearn's momentum rule rescaled
    (v = -(1 - m) * optax's trace), so its Unrolled hypergradients agree with the rule's
    Reversible ones."""
    optax = pytest.importorskip("optax")
    eqx, model, loss_fn, meta_fn, hypers = _eqx_problem()
    lr, m = 0.3, optim.applied(0.9, optim.MOMENTUM)      # the momentum revlearn applies
    tx = optax.sgd(lr * (1 - m), momentum=m)
    trained, static = eqx.partition(model, eqx.is_inexact_array)

    def f(p, h, optax_inner):
        kw = (dict(optimizer=tx, method=revlearn.Unrolled(), state0=tx.init(p)) if optax_inner
              else dict(optimizer=optim.momentum(lr, m)))
        return meta_fn(revlearn.train(loss_fn, eqx.combine(p, static), h, steps=STEPS, **kw))
    g_optax = jax.jit(jax.grad(f, argnums=(0, 1)), static_argnums=2)(trained, hypers, True)
    g_rule = jax.jit(jax.grad(f, argnums=(0, 1)), static_argnums=2)(trained, hypers, False)
    for a, b in zip(g_optax, g_rule):
        assert rel_err(a, b) <= 1e-9
    assert float(jnp.abs(g_optax[1]["log_l2"])) > 0


def test_optax_meta_optimiser_loop():
    """optax.adam over the hyperparameters, stepping on exact hypergradients: the validation
    loss goes down."""
    optax = pytest.importorskip("optax")
    eqx, model, loss_fn, meta_fn, _ = _eqx_problem()
    meta = {"log_lr": jnp.log(jnp.full(STEPS, 0.05)), "log_l2": jnp.asarray(-4.0)}

    @jax.jit
    def value_and_grad(meta):
        def f(meta):
            opt = optim.momentum(jnp.exp(meta["log_lr"]), 0.9)
            return meta_fn(revlearn.train(loss_fn, model, {"log_l2": meta["log_l2"]},
                                          optimizer=opt, steps=STEPS))
        return jax.value_and_grad(f)(meta)

    tx = optax.adam(0.1)
    state = tx.init(meta)
    losses = []
    for _ in range(4):
        loss, g = value_and_grad(meta)
        losses.append(float(loss))
        updates, state = tx.update(g, state, meta)
        meta = optax.apply_updates(meta, updates)
    assert losses[-1] < losses[0], losses


# ---------------------------------------------------------------- the examples

@pytest.mark.slow
@pytest.mark.parametrize("name, library", [("equinox_mlp.py", "equinox"),
                                           ("flax_linen.py", "flax"), ("flax_nnx.py", "flax")])
def test_interop_example_runs(name, library):
    """Each example runs as a user runs it: its hypergradient agrees with unrolled autodiff
    and its reversal is bit-exact."""
    import os
    import re
    import subprocess
    import sys
    pytest.importorskip(library)
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples", name)
    out = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ReversalCheck(weights_exact=True, state_exact=True, buffer_empty=True" in out.stdout
    err = float(re.search(r"relative difference from unrolled autodiff: (\S+)", out.stdout)[1])
    assert err < 1e-8, out.stdout
