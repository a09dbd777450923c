"""Several processes with jax.distributed (CPU, gloo collectives, loopback only): the example
starts 2 processes x 2 CPU devices and its hypergradient matches one ordinary process."""

import os
import re
import subprocess
import sys

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                       "multihost.py")


def test_two_processes_match_one_process():
    out = subprocess.run([sys.executable, EXAMPLE, "--processes", "2", "--local-devices", "2",
                          "--check", "--timeout", "240"],
                         check=False, capture_output=True, text=True, timeout=400)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "process 0 of 2: 4 devices (2 local)" in out.stdout, text
    exact = "ReversalCheck(weights_exact=True, state_exact=True, buffer_empty=True"
    assert exact in out.stdout, text
    rel = re.search(r"max relative difference multi-process vs single-process: (\S+)", out.stdout)
    assert rel is not None, text
    assert float(rel.group(1)) <= 1e-12, text
    assert "-> PASS" in out.stdout, text
