"""Bad input and faults stop with a clear error naming the argument or step and the fix."""

import os
import subprocess
import sys
import textwrap

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import pytest

import revlearn

P0 = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}


def quad(p, h, t):
    return jnp.sum((p["w"] - 0.5) ** 2) + jnp.sum(p["b"] ** 2)


def run(**kw):
    args = dict(lr=0.1, momentum=0.9, steps=5)
    args.update(kw)
    return revlearn.sgd(quad, P0, None, **args)


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.1, 0.999999999])
def test_momentum_outside_open_interval(bad):
    with pytest.raises(ValueError, match=r"momentum must lie strictly inside \(0, 1\).*" + str(bad)[:3]):
        run(momentum=bad)


def test_traced_momentum_out_of_range_stops_at_runtime():
    f = jax.jit(lambda m: run(momentum=m, method=revlearn.Reversible(min_momentum=0.5))["b"])
    with pytest.raises(Exception, match="momentum at step 0 rounds to n/65536"):
        jax.block_until_ready(f(1.2))
    g = jax.jit(lambda m: run(momentum=m, method=revlearn.Unrolled())["b"])
    with pytest.raises(Exception, match="momentum at step 0"):
        jax.block_until_ready(g(-0.5))


def test_traced_momentum_needs_a_declared_bound():
    with pytest.raises(ValueError, match=r"Reversible\(min_momentum=0.5\)"):
        jax.jit(lambda m: run(momentum=m)["b"])(0.9)


@pytest.mark.parametrize("lr, match", [
    (jnp.ones(6), r"lr has shape \(6,\), which fits neither steps=5"),
    ({"w": 0.1}, r"lr is a dict whose structure is not a prefix of params0"),
    ({"w": jnp.ones((5, 3, 3)), "b": 0.1}, r"lr\['w'\] has shape \(5, 3, 3\), whose trailing dims do not broadcast"),
    ({"w": jnp.ones((4, 3, 2)), "b": 0.1}, r"lr\['w'\] has shape \(4, 3, 2\), which fits neither"),
    (jnp.array([0.1, jnp.nan, 0.1, 0.1, 0.1]), r"lr contains non-finite values"),
])
def test_lr_shapes_and_values(lr, match):
    with pytest.raises(ValueError, match=match):
        run(lr=lr)


def test_ambiguous_per_step_or_per_weight_shape():
    params = {"b": jnp.zeros(5)}
    with pytest.raises(ValueError, match=r"ambiguous.*\(5, 1\) for a per-step schedule"):
        revlearn.sgd(lambda p, h, t: jnp.sum(p["b"] ** 2), params, None,
                     lr={"b": jnp.ones(5)}, momentum=0.9, steps=5)
    # the explicit forms are accepted
    revlearn.sgd(lambda p, h, t: jnp.sum(p["b"] ** 2), params, None,
                 lr={"b": jnp.ones((5, 1))}, momentum={"b": jnp.full((1, 5), 0.9)}, steps=5)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_steps_must_be_positive_int(steps):
    with pytest.raises(ValueError, match=r"steps must be a Python int >= 1"):
        run(steps=steps)


def test_bad_method_params_loss_and_options():
    with pytest.raises(TypeError, match="is not a revlearn method"):
        run(method="reversible")
    with pytest.raises(ValueError, match=r"params0\['n'\] has dtype int"):
        revlearn.sgd(quad, {"w": jnp.ones((3, 2)), "b": jnp.zeros(2), "n": jnp.int32(3)}, None,
                     lr=0.1, momentum=0.9, steps=2)
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        revlearn.sgd(lambda p, h, t: p["w"], P0, None, lr=0.1, momentum=0.9, steps=2)
    with pytest.raises(ValueError, match="v0 must have the same structure"):
        run(v0={"w": jnp.zeros((3, 2))})
    with pytest.raises(ValueError, match=r"Checkpointed\(every=0\)"):
        revlearn.Checkpointed(every=0)
    with pytest.raises(ValueError, match=r"frac_bits must be an integer in \[8, 60\]"):
        revlearn.Reversible(frac_bits=70)
    with pytest.raises(ValueError, match=r"min_momentum=1.5"):
        revlearn.Reversible(min_momentum=1.5)
    with pytest.raises(ValueError, match=r"vjp_in_branch='gpu'\): must be True, False or None"):
        revlearn.Reversible(vjp_in_branch="gpu")
    with pytest.raises(ValueError, match=r"isolate_gradient=1\): must be True or False"):
        revlearn.Reversible(isolate_gradient=1)


