"""
lab/show_routing.py -- routing made visible: which expert did every byte go to?

    python -m lab.show_routing runs/aux/ckpt.pt runs/global_aux/ckpt.pt
    python -m lab.show_routing runs/*/ckpt.pt --text notes.txt --layer 1 --out notes

writes PREFIX.html (one self-contained page, no network, no script; hover a
byte to see all its experts and weights) and PREFIX.png (the same picture,
for a README). The default PREFIX is `routing` in the first checkpoint's run
folder (runs/aux/routing.html above), never the current folder.

What it teaches. Qiu et al. 2025 ("Demons in the Detail", Fig. 1b) show that
whether experts specialise by domain depends on *where* the load is counted.
Balancing over a micro-batch of a few sequences asks every few sequences to
spread evenly over the experts, so a code sequence and a math sequence end
up using the experts in much the same proportions. Balancing over the global
batch only asks the corpus as a whole to be even, so code may go to "code
experts". Their figure shows the frequencies; this page shows the same thing
on the bytes themselves, one column per checkpoint, so runs trained with
aux, global_aux or lossfree can be read side by side:

  - rows: a code, a math and a prose sample from the built-in validation
    split (or one sample, your --text file);
  - every byte coloured by its top-1 expert in layer --layer: the assignment
    with the largest gate weight. Under expert choice a byte may be taken by
    no expert (grey: only the residual stream carries it) or by several;
  - below, per domain, how often each expert is among a token's selections
    over the validation set (Qiu et al. Fig. 1b); the dashed line is where
    every bar would sit if that domain used all experts equally.

Choices worth knowing:
  - A sample longer than the model's seq_len is cut into windows of seq_len,
    each routed as its own sequence, as in training (the position embedding
    ends there). The last window is slid back to end on the sample's last
    byte, so every window is full length; a byte covered by two windows is
    shown once, from the earlier one.
  - The windows are routed as one batch, topped up to a whole number of
    balance / routing groups by repeating its first windows (as
    data.val_batches tops up its last batch). Token choice does not notice;
    under expert choice a byte's experts depend on the other tokens of its
    group, so the page shows the routing this particular batch gets.
  - plumbing.load_model reads every rank's shard of a checkpoint, so the
    model is rebuilt with world_size=1 whatever world size trained it, and
    everything runs on the CPU in seconds.
"""

import argparse
import html
import math
import os
import re
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import plumbing
import train


class InputError(ValueError):
    """Something the user passed cannot be used; the message is one line
    naming the problem and the fix."""


# ----------------------------------------------------------------------------
# 1. The inputs: checkpoints and text.

def load_model(path):
    """The model of a train.py checkpoint (or run folder), every expert in it,
    in evaluation mode on the CPU (plumbing.load_model: a checkpoint that does
    not fit is refused with one line; a half-fitting model would colour the
    page with a routing nobody trained)."""
    return plumbing.load_model(path)[0]


