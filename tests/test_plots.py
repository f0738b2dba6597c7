"""The run figures (ds_cl/training/plots.py): real PNGs of a sensible size that show what they should."""

import math

import numpy as np
import pytest
from matplotlib.image import imread

from ds_cl.training.plots import heatmap, loss_curve, protected_share

GREY = (0xDD, 0xDD, 0xDD)  # cells not evaluated


def read(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(path)  # floats in 0..1, (h, w, 3 or 4)
    h, w = img.shape[:2]
    assert 200 <= h <= 2000 and 300 <= w <= 2500, img.shape
    return np.round(img[..., :3] * 255).astype(int)


def count(img, rgb):
    return int(np.all(img == rgb, axis=-1).sum())


def test_heatmap_lower_triangle(tmp_path):
    heatmap([[0.82], [0.61, 0.9], [0.55, 0.7, 0.93]], tmp_path / "m.png")
    img = read(tmp_path / "m.png")
    assert count(img, GREY) > 1000  # the 3 unseen cells above the diagonal
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # text, colours, colour bar: not a blank image


def test_heatmap_cells_and_colour_bar_share_one_scale(tmp_path):
    """Cells print score x 100; the colours and the colour bar's ticks are on that scale too (0-100), not 0-1."""
    fig = heatmap([[0.82], [0.61, 0.9]], tmp_path / "m.png")
    ax, bar = fig.axes
    im = ax.images[0]
    assert (im.norm.vmin, im.norm.vmax) == (0, 100)
    assert np.ma.getdata(im.get_array())[1, 1] == pytest.approx(90.0)
    assert sorted(t.get_text() for t in ax.texts) == ["61.0", "82.0", "90.0"]
    ticks = bar.get_yticks()
    assert ticks.min() == 0 and ticks.max() == 100, ticks
    assert "100" in bar.get_ylabel()


def test_heatmap_full_names_and_none(tmp_path):
    heatmap([[0.5, 0.2], [0.4, 0.9]], tmp_path / "full.png", tasks=["sst2", "boolq"])
    assert count(read(tmp_path / "full.png"), GREY) < 100  # (a few antialiased text pixels)
    heatmap([[0.5, None], [0.4, 0.9]], tmp_path / "none.png")
    assert count(read(tmp_path / "none.png"), GREY) > 1000
    heatmap([[0.5] * i for i in range(1, 16)], tmp_path / "big.png")  # 15 tasks: grows, within bounds
    assert read(tmp_path / "big.png").shape[1] > read(tmp_path / "full.png").shape[1]


@pytest.mark.parametrize("n", [1, 16, 900])
def test_loss_curve(tmp_path, n):
    losses = [3 * math.exp(-(i % (n // 2 or 1)) / 50) + 0.1 * (i % 7) for i in range(n)]
    if n > 100:
        losses[400] = float("nan")  # a skipped non-finite step leaves a gap
    fig = loss_curve(losses, [n // 2, n], tmp_path / "loss.png", tasks=["a", "b"] if n > 1 else None)
    img = read(tmp_path / "loss.png")
    coloured = img.max(axis=-1) - img.min(axis=-1) > 80  # the curves (grey text and grid are not)
    assert coloured.sum() > (20 if n == 1 else 300)  # the curve is drawn
    ax = fig.axes[0]
    assert ax.get_xlabel() == "optimizer step" and ax.get_ylabel() == "loss"
    if n > 1:  # one colour and one legend entry per task, named; the boundary marked
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend[:2] == ["a", "b"] and "task boundary" in legend
        colours = {line.get_color() for line in ax.get_lines() if line.get_label() in ("a", "b")}
        assert len(colours) == 2


def test_loss_curve_with_osft_leak_panel_and_named_heatmap(tmp_path):
    fig = loss_curve([2.0, 1.5, 1.2, 2.2, 1.0, 0.8], [3], tmp_path / "loss.png", tasks=["city", "sport"],
                     leaks=[(1, 1e-6), (4, 8e-7)])
    read(tmp_path / "loss.png")
    loss_ax, leak_ax = fig.axes[:2]
    assert leak_ax.get_yscale() == "log" and leak_ax.get_ylabel() == "leak"
    assert leak_ax.get_xlabel() == "optimizer step" and loss_ax.get_ylabel() == "loss"
    fig = heatmap([[0.9], [0.5, 1.0]], tmp_path / "m.png", tasks=["city", "sport"], title="osft (AA 75.0, BWT -40.0)")
    read(tmp_path / "m.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0: city", "1: sport"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0: city", "1: sport"]
    assert "AA 75.0" in ax.get_title() and ax.get_xlabel() and ax.get_ylabel()


def test_loss_curve_without_steps(tmp_path):
    loss_curve([], [], tmp_path / "loss.png")
    read(tmp_path / "loss.png")


def test_protected_share_per_layer(tmp_path):
    """osft's protected.png: layers in index order on x (10 after 9, targets outside layers last), one line
    per protected.jsonl record with its share x 100 per layer."""
    from ds_cl.methods.osft import protected_record

    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (64, 32) for i in range(11)}
    shapes["lm_head.weight"] = (400, 32)
    recs = [protected_record(0, "a", "fit", {n: 16 for n in shapes}, shapes),
            protected_record(1, "b", "extend", {n: 16 + i for i, n in enumerate(shapes)}, shapes,
                             {n: i for i, n in enumerate(shapes)}, "inputs")]
    assert recs[1]["layers"]["model.layers.10"] == 26 / 32 and recs[1]["layers"]["other"] == 27 / 32
    fig = protected_share(recs, tmp_path / "protected.png")
    read(tmp_path / "protected.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(i) for i in range(11)] + ["other"]
    lines = ax.get_lines()
    assert len(lines) == 2 and list(lines[1].get_ydata()) == pytest.approx([100 * (16 + i) / 32 for i in range(12)])
    assert "extend (inputs)" in lines[1].get_label() and "fit: 50.0%" in lines[0].get_label()
    assert recs[0]["kind"] is None and recs[1]["kind"] == "inputs"
    protected_share([], tmp_path / "empty.png")
    read(tmp_path / "empty.png")
