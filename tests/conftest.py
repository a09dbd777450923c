"""Test set-up shared by every test file: 64-bit JAX, as the core requires."""

import jax

jax.config.update("jax_enable_x64", True)