def read_text(path):
    """The bytes of a --text file, after checking that they are text.

    A few undecodable bytes are tolerated (a file cut inside a character, a
    stray Latin-1 accent): they are bytes like any other and get shown as
    U+FFFD. More than that means the file is not UTF-8 text, and colouring
    its bytes would show nothing a reader could follow."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise InputError(f"--text {path}: {e.strerror}") from None
    if not raw:
        raise InputError(f"--text {path} is empty; give it some text")
    if b"\0" in raw:
        raise InputError(f"--text {path} looks binary (it contains NUL bytes); give a UTF-8 text file")
    bad = raw.decode("utf-8", errors="replace").count("\ufffd") - raw.count("\ufffd".encode())
    if bad > max(3, len(raw) // 100):
        raise InputError(f"--text {path} is not UTF-8 text ({bad} undecodable bytes of {len(raw)}); "
                         f"convert it to UTF-8")
    return raw


def cut_bytes(raw, n):
    """At most n bytes, cut before a character rather than inside one (a UTF-8
    continuation byte looks like 10xxxxxx)."""
    if len(raw) <= n:
        return raw
    while n > 0 and raw[n] & 0xC0 == 0x80:
        n -= 1
    return raw[:n]


def builtin_samples(corpus, n_bytes):
    """One sample per domain: n_bytes of its validation stream, from the
    first unindented line after a blank line past the middle (the first
    line past the middle if the stream has no blank lines). Past the middle,
    because a stream begins with its first document's header (a module
    docstring is prose, not code); after a blank line, so a code sample
    starts with a statement and a prose sample with a paragraph."""
    samples = []
    for name, stream in zip(corpus.domains, corpus.val):
        raw = stream.numpy().tobytes()
        para = re.compile(rb"\n\n(?=\S)").search(raw, len(raw) // 2)
        start = para.end() if para else raw.find(b"\n", len(raw) // 2) + 1
        samples.append((name, cut_bytes(raw[start:], n_bytes)))
    return samples


# ----------------------------------------------------------------------------
# 2. Routing, byte by byte.

def windows(n, T):
    """Windows that cover positions 0..n-1: (start, length, first_new) each.
    Every window has length min(T, n); the last one ends on byte n-1 and
    contributes only the bytes from first_new on, the earlier ones being
    shown already with the context of their own window."""
    T = min(T, n)
    starts = list(range(0, n, T))
    starts[-1] = n - T
    return [(s, T, 0 if i == 0 else starts[i - 1] + T - s) for i, s in enumerate(starts)]


def group_knobs(balancer):
    """The strategy's group knobs and their values: the knobs its class
    declares with divides_batch=True (aux's balance groups, expert choice's
    routing groups), in sequences."""
    return {name: getattr(balancer.cfg, name) for name, knob in type(balancer).knobs.items()
            if knob.divides_batch and getattr(balancer.cfg, name) is not None}


def group_size(model):
    """Sequences the batch must hold a whole number of: the least common
    multiple of the strategy's group knobs, 1 for strategies that route each
    token alone."""
    return math.lcm(1, *group_knobs(model.moe_layers()[0].balancer).values())


@torch.no_grad()
def route_batch(model, x, layer):
    """The routing of one layer for the sequences x [B, T], batch topped up
    to whole groups by repeating its first rows. Assignments of the top-up
    rows have token_idx >= B*T; callers drop them."""
    g = group_size(model)
    rows = torch.arange(math.ceil(x.shape[0] / g) * g) % x.shape[0]
    return model(x[rows]).routings[layer]


def route_samples(model, samples, layer):
    """For every byte of every sample, its (expert, weight) assignments in
    `layer`, largest weight first: [sample][byte] -> list of pairs."""
    rows = [(s, start, T, first) for s, sample in enumerate(samples)
            for start, T, first in windows(len(sample), model.cfg.seq_len)]
    picks = [[[] for _ in sample] for sample in samples]
    # windows of one length go in one batch; only a sample shorter than
    # seq_len makes a second length
    for T in sorted({r[2] for r in rows}):
        batch = [r for r in rows if r[2] == T]
        x = torch.tensor([list(samples[s][start:start + T]) for s, start, _, _ in batch])
        routing = route_batch(model, x, layer)
        for tok, e, w in zip(routing.token_idx.tolist(), routing.expert_idx.tolist(),
                             routing.weight.tolist()):
            r, t = divmod(tok, T)
            if r >= len(batch):
                continue
            s, start, _, first = batch[r]
            if t >= first:
                picks[s][start + t].append((e, w))
    for sample in picks:
        for byte in sample:
            byte.sort(key=lambda p: (-p[1], p[0]))
    return picks


@torch.no_grad()
def domain_frequency(model, batches, layer, n_domains):
    """freq[d, e]: how often expert e is among the selections of a token of
    domain d in `layer` (Qiu et al. 2025, Fig. 1b), counted the way
    train.evaluate counts it. Micro-batch balancing keeps every row of it
    near uniform; global balancing lets rows differ."""
    E = model.cfg.n_experts
    picks = torch.zeros(n_domains, E)
    tokens = torch.zeros(n_domains)
    for x, _, dom in batches:
        B, T = x.shape
        routing = route_batch(model, x, layer)
        real = routing.token_idx < B * T
        tok_domain = dom.repeat_interleave(T)[routing.token_idx[real]]
        picks.index_put_((tok_domain, routing.expert_idx[real]), torch.ones(int(real.sum())), accumulate=True)
        tokens += torch.bincount(dom, minlength=n_domains) * T
    return picks / tokens.clamp(min=1)[:, None]


def sample_frequency(picks, n_experts):
    """The same frequency for one sample: the share of its bytes that have
    expert e among their selections."""
    freq = torch.zeros(n_experts)
    for byte in picks:
        for e, _ in byte:
            freq[e] += 1
    return freq / len(picks)


# ----------------------------------------------------------------------------
# 3. Colours and glyphs, shared by the page and the picture.

NO_EXPERT = "#c8c8c8"   # a byte no expert took (expert choice only)

# matplotlib's tab20, greys left out (grey means "no expert"): nine strong
# hues, then their light twins, so that experts 0..8 differ in hue at once.
TAB20_STRONG = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]
TAB20_LIGHT = ["#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5"]


def expert_colours(n):
    """One background colour per expert, as '#rrggbb'. Past 18 experts no
    palette stays readable, so hues are spread evenly at three lightnesses."""
    if n <= len(TAB20_STRONG) + len(TAB20_LIGHT):
        return (TAB20_STRONG + TAB20_LIGHT)[:n]
    import colorsys
    rgb = [colorsys.hls_to_rgb(i / n, (0.45, 0.65, 0.8)[i % 3], 0.75) for i in range(n)]
    return ["#" + "".join(f"{round(255 * c):02x}" for c in col) for col in rgb]


def ink(colour):
    """Black or white text, whichever reads better on `colour` (relative
    luminance as in WCAG, threshold near its midpoint)."""
    r, g, b = (int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
    lum = sum(w * (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4)
              for w, c in zip((0.2126, 0.7152, 0.0722), (r, g, b)))
    return "#000000" if lum > 0.2 else "#ffffff"


def top1_colour(assignments, colours):
    return colours[assignments[0][0]] if assignments else NO_EXPERT


def utf8_size(lead):
    """How many bytes the UTF-8 character starting with byte `lead` has
    (0: `lead` cannot start a character)."""
    for size, prefix, bits in ((1, 0b0, 1), (2, 0b110, 3), (3, 0b1110, 4), (4, 0b11110, 5)):
        if lead >> (8 - bits) == prefix:
            return size
    return 0


def glyphs(sample):
    """What to draw for every byte. Bytes are tokens, but a reader wants to
    see characters: a multi-byte UTF-8 character is drawn on its first byte,
    and its other bytes draw nothing (they still get their colour). Line
    breaks and control bytes get visible symbols, so their colour shows."""
    out, i = [], 0
    while i < len(sample):
        size = utf8_size(sample[i])
        try:
            char = sample[i:i + size].decode("utf-8") if size else None
        except UnicodeDecodeError:
            char = None
        if char is None:
            out.append("\ufffd")                      # a byte that starts no character
            i += 1
            continue
        if char == "\n":
            char = "\u21b5"                           # ↵
        elif char == "\t":
            char = "\u2192"                           # →
        elif ord(char) < 0x20:
            char = chr(0x2400 + ord(char))            # the Unicode "control pictures"
        elif char == "\x7f":
            char = "\u2421"
        out += [char] + [""] * (size - 1)
        i += size
    return out


# ----------------------------------------------------------------------------
# 4. The HTML page: hover shows everything, the data-* attributes let a
#    program (the tests) read the routing back.

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 18px; color: #222; }
h1 { font-size: 19px; margin: 0 0 4px; }
p.note { margin: 2px 0 10px; color: #555; font-size: 13px; max-width: 70em; }
table.grid { border-collapse: collapse; table-layout: fixed; width: 100%; }
.grid th, .grid td { border: 1px solid #ddd; padding: 6px 8px; vertical-align: top; }
.grid th.ckpt { font-size: 13px; font-weight: normal; text-align: left; background: #f6f6f6; }
.grid th.ckpt b { font-size: 15px; }
.grid th.row { width: 6.5em; text-align: right; font-size: 13px; }
.grid th.row small { display: block; color: #777; font-weight: normal; }
.text { font: 13px/1.6 "DejaVu Sans Mono", Menlo, Consolas, monospace; white-space: pre-wrap; word-break: break-all; }
.text span { padding: 1px 0; }
.text span.cont { display: inline-block; width: 3px; height: 1.1em; vertical-align: text-bottom; padding: 0; }
.dom { display: flex; align-items: flex-end; gap: 6px; margin: 3px 0; }
.dom .name { width: 4.5em; font-size: 12px; text-align: right; color: #444; }
.bars { flex: 1; display: flex; align-items: flex-end; gap: 1px; height: 44px; position: relative; border-bottom: 1px solid #999; }
.bars div { flex: 1; }
.bars .even { position: absolute; left: 0; right: 0; height: 0; border-top: 1px dashed #444; }
.ticks { display: flex; gap: 1px; margin-left: calc(4.5em + 6px); font-size: 9px; color: #666; }
.ticks span { flex: 1; text-align: center; }
.legend { margin: 12px 0; font-size: 13px; }
.legend span { display: inline-block; min-width: 1.7em; text-align: center; margin: 0 2px 2px 0; padding: 1px 3px; border-radius: 2px; font-family: monospace; }
"""


