"""``imp-jax chat``: a REPL that behaves like a terminal program.

readline gives line editing and history (kept in a file between sessions); Ctrl-C during a reply stops that
reply and returns to the prompt, Ctrl-C at the prompt or Ctrl-D exits; ``/clear``, ``/system TEXT`` and
``/exit`` act on the conversation instead of reaching the model.
"""

from __future__ import annotations

import contextlib
import readline
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from imp_jax.feedback import RunStats, say, timed
from imp_jax.text.chat import ChatTemplate

HELP = "/clear forgets the conversation, /system TEXT sets the system message, /exit (or Ctrl-D) quits"
HISTORY_LINES = 1000


@contextlib.contextmanager
def _history(path: Path | None) -> Iterator[None]:
    """Load readline's history from ``path`` and save it back on the way out (best effort: a read-only home
    must not stop a chat)."""
    if path is not None:
        with contextlib.suppress(OSError):
            readline.read_history_file(path)
    readline.set_history_length(HISTORY_LINES)
    try:
        yield
    finally:
        if path is not None:
            with contextlib.suppress(OSError):
                path.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(path)


class Conversation:
    """The messages so far and the system message they start with."""

    def __init__(self, system: str | None):
        self.system = system
        self.messages: list[dict] = []
        self.clear()

    def clear(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def set_system(self, text: str) -> None:
        """A new system message starts a new conversation: the old turns were answered under the old one."""
        self.system = text or None
        self.clear()


def command(line: str, conversation: Conversation) -> bool | None:
    """Run a /command: True to exit, False when handled, None when the line is for the model."""
    if not line.startswith("/"):
        return None
    name, _, rest = line.partition(" ")
    if name in ("/exit", "/quit"):
        return True
    if name == "/clear":
        conversation.clear()
        say("conversation cleared")
    elif name == "/system":
        conversation.set_system(rest.strip())
        say(f"system message {'set' if rest.strip() else 'removed'}; conversation cleared")
    else:
        say(f"unknown command {name}: {HELP}")
    return False


def run_chat(
    model,
    reply: Callable[[list[int]], Iterable[str]],
    *,
    system: str | None,
    history: Path | None,
    summary: Callable[[RunStats], None] | None,
) -> None:
    """The REPL. ``reply(ids)`` streams the model's answer to a rendered prompt; ``summary`` (None: quiet) gets
    each reply's timings."""
    if ChatTemplate.from_metadata(model.file.metadata, model.tokenizer).is_default:
        say(
            f"{model.path.name} has no chat template: using ChatML, which a base model was not trained on "
            "(expect rambling; `imp-jax generate` continues raw text)"
        )
    say(f"chatting with {model.path.name}; {HELP}; Ctrl-C stops a reply")
    conversation = Conversation(system)
    with _history(history):
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                sys.stdout.write("\n")
                return
            if not line.strip():
                continue
            done = command(line.strip(), conversation)
            if done:
                return
            if done is None:
                _turn(model, reply, conversation, line, summary)


def _turn(model, reply, conversation: Conversation, line: str, summary) -> None:
    """One user line and the streamed answer; Ctrl-C keeps what was said so far and ends the turn."""
    conversation.messages.append({"role": "user", "content": line})
    prompt = model.chat_template(conversation.messages, add_generation_prompt=True)
    ids = model.tokenizer.encode(prompt, add_special=False)
    stats = RunStats(None, len(ids))
    pieces = timed(reply(ids), stats, lambda text: len(model.tokenizer.encode(text, add_special=False)))
    said: list[str] = []
    try:
        for piece in pieces:
            said.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pieces.close()
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    conversation.messages.append({"role": "assistant", "content": "".join(said)})
    if summary is not None:
        summary(stats)
