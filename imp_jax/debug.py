"""A checked forward pass that names the first layer, op and weight whose output is not finite.

``IMP_JAX_DEBUG_NANS=1`` (or ``load(..., debug=True)``) runs this instead of trusting the fused step. It works on
the model's own jaxpr, so it checks exactly the code that runs, for every model family:

- the forward is traced once (``jax.make_jaxpr``) and re-evaluated under one ``jit`` in which every equation's
  output also yields its NaN / +inf / -inf counts; a top-level ``scan`` (the layer stack) is re-run as a scan
  whose body returns those counts per layer. One compile and one run give the counts of every op of every layer;
- every value remembers whether it is computed from one weight alone (its packed bytes and their
  dequantization), so the first failing op, in program order, is named by the weight it consumes:
  ``layer 17 ffn_down (Q4_K [576, 1536])``. A weight whose dequantized values are already non-finite (a corrupt
  scale) is reported as such.

Attention masks with ``-inf`` on purpose, so outside weights only NaN and ``+inf`` count as failures; what a
layer hands to the next one and the logits must be entirely finite.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from imp_jax.errors import ImpError, NonFiniteError
from imp_jax.gguf.qtensor import QTensor
from imp_jax.models.config import ModelConfig
from imp_jax.models.decoder import forward
from imp_jax.ops.matmul import UnitArrays
from imp_jax.ops.policy import REFERENCE, KernelPolicy
from imp_jax.runtime.cache import init_cache
from imp_jax.weights.tensor_spec import is_spec

_DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+?)(\.weight)?$")
_MOVES_ONLY = frozenset(
    {
        "reshape",
        "broadcast_in_dim",
        "squeeze",
        "expand_dims",
        "transpose",
        "slice",
        "dynamic_slice",
        "dynamic_update_slice",
        "concatenate",
        "pad",
        "rev",
        "copy",
        "copy_p",
        "select_n",
        "scatter",
    }
)


@dataclasses.dataclass(frozen=True)
class Weight:
    """The weight a checked value is computed from: its tensor name(s) (one per stacked unit) and format."""

    names: tuple[str, ...]  # GGUF tensor names, or tree paths when no specs were given
    fmt: str  # "Q4_K [576, 1536]": stored format and logical shape of one tensor

    def at(self, unit: int) -> Weight:
        return Weight(self.names[unit : unit + 1], self.fmt) if len(self.names) > 1 else self

    @property
    def layer(self) -> int | None:
        m = _BLOCK.match(self.names[0])
        return int(m.group(1)) if m else None

    @property
    def op(self) -> str:
        """The tensor kind ("attn_q"), or the fused kinds joined by '+' ("attn_q+attn_k+attn_v")."""
        return "+".join(_op(name) for name in self.names[0].split("+"))

    def __str__(self) -> str:
        return f"{self.op} ({self.fmt})"


def _op(name: str) -> str:
    m = _BLOCK.match(name)
    return m.group(2) if m else name.removesuffix(".weight")


def check_prefill(
    params,
    config: ModelConfig,
    token_ids: Sequence[int],
    *,
    dtype: str = "bfloat16",
    specs=None,
    kernels: KernelPolicy = REFERENCE,
) -> None:
    """One checked prefill of ``token_ids`` from an empty cache; raises NonFiniteError at the first bad op.

    ``specs`` (the TensorSpec tree the params were loaded from) gives the GGUF tensor names for the message.
    """
    ids = [int(t) for t in token_ids]
    if not ids:
        raise ImpError("the checked forward needs at least one token")
    tokens = jnp.asarray([ids], jnp.int32)
    pos = jnp.arange(len(ids), dtype=jnp.int32)[None]
    cache = init_cache(config, 1, len(ids), jnp.dtype(dtype))

    def run(p, t, q, c):
        return forward(p, config, t, q, c, decode=False, kernels=kernels)

    tags = weight_tags(params, specs)
    check_finite(run, params, tokens, pos, cache, weights=tags + [None] * (2 + len(jax.tree.leaves(cache))))


def weight_tags(params, specs=None) -> list[Weight]:
    """One Weight per array leaf of the params tree (the arrays of one packed weight share one, and so do the
    units of a weight held per unit: like a stacked weight's, its tag names every unit)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: _weight_leaf(x) is not None)
    spec_leaves = jax.tree.leaves(specs, is_leaf=is_spec) if specs is not None else [None] * len(flat)
    if len(spec_leaves) != len(flat):
        raise ImpError(f"the spec tree has {len(spec_leaves)} leaves, the params {len(flat)}")
    tags: list[Weight] = []
    for (path, leaf), spec in zip(flat, spec_leaves, strict=True):
        names = spec.labels if spec is not None else (jax.tree_util.keystr(path).lstrip("."),)
        one = _weight_leaf(leaf)
        fmt = _packed_format(one) if one is not None else None
        if one is not None:
            kind = fmt or _DTYPE_NAMES.get(jnp.dtype(one.dtype).name, one.dtype)
            tags += [Weight(names, f"{kind} {list(one.shape)}")] * len(jax.tree.leaves(leaf))
        else:
            stacked = spec.stacked if spec is not None else "segments" in jax.tree_util.keystr(path)
            shape = leaf.shape[1:] if stacked else leaf.shape
            tags.append(Weight(names, f"{_DTYPE_NAMES.get(jnp.dtype(leaf.dtype).name, leaf.dtype)} {list(shape)}"))
    return tags


def _weight_leaf(leaf):
    """The leaf one Weight tag covers all arrays of: a packed weight, or one unit of a weight held per unit."""
    if isinstance(leaf, UnitArrays):
        return leaf.first
    return leaf if _packed_format(leaf) is not None else None


def _packed_format(leaf) -> str | None:
    """The block format of a packed weight leaf: a QTensor, or a kernel-layout ``pallas.PackedWeight``."""
    if isinstance(leaf, QTensor):
        return leaf.qtype_name
    fmt = getattr(leaf, "fmt", None)
    return None if fmt is None else fmt.name


def check_finite(fn: Callable, *args, weights: Sequence[Weight | None] | None = None):
    """``fn(*args)`` with every op's output counted; raises NonFiniteError naming the first failing op."""
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    flat = jax.tree.leaves(args)
    tags = list(weights) if weights is not None else [None] * len(flat)
    if len(tags) != len(flat):
        raise ImpError(f"{len(tags)} weight tags for {len(flat)} array arguments")
    outs, error = _run(closed, flat, tags, detail=False)
    if error is not None:  # locate it: the same run with every op counted (a slower compile, paid only here)
        raise _run(closed, flat, tags, detail=True)[1] or error
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)