def byte_name(b):
    return repr(chr(b)) if 0x20 <= b < 0x7f else f"0x{b:02x}"


def byte_span(pos, b, glyph, assignments, colours):
    """One byte as a <span>: background = its top-1 expert, title = all its
    experts and weights (the browser shows it on hover, no script needed),
    data-* attributes = the same facts for a program to read back."""
    colour = top1_colour(assignments, colours)
    lines = [f"byte {pos}: {byte_name(b)}"]
    lines += [f"expert {e}: weight {w:.3f}" for e, w in assignments] or ["no expert (the residual carries it)"]
    experts = " ".join(f"{e}:{w:.4f}" for e, w in assignments)
    text = html.escape(glyph) + ("\n" if b == 0x0A else "")
    cls = ' class="cont"' if glyph == "" else ""
    return (f'<span{cls} data-pos="{pos}" data-byte="{b}" data-experts="{experts}" '
            f'style="background:{colour};color:{ink(colour)}" title="{html.escape(chr(10).join(lines))}">{text}</span>')


def sample_cell(sample, picks, colours):
    return "".join(byte_span(i, b, g, p, colours) for i, (b, g, p) in enumerate(zip(sample, glyphs(sample), picks)))


def bars_cell(freq, names, colours, top):
    """Small multiples: for each domain, one bar per expert in that expert's
    colour, on a scale shared by every column so heights compare across runs."""
    parts = []
    for name, row in zip(names, freq.tolist()):
        even = sum(row) / len(row)
        bars = "".join(f'<div style="height:{100 * f / top:.1f}%;background:{c}" '
                       f'title="{html.escape(name)}, expert {e}: {f:.3f}"></div>'
                       for e, (f, c) in enumerate(zip(row, colours)))
        parts.append(f'<div class="dom"><span class="name">{html.escape(name)}</span>'
                     f'<div class="bars" data-domain="{html.escape(name)}">{bars}'
                     f'<span class="even" style="bottom:{100 * even / top:.1f}%"></span></div></div>')
    ticks = "".join(f"<span>{e}</span>" for e in range(len(colours))) if len(colours) <= 32 else ""
    return "".join(parts) + f'<div class="ticks">{ticks}</div>'


