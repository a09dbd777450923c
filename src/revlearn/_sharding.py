"""Where the reversible state lives when the weights are sharded over a mesh.

JAX is the distributed engine: the loss's gradient runs as the user's shardings
say (data-parallel, model-parallel, both), with the collectives XLA inserts.
`Reversible` adds only this: its packed state (W, the moments, each buffer's x,
bounds, heads and word stacks: [..., rows, BLOCK] arrays, see
`exact._layout`) is split along the rows over every device of the mesh, in the
ZeRO/FSDP pattern, so each device holds and updates 1/S of it (S the mesh's
size). The layout's device-major order keeps every per-leaf slice local.

The mesh is the one params0's leaves carry (`NamedSharding`, concrete or in
the type of a traced array under explicit sharding), else the ambient one
(`jax.set_mesh`); without either, nothing is placed and XLA decides, as on one
device.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from .exact._layout import BLOCK


def _sharding_of(leaf):
    if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
        sh = getattr(leaf, "sharding", None)
    else:
        try:
            sh = getattr(jax.typeof(leaf), "sharding", None)
        except TypeError:
            sh = None
    return sh if isinstance(sh, NamedSharding) and not sh.mesh.empty else None


def mesh_of(params0: Any, hypers: Any = None):
    """The mesh the params0 leaves are sharded over (a `Mesh` or `AbstractMesh`), the
    ambient mesh if they carry none, or None.

    Raises:
      ValueError: leaves of params0 (or hypers) live on different meshes.
    """
    found, where = None, None
    for name, tree in (("params0", params0), ("hypers", hypers)):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            sh = _sharding_of(leaf)
            if sh is None:
                continue
            mesh = sh.mesh
            key = (tuple(mesh.axis_names), tuple(mesh.axis_sizes))
            if found is None:
                found, where = mesh, f"{name}{jax.tree_util.keystr(path)}"
            elif (tuple(found.axis_names), tuple(found.axis_sizes)) != key or (
                    isinstance(found, jax.sharding.Mesh) and isinstance(mesh, jax.sharding.Mesh)
                    and found.devices.tolist() != mesh.devices.tolist()):
                raise ValueError(
                    f"{name}{jax.tree_util.keystr(path)} is sharded over the mesh "
                    f"{dict(zip(mesh.axis_names, mesh.axis_sizes))} but {where} over "
                    f"{dict(zip(found.axis_names, found.axis_sizes))}; put every array of one "
                    "training run on one mesh (jax.device_put with NamedSharding(mesh, ...)).")
    if found is not None:
        return found
    ambient = jax.sharding.get_abstract_mesh()
    return None if ambient.empty else ambient


def shards(mesh) -> int:
    """S: the number of devices the state is split over (1 without a mesh)."""
    return 1 if mesh is None else int(mesh.size)


def explicit(mesh) -> bool:
    """Whether any axis of `mesh` is Explicit (shardings in the types)."""
    types = getattr(mesh, "axis_types", ()) or ()
    return any(t == jax.sharding.AxisType.Explicit for t in types)


def state_spec(mesh, ndim: int) -> P:
    """The state's spec: the rows axis (-2) over every mesh axis, the rest replicated."""
    spec = [None] * ndim
    spec[-2] = tuple(mesh.axis_names)
    return P(*spec)


def placer(mesh):
    """`place(tree)`: every [..., rows, BLOCK] array of `tree` (the reversible state only:
    a user's array could have that shape too) constrained to the state's sharding (rows
    split over the mesh); the identity without a mesh."""
    S = shards(mesh)
    if S == 1:
        return lambda tree: tree

    def place(tree):
        # inside `jax.sharding.auto_axes` the ambient mesh is the same one with its axes auto
        ambient = jax.sharding.get_abstract_mesh()
        m = ambient if not ambient.empty and ambient.axis_names == mesh.axis_names else mesh

        def one(x):
            if (hasattr(x, "ndim") and x.ndim >= 2 and x.shape[-1] == BLOCK
                    and x.shape[-2] % S == 0 and x.shape[-2] > 0):
                return jax.lax.with_sharding_constraint(x, NamedSharding(m, state_spec(m, x.ndim)))
            return x

        return jax.tree_util.tree_map(one, tree)

    return place


def known_shardings(leaves) -> list:
    """Per leaf, its `NamedSharding` when it is known (a concrete array, or a traced one under
    an explicit mesh, whose type carries it), else None (auto sharding under jit: XLA
    propagates it)."""
    out = []
    for leaf in leaves:
        sh = _sharding_of(leaf)
        if sh is not None and isinstance(leaf, jax.core.Tracer) and not explicit(sh.mesh):
            sh = None
        out.append(sh)
    return out


def constrain(leaves, shardings) -> list:
    """`leaves`, each constrained to its sharding where one is given."""
    return [x if sh is None else jax.lax.with_sharding_constraint(x, sh)
            for x, sh in zip(leaves, shardings)]


def auto_out_shardings(mesh, params0, rule, return_state: bool, with_path: bool):
    """`out_sharding` for `jax.sharding.auto_axes` around `train`: w_T (and each moment of
    state_T) like params0, everything else replicated."""
    rep = NamedSharding(mesh, P())
    like = jax.tree_util.tree_map(lambda a: _sharding_of(a) or rep, params0)
    out = (like,)
    if return_state:
        fields = {m.name: like for m in rule.moments}
        if rule.counted:
            fields["count"] = rep
        out += (rule.State(**fields),)
    if with_path:
        out += (rep,)
    return out[0] if len(out) == 1 else out


def with_auto_axes(fn):
    """Decorate a checker `fn(loss_fn, params0, hypers=None, ..., state0=None)` that runs the
    fixed-point core on concrete arrays: when they live on a mesh with explicit axes, run it
    on the same devices with the axes auto (and that mesh ambient), as `train` does."""
    @functools.wraps(fn)
    def wrapped(loss_fn, params0, hypers=None, *args, **kw):
        mesh = mesh_of(params0, hypers)
        if mesh is None or not explicit(mesh) or not isinstance(mesh, jax.sharding.Mesh):
            return fn(loss_fn, params0, hypers, *args, **kw)
        auto = jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                                 axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))

        def move(tree):
            def one(a):
                sh = _sharding_of(a)
                if sh is None or isinstance(a, jax.core.Tracer):
                    return a
                return jax.device_put(a, NamedSharding(auto, sh.spec))
            return jax.tree_util.tree_map(one, tree)

        kw = {k: move(v) for k, v in kw.items()}
        with jax.set_mesh(auto):
            return fn(loss_fn, move(params0), move(hypers), *args, **kw)

    return wrapped
