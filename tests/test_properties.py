"""Property-based agreement of the three methods on >= 1,000 generated problems.

Hypothesis draws the *structure* of a problem family: the update rule (one test per rule),
a random params pytree (nested dicts / lists / tuples; 0-d, empty (0,) and (2, 0), and
several other leaf shapes), its dtypes (float64, float32 or mixed per leaf), the number of
steps T (1 .. 12), a schedule template for every hyperparameter of the rule (a scalar, a
per-step [T] array, a pytree prefix of params whose entries are scalars or [T] schedules,
per-weight arrays, per-step-and-weight [T, *S] arrays, or the broadcasting forms
[1, *B] / [T, *B]), whether state0 (momentum: v0) is given (Adam: from a step count > 0
too), whether path_fn is given, whether the final state enters the meta loss
(return_state), Adam's weight decay on or off, and Checkpointed's `every`.

Compilation dominates the cost, so inside a family one compiled program evaluates
INSTANCES problems that differ in every value (params0, training data, L2 strength, every
hyperparameter's schedule values, state0, the meta loss's weights): `jax.vmap` over
chunks of CHUNK instances inside a `lax.map` over the chunks (a plain vmap over all of them
compiles far slower: every `jax.debug.callback` that reports faults is unrolled once per
batch element). For every instance the program computes, by Reversible, Unrolled and
Checkpointed, the meta loss of train(...)'s output, w_T, and the hypergradients w.r.t.
params0, the hypers (training data, per-leaf coupling vector, log L2), the rule (a pytree:
one hypergradient per hyperparameter) and state0. Checked per instance:

* Reversible and Checkpointed agree with Unrolled: for each group (meta loss, w_T, state_T,
  and the hypergradients w.r.t. params0, the hypers, each hyperparameter of the rule, each
  moment of state0) ||g - g_unr|| <= rtol * max(||g_unr||, floor), per instance (TOL).
  float64: rtol 1e-9, floor 1e-3. The floor is needed because some hypergradients are
  exact cancellations of O(1) terms (Adam's d/d b1 at T = 1 is 0: the bias correction
  cancels 1 - b1; d/d data through Adam's first step is lr eps / (|g| + eps)^2 ~ 1e-10),
  where both methods return rounding noise of those terms (|difference| <= 5e-14 seen);
  every input here is O(1), so 1e-9 * 1e-3 = 1e-12 absolute is still 1e4 times the
  rounding of the terms, and far below any real error (a wrong step, term or schedule
  entry is O(lr) absolute). float32 and mixed problems: rtol 1e-3 (revlearn's own float32
  tolerance for Reversible vs Unrolled in `check_hypergradients`), floor 1e-2. The methods
  round differently there: Unrolled and Checkpointed round weights and moments to float32
  after every step, Reversible keeps them in 64-bit fixed point; cancellations amplify that
  (Adam's d/d b2 with b2 ~ 0.996 at T = 3: 4e-7 absolute on 2.5e-3, 1.7e-4 relative).
  The summary test prints the worst seen per dtype.
* Exact reversal: Reversible's reverse pass recovers w0, every moment of the state and
  every buffer bit-for-bit, for every instance, or raises (the REVERSAL_DRIFT fault that
  `check_reversal` also reads: the same three comparisons, inside the batched program,
  reported per instance through `jax.debug.callback`; a fault of any kind in any instance
  fails the test with its message). The public `check_reversal` cannot be vmapped (it
  returns Python bools) and compiles on every call, so it runs unbatched on the first
  instance of the first family of each rule; a separate test checks that one drifting
  instance among INSTANCES fails the batched program.

Problems are sane (small learning rates, O(1) weights and data), so a ReversibleError is a
finding, not an expected fault. The total number of problems checked is counted and the
last test asserts it is >= 1,000.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import revlearn
from revlearn import optim

# (rtol, floor): a group g passes if ||g - g_unrolled|| <= rtol * max(||g_unrolled||, floor)
TOL = {"f64": (1e-9, 1e-3), "f32": (1e-3, 1e-2), "mixed": (1e-3, 1e-2)}
FAMILIES_PER_RULE = 3          # hypothesis examples per rule (3 rules)
CHUNK = 4                      # instances per vmap
CHUNKS = 28                    # vmapped chunks per family (lax.map)
INSTANCES = CHUNK * CHUNKS     # problems per family
NB = 3                         # minibatches in the training data (the loss picks t % NB)
assert 3 * FAMILIES_PER_RULE * INSTANCES >= 1000

RULES = {
    # hyperparameter: (low, high, log-uniform), the ranges values are drawn from
    "momentum": dict(lr=(0.05, 0.4, False), momentum=(0.5, 0.95, False)),
    "adam": dict(lr=(0.005, 0.05, False), b1=(0.5, 0.95, False), b2=(0.9, 0.999, False),
                 eps=(1e-8, 1e-4, True), weight_decay=(0.0, 0.5, False)),
    "rmsprop_momentum": dict(lr=(0.002, 0.03, False), decay=(0.5, 0.99, False),
                             momentum=(0.5, 0.9, False), eps=(1e-8, 1e-4, True)),
}
# lower bounds of the (traced) decays, for Reversible's buffers: below every value drawn
MIN_DECAY = {"momentum": 0.49, "b1": 0.49, "b2": 0.89, "decay": 0.49,
             "decoupled_decay": 1 - 0.05 * 0.5 - 1e-3}
MOMENTS = {"momentum": ("v",), "adam": ("m", "s"), "rmsprop_momentum": ("s", "v")}

SEEN = {"problems": 0, "families": 0, "reversal_checks": 0, "worst": {}, "kinds": set(),
        "rules": set(), "dtypes": set(), "flags": set(), "seconds": 0.0}


# ---------------------------------------------------------------- structures (hypothesis)

@dataclasses.dataclass(frozen=True)
class Leaf:
    """A params leaf's shape (not a pytree node, so trees of Leaf have params' structure)."""
    shape: tuple


@dataclasses.dataclass(frozen=True)
class Entry:
    """A schedule entry template: `kind` and the entry's shape (without the instance axis)."""
    kind: str
    shape: tuple


