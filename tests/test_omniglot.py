"""The bundled Omniglot tasks (`revlearn.data.load_omniglot`) and the omniglot-sharing
experiment's task-mixing transform."""

from __future__ import annotations

import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from revlearn import data as rdata
from revlearn import models
from revlearn.data import _omniglot


@pytest.fixture(scope="module")
def pool():
    return rdata.load_omniglot()


def test_ten_tasks_of_28x28_images(pool):
    assert pool.images.shape == (5440, 784) and pool.images.dtype == np.float32
    assert 0.0 <= pool.images.min() and pool.images.max() == 1.0
    assert len(pool.names) == 10 and pool.names[7] == "Greek (rotated)"
    chars = [int(pool.character[pool.task == t].max()) + 1 for t in range(10)]
    assert chars == [24, 22, 24, 40, 26] * 2  # Balinese, Early_Aramaic, Greek, Korean, Latin
    assert np.all(np.bincount(pool.task) == 20 * np.array(chars))
    assert np.all(np.bincount(pool.drawer) == 272)
    # task k + 5 is task k rotated by 90 degrees, image by image
    half = len(pool.task) // 2
    assert np.array_equal(pool.task[half:], pool.task[:half] + 5)
    assert np.array_equal(pool.images[half:].reshape(-1, 28, 28),
                          np.rot90(pool.images[:half].reshape(-1, 28, 28), 1, axes=(1, 2)))
    five = rdata.load_omniglot(rotate=False)
    assert five.images.shape == (2720, 784) and len(five.names) == 5


def test_checksum_mismatch_is_one_line(tmp_path):
    src = Path(_omniglot.__file__).parent / "embedded" / _omniglot.FILE
    bad = tmp_path / _omniglot.FILE
    raw = bytearray(src.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(rdata.DataCorruptError) as info:
        rdata.load_omniglot(path=bad)
    message = str(info.value)
    assert "\n" not in message and str(bad) in message and "sha256" in message
    assert "_omniglot_build" in message  # the fix
    assert rdata.load_omniglot(path=src).images.shape == (5440, 784)
    with pytest.raises(rdata.DataMissingError):
        rdata.load_omniglot(path=tmp_path / "nothing.npz")


def test_identity_mixing_is_separate_networks():
    from revlearn.experiments import omniglot_sharing as om

    chars = (5, 4, 5, 8, 5) * 2  # two groups: 4-5 characters (padded to 5), and 8
    per, sizes, rng = 2, [784, 8, om.N_OUT], np.random.default_rng(0)
    z = [{"w": 0.3 * rng.normal(size=(10, a, b)), "b": 0.3 * rng.normal(size=(10, b))}
         for a, b in itertools.pairwise(sizes)]
    xs = [rng.normal(size=(c * per, 784)) for c in chars]
    ys = [np.eye(om.N_OUT)[rng.integers(0, c, c * per)] for c in chars]
    data = []  # the experiment's layout: per group, tasks zero-padded to its largest
    for idx, c in om._groups(chars):
        assert all(chars[t] <= c for t in idx)
        x, y = np.zeros((len(idx), c * per, 784)), np.zeros((len(idx), c * per, om.N_OUT))
        for i, t in enumerate(idx):
            x[i, :len(xs[t])], y[i, :len(ys[t])] = xs[t], ys[t]
        data.append((x, y))
    assert len(data) == 2
    identity = jnp.stack([jnp.eye(10)] * 2)
    for mixed, own in zip(jax.tree.leaves(om._weights(z, identity)), jax.tree.leaves(z)):
        assert np.array_equal(mixed, own)  # bit for bit: each task gets its own z
    scores = om._task_scores(z, identity, data, chars)
    for t in range(10):  # each task alone, unpadded, with its own net
        logp = models.mlp_apply(jax.tree.map(lambda v, t=t: v[t], z), xs[t])
        assert scores[0, t] == pytest.approx(float(models.nll(logp, ys[t])), rel=1e-12)
        assert scores[1, t] == pytest.approx(float(models.error_rate(logp, ys[t])))
    # the tied baseline's first layer is one net's, shared by all ten tasks
    tied = om._weights(z, jnp.asarray(om._mixing(0.0, 2, tied_first=True)))
    for leaf in tied[0].values():
        assert np.allclose(leaf, leaf[:1])
    assert np.array_equal(tied[1]["w"], z[1]["w"])
