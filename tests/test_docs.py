"""The documentation site builds with `mkdocs build --strict` (no broken link, no missing
cross-reference, no docstring warning) and has an API entry for every public name."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _public_names() -> list[str]:
    import revlearn
    names = [f"revlearn.{n}" for n in revlearn.__all__ if n != "optim"]
    names += [f"revlearn.optim.{n}" for n in revlearn.optim.__all__]
    for lab in ("meta", "models", "spaces", "data", "experiments"):
        module = __import__(f"revlearn.{lab}", fromlist=["__all__"])
        names += [f"revlearn.{lab}.{n}" for n in module.__all__]
    return names


def test_docs_build_strict_with_every_public_name(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason=f"{module} is not installed: the docs need "
                                           "pip install -e '.[docs]'")
    site = tmp_path / "site"
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                          str(site)], cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    anchors = set()
    for page in site.joinpath("api").rglob("index.html"):
        anchors |= set(re.findall(r'id="(revlearn\.[\w.]+)"', page.read_text()))
    missing = [n for n in _public_names() if n not in anchors]
    assert not missing, f"public names without an API entry: {missing}"
    train = site.joinpath("api", "train", "index.html").read_text()
    for word in ("params0", "Returns", "Raises", "Example"):
        assert word in train, word
