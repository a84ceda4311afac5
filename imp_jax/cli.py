"""The ``imp-jax`` command line. Every ImpError becomes one line on stderr and exit status 1.

This is the one place that reads the process environment and the terminal: it turns flags into the explicit
arguments the library takes (``progress=``, thread count in XLA_FLAGS before JAX starts), and it is where the
user hears what happens (feedback on stderr, the model's text alone on stdout).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from imp_jax.errors import ImpError


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imp-jax")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from imp_jax import __version__

        return __version__


def _cmd_pull(args: argparse.Namespace) -> None:
    from imp_jax import registry

    print(registry.fetch(args.name, progress=True, root=args.cache_dir))


def _cmd_list(args: argparse.Namespace) -> None:
    from imp_jax import registry
    from imp_jax.feedback import size_words

    root = args.cache_dir
    rows = [("name", "size", "cached", "description")]
    for name, entry in registry.MODELS.items():
        default = " (default)" if name == registry.DEFAULT_MODEL else ""
        cached = "yes" if registry.is_cached(entry, root) else "no"
        rows.append((name + default, size_words(entry.size), cached, entry.description))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=False)) + "  " + r[3])
    print(f"cache: {root} (IMP_JAX_CACHE moves it)")


def _cmd_rm(args: argparse.Namespace) -> None:
    from imp_jax import registry

    for name in args.names:
        removed = registry.remove(name, args.cache_dir)
        print(f"removed {name}" if removed else f"{name} was not cached")


def _cmd_inspect(args: argparse.Namespace) -> None:
    from imp_jax.inspect import summarize
    from imp_jax.ops.policy import resolve_dtype
    from imp_jax.weights.files import open_model_file

    rows = summarize(open_model_file(args.model, root=args.cache_dir)).rows()
    rows.append(("compute dtype", f"{resolve_dtype('auto')} (the default, dtype 'auto', on this backend)"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def compile_cache_setting(environ: dict[str, str] | None = None) -> bool | str:
    """``IMP_JAX_COMPILE_CACHE``: unset or 1 keeps compiled steps in the imp-jax cache folder, 0 turns the
    persistent compile cache off, anything else is the folder to use."""
    value = (os.environ if environ is None else environ).get("IMP_JAX_COMPILE_CACHE", "1")
    return {"1": True, "0": False}.get(value, value)


def kernels_setting(environ: dict[str, str] | None = None) -> str:
    """``IMP_JAX_KERNELS``: unset or 1 (auto) runs the Pallas kernels that beat XLA on a Hopper GPU, 0 none (the
    XLA reference path), all every kernel; ``load(kernels=...)`` resolves it once."""
    return (os.environ if environ is None else environ).get("IMP_JAX_KERNELS", "auto")


def debug_setting(environ: dict[str, str] | None = None) -> bool:
    """``IMP_JAX_DEBUG_NANS``: set to anything but 0/false/no/off, ``load(debug=True)`` traces the first
    non-finite layer and op."""
    value = (os.environ if environ is None else environ).get("IMP_JAX_DEBUG_NANS", "")
    return value.strip().lower() not in ("", "0", "false", "no", "off")


def _load(args: argparse.Namespace):
    """The model, loaded with the user's settings; announces a context cut to the model's own and, unless
    --quiet, says what it loads and how long it took (kept on args for the summary)."""
    import imp_jax

    t0 = time.perf_counter()
    model = imp_jax.load(
        args.model,
        dtype=args.dtype,
        max_context=args.context,
        progress=not args.quiet,
        compile_cache=args.compile_cache,
        kernels=args.kernels,
        devices=args.tp,
        debug=args.debug,
        cache_dir=args.cache_dir,
    )
    args.load_s = time.perf_counter() - t0
    if model.max_context < args.context:
        _note(f"--context {args.context} is more than the model's {model.max_context} tokens: using that")
    if args.verbose and model.plan is not None:
        print(model.plan.report(), file=sys.stderr)
    return model


def _note(message: str) -> None:
    """An adjustment the user should know about; these speak even with --quiet (they change the result)."""
    from imp_jax.feedback import say

    say(message)


def _fraction(value: str) -> float:
    """A fraction in (0, 1]."""
    try:
        f = float(value)
    except ValueError:
        f = -1.0
    if not 0 < f <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {value!r}")
    return f


def _port(value: str) -> int:
    """--port: an integer in 0..65535, refused by argparse before anything loads."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port (0-65535)")
    return port