def leaf_shapes(T):
    return st.sampled_from([(2, 3), (), (1,), (3,), (0,), (2, 0), (3, 1, 2), (T,)]).map(Leaf)


def trees(T):
    def extend(children):
        return st.one_of(st.lists(children, min_size=1, max_size=3),
                         st.lists(children, min_size=1, max_size=3).map(tuple),
                         st.dictionaries(st.sampled_from("abcd"), children, min_size=1,
                                         max_size=3))
    return st.recursive(leaf_shapes(T), extend, max_leaves=5)


def _n_leaves(node):
    return len(jax.tree_util.tree_leaves(node))


def _step_shape(node, T):
    """[T] per step; written (T, 1) where it would be ambiguous (a lone leaf of shape (T,))."""
    ls = jax.tree_util.tree_leaves(node)
    return (T, 1) if len(ls) == 1 and ls[0].shape == (T,) else (T,)


@st.composite
def leaf_entry(draw, leaf, T):
    S = leaf.shape
    kind = draw(st.sampled_from(["step_weight", "weight", "broadcast", "step", "scalar"]))
    if kind == "scalar":
        return Entry(kind, ())
    if kind == "step":
        return Entry(kind, _step_shape(leaf, T))
    if kind == "weight":
        return Entry(kind, (1,) + S if S == (T,) else S)     # (T,) alone would be ambiguous
    if kind == "step_weight":
        return Entry(kind, (T,) + S)
    B = tuple(1 if draw(st.booleans()) else s for s in S)
    return Entry(kind, (draw(st.sampled_from([1, T])),) + B)


@st.composite
def prefix(draw, node, T):
    """A pytree prefix of `node` whose leaves are Entry templates."""
    if isinstance(node, Leaf):
        return draw(leaf_entry(node, T))
    kind = draw(st.sampled_from(["recurse", "recurse", "step", "scalar"]))
    if kind == "scalar":
        return Entry("prefix_scalar", ())
    if kind == "step":
        return Entry("prefix_step", _step_shape(node, T))
    if isinstance(node, dict):
        return {k: draw(prefix(v, T)) for k, v in node.items()}
    out = [draw(prefix(v, T)) for v in node]
    return tuple(out) if isinstance(node, tuple) else out


