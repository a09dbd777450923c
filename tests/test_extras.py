"""The core installs and runs without the lab layer (optax, matplotlib, rich); the lab's
modules and commands say in one line how to get it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# Python run with the lab's modules made unimportable, as on `pip install revlearn`.
BLOCK = textwrap.dedent('''
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("optax", "matplotlib", "rich"):
                raise ModuleNotFoundError(f"No module named {name!r}")
    sys.meta_path.insert(0, Block())
    import importlib.util
    _find = importlib.util.find_spec
    importlib.util.find_spec = lambda n, *a: (None if n.split(".")[0] in
                                              ("optax", "matplotlib", "rich") else _find(n, *a))
''')


def _python(code: str, block: bool) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", (BLOCK if block else "") + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)


def test_the_core_imports_none_of_the_lab():
    out = _python("""
        import sys, revlearn, revlearn.data, revlearn.models, revlearn.spaces
        print(sorted(m for m in ("optax", "matplotlib", "rich") if m in sys.modules))
        """, block=False)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


def test_the_core_trains_and_differentiates_without_the_lab():
    out = _python("""
        import jax, jax.numpy as jnp
        jax.config.update("jax_enable_x64", True)
        import revlearn
        loss = lambda p, h, t: jnp.sum((p["w"] - h) ** 2)
        f = lambda lr: jnp.sum(revlearn.train(loss, {"w": jnp.ones(3)}, 0.5, steps=5,
                                              optimizer=revlearn.optim.adam(lr))["w"])
        print(float(jax.grad(f)(0.1)))
        """, block=True)
    assert out.returncode == 0, out.stderr
    float(out.stdout.strip())


def test_the_lab_says_how_to_install_it():
    out = _python("""
        for name in ("revlearn.meta", "revlearn.experiments"):
            try:
                __import__(name)
            except ImportError as e:
                print(e)
        from revlearn.cli import main
        print("exit", main(["list"]))
        """, block=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == ("revlearn.meta is part of revlearn's lab layer and needs optax, "
                        "matplotlib, rich: pip install 'revlearn[lab]'"), out.stdout + out.stderr
    assert lines[1].startswith("revlearn.experiments is part of revlearn's lab layer")
    assert lines[2] == "exit 2"
    err = out.stderr.strip().splitlines()
    assert err == ["revlearn: error: `revlearn list` is part of revlearn's lab layer and needs "
                   "optax, matplotlib, rich: pip install 'revlearn[lab]'"], out.stderr
