"""One flat array for all params leaves: the shape the reversible state lives in.

The fixed-point state (W, V, the buffer's x, the adjoints dw, dv) is one array
of shape [nblocks, BLOCK]: leaf i occupies the rows [row0_i, row0_i + nb_i), in
C order, padded to whole rows with zeros (a leaf with no weights has no rows,
so whatever its schedule entries, nothing of it enters a step). Every elementwise stage of a step is
then one XLA kernel for the whole model, not one per leaf (on CPU a kernel
costs a few microseconds however small its leaf, and a model has many small
leaves: biases, norms).

    pack:    leaves [*S_i] -> [nblocks, BLOCK]   (concatenate, pad)
    unpack:  [nblocks, BLOCK] -> leaves [*S_i]   (slice, reshape)
    spread:  per-leaf entries [*B_i] (B_i broadcastable to S_i) -> an array that
             broadcasts against [nblocks, BLOCK]: [nblocks, 1] when every entry
             is a single value (a gather from an [L] table), else the packed
             broadcast (padding repeats the leaf's last value).
    sums:    [..., nblocks, BLOCK] -> per-leaf sums [..., L]: a row reduction
             then a segment sum over the rows.

Padding elements take part in every stage with zero weight and velocity; the
gradient never sees them (`unpack` drops them) and they reverse exactly like
real weights, so the state's bit-for-bit check covers them too.

Sharded over S devices (`Layout.of(shapes, shards=S)`), every leaf's rows are
rounded up to a multiple of S and the packed rows are ordered device-major:

    packed row  d R + r   (d < S, r < R = nblocks / S)  is row d r_i + (r - row0_i)
                                                         of the leaf i with row0_i <= r < row0_i + r_i

so splitting the rows axis into S equal blocks (the sharding of the state,
`exact._sharding`) gives each device r_i = rows_i / S consecutive rows of every
leaf: each step's elementwise work, and every per-leaf slice of it (the
buffer's word stacks, bounds and heads), stays on the device that holds it.
S = 1 is the unsharded layout above.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 64


class Layout(NamedTuple):
    """Static placement of the leaves of shapes `shapes` in [nblocks, BLOCK], in `shards`
    device-major blocks of rows (see the module docstring)."""

    shapes: tuple
    rows: tuple            # nb_i, rows of leaf i (a multiple of shards)
    row0: tuple            # first row of leaf i within each shard's block
    nblocks: int
    shards: int = 1

    @classmethod
    def of(cls, shapes, shards: int = 1) -> "Layout":
        shapes = tuple(tuple(s) for s in shapes)
        rows = tuple(-(-math.prod(s) // BLOCK) for s in shapes)     # an empty leaf has none
        rows = tuple(-(-r // shards) * shards for r in rows)
        local = tuple(r // shards for r in rows)
        row0 = tuple(int(r) for r in np.cumsum((0,) + local[:-1]))
        return cls(shapes, rows, row0, int(sum(rows)), shards)

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def shape(self) -> tuple:
        return (self.nblocks, BLOCK)

    @property
    def row_leaf(self) -> np.ndarray:
        """Leaf index of each row [nblocks] (int32)."""
        local = np.repeat(np.arange(len(self.shapes), dtype=np.int32),
                          [r // self.shards for r in self.rows])
        return np.tile(local, self.shards)

    def _interleave(self, parts) -> jax.Array:
        """Per-leaf rows [..., nb_i, BLOCK] -> the packed rows [..., nblocks, BLOCK]."""
        if self.shards == 1:
            return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-2)
        S = self.shards
        split = [p.reshape(p.shape[:-2] + (S, p.shape[-2] // S, BLOCK)) for p in parts]
        out = split[0] if len(split) == 1 else jnp.concatenate(split, axis=-2)
        return out.reshape(out.shape[:-3] + (self.nblocks, BLOCK))

    def pack_leaf(self, leaf: jax.Array, i: int, pad: str = "constant") -> jax.Array:
        """Leaf i [*S_i] -> its rows [nb_i, BLOCK], padded with zeros ("constant") or the
        leaf's last value ("edge")."""
        flat = jnp.ravel(leaf)
        extra = self.rows[i] * BLOCK - flat.size
        if extra:
            flat = jnp.pad(flat, (0, extra), mode=pad)
        return flat.reshape(self.rows[i], BLOCK)

    def pack(self, leaves, dtype=None, pad: str = "constant") -> jax.Array:
        """Leaves [*S_i] -> [nblocks, BLOCK] (in `dtype` if given); padding zeros ("constant")
        or the leaf's last value ("edge")."""
        parts = [self.pack_leaf(l if dtype is None else jnp.asarray(l).astype(dtype), i, pad)
                 for i, l in enumerate(leaves)]
        return self._interleave(parts)

    def rows_of(self, flat: jax.Array, i: int) -> jax.Array:
        """Leaf i's rows of a packed array, padding included [..., nb_i, BLOCK]."""
        S = self.shards
        if S == 1:
            return jax.lax.slice_in_dim(flat, self.row0[i], self.row0[i] + self.rows[i], axis=-2)
        lead = flat.shape[:-2]
        blocks = flat.reshape(lead + (S, self.nblocks // S, BLOCK))
        r = self.rows[i] // S
        part = jax.lax.slice_in_dim(blocks, self.row0[i], self.row0[i] + r, axis=-2)
        return part.reshape(lead + (self.rows[i], BLOCK))

    def leaf(self, flat: jax.Array, i: int) -> jax.Array:
        """Leaf i of a packed array (the rows' leading dims kept: [..., *S_i])."""
        lead = flat.shape[:-2]
        size = math.prod(self.shapes[i])
        return self.rows_of(flat, i).reshape(lead + (-1,))[..., :size].reshape(lead + self.shapes[i])

    def unpack(self, flat: jax.Array) -> list:
        return [self.leaf(flat, i) for i in range(len(self.shapes))]

    def entry_rows(self, entry, i: int) -> jax.Array:
        """Leaf i's entry [*B_i] as one value (shape ()) when it is a single value, else
        broadcast over the leaf's rows [nb_i, BLOCK] (padding repeats the last value)."""
        entry = jnp.asarray(entry)
        if entry.size == 1:
            return entry.reshape(())
        return self.pack_leaf(jnp.broadcast_to(entry, self.shapes[i]), i, pad="edge")

    def join(self, parts) -> jax.Array:
        """Per-leaf parts, each one value (shape ()) or the leaf's rows [nb_i, BLOCK] ->
        broadcastable to [nblocks, BLOCK]: [nblocks, 1] (a gather from an [L] table) when
        every part of a leaf with rows is one value."""
        if all(jnp.ndim(p) == 0 or r == 0 for p, r in zip(parts, self.rows)):
            dtype = jnp.result_type(*parts)
            table = [p if jnp.ndim(p) == 0 else jnp.zeros((), dtype) for p in parts]
            return jnp.stack(table).astype(dtype)[self.row_leaf][:, None]
        return self._interleave([jnp.broadcast_to(p, (r, BLOCK)) for p, r in zip(parts, self.rows)])

    def spread(self, entries, dtype=None) -> jax.Array:
        """Per-leaf entries [*B_i] (B_i broadcastable to S_i) -> broadcastable to
        [nblocks, BLOCK]: `join` of their `entry_rows`."""
        entries = [jnp.asarray(e) if dtype is None else jnp.asarray(e).astype(dtype) for e in entries]
        return self.join([self.entry_rows(e, i) for i, e in enumerate(entries)])

    def sums(self, flat: jax.Array) -> jax.Array:
        """Per-leaf sums of a packed array: [..., nblocks, BLOCK] -> [..., L]."""
        per_row = jnp.moveaxis(jnp.sum(flat, axis=-1), -1, 0)
        out = jax.ops.segment_sum(per_row, self.row_leaf, num_segments=len(self.shapes),
                                  indices_are_sorted=True)
        return jnp.moveaxis(out, 0, -1)