@st.composite
def schedule(draw, tree, T):
    # a bare-array params0 takes only the root forms: revlearn reads an array spec as covering
    # "several params leaves" and refuses per-weight shapes (reported as a finding)
    kind = draw(st.sampled_from(([] if isinstance(tree, Leaf) else ["prefix"] * 2) + ["step", "scalar"]))
    if kind == "scalar":
        return Entry("scalar", ())
    if kind == "step":
        return Entry("step", (T,))       # at the root: never ambiguous
    return draw(prefix(tree, T))


@dataclasses.dataclass(frozen=True)
class Family:
    rule: str
    T: int
    tree: object           # pytree of Leaf
    dtypes: tuple          # per leaf, "float64" / "float32"
    mode: str              # "f64", "f32", "mixed"
    hypers: tuple          # ((name, template pytree of Entry), ...); weight_decay absent = off
    state0: bool
    count0: int
    path: bool
    return_state: bool
    api: str               # "train" or "sgd"
    every: int
    seed: int

    def describe(self) -> str:
        sched = ", ".join(f"{n}={_kinds(t)}" for n, t in self.hypers)
        return (f"{self.rule} T={self.T} {self.mode} tree={self.tree!r} dtypes={self.dtypes} "
                f"[{sched}] state0={self.state0} count0={self.count0} path={self.path} "
                f"return_state={self.return_state} api={self.api} every={self.every} "
                f"seed={self.seed}")


def _kinds(template):
    return sorted({e.kind for e in jax.tree_util.tree_leaves(template)})


@st.composite
def families(draw, rule):
    # hypothesis's first example is its simplest draw (index 0 of every choice): the orders
    # here make it a 6-step problem with state0, path_fn and per-step schedules, not T = 1
    T = draw(st.integers(0, 11).map(lambda i: 1 + (i + 5) % 12))
    tree = draw(trees(T))
    leaves = jax.tree_util.tree_leaves(tree)
    if all(math.prod(l.shape) == 0 for l in leaves):     # nothing to train: make one leaf real
        tree = {"w": tree, "z": Leaf((2,))}
        leaves = jax.tree_util.tree_leaves(tree)
    mode = draw(st.sampled_from(["f64", "f32", "mixed"]))
    if mode == "mixed":
        dtypes = list(draw(st.lists(st.sampled_from(["float64", "float32"]),
                                    min_size=len(leaves), max_size=len(leaves))))
        if len(set(dtypes)) == 1 and len(dtypes) > 1:
            dtypes[-1] = "float32" if dtypes[0] == "float64" else "float64"
        if len(set(dtypes)) == 1:
            mode = "f64" if dtypes[0] == "float64" else "f32"
        dtypes = tuple(dtypes)
    else:
        dtypes = (("float64" if mode == "f64" else "float32"),) * len(leaves)
    names = list(RULES[rule])
    if rule == "adam" and draw(st.booleans()):
        names.remove("weight_decay")                     # the Python number 0: off
    hypers = tuple((n, draw(schedule(tree, T))) for n in names)
    yes = st.booleans().map(lambda b: not b)
    state0 = draw(yes)
    count0 = draw(st.sampled_from([5, 0])) if (rule == "adam" and state0) else 0
    api = draw(st.sampled_from(["train", "sgd"])) if rule == "momentum" else "train"
    return_state = draw(yes) if api == "train" else False
    return Family(rule, T, tree, dtypes, mode, hypers, state0, count0, draw(yes), return_state,
                  api, draw(st.integers(1, T)), draw(st.integers(0, 2**31 - 1)))


# ---------------------------------------------------------------- instances (numpy values)

def _values(rng, shape, lo, hi, log):
    u = rng.uniform(size=(INSTANCES,) + shape)
    return np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo))) if log else lo + u * (hi - lo)


