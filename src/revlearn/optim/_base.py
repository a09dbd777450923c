"""The update-rule interface: *what* is trained, independent of *how* it is differentiated.

A rule is a list of moments (state arrays shaped like the params: momentum's
velocity, Adam's first and second moments), the decays that multiply them (and
optionally the weights), and two elementwise maps. One step, given
g = grad_w L(w_t, theta, t) at the pre-update weights:

    for each moment x, in order:   x <- d_x x + increment_x(g, moments updated so far, h, d, c, k)
    w <- d_w w + update(updated moments, h, d, c, k)

h: the rule's hyperparameters at step t, d: its decays at step t (applied on
their grids, `exact._grid`), c: their complements 1 - d, k = t + 1 (+ the
step count of a state the run started from). The weight update reads only moments that were themselves
updated from g at the pre-update weights, never g itself, so the step can be
undone: w_t from (w_{t+1}, moments_{t+1}); then g_t = grad L(w_t)
recomputed; then each moment from its increment and decay, in reverse order.
Momentum, Adam and RMSProp with momentum have this form; plain RMSProp, Lion
and Nesterov in its usual form do not (their weight update reads g).

`float_step` is the ordinary floating-point step (used by `Unrolled`,
`Checkpointed` and the lab's learning curves); `Reversible` runs the same
equations in fixed point with the decays applied exactly (the lost bits go to
the information buffer), and differentiates `float_step` for the adjoint.
A new rule subclasses `Rule` in one file (see `_adam.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from .. import _pytrees
from ..exact._grid import Grid


class Moment(NamedTuple):
    """A state array like params: `name`, the decay that multiplies it (or None), its
    fixed point's extra fractional bits over the weights' (`Reversible(frac_bits=k)` holds it
    as round(x 2^(k + scale)), range |x| < 2^(62 - k - scale)), and whether it must be >= 0
    (a mean square: a negative initial value is refused), and whether it is held wide
    (128 bits, `exact._wide`: for a mean square, whose values span many decades and are read
    relatively; `scale` is then unused)."""

    name: str
    decay: str | None
    scale: int = 0
    nonnegative: bool = False
    wide: bool = False


class Decay(NamedTuple):
    """A decay: `name`, its `grid`, the hyperparameters it reads, and `value(h)`, an
    elementwise map of those hyperparameters' entries (broadcasting) to the decay."""

    name: str
    grid: Grid
    reads: tuple
    value: Callable[[dict], Any]
    describe: str = ""
    allow_one: bool = False      # may be exactly 1 (nothing lost), e.g. 1 - lr * 0


