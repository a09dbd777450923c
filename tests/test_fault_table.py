"""One fault policy for every method and checker: each fault x each method and checker gives
the exact outcome in the table, never a silent wrong answer.

A row is a fault (a small problem that triggers it); a column is a way of computing: the
three methods (the hypergradient w.r.t. the learning rate under `jax.grad`) and the three
checkers. The cell is the expected outcome: an exception type and a fragment of its one-line
message, or `OK` (a finite answer that agrees across the methods that return one).
"""

import dataclasses

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
import pytest

import revlearn
from revlearn import optim

W0 = {"w": jnp.ones(3)}
STEPS = 4


def quad(p, h, t):
    return jnp.sum((p["w"] - 0.5) ** 2)


def meta(p):
    return jnp.sum(p["w"] ** 2)


def _counter():
    """A loss that is not a pure function of its arguments: the gradient changes between the
    forward pass and its recomputation backwards (a host counter), so reversal drifts."""
    calls = {"n": 0}

    def scale(t):
        calls["n"] += 1
        return np.asarray(1.0 + 1e-3 * calls["n"], np.float64)

    def loss(p, h, t):
        c = jax.pure_callback(scale, jax.ShapeDtypeStruct((), jnp.float64), t)
        return c * jnp.sum((p["w"] - 0.5) ** 2)

    return loss


OK = "ok"
RE = revlearn.ReversibleError
# Each fault: (loss_fn, params0, optimizer, meta_fn, method overrides) and the outcome per column.
FAULTS = {
    "nonfinite-gradient": dict(
        loss=lambda p, h, t: jnp.sum(jnp.sqrt(p["w"] - 5.0)), opt=optim.momentum(0.1, 0.9),
        expect={c: (RE, "gradient of loss_fn is not finite at step 0") for c in
                ("reversible", "unrolled", "checkpointed", "check_reversal",
                 "check_hypergradients", "buffer_usage")}),
    "overflow-to-inf": dict(
        loss=lambda p, h, t: -1e300 * jnp.sum(p["w"]), opt=optim.momentum(1e10, 0.9),
        expect={"reversible": (RE, "left the fixed-point range"),
                "unrolled": (RE, "overflowed to inf or NaN at step 0"),
                "checkpointed": (RE, "overflowed to inf or NaN at step 0"),
                "check_reversal": (RE, "left the fixed-point range"),
                "check_hypergradients": (RE, "left the fixed-point range"),
                "buffer_usage": (RE, "left the fixed-point range")}),
    # Large but finite weights: outside the fixed-point range (Reversible stops), exact in
    # floating point (the storing methods return the float answer, which agrees between them).
    "beyond-fixed-point-range": dict(
        loss=quad, opt=optim.momentum(1e4, 0.9),
        expect={"reversible": (RE, "left the fixed-point range |w| < 1024 at step"),
                "unrolled": OK, "checkpointed": OK,
                "check_reversal": (RE, "left the fixed-point range"),
                "check_hypergradients": (RE, "left the fixed-point range"),
                "buffer_usage": (RE, "left the fixed-point range")}),
    "large-initial-weights": dict(
        loss=quad, params0={"w": jnp.full(3, 2000.0)}, opt=optim.momentum(0.1, 0.9),
        expect={"reversible": (RE, "left the fixed-point range |w| < 1024 at step 0"),
                "unrolled": OK, "checkpointed": OK,
                "check_reversal": (RE, "left the fixed-point range"),
                "check_hypergradients": (RE, "left the fixed-point range"),
                "buffer_usage": (RE, "left the fixed-point range")}),
    "nonfinite-hypergradient": dict(
        loss=quad, opt=optim.momentum(0.5, 0.9), meta=lambda p: 1e308 * jnp.sum(p["w"]),
        expect={"reversible": (RE, "hypergradient became non-finite"),
                "unrolled": (RE, "hypergradient became non-finite in the backward pass"),
                "checkpointed": (RE, "hypergradient became non-finite in the backward pass"),
                "check_reversal": OK, "buffer_usage": OK,
                "check_hypergradients": (RE, "hypergradient became non-finite")}),
    "lr-nan": dict(
        loss=quad, opt=optim.momentum(float("nan"), 0.9),
        # concrete in the checkers (rejected before running), traced under jax.grad (at runtime)
        expect={**{c: (RE, "the learning rate is not finite at step 0") for c in
                   ("reversible", "unrolled", "checkpointed")},
                **{c: (ValueError, "lr contains non-finite values") for c in
                   ("check_reversal", "check_hypergradients", "buffer_usage")}}),
    "momentum-off-grid": dict(
        loss=quad, opt=optim.momentum(0.1, 0.999999),
        expect={c: (ValueError, "momentum must lie strictly inside (0, 1)") for c in
                ("reversible", "unrolled", "checkpointed", "check_reversal",
                 "check_hypergradients", "buffer_usage")}),
    "adam-eps-zero": dict(
        loss=quad, opt=optim.adam(0.01, eps=0.0),
        expect={c: (ValueError, "eps must be > 0") for c in
                ("reversible", "unrolled", "checkpointed", "check_reversal",
                 "check_hypergradients", "buffer_usage")}),
    "adam-negative-state": dict(
        loss=quad, opt=optim.adam(0.01),
        state0=optim.adam(0.01).init(W0)._replace(s={"w": -jnp.ones(3)}),
        expect={c: (RE, "is a mean square but holds negative values at step 0") for c in
                ("reversible", "unrolled", "checkpointed")} | {
                "check_reversal": (RE, "holds negative values"),
                "buffer_usage": (RE, "holds negative values")}),
    "exhausted-buffer": dict(
        loss=quad, opt=optim.momentum(0.1, 0.5), steps=40,
        method=revlearn.Reversible(min_momentum=0.9),
        expect={"reversible": (RE, "information buffer is exhausted at step"),
                "unrolled": OK, "checkpointed": OK,
                "check_reversal": (RE, "information buffer is exhausted"),
                "buffer_usage": (RE, "information buffer is exhausted")}),
    "impure-loss": dict(
        loss=_counter, opt=optim.momentum(0.1, 0.9),
        expect={"reversible": (RE, "did not recover the initial weights"),
                "check_reversal": "drift"}),
    "string-hyper": dict(
        loss=quad, opt=optim.momentum(0.1, 0.9), hypers={"name": "abc"},
        expect={c: (TypeError, "hypers['name'] is a str") for c in
                ("reversible", "unrolled", "checkpointed", "check_reversal", "buffer_usage")}),
    "integer-params": dict(
        loss=lambda p, h, t: jnp.sum(p["w"] ** 2), params0={"w": jnp.ones(3, jnp.int32)},
        opt=optim.momentum(0.1, 0.9),
        expect={c: (ValueError, "params0['w'] has dtype int32") for c in
                ("reversible", "unrolled", "checkpointed", "check_reversal", "buffer_usage")}),
}

