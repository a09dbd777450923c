"""Faults detected inside jitted loops, reported as Python exceptions.

A loop cannot raise, so every step folds its checks into a `Fault` carried
through the `lax.scan`: the code and step of the *first* fault. After the loop
`raise_if_fault` hands it to the host once (one `jax.debug.callback` per call,
never per step), and the host raises `ReversibleError` with a message that names
the step and the fix. Under `jax.jit` the exception surfaces as a
`JaxRuntimeError` whose text contains the message.

Never return a wrong hypergradient silently: every path that can lose
information (fixed-point overflow, an exhausted buffer, non-finite gradients,
momentum out of range, drift of the reversal) has a code here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

OK = 0
NONFINITE_GRADIENT = 1
WEIGHT_OVERFLOW = 2
VELOCITY_OVERFLOW = 3
BUFFER_EXHAUSTED = 4
MOMENTUM_RANGE = 5
NONFINITE_LR = 6
REVERSAL_DRIFT = 7
BUFFER_UNDERFLOW = 8
NONFINITE_COTANGENT = 9


class ReversibleError(FloatingPointError):
    """Raised when training or its reversal cannot be exact (see the message)."""


class Fault(NamedTuple):
    """The first fault of a loop: `code` (int32, 0 = none) and its `step` (int32)."""

    code: jax.Array
    step: jax.Array

    @classmethod
    def none(cls) -> "Fault":
        return cls(jnp.int32(OK), jnp.int32(-1))

    def record(self, bad: jax.Array, code: int, step: jax.Array) -> "Fault":
        """Keep the first fault: set (`code`, `step`) if `bad` and nothing is set yet."""
        first = (self.code == OK) & bad
        return Fault(jnp.where(first, jnp.int32(code), self.code),
                     jnp.where(first, jnp.asarray(step, jnp.int32), self.step))


def _message(code: int, step: int, where: str, info: dict) -> str:
    k = info.get("frac_bits")
    limit = f"{2.0 ** (62 - k):g}" if k is not None else "the fixed-point range"
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
        VELOCITY_OVERFLOW: (
            f"{where}: a velocity or update left the fixed-point range |v| < {limit} "
            f"at step {step} (frac_bits={k}). Lower the learning rate or use a smaller "
            "Reversible(frac_bits=...) for a wider range."),
        BUFFER_EXHAUSTED: (
            f"{where}: the information buffer is exhausted at step {step} "
            f"(capacity {info.get('capacity')} words of 16 bits per weight, sized for "
            f"momentum >= {info.get('min_momentum')}). Pass a lower "
            "Reversible(min_momentum=...) or more Reversible(extra_words=...)."),
        MOMENTUM_RANGE: (
            f"{where}: momentum at step {step} rounds to n/65536 with n outside "
            "[2, 65535], i.e. momentum is not inside [2/65536, 65535/65536]. Keep "
            "momentum strictly inside (0, 1), e.g. through a logit parameterisation."),
        NONFINITE_LR: (
            f"{where}: the learning rate is not finite at step {step}. Check lr."),
        REVERSAL_DRIFT: (
            f"{where}: the reversal did not recover the initial weights, velocity "
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
            f"{where}: the hypergradient became non-finite at step {step} (the "
            "Hessian-vector product overflowed): training is chaotic at these "
            "hyperparameters; lower the learning rate or the number of steps."),
    }
    return msgs.get(code, f"{where}: unknown fault code {code} at step {step}")


def raise_if_fault(fault: Fault, where: str, **info) -> None:
    """Raise `ReversibleError` on the host if `fault` holds a code (works under jit/vmap)."""

    def host(code, step):
        code = np.asarray(code).ravel()
        step = np.asarray(step).ravel()
        bad = np.flatnonzero(code != OK)
        if bad.size:
            i = bad[0]
            raise ReversibleError(_message(int(code[i]), int(step[i]), where, info))

    jax.debug.callback(host, fault.code, fault.step)
