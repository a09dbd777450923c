"""A warning before a GPU run whose gradient uses kernels that are not deterministic there.

Exact reversal recomputes g_t = grad_w L(w_t, theta, t) in the reverse pass
and needs the forward pass's bits. On GPU, XLA picks convolution algorithms
that may accumulate in a different order from one call to the next, and
max-pool gradients (`select_and_scatter_add`) add with atomics, unless
`XLA_FLAGS=--xla_gpu_deterministic_ops=true` is set before JAX starts. On an
H200 the float32 convnet of the tests drifted in 3 of 3 runs without the flag
and reversed exactly with it (`benchmarks/results/exactness_gpu.md`); the tanh
MLP was exact without it. Drift is always detected and raised after the
reverse pass; this check says so before the forward pass, where it is cheap
to fix (in `sgd` with `Reversible`, `check_reversal` and `buffer_usage`). It reads the jaxpr of the loss's gradient (one trace, at trace time of
`sgd`) and costs nothing on CPU, where it returns at once.

Scatter-adds with repeated indices (the gradient of an embedding lookup) are
not deterministic on GPU either, but most scatter-adds in gradients have
unique indices (`take_along_axis` in a log-likelihood), so they do not warn.
"""

from __future__ import annotations

import os
import warnings

import jax

FLAG = "--xla_gpu_deterministic_ops=true"
NONDETERMINISTIC_ON_GPU = frozenset({"conv_general_dilated", "select_and_scatter_add"})


def _backend() -> str:
    return jax.default_backend()


def deterministic_flag_set(xla_flags: str) -> bool:
    """Whether an XLA_FLAGS string turns on deterministic GPU ops (the last mention wins)."""
    on = False
    for token in xla_flags.split():
        name, _, value = token.partition("=")
        if name == "--xla_gpu_deterministic_ops":
            on = value.lower() in ("", "true", "1")
    return on


def primitives(jaxpr) -> set[str]:
    """Names of every primitive in a (closed) jaxpr, including those of nested jaxprs
    (jit, cond branches, scan bodies, custom derivatives)."""
    names: set[str] = set()
    stack = [jaxpr]
    while stack:
        j = stack.pop()
        j = getattr(j, "jaxpr", j)                     # ClosedJaxpr -> Jaxpr
        for eqn in j.eqns:
            names.add(eqn.primitive.name)
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                    if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        stack.append(sub)
    return names


def warn_if_sharded_nondeterministic(mesh, where: str) -> None:
    """Warn (RuntimeWarning) when the state is sharded over several GPUs without the
    deterministic-ops flag: the gradient's all-reduces must add in the same order in both
    passes (NCCL's do not promise it without the flag). On CPU the collectives are
    deterministic and this returns at once."""
    if mesh is None or getattr(mesh, "size", 1) <= 1 or _backend() not in ("gpu", "cuda", "rocm"):
        return
    if deterministic_flag_set(os.environ.get("XLA_FLAGS", "")):
        return
    warnings.warn(
        f"{where}: training is sharded over {mesh.size} GPUs, whose collectives (the "
        "gradient's all-reduces) need not add in the same order in the forward and the "
        "reverse pass, so the reversal may drift and end in an error. Set "
        f"XLA_FLAGS={FLAG} in the environment before JAX starts, or use "
        "revlearn.Checkpointed().", RuntimeWarning, stacklevel=4)


def warn_if_nondeterministic(problem, params, theta, where: str) -> None:
    """Warn (RuntimeWarning) when running on GPU without the deterministic-ops flag and
    the gradient of `problem`'s loss contains a primitive in `NONDETERMINISTIC_ON_GPU`.
    Both callers (`Reversible.solve` under `sgd`, `_check._setup` under a checker) sit two
    frames below the user's call, which the warning names."""
    if _backend() not in ("gpu", "cuda", "rocm"):
        return
    if deterministic_flag_set(os.environ.get("XLA_FLAGS", "")):
        return
    spec = lambda x: jax.ShapeDtypeStruct(jax.numpy.shape(x), jax.numpy.result_type(x))
    args = jax.tree_util.tree_map(spec, (params, theta))
    jaxpr = jax.make_jaxpr(problem.gradient)(*args, jax.ShapeDtypeStruct((), jax.numpy.int32))
    found = sorted(primitives(jaxpr) & NONDETERMINISTIC_ON_GPU)
    if found:
        warnings.warn(
            f"{where}: the gradient of loss_fn uses {', '.join(found)}, which XLA runs "
            "non-deterministically on GPU, so the reverse pass may not recompute the forward "
            "pass's gradient bit-for-bit and the run would end in a reversal-drift error. "
            f"Set XLA_FLAGS={FLAG} in the environment before JAX starts (a float32 convnet "
            "reversed exactly on an H200 only with it), or use revlearn.Checkpointed().",
            RuntimeWarning, stacklevel=4)