def instances(fam: Family):
    """(params0, hypers, rule, state0 moments, meta weights), each with a leading
    INSTANCES axis, all values drawn from the family's seed."""
    rng = np.random.default_rng(fam.seed)
    leaves, treedef = jax.tree_util.tree_flatten(fam.tree)
    dts = [np.dtype(d) for d in fam.dtypes]
    like = lambda f: treedef.unflatten([f(l.shape, dt).astype(dt) for l, dt in zip(leaves, dts)])
    n = INSTANCES
    p0 = like(lambda s, dt: rng.uniform(-1, 1, (n,) + s))
    hyp = {"x": like(lambda s, dt: rng.normal(0, 0.5, (n, NB) + s)),
           "u": like(lambda s, dt: rng.normal(0, 0.3, (n,) + s)),
           "log_l2": rng.uniform(-4, -1, (n,))}
    spec = {}
    for name, template in fam.hypers:
        lo, hi, log = RULES[fam.rule][name]
        spec[name] = jax.tree_util.tree_map(lambda e: _values(rng, e.shape, lo, hi, log),
                                            template)
    rule = getattr(optim, fam.rule)(**spec)
    s0 = {}
    if fam.state0:
        for m in MOMENTS[fam.rule]:
            if m == "s":       # a mean square: >= 0
                s0[m] = like(lambda s, dt: rng.uniform(0, 0.7, (n,) + s) ** 2)
            else:
                s0[m] = like(lambda s, dt: rng.normal(0, 0.1, (n,) + s))
    meta_w = {"w": like(lambda s, dt: rng.normal(0, 1, (n,) + s)),
              "s": {m: like(lambda s, dt: rng.normal(0, 1, (n,) + s))
                    for m in MOMENTS[fam.rule]}}
    return p0, hyp, rule, s0, meta_w


# ---------------------------------------------------------------- one instance, three methods

def loss_fn(p, h, t):
    """Nonlinear in w and the data, couples every leaf (tanh of a weighted sum), reads the
    minibatch t % NB, and a log L2 strength; each leaf's terms in its dtype, summed in f64."""
    total = jnp.zeros((), jnp.float64)
    c = jnp.zeros((), jnp.float64)
    sq = jnp.zeros((), jnp.float64)
    for w, x, u in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(h["x"]),
                       jax.tree_util.tree_leaves(h["u"])):
        xt = x[t % NB]
        total += jnp.sum(0.5 * (w - xt) ** 2 + 0.1 * jnp.cos(w * xt)).astype(jnp.float64)
        c += jnp.sum(w * u).astype(jnp.float64)
        sq += jnp.sum(w * w).astype(jnp.float64)
    return total + 0.5 * jnp.tanh(c) ** 2 + jnp.exp(h["log_l2"]) * sq


def path_fn(p, h, t):
    return sum(jnp.sum(jnp.sin(w)).astype(jnp.float64) for w in jax.tree_util.tree_leaves(p)) \
        * (1.0 + 0.1 * t)


def _state(fam: Family, s0: dict):
    if not fam.state0:
        return None
    if fam.rule == "momentum":
        return optim.MomentumState(s0["v"])
    if fam.rule == "adam":
        return optim.AdamState(jnp.int32(fam.count0), s0["m"], s0["s"])
    return optim.RMSPropMomentumState(s0["s"], s0["v"])


def objective(fam: Family, method, p0, hyp, rule, s0, meta_w):
    """The meta loss of one instance and (w_T, state_T moments or {})."""
    kw = dict(steps=fam.T, method=method, path_fn=path_fn if fam.path else None)
    if fam.api == "sgd":
        out = revlearn.sgd(loss_fn, p0, hyp, lr=rule.lr, momentum=rule.momentum,
                           v0=s0["v"] if fam.state0 else None, **kw)
    else:
        out = revlearn.train(loss_fn, p0, hyp, optimizer=rule, state0=_state(fam, s0),
                             return_state=fam.return_state, **kw)
    out = out if isinstance(out, tuple) else (out,)
    wT = out[0]
    meta = sum(jnp.sum(a * jnp.sin(w)).astype(jnp.float64) + 0.05 * jnp.sum(w * w).astype(jnp.float64)
               for a, w in zip(jax.tree_util.tree_leaves(meta_w["w"]), jax.tree_util.tree_leaves(wT)))
    moments = {}
    if fam.return_state:
        for m in MOMENTS[fam.rule]:
            moments[m] = getattr(out[1], m)
            meta += sum(jnp.sum(a * x).astype(jnp.float64) for a, x in
                        zip(jax.tree_util.tree_leaves(meta_w["s"][m]),
                            jax.tree_util.tree_leaves(moments[m])))
    if fam.path:
        meta += 0.1 * out[-1]
    return meta, (wT, moments)


