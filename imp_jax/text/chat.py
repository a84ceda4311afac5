"""Chat templates: the Jinja2 template a GGUF file carries in ``tokenizer.chat_template``, rendered as HF does.

The environment matches ``transformers``' chat-template renderer, which is what the templates are written for: a
sandbox (templates come from model files, not from us) with ``trim_blocks``/``lstrip_blocks``, loop controls,
the ``{% generation %}`` marker, a ``tojson`` that does not HTML-escape and takes ``indent``/``separators``/
``sort_keys``, and the globals ``raise_exception`` and ``strftime_now``. Variables: ``messages``, ``tools``,
``add_generation_prompt``, ``bos_token``, ``eos_token`` and any extra keyword.

A file without a template gets llama.cpp's ChatML fallback. ``ChatTemplate.from_metadata`` also drops a BOS the
template writes when the tokenizer adds one anyway (and an EOS likewise), as llama.cpp's ``common_chat`` does,
so the prompt never starts with two.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jinja2
from gguf import Keys
from jinja2 import nodes
from jinja2.ext import Extension

from imp_jax.errors import ChatTemplateError
from imp_jax.text.template_sandbox import DEFAULT_LIMITS, BoundedEnvironment, TemplateLimits, render_bounded

if TYPE_CHECKING:
    from imp_jax.text.tokenizer import Tokenizer

# llama.cpp's fallback (common/chat.cpp, CHATML_TEMPLATE_SRC), verbatim.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "  {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\n' -}}\n"
    "{%- endif -%}"
)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class _GenerationMarker(Extension):
    """``{% generation %}...{% endgeneration %}`` (HF marks assistant text for training masks): renders its body."""

    tags = frozenset({"generation"})

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _environment() -> BoundedEnvironment:
    env = BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationMarker, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template; ``render`` turns a conversation into the prompt text."""

    def __init__(
        self,
        source: str | None,
        *,
        bos_token: str = "",
        eos_token: str = "",
        strip_bos: bool = False,
        strip_eos: bool = False,
        limits: TemplateLimits = DEFAULT_LIMITS,
    ):
        """source: the Jinja2 text, or None for ChatML. strip_bos / strip_eos: drop a leading bos_token / trailing
        eos_token from the rendered text (for a tokenizer that adds them itself). limits: the time and size one
        render may take (imp_jax.text.template_sandbox): a file's template is code from the file."""
        self.source = CHATML_TEMPLATE if source is None else source
        self.is_default = source is None
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._strip_bos = strip_bos and bool(bos_token)
        self._strip_eos = strip_eos and bool(eos_token)
        self.limits = limits
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from None
        except (jinja2.TemplateError, RecursionError, SyntaxError, ValueError, TypeError, MemoryError) as e:
            raise ChatTemplateError(f"chat template does not compile: {type(e).__name__}: {e}"[:500]) from e

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], tokenizer: Tokenizer) -> ChatTemplate:
        """The file's template, with the tokenizer's BOS/EOS text and add-BOS/EOS rules.

        As in llama.cpp: the default template, else the one named ``tool_use``, else ChatML.
        """
        source = metadata.get(Keys.Tokenizer.CHAT_TEMPLATE) or metadata.get(
            Keys.Tokenizer.CHAT_TEMPLATE_N.format(name="tool_use")
        )

        def text(token_id: int | None) -> str:
            return "" if token_id is None else tokenizer.id_to_piece(token_id)

        return cls(
            str(source) if source else None,
            bos_token=text(tokenizer.bos_id),
            eos_token=text(tokenizer.eos_id),
            strip_bos=tokenizer.add_bos,
            strip_eos=tokenizer.add_eos,
        )

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt for ``messages`` (``[{"role": ..., "content": ...}, ...]``); ``tools`` are JSON schemas."""
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, **kwargs}
        try:
            text = render_bounded(
                self._template,
                dict(messages=list(messages), tools=tools, add_generation_prompt=add_generation_prompt, **variables),
                self.limits,
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed while rendering: {e}") from None
        except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError, RecursionError, MemoryError) as e:
            raise ChatTemplateError(f"chat template failed while rendering: {type(e).__name__}: {e}"[:500]) from None
        if self._strip_bos and text.startswith(self.bos_token):
            text = text[len(self.bos_token) :]
        if self._strip_eos and text.endswith(self.eos_token):
            text = text[: -len(self.eos_token)]
        return text


def render_chat(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    tools: Sequence[Mapping[str, Any]] | None = None,
    **kwargs: Any,
) -> str:
    """Render ``template`` (None: ChatML) for ``messages``, as ``transformers``' apply_chat_template does."""
    return ChatTemplate(template, bos_token=bos_token, eos_token=eos_token).render(
        messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs
    )