METHODS = {"reversible": revlearn.Reversible, "unrolled": revlearn.Unrolled,
           "checkpointed": lambda: revlearn.Checkpointed(every=2)}
CASES = [(f, c) for f, spec in FAULTS.items() for c in spec["expect"]]


def _spec(fault):
    spec = dict(FAULTS[fault])
    if spec["loss"] is _counter:
        spec["loss"] = _counter()
    return spec


def _compute(column, spec):
    loss, opt = spec["loss"], spec["opt"]
    params0, hypers = spec.get("params0", W0), spec.get("hypers")
    steps, state0, meta_fn = spec.get("steps", STEPS), spec.get("state0"), spec.get("meta", meta)
    rev = spec.get("method") or revlearn.Reversible()
    if column in METHODS:
        method = rev if column == "reversible" else METHODS[column]()

        def f(lr):
            o = dataclasses.replace(opt, lr=lr)
            return meta_fn(revlearn.train(loss, params0, hypers, optimizer=o, steps=steps,
                                          method=method, state0=state0))
        value, grad = jax.value_and_grad(f)(opt.lr)
        return float(value), float(grad)
    if column == "check_reversal":
        return revlearn.check_reversal(loss, params0, hypers, optimizer=opt, steps=steps,
                                       state0=state0, method=rev)
    if column == "buffer_usage":
        return revlearn.buffer_usage(loss, params0, hypers, optimizer=opt, steps=steps,
                                     state0=state0, method=rev)
    if column == "check_hypergradients":
        return revlearn.check_hypergradients(loss, meta_fn, params0, hypers, optimizer=opt,
                                             steps=steps)
    raise AssertionError(column)


@pytest.mark.parametrize("fault, column", CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_fault_table(fault, column):
    spec = _spec(fault)
    expect = spec["expect"][column]
    if isinstance(expect, tuple):
        exc, fragment = expect
        # Under jit a ReversibleError reaches the caller as a JaxRuntimeError carrying it.
        with pytest.raises((exc, jax.errors.JaxRuntimeError)) as info:
            jax.block_until_ready(_compute(column, spec))
        assert fragment in str(info.value), str(info.value)
        if info.type is not exc:
            assert exc.__name__ in str(info.value)
        return
    out = _compute(column, spec)
    if expect == "drift":  # what check_reversal measures: reported, not raised
        assert not out.passed and not out.weights_exact
    elif column in METHODS:  # a finite answer, the same by every storing method
        assert np.all(np.isfinite(out))
        others = [_compute(c, _spec(fault)) for c in METHODS
                  if c != column and FAULTS[fault]["expect"].get(c) == OK]
        for o in others:
            np.testing.assert_allclose(out, o, rtol=1e-12)
    elif column == "check_reversal":
        assert out.passed
    elif column == "buffer_usage":
        assert out.max_words_used <= out.capacity_words


def test_the_table_is_large_enough():
    assert len(CASES) >= 40
