"""
Tests of lab/show_routing.py: the page shows every byte once, in the colour of
the expert the model really chose; expert choice's "no expert" and "several
experts" survive the trip; checkpoints become columns; a bad input is one
line and exit code 2.

The checkpoints are made here, by train.main with the tiny preset and two
steps, so they have exactly the format train.py writes.
"""

import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import plumbing
import train
from lab import show_routing

ROOT = Path(__file__).resolve().parent.parent

LAYER = 1                     # the tiny preset has 2 layers; show the second


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for balancer in ("aux", "expert_choice"):
        out = root / balancer
        assert train.main(["--preset", "tiny", "--steps", "2", "--balancer", balancer, "--out", str(out)]) == 0
        paths[balancer] = str(out / "ckpt.pt")
    return paths


class Page(HTMLParser):
    """What a program can read back from the page: the byte spans of every
    (checkpoint, sample) cell, the column headers and the bars."""

    def __init__(self, path):
        super().__init__()
        self.cells, self.columns, self.freq_cells, self.bars = {}, 0, 0, []
        self.cell = None
        self.feed(Path(path).read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td":
            self.cell = (int(a["data-ckpt"]), int(a["data-sample"])) if "data-sample" in a else None
            if self.cell:
                self.cells[self.cell] = []
            self.freq_cells += a.get("class") == "freq"
        elif tag == "th" and a.get("class") == "ckpt":
            self.columns += 1
        elif tag == "span" and self.cell and "data-pos" in a:
            self.cells[self.cell].append(a)
        elif tag == "div" and "title" in a and "expert" in a["title"]:
            self.bars.append(a["title"])


def experts_of(span):
    """The (expert, weight) pairs a span lists, largest weight first."""
    pairs = [p.split(":") for p in span["data-experts"].split()]
    return [(int(e), float(w)) for e, w in pairs]


def background(span):
    return dict(part.split(":") for part in span["style"].split(";"))["background"]


def run(*argv):
    assert show_routing.main([str(a) for a in argv]) == 0


# ----------------------------------------------------------------------------
# The page shows the routing the model computes.

TEXT = "def f(x):\n\treturn x + 1  # naïve café, 3 × 4 = 12\n" * 3   # > 2 windows of 64, with UTF-8


@pytest.fixture(scope="module")
def text_page(ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    (root / "sample.txt").write_text(TEXT, encoding="utf-8")
    run(ckpts["aux"], "--text", root / "sample.txt", "--layer", LAYER, "--val-seqs", 2, "--out", root / "r")
    return Page(root / "r.html")


def router_top_k(model, windows, layer):
    """Recompute token choice independently of the Routing objects: read the
    router's logits with a hook and take the softmax top-k by hand."""
    seen = []
    hook = model.blocks[layer].moe.router.register_forward_hook(lambda mod, inp, out: seen.append(out))
    with torch.no_grad():
        for w in windows:
            model(torch.tensor([list(w)] * 2))          # aux routes whole balance groups of 2 sequences
    hook.remove()
    k = model.cfg.top_k
    return [logits[0].softmax(-1).topk(k, dim=-1) for logits in seen]


def test_every_byte_of_the_sample_appears_once_coloured_by_its_top1_expert(ckpts, text_page):
    spans = text_page.cells[0, 0]
    data = TEXT.encode("utf-8")
    assert [int(s["data-byte"]) for s in spans] == list(data)
    assert [int(s["data-pos"]) for s in spans] == list(range(len(data)))

    # the documented windows: 64 bytes each, the last one slid back to end on
    # the last byte, every byte taken from the first window that covers it
    model = show_routing.load_model(ckpts["aux"])
    T = model.cfg.seq_len
    starts = list(range(0, len(data) - T, T)) + [len(data) - T]
    top = router_top_k(model, [data[s:s + T] for s in starts], LAYER)
    colours = show_routing.expert_colours(model.cfg.n_experts)
    for pos, span in enumerate(spans):
        w = next(i for i, s in enumerate(starts) if s <= pos < s + T)
        t = pos - starts[w]
        expected = top[w].indices[t].tolist()
        shown = experts_of(span)
        assert [e for e, _ in shown] == expected, f"byte {pos}"
        assert background(span) == colours[expected[0]], f"byte {pos}"
        torch.testing.assert_close(torch.tensor([w for _, w in shown]), top[w].values[t], atol=1e-4, rtol=0)


def test_a_text_sample_gets_its_own_row_of_bars_beside_the_validation_domains(text_page):
    domains = {title.split(",")[0] for title in text_page.bars}
    assert domains == {"code", "math", "prose", "sample.txt"}


@pytest.fixture(scope="module")
def two_columns(ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    run(ckpts["aux"], ckpts["expert_choice"], "--layer", LAYER, "--bytes", 128, "--val-seqs", 4,
        "--out", root / "r")
    return root / "r", Page(root / "r.html")


def test_two_checkpoints_give_two_columns_side_by_side(two_columns):
    _, page = two_columns
    assert page.columns == 2 and page.freq_cells == 2
    assert sorted(page.cells) == [(c, s) for c in range(2) for s in range(3)]   # code, math, prose
    for s in range(3):
        assert [x["data-byte"] for x in page.cells[0, s]] == [x["data-byte"] for x in page.cells[1, s]]


def test_under_expert_choice_a_byte_may_have_no_expert_or_several_and_the_page_shows_which(ckpts, two_columns):
    """Expert choice routes the windows of all samples as one batch (code,
    math, prose, in order), so the test can route that batch and compare."""
    _, page = two_columns
    model = show_routing.load_model(ckpts["expert_choice"])
    T = model.cfg.seq_len
    samples = [bytes(int(x["data-byte"]) for x in page.cells[1, s]) for s in range(3)]
    windows = [sample[i:i + T] for sample in samples for i in range(0, len(sample), T)]
    with torch.no_grad():
        routing = model(torch.tensor([list(w) for w in windows])).routings[LAYER]
    expected = [[] for _ in range(len(windows) * T)]
    for tok, e in zip(routing.token_idx.tolist(), routing.expert_idx.tolist()):
        expected[tok].append(e)
    shown = [sorted(e for e, _ in experts_of(x)) for s in range(3) for x in page.cells[1, s]]
    assert shown == [sorted(e) for e in expected]
    assert any(len(e) == 0 for e in shown) and any(len(e) >= 2 for e in shown)
    colours = show_routing.expert_colours(model.cfg.n_experts)
    for x in (x for s in range(3) for x in page.cells[1, s]):
        pairs = experts_of(x)
        assert background(x) == (colours[pairs[0][0]] if pairs else show_routing.NO_EXPERT)


def test_token_choice_bars_add_up_to_top_k_per_domain(two_columns):
    """Each token is among exactly k experts' selections, so a domain's
    frequencies (Qiu et al. Fig. 1b) sum to k for the aux checkpoint."""
    _, page = two_columns
    sums = {}
    for title in page.bars[:3 * 8]:                     # the first column: 3 domains x 8 experts
        domain, value = title.split(",")[0], float(title.rsplit(":", 1)[1])
        sums[domain] = sums.get(domain, 0) + value
    assert sums.keys() == {"code", "math", "prose"}
    for total in sums.values():
        assert total == pytest.approx(2, abs=0.01)


def test_png_is_written(two_columns):
    prefix, _ = two_columns
    png = Path(f"{prefix}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_without_out_the_pages_go_next_to_the_first_checkpoint_not_the_current_folder(ckpts, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_folder = Path(ckpts["aux"]).parent
    run(run_folder, ckpts["expert_choice"], "--bytes", 32, "--val-seqs", 1)
    assert (run_folder / "routing.html").is_file() and (run_folder / "routing.png").is_file()
    assert list(tmp_path.iterdir()) == []


def test_a_long_column_title_is_wrapped_to_the_width_of_its_column(ckpts):
    """The strategy's summary is longer than one line of a column; cut at the
    figure's edge it lost its last words (the specialisation figure)."""
    model = show_routing.load_model(ckpts["expert_choice"])
    col = show_routing.Column("runs/expert_choice/ckpt.pt", model, LAYER, [], torch.zeros(3, 8), 0.123)
    title = show_routing.column_title(col, 80 * 0.075)
    assert title.replace("\n", " ").endswith("specialisation 0.123")
    assert len(title.splitlines()) >= 3 and max(len(line) for line in title.splitlines()) <= 100


def test_the_page_loads_nothing_from_the_network(two_columns):
    prefix, _ = two_columns
    page = Path(f"{prefix}.html").read_text(encoding="utf-8")
    for needle in ("http://", "https://", "<script", "src=", "@import"):
        assert needle not in page


# ----------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, no traceback, nothing written.

def bad_inputs(root, ckpts):
    (root / "notes.pt").write_text("these are my notes, not a checkpoint\n")
    whole = Path(ckpts["aux"]).read_bytes()
    (root / "truncated.pt").write_bytes(whole[:len(whole) // 2])
    ckpt = torch.load(ckpts["aux"], map_location="cpu", weights_only=False)
    ckpt["config"]["balance"]["new_knob"] = 1
    torch.save(ckpt, root / "newer.pt")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (root / "latin.txt").write_bytes("déjà vu à la carte, façade, garçon ".encode("latin-1") * 20)
    (root / "empty.txt").write_bytes(b"")
    return {
        "missing checkpoint": [root / "nowhere.pt"],
        "text file named .pt": [root / "notes.pt"],
        "truncated checkpoint": [root / "truncated.pt"],
        "config field this code does not know": [root / "newer.pt"],
        "binary --text": [ckpts["aux"], "--text", root / "binary.txt"],
        "--text not UTF-8": [ckpts["aux"], "--text", root / "latin.txt"],
        "empty --text": [ckpts["aux"], "--text", root / "empty.txt"],
        "missing --text": [ckpts["aux"], "--text", root / "nowhere.txt"],
        "--layer past the last": [ckpts["aux"], "--layer", 2],
        "--layer before the first": [ckpts["aux"], "--layer", -3],
        "--bytes zero": [ckpts["aux"], "--bytes", 0],
    }


CASES = ["missing checkpoint", "text file named .pt", "truncated checkpoint", "config field this code does not know",
         "binary --text", "--text not UTF-8", "empty --text", "missing --text", "--layer past the last",
         "--layer before the first", "--bytes zero"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_code_2(ckpts, tmp_path, capsys, case):
    argv = bad_inputs(tmp_path, ckpts)[case] + ["--out", tmp_path / "r"]
    with pytest.raises(SystemExit) as exit_:
        plumbing.cli(lambda: show_routing.main([str(a) for a in argv]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "r.html").exists()


def test_bad_input_from_the_command_line_is_one_line_and_exit_code_2(ckpts, tmp_path):
    """The same through a real process, as a user types it."""
    res = subprocess.run([sys.executable, "-m", "lab.show_routing", ckpts["aux"], "--layer", "7",
                          "--out", str(tmp_path / "r")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "--layer 7" in res.stderr
