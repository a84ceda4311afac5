"""A Jinja2 sandbox with a time budget and a size cap, for templates that come from model files.

Jinja2's ``ImmutableSandboxedEnvironment`` stops a template from reaching attributes, files and imports, but not
from running forever or building gigabytes: ``{% for i in range(99999) %}{% for j in range(99999) %}`` loops
without calling anything the sandbox sees, and ``{% set s = s ~ s %}`` doubles a string each turn. So the parsed
tree is rewritten before it is compiled: every ``for`` iterates through ``_bounded_iter`` (which checks the
deadline on each item) and every ``~`` concatenation through ``_bounded_str`` (which checks the length). Calls,
filters, attribute lookups and the ``*``, ``**``, ``+`` and ``%`` operators check both as well, and refuse
arguments that would build something over the cap before building it. Rendering streams through
``Template.generate`` so the output is counted as it is written. ``include``/``import``/``extends`` are
rejected when the template is compiled.

Each render's deadline lives in a ``ContextVar``, so one environment serves any number of threads.
"""

from __future__ import annotations

import contextvars
import dataclasses
import operator
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from imp_jax.errors import ChatTemplateError

_ITER, _STR = "__imp_bounded_iter", "__imp_bounded_str"
_WIDE_FORMAT = re.compile(r"%[-+ #0]*(\d{6,}|\*)")  # "%0999999d": a field width that allocates megabytes
_WIDE_FIELD = re.compile(r"\d{6,}")  # "{:>9999999}" in str.format
_MAX_INT_BITS = 1 << 16


class TemplateLimitError(ChatTemplateError):
    """A template ran past its time budget or built more text than the cap allows."""


@dataclasses.dataclass(frozen=True)
class TemplateLimits:
    """What one render may spend. Real chat templates render in milliseconds and write kilobytes; the defaults
    leave them three orders of magnitude of room. ``max_chars`` bounds the output and every string, list or
    number of digits built along the way."""

    max_seconds: float = 2.0
    max_chars: int = 8 * 2**20


DEFAULT_LIMITS = TemplateLimits()
_DEADLINE: contextvars.ContextVar[tuple[float, TemplateLimits] | None] = contextvars.ContextVar(
    "imp_jax_template_deadline", default=None
)


def _budget() -> tuple[float, TemplateLimits]:
    state = _DEADLINE.get()
    if state is None:  # outside render_bounded (e.g. constant folding at compile time): the default budget
        return time.monotonic() + DEFAULT_LIMITS.max_seconds, DEFAULT_LIMITS
    return state


def _tick() -> None:
    deadline, limits = _budget()
    if time.monotonic() > deadline:
        raise TemplateLimitError(f"chat template: rendering took longer than {limits.max_seconds:g} s; stopped")


def _check_size(value: Any) -> Any:
    limit = _budget()[1].max_chars
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > limit:
        raise TemplateLimitError(f"chat template: built a value of {len(value)} items, over the cap of {limit}")
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise TemplateLimitError(f"chat template: built a number of {value.bit_length()} bits, over the cap")
    return value


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def _precheck(name: str, value: Any, args: tuple[Any, ...]) -> None:
    """Refuse a call whose result would pass the cap before making it: an integer argument past the cap (a
    ``center``/``ljust``/``indent`` width), a ``replace`` or ``join`` whose result is longer, a ``format`` with
    a field width of megabytes. Everything else is bounded by its inputs and checked after."""
    limit = _budget()[1].max_chars
    if any(isinstance(a, int) and not isinstance(a, bool) and a > limit for a in args):
        raise TemplateLimitError(f"chat template: an argument of '{name}' is over the cap of {limit}")
    if name == "replace" and isinstance(value, str) and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        old, new = args[:2]
        estimate = len(value) + (len(value) + 1 if not old else value.count(old)) * len(new)
    elif name == "join" and isinstance(value, (list, tuple)):
        sep = args[0] if args and isinstance(args[0], str) else ""
        estimate = len(sep) * len(value) + sum(_size(v) for v in value)
    elif name in ("format", "format_map") and isinstance(value, str) and _WIDE_FIELD.search(value):
        estimate = limit + 1
    else:
        return
    if estimate > limit:
        raise TemplateLimitError(f"chat template: '{name}' would build {estimate} items, over the cap of {limit}")


