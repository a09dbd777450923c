"""The GPU determinism warning: conv and max-pool gradients warn on GPU unless
XLA_FLAGS turns on deterministic ops; MLPs and CPU runs do not warn.

The backend is faked (`_determinism._backend`): the check runs at trace time,
and the training itself still runs on this machine's CPU.
"""

import warnings

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import pytest

import revlearn
from revlearn.exact import _determinism
from revlearn.models import convnet_apply, convnet_init

X = jax.random.normal(jax.random.PRNGKey(1), (4, 64))
Y = jnp.array([0, 1, 2, 1])


def conv_loss(p, h, t):
    logp = convnet_apply(p, X)
    return -jnp.mean(jnp.take_along_axis(logp, Y[:, None], axis=1))


def pool_loss(p, h, t):
    img = (X @ p["w"]).reshape(4, 4, 4, 1)
    pooled = jax.lax.reduce_window(img, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return jnp.sum(pooled ** 2)


def mlp_loss(p, h, t):
    logits = jnp.tanh(X @ p["w"]) @ p["v"]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), Y[:, None], axis=1))


CONV = convnet_init(jax.random.PRNGKey(0), channels=(2,), kernel=3, image_size=8, n_out=3)
POOL = {"w": 0.1 * jnp.ones((64, 16))}
MLP = {"w": 0.1 * jnp.ones((64, 5)), "v": 0.1 * jnp.ones((5, 3))}


def train(loss, params):
    return revlearn.sgd(loss, params, None, lr=0.05, momentum=0.9, steps=3)


@pytest.fixture
def on_gpu(monkeypatch):
    monkeypatch.setattr(_determinism, "_backend", lambda: "gpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    return monkeypatch


@pytest.mark.parametrize("loss,params,prim", [(conv_loss, CONV, "conv_general_dilated"),
                                              (pool_loss, POOL, "select_and_scatter_add")])
def test_warns_on_gpu_without_flag(on_gpu, loss, params, prim):
    with pytest.warns(RuntimeWarning, match=rf"uses {prim}.*XLA_FLAGS=--xla_gpu_deterministic_ops=true"):
        out = train(loss, params)
    assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree_util.tree_leaves(out))


@pytest.mark.parametrize("flags", ["--xla_gpu_deterministic_ops=true",
                                   "--foo=1 --xla_gpu_deterministic_ops",
                                   "--xla_gpu_deterministic_ops=1"])
def test_no_warning_with_flag(on_gpu, flags):
    on_gpu.setenv("XLA_FLAGS", flags)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(conv_loss, CONV)


def test_flag_turned_off_again_warns(on_gpu):
    on_gpu.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true --xla_gpu_deterministic_ops=false")
    with pytest.warns(RuntimeWarning, match="conv_general_dilated"):
        train(conv_loss, CONV)


def test_mlp_on_gpu_and_conv_on_cpu_do_not_warn(on_gpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(mlp_loss, MLP)
    on_gpu.setattr(_determinism, "_backend", lambda: "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(conv_loss, CONV)


def test_primitives_sees_nested_jaxprs():
    f = lambda x: jax.lax.cond(x.sum() > 0, lambda y: jax.jit(jnp.sin)(y), jnp.cos, x)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: f(x).sum()))(jnp.ones(3))
    assert not {"sin", "cos"} & {e.primitive.name for e in jaxpr.jaxpr.eqns}   # only nested
    assert {"sin", "cos", "cond"} <= _determinism.primitives(jaxpr)


def test_checkers_warn_too(on_gpu):
    with pytest.warns(RuntimeWarning, match=r"check_reversal: the gradient of loss_fn uses conv"):
        revlearn.check_reversal(conv_loss, CONV, None, lr=0.05, momentum=0.9, steps=2)


def test_check_handles_key_and_int_hypers(on_gpu):
    def noisy_conv(p, h, t):
        noise = jax.random.normal(jax.random.fold_in(h["key"], t), X.shape) * h["scale"]
        logp = convnet_apply(p, X + noise)
        return -jnp.mean(jnp.take_along_axis(logp, Y[:, None], axis=1)) * h["n"]
    hypers = {"key": jax.random.key(0), "scale": jnp.float64(0.01), "n": jnp.int32(1)}
    with pytest.warns(RuntimeWarning, match="conv_general_dilated"):
        revlearn.sgd(noisy_conv, CONV, hypers, lr=0.05, momentum=0.9, steps=2)


def test_sharded_over_several_gpus_warns_without_flag(on_gpu):
    mesh = jax.sharding.AbstractMesh((4,), ("d",))
    with pytest.warns(RuntimeWarning, match="sharded over 4 GPUs, whose collectives"):
        _determinism.warn_if_sharded_nondeterministic(mesh, "here")
    on_gpu.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=true")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _determinism.warn_if_sharded_nondeterministic(mesh, "here")
        _determinism.warn_if_sharded_nondeterministic(None, "here")