def balance_scope(model):
    """What the strategy is, and over how many sequences it balances or
    routes (its group knobs, e.g. aux's balance_seqs: the knob Qiu et al. turn)."""
    bal = model.moe_layers()[0].balancer
    groups = [f"{name} {value}" for name, value in group_knobs(bal).items()]
    return bal.summary + (f" ({', '.join(groups)})" if groups else "")


@dataclass
class Column:
    """Everything one checkpoint contributes to the page and the picture."""
    path: str
    model: torch.nn.Module
    layer: int             # the layer shown, counted from 0
    picks: list            # [sample][byte] -> [(expert, weight)], largest weight first
    freq: torch.Tensor     # [rows, E]: the validation domains, then the --text sample if any
    spread: float          # specialisation of this layer over the validation domains

    @property
    def colours(self):
        return expert_colours(self.model.cfg.n_experts)

    @property
    def title(self):
        cfg = self.model.cfg
        parts = [balance_scope(self.model), f"{self.model.moe_layers()[0].balancer.cfg.gate} gate",
                 f"{cfg.n_experts} experts top-{cfg.top_k}", f"layer {self.layer} of {cfg.n_layers}",
                 f"specialisation {self.spread:.3f}"]
        return ", ".join(p for p in parts if p)


def legend_html(colours):
    """Every expert's colour with its number, and the grey of "no expert"."""
    legend = "".join(f'<span style="background:{c};color:{ink(c)}">{e}</span>' for e, c in enumerate(colours))
    return legend + f' &nbsp;<span style="background:{NO_EXPERT}">&nbsp;</span> no expert (expert choice only)'