def program(fam: Family, names=("rev", "unr", "chk")):
    """One compiled program: for every instance, each method's (meta loss, (w_T, state_T),
    hypergradients), vmapped over chunks of CHUNK instances inside a lax.map over chunks."""
    ms = {"rev": revlearn.Reversible(min_decay=MIN_DECAY), "unr": revlearn.Unrolled(),
          "chk": revlearn.Checkpointed(every=fam.every)}
    ms = {n: ms[n] for n in names}

    def one(args):
        p0, hyp, rule, s0, meta_w = args
        out = {}
        for name, m in ms.items():
            (v, aux), g = jax.value_and_grad(
                lambda *a: objective(fam, m, *a, meta_w), argnums=(0, 1, 2, 3), has_aux=True)(
                p0, hyp, rule, s0)
            out[name] = (v, aux, g)
        return out

    def run(args):
        chunked = jax.tree_util.tree_map(
            lambda a: a.reshape((CHUNKS, CHUNK) + a.shape[1:]), args)
        out = jax.lax.map(jax.vmap(one), chunked)
        return jax.tree_util.tree_map(lambda a: a.reshape((INSTANCES,) + a.shape[2:]), out)

    return jax.jit(run)


# ---------------------------------------------------------------- comparison

def _sq(tree):
    """Per instance, the squared norm of a pytree with a leading instance axis."""
    total = np.zeros(INSTANCES)
    for a in jax.tree_util.tree_leaves(tree):
        a = np.asarray(a, np.float64).reshape(INSTANCES, -1)
        total += np.sum(a * a, axis=1)
    return total


def _rel(a, b, floor):
    """Per instance ||a - b|| / max(||b||, floor)."""
    diff = _sq(jax.tree_util.tree_map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b))
    return np.sqrt(diff) / np.maximum(np.sqrt(_sq(b)), floor)


def groups(fam: Family, v, aux, g):
    """name -> per-instance pytree: the meta loss, w_T, state_T and each hypergradient group."""
    out = {"meta": v, "w_T": aux[0], "d params0": g[0], "d hypers": g[1]}
    if aux[1]:
        out["state_T"] = aux[1]
    for name, _ in fam.hypers:
        out[f"d {name}"] = getattr(g[2], name)
    for m, a in g[3].items():
        out[f"d state0.{m}"] = a
    return out


