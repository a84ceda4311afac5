"""The command line driven as a user drives it: subprocesses, and a pseudo-terminal for chat.

Every run uses tinycoder (a 1M-parameter random llama: loads and decodes in moments) so the module stays fast.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imp_jax import registry

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny() -> str:
    return str(registry.fetch("tinycoder", progress=False))


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    env.pop("IMP_JAX_DEBUG_NANS", None)
    return env


def cli(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imp_jax.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=300,
        check=False,
    )


def _one_error_line(run: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imp-jax: error: "), run.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_version_list_and_rm(tmp_path: Path) -> None:
    run = cli("--version")
    assert run.returncode == 0 and re.fullmatch(r"imp-jax \d+\.\d+\.\d+\S*\n", run.stdout)
    cache = str(tmp_path / "cache")
    run = cli("list", IMP_JAX_CACHE=cache)
    assert run.returncode == 0
    assert re.search(r"smollm2-135m \(default\)\s+98\.4 MB\s+no", run.stdout) and cache in run.stdout
    assert cli("rm", "tinycoder", IMP_JAX_CACHE=cache).stdout == "tinycoder was not cached\n"
    folder = tmp_path / "cache" / "models" / "tinycoder"
    folder.mkdir(parents=True)
    (folder / "tinycoder-tiny.gguf").write_bytes(b"x")
    assert cli("rm", "tinycoder", IMP_JAX_CACHE=cache).stdout == "removed tinycoder\n" and not folder.exists()
    _one_error_line(cli("rm", "no-such-model", IMP_JAX_CACHE=cache), "unknown model name 'no-such-model'")


def test_a_cache_root_that_cannot_be_a_folder_is_one_error_line(tiny: str, tmp_path: Path) -> None:
    """IMP_JAX_CACHE naming a file: pulling a model and loading one (whose compile cache lives there too) each
    say which folder cannot be used, without a traceback."""
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    _one_error_line(
        cli("pull", "tinycoder", IMP_JAX_CACHE=str(not_a_folder)), f"cannot use {not_a_folder} as the model cache"
    )
    _one_error_line(
        cli("generate", "hi", "-m", tiny, "-n", "1", IMP_JAX_CACHE=str(not_a_folder)),
        f"cannot use {not_a_folder / 'xla'} as the compile cache folder",
    )


def test_quantize_paths_are_checked_and_registry_names_work(tiny: str, tmp_path: Path) -> None:
    _one_error_line(cli("quantize", tiny, "/nonexistent-dir/out.gguf", "--type", "q8_0"), "does not exist")
    folder = tmp_path / "some_directory.gguf"
    folder.mkdir()
    _one_error_line(cli("quantize", tiny, str(folder), "--type", "q8_0"), "is a directory")
    out = tmp_path / "tiny-q8.gguf"
    run = cli("quantize", "tinycoder", str(out), "--type", "q8_0")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(out) and out.read_bytes()[:4] == b"GGUF"


def test_plan_exits_1_when_it_does_not_fit(tiny: str) -> None:
    run = cli("plan", "--model", tiny, "--context", "256", "--device-memory", "1MiB")
    assert "does NOT fit" in run.stdout
    _one_error_line(run, r"too large .* Try")
    t0 = time.perf_counter()
    run = cli("plan", "--model", tiny, "--context", "auto", "--device-memory", "1MiB")
    _one_error_line(run, r"no context fits: even 16 tokens need")
    assert time.perf_counter() - t0 < 60
    run = cli("plan", "--model", tiny, "--context", "100000")
    assert run.returncode == 0 and "fits" in run.stdout and "more than the model's 2048 tokens" in run.stderr


def test_prompt_sources_and_argument_errors(tiny: str, tmp_path: Path) -> None:
    _one_error_line(cli("generate", "-m", tiny, "-f", str(tmp_path / "missing.txt")), "cannot read the prompt file")
    _one_error_line(cli("generate", "-m", tiny), "no prompt")
    _one_error_line(cli("generate", "-m", tiny, "x", "-f", "y"), "not both")
    _one_error_line(cli("generate", "-m", tiny, "x", "--threads", "0"), "--threads takes 1 to")


def test_bad_options_are_refused_before_the_model_loads(tiny: str) -> None:
    """Sampling values out of range and a port the server could not listen on are one error line before any
    load: nothing is read or planned first (the "loading" line never appears)."""
    for args, pattern in (
        (("--temperature", "-1"), "temperature must be"),
        (("--top-p", "2"), "top_p must be"),
        (("--max-tokens", "-3"), "--max-tokens must be"),
    ):
        run = cli("generate", "-m", tiny, "x", *args)
        _one_error_line(run, pattern)
    run = cli("serve", "-m", tiny, "--port", "99999")
    assert run.returncode == 2 and "not a TCP port" in run.stderr and "loading" not in run.stderr
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        run = cli("serve", "-m", tiny, "--port", str(taken.getsockname()[1]))
    _one_error_line(run, "cannot listen on 127.0.0.1:")


def test_generate_announces_and_reports(tiny: str, tmp_path: Path) -> None:
    """stdin prompt, context cut to the model's, a loading line, the plan's choices and the timings line."""
    run = cli("generate", "-", "-m", tiny, "-n", "4", "--context", "100000", "--threads", "1", stdin="Hello there")
    assert run.returncode == 0, run.stderr
    err = run.stderr
    assert "loading tinycoder-tiny.gguf (2.8 MB" in err
    assert re.search(r"float32, .* path, context 2048", err)  # dtype auto on CPU, and the plan's path
    assert "--context 100000 is more than the model's 2048 tokens" in err
    assert re.search(r"load \d+\.\d s, prompt \d+ tok at .*, decode \d+ tok at .*, TTFT \d+\.\d\d s", err)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("one two three four five six")
    run = cli("generate", "-f", str(prompt), "-m", tiny, "-n", "50", "--context", "16", "-q")
    assert run.returncode == 0, run.stderr
    assert re.fullmatch(r"imp-jax: the context of 16 tokens holds the \d+-token prompt and \d+ more: .*\n", run.stderr)


class _Terminal:
    """The parent side of a pseudo-terminal, read until a pattern shows up: the test waits on output, never on a
    clock, so a loaded machine only makes it slower. The deadlines are there to end a hung run, not to pace it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending = ""  # read but not yet matched: text that came with a match's chunk is kept for the next
        self.seen: list[str] = []

    def expect(self, pattern: str, timeout: float = 600) -> str:
        """Wait until ``pattern`` matches the text since the last match; return that text up to the match's end."""
        end = time.monotonic() + timeout
        while (m := re.search(pattern, self.pending)) is None:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} never came within {timeout} s; got {self.pending!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the terminal closed before {pattern!r}; got {self.pending!r}")
            self.pending += chunk.decode(errors="replace")
        text, self.pending = self.pending[: m.end()], self.pending[m.end() :]
        self.seen.append(text)
        return text


# The child execs at once, so the forked copy of JAX's threads never runs: the fork warnings do not apply.
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning", "ignore:This process:DeprecationWarning")
def test_chat_in_a_terminal(tiny: str) -> None:
    """Line editing and history through readline, the ChatML warning, Ctrl-C stopping one reply, /exit."""
    pid, fd = pty.fork()
    if pid == 0:
        # A runner started in the background (nohup, `&`) hands its children SIGINT ignored, and Python then
        # installs no KeyboardInterrupt handler: give the chat the terminal's usual Ctrl-C.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execve(
            sys.executable,
            [sys.executable, "-m", "imp_jax.cli", "chat", "-m", tiny, "-n", "1900", "--no-history", "-q"],
            _env(TERM="dumb"),
        )
    term = _Terminal(fd)
    try:
        out = term.expect(r"> $")
        assert "has no chat template: using ChatML" in out
        os.write(fd, b"/cler\x1b[Da\r")  # type, Left arrow, insert: readline makes it /clear
        term.expect(r"conversation cleared[\s\S]*> $")
        os.write(fd, b"\x1b[A\r")  # Up arrow: the last line again
        term.expect(r"conversation cleared[\s\S]*> $")
        os.write(fd, b"hello\r")
        term.expect(r"hello\r?\n.{8}")  # the reply has started streaming (1900 tokens: seconds more of it)
        os.write(fd, b"\x03")  # Ctrl-C mid-reply
        term.expect(r"\[stopped\][\s\S]*> $")  # the reply ends there and the prompt is back
        os.write(fd, b"/exit\r")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, term.seen
    finally:
        os.close(fd)
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