def _run(closed: ClosedJaxpr, flat, tags, *, detail: bool):
    """Evaluate under one jit, counting layer outputs and final outputs (and with ``detail`` every op)."""
    sites: list = []  # filled while the instrumented function is traced (once)

    @jax.jit
    def instrumented(consts, flat):
        ev = _Evaluator(sites, [], detail)
        outs = ev.run(closed.jaxpr, consts, flat, tags, top=True)
        for out in outs:
            ev.record(_Site("output", None, None, strict=True), out)
        return outs, ev.counts

    outs, counts = instrumented(closed.consts, flat)
    return outs, _first_failure(sites, jax.device_get(counts))


@dataclasses.dataclass(frozen=True)
class _Site:
    """One checked value: the op that made it and what it was computed from."""

    prim: str
    chain: Weight | None  # computed from this weight alone
    used: Weight | None  # the first weight the op consumed
    strict: bool = False  # a layer's output: -inf fails too


@dataclasses.dataclass(frozen=True)
class _Loop:
    """A top-level scan: its body's sites, counted per iteration."""

    first_unit: int
    length: int
    reverse: bool
    body: tuple[_Site, ...]


class _Evaluator:
    """Evaluates a jaxpr under tracing, appending a site and its counts for every floating output."""

    def __init__(self, sites: list, counts: list, detail: bool):
        self.sites, self.counts, self.detail = sites, counts, detail
        self.units = 0

    def run(self, jaxpr: Jaxpr, consts, args, tags, *, top: bool):
        env, tag = {}, {}
        for v, x in zip(jaxpr.constvars, consts, strict=True):
            env[v], tag[v] = x, None
        for v, x, t in zip(jaxpr.invars, args, tags, strict=True):
            env[v], tag[v] = x, t
            if self.detail and t is not None and (not top or len(t.names) == 1):
                self.record(_Site("loading", t, t), x)  # a dense weight as stored (in a scan: one layer's slice)

        def read(v):
            return v.val if isinstance(v, Literal) else env[v]

        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            intags = [None if isinstance(v, Literal) else tag[v] for v in eqn.invars]
            out_tag = _chain(eqn, intags)
            if eqn.primitive.name == "scan" and top:
                outs = self._scan(eqn, invals, intags)
            else:
                with eqn.ctx.manager:
                    outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
                outs = outs if eqn.primitive.multiple_results else [outs]
                used = next((t for t in intags if t is not None), None)
                if self.detail and _can_create_nonfinite(eqn):
                    name = eqn.params.get("name", eqn.primitive.name) if eqn.primitive.name == "jit" else None
                    for out in outs:
                        self.record(_Site(name or eqn.primitive.name, out_tag, used), out)
            for v, x in zip(eqn.outvars, outs, strict=True):
                env[v], tag[v] = x, out_tag
        return [read(v) for v in jaxpr.outvars]

    def record(self, site: _Site, value) -> None:
        if jnp.issubdtype(value.dtype, jnp.inexact):
            self.sites.append(site)
            self.counts.append(_counts(value))

    def _scan(self, eqn, invals, intags):
        p = eqn.params
        body = p["jaxpr"] if isinstance(p["jaxpr"], ClosedJaxpr) else ClosedJaxpr(p["jaxpr"], [])
        n_consts, n_carry = _scan_layout(p)
        consts, carry, xs = invals[:n_consts], invals[n_consts : n_consts + n_carry], invals[n_consts + n_carry :]
        tags = intags[:n_consts] + [None] * n_carry + intags[n_consts + n_carry :]
        body_sites: list = []

        def step(c, x):
            inner = _Evaluator([], [], self.detail)
            outs = inner.run(body.jaxpr, body.consts, [*consts, *c, *x], tags, top=False)
            for out in outs[:n_carry]:
                inner.record(_Site("layer output", None, None, strict=True), out)
            body_sites[:] = inner.sites
            return outs[:n_carry], (outs[n_carry:], jnp.stack(inner.counts))

        carry, (ys, counts) = jax.lax.scan(step, carry, xs, length=p["length"], reverse=p["reverse"])
        self.sites.append(_Loop(self.units, p["length"], p["reverse"], tuple(body_sites)))
        self.counts.append(counts)
        self.units += p["length"]
        return [*carry, *ys]