# kinds of hyperparameter: what values are valid
REAL = "real"              # any finite value (learning rates)
DECAY = "decay"            # on its decay's grid, inside (0, 1)
POSITIVE = "positive"      # > 0 (eps)
NONNEGATIVE = "nonnegative"  # >= 0 (weight decay)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Base class of the update rules (see the module docstring). Subclasses set the class
    attributes and implement `increment` and `update`; instances hold the user's
    hyperparameter specs (each a scalar, a [steps] schedule, a pytree prefix of params0 with
    per-weight or [steps, *shape] leaves)."""

    name: ClassVar[str]
    hyper_kinds: ClassVar[dict]          # hyperparameter name -> kind, in signature order

    def __init_subclass__(cls, **kw):
        """Every rule is a pytree whose leaves are its hyperparameters (so `jax.grad` w.r.t. a
        rule returns a rule of hypergradients, and rules pass through `jax.jit`); a
        non-negative hyperparameter that is the Python number 0 (off, e.g. Adam's weight
        decay) is static, so tracing does not turn it on."""
        super().__init_subclass__(**kw)

        def flatten(rule):
            names = tuple(n for n in rule.hyper_kinds if not _off(rule, n))
            static = tuple((n, getattr(rule, n)) for n in rule.hyper_kinds if _off(rule, n))
            return tuple(getattr(rule, n) for n in names), (names, static)

        def unflatten(aux, children):
            names, static = aux
            return cls(**dict(zip(names, children)), **dict(static))

        jax.tree_util.register_pytree_node(cls, flatten, unflatten)
    moments: ClassVar[tuple]             # of Moment, in update order
    step_reads: ClassVar[tuple | None] = None   # hyperparameters `increment`/`update` read
                                                # as such (None: all; the others reach the
                                                # step only through decays)
    counted: ClassVar[bool] = False      # the state carries a step count (bias corrections)
    isolate_update: ClassVar[bool] = False   # compute `update` isolated in both exact passes
                                             # (it uses pow, whose bits may depend on fusion)
    affine_in_gradient: ClassVar[bool] = False   # the step is affine in g with coefficients
                                                 # that do not read the state (momentum): the
                                                 # reverse pass can then form g's cotangent
                                                 # before recomputing g
    State: ClassVar[type]                # the state NamedTuple (fields: "count" if counted, moments)

    def hypers(self) -> dict:
        """Hyperparameter name -> the user's spec."""
        return {n: getattr(self, n) for n in self.hyper_kinds}

    def decays(self) -> tuple:
        """The rule's decays (a tuple of `Decay`)."""
        raise NotImplementedError

    @property
    def weight_decay_name(self) -> str | None:
        """Name of the decay applied to the weights, or None."""
        return None

    def increment(self, name: str, g, new: dict, h: dict, d: dict, c: dict, k):
        """What is added to moment `name` after its decay (elementwise, any shapes)."""
        raise NotImplementedError

    def update(self, new: dict, h: dict, d: dict, c: dict, k):
        """What is added to the weights after their decay, from the updated moments."""
        raise NotImplementedError

    # ---- generic parts ----

    def init(self, params) -> Any:
        """The initial state: zero moments like params (and count 0); for an Equinox module,
        like its trained part (`eqx.filter(params, eqx.is_inexact_array)`)."""
        zeros = jax.tree_util.tree_map(jnp.zeros_like, _pytrees.trained(params))
        fields = {m.name: zeros for m in self.moments}
        if self.counted:
            fields["count"] = jnp.zeros((), jnp.int32)
        return self.State(**fields)

    def float_step(self, w, moments: dict, g, h: dict, d: dict, k):
        """One floating-point step of one array (or the packed state): returns (w', moments').

        Computed in w's dtype: h and the decays d (float64, on their grids) are cast to it,
        and so are the complements c = 1 - d, taken in float64 first (a factor 1 - 1e-7 is
        not a float32 number, its complement is); the weights' decay is applied as
        w - c_w w."""
        dt = w.dtype
        h = {n: jnp.asarray(v).astype(dt) for n, v in h.items()}
        c = {n: (1.0 - jnp.asarray(v, jnp.float64)).astype(dt) for n, v in d.items()}
        d = {n: jnp.asarray(v).astype(dt) for n, v in d.items()}
        new = {}
        for m in self.moments:
            x = moments[m.name]
            if m.decay is not None:
                x = d[m.decay] * x
            new[m.name] = (x + self.increment(m.name, g, new, h, d, c, k)).astype(x.dtype)
        if self.weight_decay_name is not None:
            w = w - c[self.weight_decay_name] * w
        return (w + self.update(new, h, d, c, k)).astype(dt), new


def _off(rule, name) -> bool:
    v = getattr(rule, name)
    return (rule.hyper_kinds[name] == NONNEGATIVE and isinstance(v, (int, float))
            and not isinstance(v, bool) and v == 0)


def safe_sqrt(x):
    """sqrt(x) for x >= 0 whose derivative at 0 is 0 instead of inf (so that a weight that
    never sees a gradient, s = m = 0, gives 0, not 0 * inf = nan, in every hypergradient);
    the same bits as jnp.sqrt elsewhere."""
    pos = x > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, x, 1.0)), 0.0)

