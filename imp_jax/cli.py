"""The ``imp-jax`` command line. Every ImpError becomes one line on stderr and exit status 1."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from imp_jax.errors import ImpError


def _cmd_pull(args: argparse.Namespace) -> None:
    from imp_jax import registry

    print(registry.fetch(args.name, progress=True))


def _cmd_inspect(args: argparse.Namespace) -> None:
    from imp_jax.inspect import summarize
    from imp_jax.weights.files import open_model_file

    summary = summarize(open_model_file(args.model))
    width = max(len(k) for k, _ in summary.rows())
    for key, value in summary.rows():
        print(f"{key:<{width}}  {value}")


def compile_cache_setting(environ: dict[str, str] | None = None) -> bool | str:
    """``IMP_JAX_COMPILE_CACHE``: unset or 1 keeps compiled steps in the imp-jax cache folder, 0 turns the
    persistent compile cache off, anything else is the folder to use."""
    value = (os.environ if environ is None else environ).get("IMP_JAX_COMPILE_CACHE", "1")
    return {"1": True, "0": False}.get(value, value)


def _load(args: argparse.Namespace):
    import imp_jax

    return imp_jax.load(args.model, dtype=args.dtype, max_context=args.context, compile_cache=compile_cache_setting())


def _sampling(args: argparse.Namespace) -> dict:
    return dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
    )


def _cmd_generate(args: argparse.Namespace) -> None:
    import imp_jax

    model = _load(args)
    pieces = imp_jax.generate(model, args.prompt, stream=True, **_sampling(args))
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _cmd_chat(args: argparse.Namespace) -> None:
    import imp_jax

    model = _load(args)
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print(f"chatting with {model.path.name} (empty line or Ctrl-D to quit)", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        prompt = model.chat_template(messages, add_generation_prompt=True)
        ids = model.tokenizer.encode(prompt, add_special=False)
        reply = []
        for piece in imp_jax.generate(model, ids, stream=True, **_sampling(args)):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})


def _cmd_bench(args: argparse.Namespace) -> None:
    from imp_jax import bench

    if args.synthetic:
        params, cfg, size, n_params = bench.synthetic_model(args.synthetic, args.quant, args.dtype)
        name, quant = args.synthetic, args.quant
    else:
        import imp_jax
        from imp_jax.inspect import summarize

        model = imp_jax.load(args.model, dtype=args.dtype, max_context=max(args.pp, args.tg) + 8, batch=args.batch)
        s = summarize(model.file)
        params, cfg = model.params, model.config
        name, quant, size, n_params = model.path.name, next(iter(s.bytes_by_qtype)), s.file_bytes, s.n_params
    rows = bench.run(params, cfg, name=name, quant=quant, size_bytes=size, n_params=n_params,
                     dtype=args.dtype, pp=args.pp, tg=args.tg, reps=args.reps, batch=args.batch)  # fmt: skip
    print(bench.as_json(rows) if args.json else bench.table(rows))


def _cmd_quantize(args: argparse.Namespace) -> None:
    from rich.progress import Progress

    from imp_jax.gguf import open_gguf
    from imp_jax.weights.quantize import quantize_file

    mf = open_gguf(args.input)
    with Progress(transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task(f"quantizing to {args.type}", total=len(mf.tensors))
        out = quantize_file(mf, args.output, args.type, pure=args.pure, on_tensor=lambda _: bar.advance(task))
    print(out)


def _add_model(p: argparse.ArgumentParser, *, required: bool) -> None:
    from imp_jax.registry import DEFAULT_MODEL

    if required:
        p.add_argument("--model", "-m", required=True, help="a .gguf path or a registry name")
    else:
        p.add_argument(
            "--model",
            "-m",
            default=DEFAULT_MODEL,
            help=f"a .gguf path or a registry name (default {DEFAULT_MODEL})",
        )


def _add_generation(p: argparse.ArgumentParser, *, max_tokens: int) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=max_tokens)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--context", type=int, default=4096, help="max context (prompt + generated tokens)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imp-jax", description="Run GGUF language models on JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="fetch a registry model into the cache and print its path")
    p.add_argument("name")
    p.set_defaults(run=_cmd_pull)

    p = sub.add_parser("inspect", help="architecture, parameters, bytes per quant type, key metadata")
    p.add_argument("model", help="a .gguf path or a registry name")
    p.set_defaults(run=_cmd_inspect)

    p = sub.add_parser("generate", help="continue a prompt")
    p.add_argument("prompt")
    _add_model(p, required=False)
    _add_generation(p, max_tokens=128)
    p.set_defaults(run=_cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model's own template")
    _add_model(p, required=False)
    p.add_argument("--system", default=None, help="system message")
    _add_generation(p, max_tokens=512)
    p.set_defaults(run=_cmd_chat)

    p = sub.add_parser("bench", help="llama-bench-style pp/tg throughput")
    _add_model(p, required=False)
    p.add_argument("--synthetic", default=None, help="a model shape with random weights built on the device")
    p.add_argument("--quant", default="mxfp4", help="with --synthetic: mxfp4, q8_0, q4_k or bf16")
    p.add_argument("--pp", type=int, default=512)
    p.add_argument("--tg", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    p.set_defaults(run=_cmd_bench)

    from imp_jax.planning.memory import add_plan_parser

    add_plan_parser(sub)

    p = sub.add_parser("quantize", help="rewrite a GGUF with its weight matrices in another quant type")
    p.add_argument("input", help="input .gguf")
    p.add_argument("output", help="output .gguf (written atomically)")
    p.add_argument("--type", required=True, choices=["mxfp4", "q8_0", "q4_0"])
    p.add_argument("--pure", action="store_true", help="every matrix in --type (no Q8_0 for attn_v / ffn_down)")
    p.set_defaults(run=_cmd_quantize)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
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
