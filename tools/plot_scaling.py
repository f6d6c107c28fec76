#!/usr/bin/env python3
"""Draws the scaling figure of issue #6 (item 4) from tools/scaling.sh's CSV: step time and peak
GPU memory against resolution (rank 32) and against LoRA rank (1024²), one SVG, Python standard
library only (the SVG is written by hand; no matplotlib).

    python3 tools/plot_scaling.py OUTDIR/scaling.csv [MORE.csv ...] [--out docs/scaling.svg]

Input: CSV files with the columns size,rank,base,checkpointing,step_s_median,peak_gib,
predicted_gib,status (tools/scaling.sh), or a markdown file holding such a CSV in a ```csv fenced
block (the GPU check's step_table.md). Several files (say an int8 and a bf16 grid) give one series
per (base, checkpointing). Rows whose status does not start with "ok" or whose numbers are
missing are not drawn as measurements: they are marked with a cross on the axis and listed under
the figure; the planner's prediction (predicted_gib) is drawn wherever it is present, dashed.
"""
import argparse
import csv
import io
import math
import os
import sys
from xml.sax.saxutils import escape

COLUMNS = ["size", "rank", "base", "checkpointing", "step_s_median", "peak_gib", "predicted_gib", "status"]
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
FONT = 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif"'


def num(s):
    try:
        v = float(s)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def read_rows(path):
    """Rows of one CSV file, or of the ```csv block(s) of a markdown file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("size,"):
        blocks = [text]
    else:
        blocks, cur = [], None
        for line in text.splitlines():
            if cur is None and line.strip().startswith("```csv"):
                cur = []
            elif cur is not None and line.strip().startswith("```"):
                blocks.append("\n".join(cur))
                cur = None
            elif cur is not None:
                cur.append(line)
        if not blocks:
            sys.exit(f"plot_scaling: {path}: neither a CSV starting with 'size,' nor markdown with a ```csv block")
    rows = []
    for b in blocks:
        for r in csv.DictReader(io.StringIO(b.strip() + "\n")):
            missing = [c for c in COLUMNS if c not in r]
            if missing:
                sys.exit(f"plot_scaling: {path}: missing column(s) {', '.join(missing)}")
            size, rank = num(r["size"]), num(r["rank"])
            if size is None or rank is None:
                continue  # a malformed row: nothing to place it at
            status = (r["status"] or "").strip() or "no status"
            ok = status.startswith("ok")
            rows.append(dict(size=int(size), rank=int(rank), base=(r["base"] or "?").strip(),
                             ckpt=(r["checkpointing"] or "?").strip(), status=status,
                             step=num(r["step_s_median"]) if ok else None,
                             peak=num(r["peak_gib"]) if ok else None,
                             pred=num(r["predicted_gib"])))
    return rows


def nice_step(span, target=5):
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def fmt(v):
    return f"{v:g}" if abs(v) >= 0.01 or v == 0 else f"{v:.0e}"


class Panel:
    def __init__(self, x, y, w, h, title, xlabel, ylabel, xs, xlog, xticklabels):
        self.x, self.y, self.w, self.h = x, y, w, h
        self.title, self.xlabel, self.ylabel = title, xlabel, ylabel
        self.xs, self.xlog, self.xticklabels = xs, xlog, xticklabels

    def px(self, v):
        lo, hi = self.xs[0], self.xs[-1]
        f = (lambda t: math.log2(t)) if self.xlog else (lambda t: t)
        pad = 0.06 * (f(hi) - f(lo) or 1)
        return self.x + (f(v) - f(lo) + pad) / (f(hi) - f(lo) + 2 * pad) * self.w

    def py(self, v):
        return self.y + self.h - v / self.ymax * self.h

    def frame(self, ymax_data):
        out = []
        if ymax_data is None or ymax_data <= 0:
            ymax_data = 1.0
        step = nice_step(ymax_data * 1.08)
        self.ymax = step * math.ceil(ymax_data * 1.08 / step)
        out.append(f'<text x="{self.x + self.w / 2:.1f}" y="{self.y - 10:.1f}" text-anchor="middle" '
                   f'font-size="14" font-weight="bold" {FONT}>{escape(self.title)}</text>')
        t = 0.0
        while t <= self.ymax + 1e-9:
            yy = self.py(t)
            out.append(f'<line x1="{self.x:.1f}" y1="{yy:.1f}" x2="{self.x + self.w:.1f}" y2="{yy:.1f}" '
                       f'stroke="#e6e6e6"/>')
            out.append(f'<text x="{self.x - 6:.1f}" y="{yy + 4:.1f}" text-anchor="end" font-size="11" {FONT}>'
                       f'{fmt(round(t, 10))}</text>')
            t += step
        for v, lab in zip(self.xs, self.xticklabels):
            xx = self.px(v)
            out.append(f'<line x1="{xx:.1f}" y1="{self.y + self.h:.1f}" x2="{xx:.1f}" y2="{self.y + self.h + 4:.1f}" '
                       f'stroke="#333"/>')
            out.append(f'<text x="{xx:.1f}" y="{self.y + self.h + 17:.1f}" text-anchor="middle" font-size="11" '
                       f'{FONT}>{escape(lab)}</text>')
        out.append(f'<rect x="{self.x:.1f}" y="{self.y:.1f}" width="{self.w:.1f}" height="{self.h:.1f}" '
                   f'fill="none" stroke="#333"/>')
        out.append(f'<text x="{self.x + self.w / 2:.1f}" y="{self.y + self.h + 34:.1f}" text-anchor="middle" '
                   f'font-size="12" {FONT}>{escape(self.xlabel)}</text>')
        cy = self.y + self.h / 2
        out.append(f'<text x="{self.x - 42:.1f}" y="{cy:.1f}" text-anchor="middle" font-size="12" {FONT} '
                   f'transform="rotate(-90 {self.x - 42:.1f} {cy:.1f})">{escape(self.ylabel)}</text>')
        return out

    def series(self, pts, colour, dashed=False, marker="circle"):
        """pts: [(x, y)]; a point with y None is left out and the line joins its neighbours (the
        missing point gets a cross on the axis elsewhere)."""
        out, run = [], []
        dash = ' stroke-dasharray="6 4"' if dashed else ""

        def flush():
            if len(run) > 1:
                d = " ".join(f"{self.px(a):.1f},{self.py(b):.1f}" for a, b in run)
                out.append(f'<polyline points="{d}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
            run.clear()

        for a, b in sorted(pts):
            if b is None:
                continue
            run.append((a, b))
            cx, cy = self.px(a), self.py(b)
            if marker == "circle":
                out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3.5" fill="{colour}"/>')
            else:
                out.append(f'<rect x="{cx - 3:.1f}" y="{cy - 3:.1f}" width="6" height="6" fill="white" '
                           f'stroke="{colour}" stroke-width="1.5"/>')
        flush()
        return out

    def cross(self, xv, colour, k):
        cx, cy = self.px(xv), self.y + self.h - 7 - 9 * k
        return [f'<path d="M{cx - 4:.1f},{cy - 4:.1f} L{cx + 4:.1f},{cy + 4:.1f} M{cx - 4:.1f},{cy + 4:.1f} '
                f'L{cx + 4:.1f},{cy - 4:.1f}" stroke="{colour}" stroke-width="2"/>']

    def empty_note(self):
        return [f'<text x="{self.x + self.w / 2:.1f}" y="{self.y + self.h / 2:.1f}" text-anchor="middle" '
                f'font-size="12" fill="#888" {FONT}>no measured point</text>']


def pick(rows, key_fn):
    """Last row per key (a later run of the same point wins; an ok row beats a failed one)."""
    best = {}
    for r in rows:
        k = key_fn(r)
        if k not in best or r["status"].startswith("ok") or not best[k]["status"].startswith("ok"):
            best[k] = r
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="scaling.csv file(s), or markdown with a ```csv block")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--out", default=os.path.join(root, "docs", "scaling.svg"))
    ap.add_argument("--title", default="flux-kernels: one FLUX.1-dev LoRA training step (batch 1, 512 text "
                                       "tokens, attn-mlp targets)")
    ap.add_argument("--subtitle", default="", help="e.g. the card and the commit")
    args = ap.parse_args()

    rows = [r for p in args.inputs for r in read_rows(p)]
    if not rows:
        sys.exit("plot_scaling: no rows")
    groups = []
    for r in rows:
        g = (r["base"], r["ckpt"])
        if g not in groups:
            groups.append(g)
    colour = {g: COLOURS[i % len(COLOURS)] for i, g in enumerate(groups)}

    res_rows = [r for r in rows if r["rank"] == 32]
    rank_rows = [r for r in rows if r["size"] == 1024]
    sizes = sorted({r["size"] for r in res_rows}) or [512, 1024]
    ranks = sorted({r["rank"] for r in rank_rows}) or [4, 128]
    if len(sizes) == 1:
        sizes = [sizes[0] - 256, sizes[0], sizes[0] + 256]
    if len(ranks) == 1:
        ranks = [ranks[0] / 2, ranks[0], ranks[0] * 2]
    size_labels = [f"{s}²" if s in {r['size'] for r in res_rows} else "" for s in sizes]
    rank_labels = [f"{int(k)}" if k in {r['rank'] for r in rank_rows} else "" for k in ranks]

    W, H = 980, 700
    pw, ph = 380, 210
    lx, rx, ty, by = 90, 570, 80, 380
    panels = {
        ("res", "step"): Panel(lx, ty, pw, ph, "Step time vs resolution (rank 32)", "resolution (px)",
                               "step time (s, median)", sizes, False, size_labels),
        ("rank", "step"): Panel(rx, ty, pw, ph, "Step time vs rank (1024²)", "LoRA rank (log scale)",
                                "step time (s, median)", ranks, True, rank_labels),
        ("res", "mem"): Panel(lx, by, pw, ph, "Peak GPU memory vs resolution (rank 32)", "resolution (px)",
                              "GiB", sizes, False, size_labels),
        ("rank", "mem"): Panel(rx, by, pw, ph, "Peak GPU memory vs rank (1024²)", "LoRA rank (log scale)",
                               "GiB", ranks, True, rank_labels),
    }
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="26" text-anchor="middle" font-size="15" font-weight="bold" {FONT}>'
           f'{escape(args.title)}</text>']
    if args.subtitle:
        svg.append(f'<text x="{W / 2}" y="46" text-anchor="middle" font-size="12" fill="#444" {FONT}>'
                   f'{escape(args.subtitle)}</text>')
    failures, seen = [], set()
    for axis, sel, xkey in (("res", res_rows, "size"), ("rank", rank_rows, "rank")):
        best = pick(sel, lambda r: (r["base"], r["ckpt"], r[xkey]))
        by_group = {g: sorted((r for (gb, gc, _), r in best.items() if (gb, gc) == g), key=lambda r: r[xkey])
                    for g in groups}
        for metric in ("step", "mem"):
            p = panels[(axis, metric)]
            vals = [r["step"] if metric == "step" else r["peak"] for r in best.values()]
            if metric == "mem":
                vals += [r["pred"] for r in best.values()]
            vals = [v for v in vals if v is not None]
            svg += p.frame(max(vals) if vals else None)
            drawn = False
            for gi, g in enumerate(groups):
                pts = by_group[g]
                if metric == "step":
                    meas = [(r[xkey], r["step"]) for r in pts]
                else:
                    meas = [(r[xkey], r["peak"]) for r in pts]
                    pred = [(r[xkey], r["pred"]) for r in pts if r["pred"] is not None]
                    svg += p.series(pred, colour[g], dashed=True, marker="square")
                drawn |= any(v is not None for _, v in meas)
                svg += p.series(meas, colour[g])
                for r in pts:
                    if not r["status"].startswith("ok") or (r["step"] if metric == "step" else r["peak"]) is None:
                        svg += p.cross(r[xkey], colour[g], gi)
                        if metric == "step" and (r["size"], r["rank"], g) not in seen:
                            seen.add((r["size"], r["rank"], g))
                            why = r["status"] if not r["status"].startswith("ok") else r["status"] + " but no numbers"
                            failures.append(f"{r['size']}² r {r['rank']} {r['base']} ckpt {r['ckpt']}: {why}")
            if not drawn:
                svg += p.empty_note()

    # Legend and the list of points without a measurement.
    ly = by + ph + 62
    x = lx
    for g in groups:
        c = colour[g]
        svg.append(f'<line x1="{x}" y1="{ly}" x2="{x + 26}" y2="{ly}" stroke="{c}" stroke-width="2"/>'
                   f'<circle cx="{x + 13}" cy="{ly}" r="3.5" fill="{c}"/>')
        svg.append(f'<text x="{x + 32}" y="{ly + 4}" font-size="12" {FONT}>{escape(g[0])} base, checkpointing '
                   f'{escape(g[1])}: measured</text>')
        x += 330
        svg.append(f'<line x1="{x}" y1="{ly}" x2="{x + 26}" y2="{ly}" stroke="{c}" stroke-width="2" '
                   f'stroke-dasharray="6 4"/><rect x="{x + 10}" y="{ly - 3}" width="6" height="6" fill="white" '
                   f'stroke="{c}" stroke-width="1.5"/>')
        svg.append(f'<text x="{x + 32}" y="{ly + 4}" font-size="12" {FONT}>predicted by flux-kernels plan '
                   f'(memory only)</text>')
        x = lx
        ly += 18
    svg.append(f'<text x="{lx}" y="{ly + 4}" font-size="12" {FONT}>× on the axis: no measurement at that point '
               f'({len(failures)} point{"s" if len(failures) != 1 else ""})</text>')
    for f_ in failures[:6]:
        ly += 15
        svg.append(f'<text x="{lx + 14}" y="{ly + 4}" font-size="11" fill="#555" {FONT}>{escape(f_[:130])}</text>')
    if len(failures) > 6:
        ly += 15
        svg.append(f'<text x="{lx + 14}" y="{ly + 4}" font-size="11" fill="#555" {FONT}>… and '
                   f'{len(failures) - 6} more</text>')
    H2 = max(H, ly + 20)
    svg[0] = f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H2}" viewBox="0 0 {W} {H2}">'
    svg[1] = f'<rect width="{W}" height="{H2}" fill="white"/>'
    svg.append("</svg>")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(svg) + "\n")
    n_ok = sum(1 for r in rows if r["status"].startswith("ok"))
    print(f"plot_scaling: {args.out}: {len(rows)} rows, {n_ok} measured, {len(failures)} without a measurement")


if __name__ == "__main__":
    main()
