"""Meta-level populations (seeds averaged, sweep points) split over devices: each device
evaluates its share, and the result is the same bit for bit as on one device.

Runs in a subprocess with 4 forced host devices (XLA's device count is fixed at start)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    import revlearn
    from revlearn import meta
    from revlearn.cli import main

    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    X = jax.random.normal(kx, (32, 6))

    def one(lr, key):
        w0 = {"w": 0.3 * jax.random.normal(key, (6, 3))}
        loss = lambda p, h, t: jnp.mean(jnp.tanh(X @ p["w"]) ** 2) + 0.01 * jnp.sum(p["w"] ** 2)
        f = lambda lr: jnp.sum(revlearn.sgd(loss, w0, None, lr=lr, momentum=0.9, steps=8)["w"])
        return jax.value_and_grad(f)(lr)

    key = jax.random.PRNGKey(3)
    out = {}
    with meta.using_devices(1):   # (read when the function is traced: a new jit each time)
        one_dev = jax.jit(meta.average_over(one, 8))(0.2, key)
        out["devices_used_1"] = meta.population_devices(8)
    four = jax.jit(meta.average_over(one, 8))(0.2, key)   # default: every visible device
    out["devices_used_default"] = meta.population_devices(8)
    out["identical"] = all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
                           for a, b in zip(one_dev, four))
    # the program ran on all 4 devices (its outputs live there), the 1-device one on one
    out["devices_run"] = [len(one_dev[0].sharding.device_set), len(four[0].sharding.device_set)]
    out["uneven"] = meta.population_devices(6)   # 6 members on 4 devices: 3 devices
    out["bad"] = None
    try:
        with meta.using_devices(9):
            pass
    except ValueError as e:
        out["bad"] = str(e)

    if sys.argv[2] == "cli":  # the command line: an experiment averaging seeds, on 1 and 2 devices
        base = ["run", "schedules", "--smoke", "--no-progress"]
        rc1 = main(base + ["--devices", "1", "--out", sys.argv[1] + "/one"])
        rc2 = main(base + ["--devices", "2", "--out", sys.argv[1] + "/two"])
        a = meta.RunDir(sys.argv[1] + "/one").load_arrays("results")
        b = meta.RunDir(sys.argv[1] + "/two").load_arrays("results")
        out["cli_rc"] = [rc1, rc2]
        out["cli_identical"] = a.keys() == b.keys() and all(
            a[k].tobytes() == b[k].tobytes() for k in a)
    print("RESULT " + json.dumps(out))
''')


def _run(tmp_path, what: str) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path), what],
                          capture_output=True, text=True, env=env, timeout=600)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[0][len("RESULT "):])


def test_populations_split_over_devices_give_identical_results(tmp_path):
    out = _run(tmp_path, "api")
    assert out["devices_used_1"] == 1 and out["devices_used_default"] == 4
    assert out["devices_run"] == [1, 4], out["devices_run"]
    assert out["identical"], "averaging over 4 devices changed the result"
    assert out["uneven"] == 3
    assert "only 4 device(s) are visible" in out["bad"]


@pytest.mark.slow  # two smoke runs of schedules (~40 s)
def test_cli_devices_flag_gives_identical_results(tmp_path):
    out = _run(tmp_path, "cli")
    assert out["devices_run"] == [1, 4] and out["identical"]
    assert out["cli_rc"] == [0, 0] and out["cli_identical"]