@pytest.mark.parametrize("method", [revlearn.Reversible(), revlearn.Unrolled(), revlearn.Checkpointed()])
def test_non_finite_gradient_names_the_step(method):
    def loss(p, h, t):  # sqrt of a negative number from step 3 on
        return jnp.sum(jnp.sqrt(p["b"] + 3.0 - t))
    with pytest.raises(Exception, match=r"gradient of loss_fn is not finite at step 3"):
        jax.block_until_ready(revlearn.sgd(loss, P0, None, lr=0.1, momentum=0.9, steps=8, method=method))


def test_non_finite_hypergradient_names_the_step():
    """A per-step meta term whose gradient overflows (2e308) makes the reverse pass's
    cotangent non-finite at every step; the error names the last step, where it starts."""
    def f(w):
        _, path = revlearn.sgd(quad, {"w": w, "b": jnp.zeros(2)}, None, lr=0.1, momentum=0.9,
                               steps=8, path_fn=lambda p, h, t: 1e308 * jnp.sum(p["w"] ** 2))
        return path
    with pytest.raises(Exception, match=r"hypergradient became non-finite at step 7"):
        jax.block_until_ready(jax.grad(f)(jnp.ones((3, 2))))


def test_fixed_point_overflow_names_the_step_and_the_fix():
    def linear(p, h, t):  # gradient -1: w grows by about lr per step
        return -jnp.sum(p["w"])
    with pytest.raises(Exception, match=r"weight left the fixed-point range \|w\| < 1024 at step \d+ "
                                        r"\(frac_bits=52\).*Reversible\(frac_bits=48\)"):
        jax.block_until_ready(revlearn.sgd(linear, P0, None, lr=200.0, momentum=0.5, steps=40))
    # a wider range (fewer fractional bits) trains the same problem without error
    out = revlearn.sgd(linear, P0, None, lr=200.0, momentum=0.5, steps=40,
                       method=revlearn.Reversible(frac_bits=40))
    assert float(out["w"][0, 0]) > 1024
    with pytest.raises(Exception, match=r"fixed-point range.*at step 0"):
        jax.block_until_ready(revlearn.sgd(quad, {"w": jnp.full((3, 2), 5000.0), "b": jnp.zeros(2)},
                                           None, lr=0.1, momentum=0.9, steps=3))


def test_exhausted_buffer_names_the_step_and_the_fix():
    f = jax.jit(lambda m: revlearn.sgd(quad, P0, None, lr=0.01, momentum=m, steps=200,
                                       method=revlearn.Reversible(min_momentum=0.99, extra_words=2))["w"])
    with pytest.raises(Exception, match=r"information buffer is exhausted at step \d+ \(capacity 3 words"
                                        r".*Reversible\(min_momentum=...\)"):
        jax.block_until_ready(f(0.3))
    # with an honest bound the same call works
    g = jax.jit(lambda m: revlearn.sgd(quad, P0, None, lr=0.01, momentum=m, steps=200,
                                       method=revlearn.Reversible(min_momentum=0.3))["w"])
    assert bool(jnp.all(jnp.isfinite(g(0.3))))


def test_without_x64_mode_reversible_says_what_to_call():
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, revlearn
        try:
            revlearn.sgd(lambda p, h, t: jnp.sum(p ** 2), jnp.ones(3), None, lr=0.1, momentum=0.9, steps=2)
        except RuntimeError as e:
            print("ERR", e)
        out = revlearn.sgd(lambda p, h, t: jnp.sum(p ** 2), jnp.ones(3), None, lr=0.1, momentum=0.9,
                           steps=2, method=revlearn.Unrolled())
        print("UNROLLED", out.dtype)
    """)
    env = dict(os.environ, JAX_ENABLE_X64="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERR revlearn.Reversible needs 64-bit integers" in out.stdout, out.stdout + out.stderr
    assert "jax.config.update('jax_enable_x64', True)" in out.stdout
    assert "UNROLLED float32" in out.stdout
