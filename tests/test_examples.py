"""The examples run as a user runs them, and their own checks pass (so they cannot rot)."""

import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.parametrize("name", ["hypergradient.py", "adam_hypergradient.py"])
def test_example_runs_and_its_checks_pass(name):
    out = subprocess.run([sys.executable, os.path.join(EXAMPLES, name)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ReversalCheck(weights_exact=True, state_exact=True, buffer_empty=True" in out.stdout, out.stdout
    assert "-> PASS" in out.stdout, out.stdout
    assert "validation loss after 100" in out.stdout
