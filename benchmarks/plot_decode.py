"""Plot of batch-1 decode tok/s against the bandwidth roofline, per model shape (docs/decode_roofline.png).

Reads one or more JSON files written by ``benchmarks/e2e.py --out`` and draws, for each shape with batch-1 tg
rows, a filled bar per series (engine and quant: achieved tok/s) inside a hollow bar at that row's roofline (bytes
read per token over the copy bandwidth measured in the same run), each labelled with its % of roofline. The y axis is
logarithmic when the values span more than 20x. Runs anywhere (no JAX); needs matplotlib, the ``bench`` extra::

    python benchmarks/plot_decode.py e2e.json [more.json ...] --out docs/decode_roofline.png
"""

from __future__ import annotations

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

LOG_SPAN = 20  # log y axis when max / min tok/s exceeds this


def load(paths: list[str]) -> tuple[list[float], list[dict]]:
    """Copy bandwidths (GB/s) and batch-1 decode rows with a roofline, from e2e.py JSON files; each row's
    ``series`` is its engine and quant ("imp-jax pallas MXFP4").

    A series a later file repeats for the same shape is suffixed there with that file's stem (a re-run beside the
    original keeps the original's name and colour)."""
    bws, rows = [], []
    seen: set[tuple[str, str]] = set()
    for p in paths:
        data = json.loads(pathlib.Path(p).read_text())
        bws.append(float(data["copy_gb_s"]))
        mine = [r for r in data["rows"] if r["test"].startswith("tg") and r["batch"] == 1 and "roofline" in r]
        bases = [(_series(r), r["shape"]) for r in mine]
        for r, (series, shape) in zip(mine, bases, strict=True):
            rows.append(dict(r, series=f"{series} [{pathlib.Path(p).stem}]" if (series, shape) in seen else series))
        seen |= set(bases)
    return bws, rows


def _series(row: dict) -> str:
    """The engine, and the quant unless the engine names it ("torch bf16")."""
    engine, quant = row["engine"], row["quant"]
    return engine if quant.lower() in engine.lower() else f"{engine} {quant.upper()}"


def groups(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by shape, groups in first-seen order; inside a group, series in first-seen order over all rows, so a
    series keeps its place in every group whichever file its row came from."""
    rank = {e: i for i, e in enumerate(dict.fromkeys(r["series"] for r in rows))}
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["shape"], []).append(r)
    return {k: sorted(v, key=lambda r: rank[r["series"]]) for k, v in out.items()}


def plot(bws: list[float], rows: list[dict], out: str | pathlib.Path) -> None:
    """Write the PNG (1200 x 500 px; the legend sits right of the bars)."""
    fig, ax = plt.subplots(figsize=(12, 5), dpi=100)
    series = list(dict.fromkeys(r["series"] for r in rows))
    colors = {e: plt.get_cmap("tab10")(i % 10) for i, e in enumerate(series)}
    width = 0.8 / max(len(g) for g in groups(rows).values())
    ticks = []
    for gi, (key, members) in enumerate(groups(rows).items()):
        ticks.append((gi, key))
        for i, r in enumerate(members):
            x = gi + (i - (len(members) - 1) / 2) * width
            ax.bar(x, r["roofline"], width * 0.9, fill=False, edgecolor="0.3", linestyle="--", linewidth=1)
            ax.annotate(f"{r['roofline']:.0f}", (x, r["roofline"]), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7, color="0.3")  # fmt: skip
            ax.bar(x, r["tok_s"], width * 0.9, color=colors[r["series"]])
            ax.annotate(f"{r['pct']:.0f}%", (x, r["tok_s"]), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8)  # fmt: skip
    values = [r["tok_s"] for r in rows] + [r["roofline"] for r in rows]
    if max(values) / min(values) > LOG_SPAN:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xticks([t for t, _ in ticks], [label for _, label in ticks])
    ax.set_ylabel("decode tok/s (batch 1)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[e]) for e in series]
    handles.append(plt.Rectangle((0, 0), 1, 1, fill=False, edgecolor="0.3", linestyle="--"))
    ax.legend(handles, [*series, "roofline (bytes/token over copy GB/s)"], fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))  # fmt: skip
    lo, hi = round(min(bws)), round(max(bws))
    bw = f"{lo}" if lo == hi else f"{lo}-{hi}"
    ax.set_title(f"Batch-1 decode vs roofline (HBM copy {bw} GB/s; labels: % of roofline)", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="JSON files written by benchmarks/e2e.py --out")
    ap.add_argument("--out", default="docs/decode_roofline.png")
    args = ap.parse_args(argv)
    bws, rows = load(args.inputs)
    if not rows:
        raise SystemExit("no batch-1 tg rows with a roofline in the inputs")
    plot(bws, rows, args.out)
    print(f"wrote {args.out}: {len(rows)} bars in {len(groups(rows))} groups")


if __name__ == "__main__":
    main()