def html_page(columns, samples, freq_names, layer_label):
    """The whole page: a header per checkpoint, a row per sample, the bars."""
    top = max(float(col.freq.max()) for col in columns) or 1.0
    head = "".join(f'<th class="ckpt"><b>{html.escape(col.model.cfg.balancer)}</b> &middot; '
                   f'{html.escape(col.path)}<br>{html.escape(col.title)}</th>' for col in columns)
    rows = []
    for s, (name, sample) in enumerate(samples):
        cells = "".join(f'<td class="text" data-ckpt="{c}" data-sample="{s}">'
                        f'{sample_cell(sample, col.picks[s], col.colours)}</td>' for c, col in enumerate(columns))
        rows.append(f'<tr><th class="row">{html.escape(name)}<small>{len(sample)} bytes</small></th>{cells}</tr>')
    bars = "".join(f'<td class="freq" data-ckpt="{c}">{bars_cell(col.freq, freq_names, col.colours, top)}</td>'
                   for c, col in enumerate(columns))
    rows.append(f'<tr><th class="row">expert frequency<small>per domain, Qiu et al. Fig. 1b</small></th>{bars}</tr>')
    legend = legend_html(max(columns, key=lambda col: col.model.cfg.n_experts).colours)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Routing by byte, {html.escape(layer_label)}</title>
