"""Exactness machinery of `Reversible`: fixed point (`_fixed_point`), decay grids (`_grid`),
the information buffer (`_buffer`), the packed layout (`_layout`) and the GPU determinism
check (`_determinism`)."""