def _check_listen(host: str, port: int) -> None:
    """Fail now, before the model loads, when the server could not listen on host:port (in use, no permission,
    unknown address)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as e:
        raise ImpError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _check_sampling(args: argparse.Namespace) -> None:
    """The sampling options' ranges, checked before the model loads (the Engine checks them again per request)."""
    from imp_jax import user_input

    s = _sampling(args)
    user_input.sampling_params(s["temperature"], s["top_k"], s["top_p"], s["min_p"], s["repeat_penalty"], s["seed"])
    user_input.stop_strings(s["stop"])
    user_input.integer(s["max_tokens"], "--max-tokens", 0, None)


def _sampling(args: argparse.Namespace, max_tokens: int | None = None) -> dict:
    return dict(
        max_tokens=args.max_tokens if max_tokens is None else max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def _prompt_text(args: argparse.Namespace) -> str:
    """The prompt from the argument, from stdin ("-") or from a file (-f), exactly one of them."""
    if args.file is not None and args.prompt is not None:
        raise ImpError("give the prompt either as an argument or with -f FILE, not both")
    if args.file is not None:
        try:
            return Path(args.file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ImpError(f"cannot read the prompt file {args.file}: {getattr(e, 'strerror', None) or e}") from None
    if args.prompt == "-":
        return sys.stdin.read()
    if args.prompt is None:
        raise ImpError("no prompt: give it as an argument, '-' to read stdin, or -f FILE")
    return args.prompt


def _budget(args: argparse.Namespace, model, prompt_tokens: int) -> int:
    """max_tokens, cut (and said so) to what the context has left after the prompt."""
    room = model.max_context - prompt_tokens
    if 0 <= room < args.max_tokens:
        _note(
            f"the context of {model.max_context} tokens holds the {prompt_tokens}-token prompt and {room} more: "
            f"generating at most {room} tokens, not {args.max_tokens} (raise --context)",
        )
        return room
    return args.max_tokens


def _summary(args: argparse.Namespace):
    """Where a run's timings go: a line on stderr, none with --quiet."""
    from imp_jax.feedback import say

    return None if args.quiet else (lambda stats: say(stats.line()))


def _cmd_generate(args: argparse.Namespace) -> None:
    import imp_jax
    from imp_jax.feedback import RunStats, timed

    text = _prompt_text(args)
    _check_sampling(args)
    model = _load(args)
    ids = model.tokenizer.encode(text)
    pieces = imp_jax.generate(model, ids, stream=True, **_sampling(args, _budget(args, model, len(ids))))
    stats = RunStats(args.load_s, len(ids))
    for piece in timed(pieces, stats, lambda out: len(model.tokenizer.encode(out, add_special=False))):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if report := _summary(args):
        report(stats)


def _cmd_chat(args: argparse.Namespace) -> None:
    import imp_jax
    from imp_jax.cli_chat import run_chat

    _check_sampling(args)
    model = _load(args)

    def reply(ids: list[int]):
        return imp_jax.generate(model, ids, stream=True, **_sampling(args, _budget(args, model, len(ids))))

    history = None if args.no_history else args.cache_dir / "chat_history"
    run_chat(model, reply, system=args.system, history=history, summary=_summary(args))


def _cmd_bench(args: argparse.Namespace) -> None:
    from imp_jax import bench
    from imp_jax.ops.policy import resolve_dtype, resolve_kernels

    dtype = resolve_dtype(args.dtype)
    kernels = resolve_kernels(args.kernels)
    if args.synthetic:
        params, cfg, size, n_params = bench.synthetic_model(args.synthetic, args.quant, dtype, kernels=kernels)
        name, quant = args.synthetic, args.quant
    else:
        import imp_jax
        from imp_jax.inspect import summarize

        model = imp_jax.load(
            args.model, dtype=dtype, max_context=max(args.pp, args.tg) + 8, batch=args.batch, kernels=kernels,
            cache_dir=args.cache_dir,
        )  # fmt: skip
        s = summarize(model.file)
        params, cfg, kernels = model.params, model.config, model.kernels  # the policy load resolved
        name, quant, size, n_params = model.path.name, next(iter(s.bytes_by_qtype)), s.file_bytes, s.n_params
    rows = bench.run(params, cfg, name=name, quant=quant, size_bytes=size, n_params=n_params, dtype=dtype,
                     pp=args.pp, tg=args.tg, reps=args.reps, batch=args.batch, kernels=kernels)  # fmt: skip
    print(bench.as_json(rows) if args.json else bench.table(rows))


def _cmd_serve(args: argparse.Namespace) -> None:
    import imp_jax
    from imp_jax.serving.app import ServerSettings
    from imp_jax.serving.server import serve

    _check_listen(args.host, args.port)
    # load() checks one sequence of max_context; the engine's pool then takes memory_utilization of what is left,
    # sized by the programs it runs (a plan of parallel x max_context prefilled at once would overstate it)
    model = imp_jax.load(args.model, dtype=args.dtype, max_context=args.max_context, batch=1,
                         device_memory=args.device_memory, progress=True, kernels=args.kernels, devices=args.tp,
                         debug=args.debug, compile_cache=args.compile_cache, cache_dir=args.cache_dir)  # fmt: skip
    name = args.model_name or (Path(args.model).stem if args.model.endswith(".gguf") else args.model)
    settings = ServerSettings(name, api_key=args.api_key or os.environ.get("IMP_JAX_API_KEY"),
                              max_queue=args.max_queue, max_seqs=args.parallel, token_budget=args.batch_tokens,
                              memory_utilization=args.memory_utilization, warm_up=args.warm_up)  # fmt: skip
    serve(model, settings, host=args.host, port=args.port)


def _output_path(value: str) -> Path:
    """Where quantize may write: a file name in an existing folder (checked before minutes of work)."""
    out = Path(value).expanduser()
    if out.is_dir():
        raise ImpError(f"{out} is a directory: give the output file's name, e.g. {out / 'model.gguf'}")
    if not out.parent.is_dir():
        raise ImpError(f"cannot write {out}: the folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise ImpError(f"cannot write {out}: the folder {out.parent} is not writable")
    return out


def _cmd_quantize(args: argparse.Namespace) -> None:
    from rich.progress import Progress

    from imp_jax.weights.files import open_model_file
    from imp_jax.weights.quantize import quantize_file

    out = _output_path(args.output)
    mf = open_model_file(args.input, progress=not args.quiet, root=args.cache_dir)
    with Progress(transient=True, disable=args.quiet or not sys.stderr.isatty()) as bar:
        task = bar.add_task(f"quantizing to {args.type}", total=len(mf.tensors))
        try:
            written = quantize_file(mf, out, args.type, pure=args.pure, on_tensor=lambda _: bar.advance(task))
        except OSError as e:  # a full disk, a file vanishing under us
            raise ImpError(f"cannot write {out}: {e.strerror or e}") from None
    print(written)


def _add_model(p: argparse.ArgumentParser) -> None:
    from imp_jax.registry import DEFAULT_MODEL

    p.add_argument(
        "--model", "-m", default=DEFAULT_MODEL, help=f"a .gguf path or a registry name (default {DEFAULT_MODEL})"
    )


def _add_tp(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="devices to split the model over (tensor parallel, default 1)")


def _add_output(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--quiet", "-q", action="store_true", help="no loading line, progress or timings")
    group.add_argument("--verbose", "-v", action="store_true", help="also print the memory plan")


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="CPU threads for XLA (default: every core)")


def _add_generation(p: argparse.ArgumentParser, *, max_tokens: int) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=max_tokens, help=f"default {max_tokens}")
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--context", type=int, default=4096, help="max context, prompt + generated (default 4096)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help=_DTYPE_HELP)
    _add_tp(p)
    _add_output(p)
    _add_threads(p)


_DTYPE_HELP = "compute dtype; auto (default) is float32 on CPU, bfloat16 on a GPU"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imp-jax", description="Run GGUF language models on JAX.")
    parser.add_argument("--version", action="version", version=f"imp-jax {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="fetch a registry model into the cache and print its path")
    p.add_argument("name")
    p.set_defaults(run=_cmd_pull)

    p = sub.add_parser("list", help="registry models, their sizes and which are cached")
    p.set_defaults(run=_cmd_list)

    p = sub.add_parser("rm", help="delete cached registry models")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(run=_cmd_rm)

    p = sub.add_parser("inspect", help="architecture, parameters, bytes per quant type, key metadata")
    p.add_argument("model", help="a .gguf path or a registry name")
    p.set_defaults(run=_cmd_inspect)

    p = sub.add_parser("generate", help="continue a prompt as raw text (chat is for instruct models)")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt; '-' reads it from stdin")
    p.add_argument("--file", "-f", default=None, help="read the prompt from this file")
    _add_model(p)
    _add_generation(p, max_tokens=128)
    p.set_defaults(run=_cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's own template")
    _add_model(p)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--no-history", action="store_true", help="do not read or write the chat history file")
    _add_generation(p, max_tokens=512)
    p.set_defaults(run=_cmd_chat)

    p = sub.add_parser("bench", help="llama-bench-style pp/tg throughput")
    _add_model(p)
    p.add_argument("--synthetic", default=None, help="a model shape with random weights built on the device")
    p.add_argument("--quant", default="mxfp4", help="with --synthetic: mxfp4, q8_0, q4_k or bf16")
    p.add_argument("--pp", type=int, default=512)
    p.add_argument("--tg", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help=_DTYPE_HELP)
    p.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    _add_threads(p)
    p.set_defaults(run=_cmd_bench)

    from imp_jax.planning.command import add_plan_parser

    _add_threads(add_plan_parser(sub))

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
    _add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 0-65535 (0: any free port; default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set IMP_JAX_API_KEY)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the --model name)")
    p.add_argument("--max-context", type=int, default=4096, help="context per request (default 4096)")
    p.add_argument("--parallel", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--batch-tokens", type=int, default=2048, help="tokens one engine step feeds (default 2048)")
    p.add_argument("--max-queue", type=int, default=256, help="requests that may wait; more get 429 (default 256)")
    p.add_argument("--device-memory", default=None, help="device memory budget, e.g. 8GiB (default: what is free)")
    p.add_argument("--memory-utilization", type=_fraction, default=0.9,
                   help="share of the budget weights, workspace and KV pages may fill (default 0.9)")  # fmt: skip
    p.add_argument(
        "--no-warm-up",
        dest="warm_up",
        action="store_false",
        help="serve at once, compiling each step's program when it first comes (the first requests wait)",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help=_DTYPE_HELP)
    _add_tp(p)
    _add_threads(p)
    p.set_defaults(run=_cmd_serve)

    p = sub.add_parser("quantize", help="rewrite a GGUF with its weight matrices in another quant type")
    p.add_argument("input", help="input .gguf or a registry name")
    p.add_argument("output", help="output .gguf (written atomically)")
    p.add_argument("--type", required=True, choices=["mxfp4", "q8_0", "q4_0"])
    p.add_argument("--pure", action="store_true", help="every matrix in --type (no Q8_0 for attn_v / ffn_down)")
    p.add_argument("--quiet", "-q", action="store_true", help="no download or progress lines")
    p.set_defaults(run=_cmd_quantize)
    return parser


def set_threads(threads: int | None, environ: dict | os._Environ = os.environ) -> None:
    """Give XLA:CPU ``threads`` intra-op threads. XLA reads XLA_FLAGS once, when the backend starts, so this
    must run before the first JAX computation (the CLI calls it before any command imports jax's backend)."""
    if threads is None:
        return
    cores = len(os.sched_getaffinity(0))
    if not 1 <= threads <= cores:
        raise ImpError(f"--threads takes 1 to {cores} (the cores this process may use), got {threads}")
    flags = environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith(("intra_op_parallelism_threads=", "--xla_cpu_multi_thread_eigen"))]
    multi = "true" if threads > 1 else "false"
    flags += [f"--xla_cpu_multi_thread_eigen={multi}", f"intra_op_parallelism_threads={threads}"]
    environ["XLA_FLAGS"] = " ".join(flags)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.kernels = kernels_setting()
    args.debug = debug_setting()
    args.compile_cache = compile_cache_setting()
    from imp_jax import registry

    args.cache_dir = registry.cache_dir(os.environ)  # the cache root every command passes down
    try:
        set_threads(getattr(args, "threads", None))
        args.run(args)
    except ImpError as e:
        print(f"imp-jax: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("imp-jax: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
