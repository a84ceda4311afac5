"""Every error the package raises on purpose.

Each message names what the user can act on: the file, the tensor, the limit. The CLI prints the message as one
line; nothing here ever wraps a traceback the user has to read.
"""

from __future__ import annotations


class ImpError(Exception):
    """Base of every error imp-jax raises on purpose."""


class GGUFError(ImpError):
    """A GGUF file is unreadable, truncated or corrupt."""

    def __init__(self, path: object, message: str, *, tensor: str | None = None):
        self.path = str(path)
        self.tensor = tensor
        where = f"{self.path}" + (f", tensor '{tensor}'" if tensor else "")
        super().__init__(f"{where}: {message}")


class UnsupportedModel(ImpError):
    """The architecture, a tensor layout or a quant type is not supported."""


class ModelTooLarge(ImpError):
    """Raised before any weight reaches the device when the memory plan does not fit."""

    def __init__(self, message: str, *, needed: int, available: int):
        self.needed = int(needed)
        self.available = int(available)
        super().__init__(message)


class RegistryError(ImpError):
    """A registry model cannot be fetched, assembled or verified."""


class InvalidRequest(ImpError):
    """A request a user sent (prompt, token ids, sampling values, stop strings) is outside what is accepted;
    the message names the value and the limit."""


class ContextOverflow(InvalidRequest):
    """A prompt (plus the tokens to generate) does not fit the model's context."""


class ChatTemplateError(ImpError):
    """A chat template does not compile, fails while rendering, or rejects the conversation."""


class KernelError(ImpError):
    """A kernel cannot run for these shapes or dtypes (names op, shapes and dtypes)."""


class NonFiniteError(ImpError):
    """A checked forward (imp_jax.debug) met a NaN or inf: names the layer, the op and its weight."""

    def __init__(self, message: str, *, layer: int | None, op: str, nan: int, inf: int):
        self.layer = layer
        self.op = op
        self.nan = int(nan)
        self.inf = int(inf)
        super().__init__(message)


def gib(n: float) -> str:
    """Bytes as GiB with one decimal, the unit every memory message uses."""
    return f"{n / 2**30:.1f} GiB"


class RequestTooLarge(ImpError):
    """A request can never fit the engine's page pool (names the pages it needs and the pool's size)."""

    def __init__(self, message: str, *, needed: int, available: int):
        self.needed = int(needed)
        self.available = int(available)
        super().__init__(message)
