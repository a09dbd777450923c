"""Faults detected inside jitted loops, reported as Python exceptions.

A loop cannot raise, so every step folds its checks into a `Fault` carried
through the `lax.scan`: the code and step of the *first* fault. After the loop
`raise_if_fault` hands it to the host once (one `jax.debug.callback` per call,
never per step), and the host raises `ReversibleError` with a message that names
the step and the fix. Under `jax.jit` the exception surfaces as a
`JaxRuntimeError` whose text contains the message.

Never return a wrong hypergradient silently: every path that can lose
information (fixed-point overflow, an exhausted buffer, non-finite gradients,
momentum out of range, drift of the reversal) has a code here, and the storing
methods (`Unrolled`, `Checkpointed`) raise the same error when their
floating-point weights or state overflow to inf/NaN (`NONFINITE_STATE`) or a
hypergradient comes out non-finite (`guard_cotangents`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .exact._grid import off_grid_traced
from .optim._base import NONNEGATIVE, POSITIVE

OK = 0
NONFINITE_GRADIENT = 1
WEIGHT_OVERFLOW = 2
STATE_OVERFLOW = 3          # arg: the moment (e.g. the velocity v)
BUFFER_EXHAUSTED = 4        # arg: the decay
DECAY_RANGE = 5             # arg: the decay
BAD_HYPER = 6               # arg: the hyperparameter
REVERSAL_DRIFT = 7
BUFFER_UNDERFLOW = 8
NONFINITE_COTANGENT = 9
NEGATIVE_STATE = 10         # arg: the moment
NONFINITE_STATE = 11        # floating-point methods: a weight or the optimiser state is inf/NaN


class ReversibleError(FloatingPointError):
    """Raised when training or its reversal cannot be exact; never a wrong hypergradient.

    Its one-line message names where (e.g. `revlearn.train(optimizer=optim.adam,
    method=Reversible())`), the fault, the step and the fix. The faults: a non-finite
    gradient, hyperparameter, weight or state; a weight or moment leaving the fixed-point
    range; an exhausted information buffer; a decay off its grid or outside (0, 1);
    eps <= 0, a negative weight decay or second moment; a non-finite hypergradient in the
    backward pass; and any drift of the reversal (the recomputed gradient differed from
    the forward one). It subclasses `FloatingPointError`. Under `jax.jit` the error
    arrives as a `jax.errors.JaxRuntimeError` whose message carries this one.

    Example:
        ```python
        try:
            revlearn.train(loss_fn, params0, optimizer=revlearn.optim.momentum(1e4, 0.9),
                           steps=100)
        except revlearn.ReversibleError as e:
            print(e)   # ...: a weight left the fixed-point range |w| < 1024 at step 3 ...
        ```
    """


class Fault(NamedTuple):
    """The first fault of a loop: `code` (int32, 0 = none), its `step` (int32) and `arg`
    (int32: which moment, decay or hyperparameter, an index into the names the message is
    given; -1 for none)."""

    code: jax.Array
    step: jax.Array
    arg: jax.Array

    @classmethod
    def none(cls) -> "Fault":
        return cls(jnp.int32(OK), jnp.int32(-1), jnp.int32(-1))

    def record(self, bad: jax.Array, code: int, step: jax.Array, arg: int = -1) -> "Fault":
        """Keep the first fault: set (`code`, `step`, `arg`) if `bad` and nothing is set yet."""
        first = (self.code == OK) & bad
        return Fault(jnp.where(first, jnp.int32(code), self.code),
                     jnp.where(first, jnp.asarray(step, jnp.int32), self.step),
                     jnp.where(first, jnp.int32(arg), self.arg))


class Names(NamedTuple):
    """What a fault's `arg` indexes, per code family: moments (with their fixed points'
    fractional bits), decays (with their grids' descriptions and bound hints) and
    hyperparameters (with their kinds)."""

    moments: tuple = ()          # of (name, frac_bits)
    decays: tuple = ()           # of (name, description, grid bits, grid range text, word bits)
    hypers: tuple = ()           # of (name, kind)


def _pick(seq, i, default):
    return seq[i] if 0 <= i < len(seq) else default


def _message(code: int, step: int, arg: int, where: str, info: dict) -> str:
    k = info.get("frac_bits")
    names: Names = info.get("names") or Names()
    limit = f"{2.0 ** (62 - k):g}" if k is not None else "the fixed-point range"
    if code == STATE_OVERFLOW:
        name, kk = _pick(names.moments, arg, ("v", k))
        what = "a velocity or update" if name == "v" else f"the optimiser state {name} or its update"
        lim = f"{2.0 ** (62 - kk):g}" if kk is not None else limit
        return (f"{where}: {what} left the fixed-point range |{name}| < {lim} at step {step} "
                f"(frac_bits={k}). Lower the learning rate (or the gradients' scale), or use a "
                "smaller Reversible(frac_bits=...) for a wider range.")
    if code == NEGATIVE_STATE:
        name, _ = _pick(names.moments, arg, ("s", k))
        return (f"{where}: the optimiser state {name} is a mean square but holds negative values "
                f"at step {step}. Start from optimizer.init(params0) or a state a run returned.")
    if code == DECAY_RANGE:
        name, desc, bits, rng, _ = _pick(names.decays, arg, ("momentum", "momentum", 16,
                                                             "[2, 65535]", 16))
        if name == "momentum" and bits == 16:
            return (f"{where}: momentum at step {step} rounds to n/65536 with n outside "
                    "[2, 65535], i.e. momentum is not inside [2/65536, 65535/65536]. Keep "
                    "momentum strictly inside (0, 1), e.g. through a logit parameterisation.")
        return (f"{where}: {desc} at step {step} rounds to n/2^{bits} with n outside {rng}. "
                f"Keep it strictly inside (0, 1) (e.g. through a logit parameterisation).")
    if code == BAD_HYPER:
        name, kind = _pick(names.hypers, arg, ("lr", "real"))
        if name == "lr":
            return f"{where}: the learning rate is not finite at step {step}. Check lr."
        need = {"positive": "finite and > 0", "nonnegative": "finite and >= 0"}.get(kind, "finite")
        return f"{where}: {name} at step {step} is not {need}. Check {name}."
    if code == BUFFER_EXHAUSTED:
        name, _, _, _, wb = _pick(names.decays, arg, ("momentum", "", 16, "", 16))
        bound = info.get("bounds", {}).get(name, "its values")
        cap = info.get("capacity", {}).get(name, "?")
        of = "" if name == "momentum" else f" of {name}"
        return (f"{where}: the information buffer{of} is exhausted at step {step} "
                f"(capacity {cap} words of {wb} bits per weight, sized for {name} >= {bound}). "
                "Pass a lower "
                + ("Reversible(min_momentum=...)" if name == "momentum"
                   else f"Reversible(min_decay={{'{name}': ...}})")
                + " or more Reversible(extra_words=...).")
    msgs = {
        NONFINITE_GRADIENT: (
            f"{where}: the gradient of loss_fn is not finite at step {step}. "
            "Lower the learning rate, check the loss for log(0) or overflow, or "
            "clip inside loss_fn."),
        WEIGHT_OVERFLOW: (
            f"{where}: a weight left the fixed-point range |w| < {limit} at step "
            f"{step} (frac_bits={k}). Training diverged, or the weights are large: "
            f"lower the learning rate or use Reversible(frac_bits={k - 4 if k else 'smaller'}) "
            "for a wider range."),
        REVERSAL_DRIFT: (
            f"{where}: the reversal did not recover the initial weights, optimiser state "
            "and buffer bit-for-bit, so the hypergradient would be wrong. The "
            "gradient recomputed backwards differed from the forward one. Causes and "
            "fixes: loss_fn is not a pure function of (params, hypers, step) (derive "
            "any randomness from `step`); on GPU, non-deterministic kernels (a float32 "
            "convnet's gradient drifted on an H200 until run with "
            "XLA_FLAGS=--xla_gpu_deterministic_ops=true; scatter-add too); or the "
            "compiler rounded the gradient differently in the two passes (use "
            "Reversible(isolate_gradient=True, vjp_in_branch=False), which makes the "
            "backward gradient the forward pass's own computation; the default off CPU). "
            "Else use revlearn.Checkpointed() or revlearn.Unrolled(), which do not reverse."),
        BUFFER_UNDERFLOW: (
            f"{where}: the information buffer ran empty at step {step}: the reversal "
            "is out of step with the forward pass (non-deterministic loss_fn?)."),
        NONFINITE_COTANGENT: (
            f"{where}: the hypergradient became non-finite "
            + (f"at step {step} " if step >= 0 else "in the backward pass ")
            + "(the Hessian-vector product overflowed, or the meta-loss is not finite): "
            "training is chaotic at these hyperparameters; lower the learning rate or the "
            "number of steps."),
        NONFINITE_STATE: (
            f"{where}: a weight or the optimiser state overflowed to inf or NaN at step "
            f"{step}: training diverged. Lower the learning rate (or the gradients' scale)."),
    }
    return msgs.get(code, f"{where}: unknown fault code {code} at step {step}")


def raise_now(fault: Fault, where: str, **info) -> None:
    """Raise `ReversibleError` now if a concrete `fault` (returned by a jitted function) holds
    a code."""
    code = np.asarray(fault.code).ravel()
    bad = np.flatnonzero(code != OK)
    if bad.size:
        i = bad[0]
        raise ReversibleError(_message(int(code[i]), int(np.asarray(fault.step).ravel()[i]),
                                       int(np.asarray(fault.arg).ravel()[i]), where, info))


def raise_if_fault(fault: Fault, where: str, **info) -> None:
    """Raise `ReversibleError` on the host if `fault` holds a code (works under jit/vmap)."""

    def host(code, step, arg):
        code = np.asarray(code).ravel()
        step = np.asarray(step).ravel()
        arg = np.asarray(arg).ravel()
        bad = np.flatnonzero(code != OK)
        if bad.size:
            i = bad[0]
            raise ReversibleError(_message(int(code[i]), int(step[i]), int(arg[i]), where, info))

    # partitioned: on a mesh every device calls back with its copy of the (replicated) fault,
    # so every device stops; one device's callback alone left the others waiting in the next
    # collective (a hang across processes, an all-reduce timeout abort in one)
    jax.debug.callback(host, fault.code, fault.step, fault.arg, partitioned=True)


def guard_cotangents(tree, where: str, **info):
    """`tree`, unchanged; in reverse mode, raise `ReversibleError` (NONFINITE_COTANGENT, "in the
    backward pass") if the cotangent of any inexact leaf is not finite. Put it on the inputs of
    a computation JAX differentiates, so a hypergradient that overflowed is never returned."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    idx = [i for i, l in enumerate(leaves)
           if jnp.issubdtype(jnp.result_type(l), jnp.inexact) and jnp.size(l) > 0]
    if not idx:
        return tree

    @jax.custom_vjp
    def identity(*xs):
        return xs

    def fwd(*xs):
        return xs, None

    def bwd(_, cts):
        bad = jnp.zeros((), bool)
        for c in cts:
            bad |= ~jnp.all(jnp.isfinite(c))
        raise_if_fault(Fault.none().record(bad, NONFINITE_COTANGENT, -1), where, **info)
        return tuple(cts)

    identity.defvjp(fwd, bwd)
    out = list(leaves)
    for i, x in zip(idx, identity(*[leaves[i] for i in idx])):
        out[i] = x
    return jax.tree_util.tree_unflatten(treedef, out)


def state0_faults(fault: Fault, rule, state0: dict) -> Fault:
    """Record NEGATIVE_STATE (at step 0) for a moment that must be >= 0 (Adam's s) but holds
    negative values in `state0` (moment name -> its leaves): every method starts from it."""
    for j, mo in enumerate(rule.moments):
        if mo.nonnegative:
            neg = jnp.zeros((), bool)
            for x in state0[mo.name]:
                neg |= jnp.any(jnp.asarray(x) < 0)
            fault = fault.record(neg, NEGATIVE_STATE, 0, j)
    return fault


def all_finite(leaves) -> jax.Array:
    """Whether every inexact array in `leaves` is finite (a bool scalar)."""
    ok = jnp.ones((), bool)
    for a in leaves:
        if jnp.issubdtype(jnp.result_type(a), jnp.inexact):
            ok &= jnp.all(jnp.isfinite(a))
    return ok


def names(rule, frac_bits: int | None = None) -> Names:
    """The `Names` of a `revlearn.optim` rule, for the messages of its faults."""
    moments = tuple((m.name, None if frac_bits is None else frac_bits + m.scale)
                    for m in rule.moments)
    decays = tuple((d.name, d.describe or d.name, d.grid.bits,
                    f"[{d.grid.min_numerator}, {d.grid.max_numerator + d.allow_one}]",
                    d.grid.word_bits)
                   for d in rule.decays())
    return Names(moments, decays, tuple(rule.hyper_kinds.items()))


def _first_bad_step(entries, bad_fn, steps: int, stepwise):
    """(any entry bad, first step with a bad entry) over a schedule's arrays."""
    first = jnp.int32(steps)
    for a, sw in zip(entries, stepwise):
        if a is None:
            continue
        if not sw:
            first = jnp.where(jnp.any(bad_fn(a)), 0, first)
        else:
            per_step = jnp.any(bad_fn(a).reshape(steps, -1), axis=1)
            first = jnp.minimum(first, jnp.where(jnp.any(per_step), jnp.argmax(per_step), steps))
    return first < steps, first


def schedule_faults(fault: Fault, rule, hypers: dict, decays: dict, steps: int) -> Fault:
    """Record the first decay off its grid (DECAY_RANGE) and the first bad hyperparameter value
    (BAD_HYPER: not finite, or eps <= 0, weight decay < 0) over whole schedules, once per run
    (values that are traced cannot be checked before the run)."""

    def scan(schedule, bad_fn):
        stepwise = [False] * len(schedule.constant) + [True] * len(schedule.stepwise)
        return _first_bad_step(list(schedule.constant) + list(schedule.stepwise), bad_fn, steps,
                               stepwise)

    for j, d in enumerate(rule.decays()):
        bad, step = scan(decays[d.name], lambda a, d=d: off_grid_traced(a, d.grid, d.allow_one))
        fault = fault.record(bad, DECAY_RANGE, step, j)
    for j, (name, kind) in enumerate(rule.hyper_kinds.items()):
        def bad_fn(a, kind=kind):
            out = ~jnp.isfinite(a)
            if kind == POSITIVE:
                out |= a <= 0
            elif kind == NONNEGATIVE:
                out |= a < 0
            return out
        bad, step = scan(hypers[name], bad_fn)
        fault = fault.record(bad, BAD_HYPER, step, j)
    return fault