def check_family(fam: Family):
    start = time.perf_counter()
    args = instances(fam)
    out = program(fam)(args)
    jax.block_until_ready(out)
    rtol, floor = TOL[fam.mode]
    ref = groups(fam, *out["unr"])
    worst = SEEN["worst"].setdefault(fam.mode, {})
    failures = []
    for name in ("rev", "chk"):
        got = groups(fam, *out[name])
        for key in ref:
            r = _rel(got[key], ref[key], floor)
            assert np.all(np.isfinite(r)), (name, key, fam.describe())
            tag = f"{name} vs unr"
            worst[tag] = max(worst.get(tag, 0.0), float(np.max(r)))
            bad = np.flatnonzero(r > rtol)
            if bad.size:
                failures.append(f"{name} vs unrolled, {key}: {bad.size} instances beyond "
                                f"{rtol:g}, worst {np.max(r):.3e} (instance {int(np.argmax(r))})")
    # hypergradients are not trivially zero
    assert np.all(_sq(ref["d params0"]) > 0), fam.describe()
    assert np.all(_sq(ref["d hypers"]) > 0), fam.describe()
    assert not failures, fam.describe() + "\n" + "\n".join(failures)

    # the public check_reversal (unbatched, a compile of its own) on the first instance of the
    # first family of each rule; every instance was checked inside the program above
    if fam.rule not in SEEN["rules"]:
        p0, hyp, rule, s0, _ = jax.tree_util.tree_map(lambda a: a[0], args)
        kw = (dict(lr=rule.lr, momentum=rule.momentum, v0=s0["v"] if fam.state0 else None)
              if fam.api == "sgd" else dict(optimizer=rule, state0=_state(fam, s0)))
        rc = revlearn.check_reversal(loss_fn, p0, hyp, steps=fam.T, **kw)
        assert rc.passed, (rc, fam.describe())
        SEEN["reversal_checks"] += 1

    SEEN["problems"] += INSTANCES
    SEEN["families"] += 1
    SEEN["rules"].add(fam.rule)
    SEEN["dtypes"].add(fam.mode)
    for _, t in fam.hypers:
        SEEN["kinds"].update(_kinds(t))
    SEEN["flags"].update({f"state0={fam.state0}", f"path={fam.path}", f"api={fam.api}",
                          f"return_state={fam.return_state}", f"T={fam.T}"})
    SEEN["seconds"] += time.perf_counter() - start
    print(f"\n[{time.perf_counter() - start:.1f}s] {fam.describe()}", flush=True)


SETTINGS = settings(max_examples=FAMILIES_PER_RULE, derandomize=True, database=None,
                    deadline=None, phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.mark.parametrize("rule", list(RULES))
@SETTINGS
@given(data=st.data())
def test_methods_agree_on_generated_problems(rule, data):
    # hypothesis's pytest plugin gives each parametrized case its own derandomized seed
    check_family(data.draw(families(rule), label="family"))


def test_batched_reversal_check_catches_one_drifting_instance(monkeypatch):
    """The in-program reversal check is live under lax.map(vmap(...)): one instance of
    INSTANCES whose fixed-point weights are off by one unit before the reverse pass (as a
    non-deterministic gradient would leave them) fails the whole program with the drift
    error."""
    from revlearn.methods import _reversible

    fam = Family("momentum", 2, Leaf((3,)), ("float64",), "f64",
                 (("lr", Entry("scalar", ())), ("momentum", Entry("scalar", ()))),
                 False, 0, False, False, "train", 1, 7)
    p0, hyp, rule, s0, meta_w = instances(fam)
    p0 = np.where(np.arange(INSTANCES)[:, None] == 37, 0.5, -0.5) * np.ones((1, 3))
    real_forward = _reversible.forward

    def off_by_one(*args, **kwargs):
        fw = real_forward(*args, **kwargs)
        return fw._replace(W=fw.W.at[0, 0].add((fw.W0[0, 0] > 0).astype(fw.W.dtype)))

    monkeypatch.setattr(_reversible, "forward", off_by_one)
    with pytest.raises(Exception, match="did not recover the initial weights"):
        jax.block_until_ready(program(fam, ("rev",))((p0, hyp, rule, s0, meta_w)))
    monkeypatch.undo()
    jax.block_until_ready(program(fam, ("rev",))((p0, hyp, rule, s0, meta_w)))   # else fine


def test_at_least_1000_problems_checked():
    if SEEN["rules"] != set(RULES):
        pytest.skip("run the whole file: the count covers the three rule tests")
    print(f"\n{SEEN['families']} families x {INSTANCES} instances = {SEEN['problems']} problems, "
          f"{SEEN['reversal_checks']} unbatched check_reversal, {SEEN['seconds']:.1f} s; "
          f"dtypes {sorted(SEEN['dtypes'])}; schedule kinds {sorted(SEEN['kinds'])}; "
          f"flags {sorted(SEEN['flags'])}")
    for mode, w in sorted(SEEN["worst"].items()):
        print(f"worst relative disagreement [{mode}]: "
              + ", ".join(f"{k} {v:.2e}" for k, v in sorted(w.items())))
    assert SEEN["problems"] >= 1000