def _bounded_iter(iterable: Iterable[Any]) -> Iterator[Any]:
    for item in iterable:
        _tick()
        yield item


class _Bound(NodeTransformer):
    """Rewrites a parsed template so that loops and concatenations are checked (see the module docstring)."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name(_ITER, "load"), [node.iter], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        self.generic_visit(node)
        return nodes.Call(nodes.Name(_STR, "load"), [node], [], None, None, lineno=node.lineno)


_BINOPS = {"*": operator.mul, "**": operator.pow, "+": operator.add, "%": operator.mod}
_FORBIDDEN = (
    (nodes.Include, "include"), (nodes.Import, "import"), (nodes.FromImport, "import"), (nodes.Extends, "extends"),
)  # fmt: skip


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """An immutable sandbox whose templates are stopped at ``TemplateLimits`` when rendered by ``render_bounded``."""

    intercepted_binops = frozenset(_BINOPS)

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.globals[_ITER] = _bounded_iter
        self.globals[_STR] = _check_size
        self.filters = _BoundedFilters(self.filters)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for kind, what in _FORBIDDEN:
            found = next(tree.find_all(kind), None)
            if found is not None:
                raise TemplateLimitError(f"chat template line {found.lineno}: '{what}' is not allowed")
        tree = _Bound().visit(tree)
        tree.set_environment(self)
        return tree

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _tick()
        owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
        if name == "join" and isinstance(owner, str):  # sep.join(items): the items are what grows
            _precheck(name, args[0] if args else (), (owner,))
        else:
            _precheck(name, owner, (*args, *kwargs.values()))
        return _check_size(super().call(context, obj, *args, **kwargs))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        limit = _budget()[1].max_chars
        if operator == "*" and isinstance(left, int) != isinstance(right, int):
            count, seq = (left, right) if isinstance(left, int) else (right, left)
            if _size(seq) * max(int(count), 0) > limit:
                raise TemplateLimitError(f"chat template: '*' would build more than the cap of {limit} items")
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "**" and ints and right > 0 and abs(left).bit_length() * right > _MAX_INT_BITS:
            raise TemplateLimitError(f"chat template: '**' with exponent {right} builds a number over the cap")
        if operator == "+" and _size(left) + _size(right) > limit:
            raise TemplateLimitError(f"chat template: '+' would build more than the cap of {limit} items")
        if operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
            raise TemplateLimitError("chat template: a '%' format with a field width over the cap")
        return _check_size(_BINOPS[operator](left, right))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)


def _bounded_filter(name: str, f: Any) -> Any:
    """A filter that checks the budget and its arguments first and its result's size after, keeping the
    pass_context/pass_eval_context markers Jinja2 dispatches on."""

    def bounded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        plain = [a for a in args if not isinstance(a, BoundedEnvironment) and not hasattr(a, "environment")]
        if plain:
            _precheck(name, plain[0], (*plain[1:], *kwargs.values()))
        return _check_size(f(*args, **kwargs))

    bounded.__dict__.update(getattr(f, "__dict__", {}))
    bounded.__wrapped__ = f
    return bounded


class _BoundedFilters(dict):
    """The filter table; a filter added later (``env.filters["tojson"] = ...``) is bounded like the built-ins."""

    def __init__(self, filters: Mapping[str, Any]):
        super().__init__({name: _bounded_filter(name, f) for name, f in filters.items()})

    def __setitem__(self, name: str, f: Any) -> None:
        super().__setitem__(name, _bounded_filter(name, f))


def render_bounded(template: Any, variables: Mapping[str, Any], limits: TemplateLimits) -> str:
    """``template.render(**variables)`` stopped with ``TemplateLimitError`` past ``limits``."""
    token = _DEADLINE.set((time.monotonic() + limits.max_seconds, limits))
    try:
        out: list[str] = []
        written = 0
        for chunk in template.generate(**variables):
            written += len(chunk)
            if written > limits.max_chars:
                raise TemplateLimitError(f"chat template: the output passed the cap of {limits.max_chars} characters")
            out.append(chunk)
            _tick()
        return "".join(out)
    finally:
        _DEADLINE.reset(token)