def _can_create_nonfinite(eqn) -> bool:
    """Ops that only move or select values, or widen them, cannot turn finite values into non-finite ones:
    checking them would only cost compile time (each check is one reduction in the instrumented program)."""
    name = eqn.primitive.name
    if name == "convert_element_type":
        return jnp.finfo(eqn.params["new_dtype"]).max < jnp.finfo(jnp.float32).max if _float(eqn) else False
    return name not in _MOVES_ONLY


def _float(eqn) -> bool:
    return jnp.issubdtype(eqn.params["new_dtype"], jnp.floating)


def _counts(x) -> jax.Array:
    """[NaN, +inf, -inf] counts of x, in one reduction."""
    flags = jnp.stack([jnp.isnan(x), jnp.isposinf(x), jnp.isneginf(x)]).reshape(3, -1)
    return jnp.sum(flags, axis=1, dtype=jnp.int32)


def _scan_layout(params) -> tuple[int, int]:
    """Numbers of constant and carry operands of a scan equation (jax 0.11 groups them in ``ft_in``)."""
    if "ft_in" in params:
        consts, carry, _ = params["ft_in"].unpack()
        return len(consts), len(carry)
    return params["num_consts"], params["num_carry"]


def _chain(eqn, intags) -> Weight | None:
    """The weight an equation's output is computed from alone (all its non-literal inputs come from it)."""
    tags = [t for v, t in zip(eqn.invars, intags, strict=True) if not isinstance(v, Literal)]
    if tags and all(t is not None and t == tags[0] for t in tags):
        return tags[0]
    return None


def _first_failure(sites: list, counts: list) -> NonFiniteError | None:
    """Walk the sites in program order (scan iterations in order) and judge each one's counts."""
    judge = _Judge()
    for site, c in zip(sites, counts, strict=True):
        if isinstance(site, _Loop):
            order = range(site.length - 1, -1, -1) if site.reverse else range(site.length)
            for i in order:
                judge.enter(site.first_unit + i)
                for body_site, bc in zip(site.body, np.asarray(c)[i], strict=True):
                    if (error := judge(body_site, bc, unit=i)) is not None:
                        return error
            judge.leave()
        elif (error := judge(site, c)) is not None:
            return error
    return None


class _Judge:
    """Decides whether one site fails, keeping the layer and the last weight op for the message."""

    def __init__(self):
        self.layer: int | None = None
        self.last_op = "the embedding"

    def enter(self, unit: int) -> None:
        self.layer, self.last_op = unit, "the layer input"

    def leave(self) -> None:
        self.layer = None

    def __call__(self, site: _Site, counts, unit: int | None = None) -> NonFiniteError | None:
        nan, posinf, neginf = (int(n) for n in counts)
        chain = site.chain.at(unit) if site.chain is not None and unit is not None else site.chain
        used = site.used.at(unit) if site.used is not None and unit is not None else site.used
        for w in (chain, used):
            if self.layer is not None and w is not None and w.layer is not None:
                self.layer = w.layer
        where = f"layer {self.layer} " if self.layer is not None else ""
        inf = posinf + neginf
        if chain is not None and nan + inf:
            text = f"{chain}: its values (after {site.prim}) have {nan} NaN / {inf} inf: the stored tensor is corrupt"
            return NonFiniteError(where + text, layer=self.layer, op=chain.op, nan=nan, inf=inf)
        if nan + posinf or (site.strict and neginf):
            op = used.op if used is not None else site.prim
            what = str(used) if used is not None else f"{site.prim} after {self.last_op}"
            return NonFiniteError(
                f"{where}{what}: output has {nan} NaN / {inf} inf", layer=self.layer, op=op, nan=nan, inf=inf
            )
        if used is not None and chain is None:
            self.last_op = used.op
        return None