<style>{CSS}</style></head><body>
<h1>Which expert did each byte go to? ({html.escape(layer_label)})</h1>
<p class="note">Each byte is coloured by its top-1 expert (the largest gate weight); hover over a byte for all
its experts and weights. The bars show, for each domain of the validation set, how often each expert is among
a token's selections (Qiu et al. 2025, Fig. 1b); the dashed line is where every bar would sit if that domain
used all experts equally. Micro-batch balancing keeps the rows alike; global-batch balancing lets domains
pick their own experts.</p>
<div class="legend">experts: {legend}</div>
<table class="grid"><tr><th class="row"></th>{head}</tr>
{chr(10).join(rows)}
</table></body></html>
"""


# ----------------------------------------------------------------------------
# 5. The PNG: the same picture, drawn by matplotlib.

def text_layout(sample, width):
    """(line, column) of every byte when the text is wrapped at `width`
    cells: a line break ends its line after taking a cell for its symbol."""
    places, line, col = [], 0, 0
    for b in sample:
        if col == width:
            line, col = line + 1, 0
        places.append((line, col))
        col += 1
        if b == 0x0A:
            line, col = line + 1, 0
    return places


def draw_sample(ax, sample, picks, colours, width):
    """One sample as a grid of coloured cells with the glyphs on top. The
    cells are one image (fast); only the glyphs are separate text objects."""
    places = text_layout(sample, width)
    n_lines = places[-1][0] + 1
    grid = torch.ones(n_lines, width, 3)
    for (line, col), p in zip(places, picks):
        c = top1_colour(p, colours)
        grid[line, col] = torch.tensor([int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", extent=(0, width, n_lines, 0))
    for (line, col), g, p in zip(places, glyphs(sample), picks):
        if g.strip():
            ax.text(col + 0.5, line + 0.55, g, ha="center", va="center", fontsize=8.3,
                    family="DejaVu Sans Mono", color=ink(top1_colour(p, colours)))
    ax.set_xticks([])
    ax.set_yticks([])


def draw_bars(ax, row, colours, top):
    E = len(row)
    ax.bar(range(E), row, width=0.85, color=colours)
    ax.axhline(sum(row) / E, color="#444", lw=0.8, ls="--")
    ax.set_ylim(0, top * 1.08)
    ax.set_xlim(-0.6, E - 0.4)
    ax.tick_params(labelsize=7)
    ax.spines[["top", "right"]].set_visible(False)


TITLE_PT = 8.5


def column_title(col, inches):
    """A column's heading, wrapped to the width of its axes: the strategy's
    summary is longer than one line of a narrow column. A character of
    DejaVu Sans is about 0.6 of the font size wide on average."""
    chars = max(20, int(inches * 72 / (0.6 * TITLE_PT)))
    return "\n".join([f"{col.model.cfg.balancer}: {col.path}"] + textwrap.wrap(col.title, chars))


def png_figure(columns, samples, freq_names, layer_label, path, width=80):
    """Rows: the samples, then one bar chart per domain; one column per
    checkpoint. Sizes follow the text so a cell stays readable."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cell_w, line_h, bar_h = 0.075, 0.16, 0.62       # inches
    lines = [text_layout(sample, width)[-1][0] + 1 for _, sample in samples]
    heights = [n * line_h for n in lines] + [bar_h] * len(freq_names)
    left = max(0.9, 0.35 + 0.075 * max(len(name) for name in freq_names))   # room for the row labels
    titles = [column_title(col, width * cell_w) for col in columns]
    head = 0.45 + 0.15 * max(t.count("\n") + 1 for t in titles)          # the titles, then the suptitle
    fig = plt.figure(figsize=(left + 0.1 + len(columns) * (width * cell_w + 0.45), sum(heights) + head + 0.65))
    grid = fig.add_gridspec(len(heights), len(columns), height_ratios=heights, left=left / fig.get_figwidth(),
                            right=0.99, top=1 - head / fig.get_figheight(), bottom=0.45 / fig.get_figheight(),
                            hspace=0.12, wspace=0.08)
    top = max(float(col.freq.max()) for col in columns) or 1.0
    for c, col in enumerate(columns):
        for s, (name, sample) in enumerate(samples):
            ax = fig.add_subplot(grid[s, c])
            draw_sample(ax, sample, col.picks[s], col.colours, width)
            if s == 0:
                ax.set_title(titles[c], fontsize=TITLE_PT)
            if c == 0:
                ax.set_ylabel(name, fontsize=10)
        for d, name in enumerate(freq_names):
            ax = fig.add_subplot(grid[len(samples) + d, c])
            draw_bars(ax, col.freq[d].tolist(), col.colours, top)
            if c == 0:
                ax.set_ylabel(name, fontsize=9, rotation=0, ha="right", va="center")
            else:
                ax.set_yticklabels([])
            if d < len(freq_names) - 1:
                ax.set_xticklabels([])
            else:
                ax.set_xlabel("expert: how often among a token's selections, per domain (Qiu et al. Fig. 1b)",
                              fontsize=8)
    fig.suptitle(f"Each byte coloured by its top-1 expert, {layer_label}", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------
# 6. The command line.

def positive(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def parse_args(argv=None):
    p = plumbing.OneLineParser(description="Colour every byte of a code, a math and a prose sample (or your text) by the "
                                  "expert it goes to, one column per checkpoint, with the per-domain expert "
                                  "frequencies of Qiu et al. 2025, Fig. 1b. Writes PREFIX.html and PREFIX.png.")
    p.prog = "python -m lab.show_routing"   # what --help and errors call it: it runs as a module
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="ckpt.pt files (or run folders) written by train.py")
    p.add_argument("--text", metavar="FILE", help="show this UTF-8 text file as the one sample")
    p.add_argument("--layer", type=int, metavar="L",
                   help="MoE layer to show, from 0; negative counts from the end (default: the middle one)")
    p.add_argument("--bytes", type=positive, metavar="N", help="bytes per sample (default: 256, or up to 2048 of a --text file)")
    p.add_argument("--val-seqs", type=positive, default=32, metavar="N",
                   help="validation sequences per domain for the bars (default: 32)")
    p.add_argument("--data", metavar="DIR",
                   help="the text folder the checkpoints were trained on (default: the built-in corpus)")
    p.add_argument("--out", metavar="PREFIX",
                   help="writes PREFIX.html and PREFIX.png (default: routing, in the first checkpoint's run folder)")
    return p.parse_args(argv)


def layer_index(layer, model, path):
    """--layer as a 0-based index into this model's layers, Python style.

    The default is the middle layer (layer 2 of 4 in the default preset:
    specialisation 0.105 under aux vs 0.223 under global_aux, one seed; the
    balance scope shows in every layer: 0.12 vs 0.26, 0.08 vs 0.16 and 0.13
    vs 0.32 in layers 0, 1 and 3; docs/routing.md)."""
    n = model.cfg.n_layers
    if layer is None:
        return n // 2
    if not -n <= layer < n:
        raise InputError(f"--layer {layer} is out of range: {path} has {n} layers "
                         f"(use 0..{n - 1}, or -1 for the last)")
    return layer % n


def run_folder(path):
    """The folder a checkpoint lives in (a run folder is its own): where the
    pictures of a run go, so that nothing lands in the current folder."""
    return path if os.path.isdir(path) else os.path.dirname(path) or "."


def write_file(path, write):
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        write(path)
    except OSError as e:
        raise InputError(f"cannot write {path} ({e.strerror}); choose another --out") from None


def main(argv=None):
    t0 = time.time()
    args = parse_args(argv)
    # The batches are a few thousand tokens: more threads only add
    # synchronisation, and on a busy 2-core machine that made a run 3x to 10x
    # slower than one thread.
    torch.set_num_threads(1)
    # the cheap checks first, so a typo fails before any model is built
    text = read_text(args.text) if args.text else None
    models = [(path, load_model(path)) for path in args.checkpoints]
    layers = [layer_index(args.layer, model, path) for path, model in models]
    corpus = data.load_corpus(args.data, seq_len=max(m.cfg.seq_len for _, m in models), log=lambda *a: None)

    if text is None:
        samples = builtin_samples(corpus, args.bytes or 256)
    else:
        shown = cut_bytes(text, args.bytes or 2048)
        if len(shown) < len(text):
            print(f"note: showing the first {len(shown)} of {len(text)} bytes of {args.text} (raise --bytes for more)")
        samples = [(os.path.basename(args.text), shown)]
    # the bars: every validation domain, and the --text sample as one more row
    freq_names = corpus.domains + ([samples[0][0]] if text is not None else [])

    columns = []
    for (path, model), layer in zip(models, layers):
        picks = route_samples(model, [sample for _, sample in samples], layer)
        g = group_size(model)         # about 16 sequences a batch, in whole groups
        batches = data.val_batches(corpus, model.cfg.seq_len, g * math.ceil(16 / g), args.val_seqs)
        freq = domain_frequency(model, batches, layer, len(corpus.domains))
        spread = train.specialization_score(freq[None])
        if text is not None:
            freq = torch.cat([freq, sample_frequency(picks[0], model.cfg.n_experts)[None]])
        columns.append(Column(path, model, layer, picks, freq, spread))

    layer_label = "layer " + ", ".join(str(v) for v in sorted(set(layers)))
    args.out = args.out or os.path.join(run_folder(args.checkpoints[0]), "routing")
    page = html_page(columns, samples, freq_names, layer_label)
    write_file(args.out + ".html", lambda p: Path(p).write_text(page, encoding="utf-8"))
    write_file(args.out + ".png", lambda p: png_figure(columns, samples, freq_names, layer_label, p))
    print(f"wrote {args.out}.html and {args.out}.png ({len(columns)} checkpoint(s), {layer_label}) "
          f"in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    plumbing.cli(main)      # a problem with the input: one line on stderr, exit code 2
