"""Ranked-list pictures and CMC curves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reid_core import viz

CELL = (32, 16)  # (height, width)


def count_color(image: Image.Image, color) -> int:
    """Pixels of exactly ``color`` in the picture strip (above the captions, whose anti-aliased text has greys)."""
    strip = np.asarray(image)[: viz.GAP + CELL[0] + 2 * viz.BORDER]
    return int(np.all(strip == np.array(color, dtype=np.uint8), axis=2).sum())


def band_area() -> int:
    h, w = CELL
    return (h + 2 * viz.BORDER) * (w + 2 * viz.BORDER) - h * w


def test_nearest_gallery_orders_by_distance_then_index():
    d = np.array([0.5, 0.1, 0.3, 0.1, 0.3, 0.9])
    np.testing.assert_array_equal(viz.nearest_gallery(d, count=4), [1, 3, 2, 4])
    np.testing.assert_array_equal(viz.nearest_gallery(torch.tensor(d), count=10), [1, 3, 2, 4, 0, 5])
    with pytest.raises(ValueError, match="NaN"):
        viz.nearest_gallery(np.array([0.0, np.nan]), count=1)


def test_ranked_list_borders_ranks_and_junk(tmp_path):
    rng = np.random.default_rng(0)
    gallery = [rng.integers(30, 60, size=(40, 20, 3), dtype=np.uint8) for _ in range(8)]
    # gallery index:        0    1    2    3    4    5    6    7
    distances = np.array([0.40, 0.10, 0.20, 0.30, 0.50, 0.60, 0.70, 0.05])
    pids = np.array([3, 3, 9, 3, 9, 9, 9, 3])
    cams = np.array([1, 2, 2, 0, 2, 2, 2, 0])  # query camera 0: indices 3 and 7 are junk
    opened = []

    def load(i):
        opened.append(i)
        return gallery[i]

    fig = viz.ranked_list_figure(
        gallery[0],
        load,
        distances,
        query_pid=3,
        query_camid=0,
        gallery_pids=pids,
        gallery_camids=cams,
        top_k=4,
        cell_size=CELL,
        path=tmp_path / "sub" / "list.png",
    )
    # order: 7 (junk) 1 (right) 2 (wrong) 3 (junk) 0 (right) 4 (wrong) -> 4 ranked + 2 junk cells
    assert opened == [7, 1, 2, 3, 0, 4]
    assert count_color(fig, viz.CORRECT_COLOR) == 2 * band_area()
    assert count_color(fig, viz.WRONG_COLOR) == 2 * band_area()
    assert count_color(fig, viz.JUNK_COLOR) == 2 * band_area()
    assert count_color(fig, viz.QUERY_COLOR) == band_area()
    with Image.open(tmp_path / "sub" / "list.png") as saved:
        assert saved.size == fig.size

    no_junk = viz.ranked_list_figure(
        torch.rand(3, 40, 20),
        gallery,
        distances,
        query_pid=3,
        query_camid=0,
        gallery_pids=pids,
        gallery_camids=cams,
        top_k=4,
        show_junk=False,
        cell_size=CELL,
    )
    assert count_color(no_junk, viz.JUNK_COLOR) == 0
    assert no_junk.width < fig.width


def test_ranked_list_reads_paths_and_pages(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"g{i}.png"
        Image.new("RGB", (10, 20), (10 * i, 0, 0)).save(p)
        paths.append(str(p))
    fig = viz.ranked_list_figure(
        paths[0],
        paths,
        [0.3, 0.2, 0.1],
        query_pid=1,
        query_camid=0,
        gallery_pids=[1, 2, 1],
        gallery_camids=[1, 1, 1],
        top_k=10,
        cell_size=CELL,
    )
    assert count_color(fig, viz.CORRECT_COLOR) == 2 * band_area()
    page = viz.ranked_lists_page([fig, fig], path=tmp_path / "page.png")
    assert page.size == (fig.width, 2 * fig.height)
    assert (tmp_path / "page.png").stat().st_size > 0


def test_ranked_list_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="equal length"):
        viz.ranked_list_figure(
            np.zeros((4, 4)),
            [np.zeros((4, 4))] * 2,
            [0.1, 0.2],
            query_pid=0,
            query_camid=0,
            gallery_pids=[0, 1, 2],
            gallery_camids=[0, 0],
        )


def test_to_pil_image_inputs():
    assert viz.to_pil_image(np.zeros((5, 4))).size == (4, 5)
    assert viz.to_pil_image(torch.ones(3, 6, 2)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match="cannot make an image"):
        viz.to_pil_image(42)
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, 3\)"):
        viz.to_pil_image(np.zeros((4, 4, 5)))


def test_cmc_curve_png(tmp_path):
    out = viz.cmc_curve_png(np.linspace(0.3, 1.0, 50), tmp_path / "plots" / "cmc.png", max_rank=20)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 100
    out2 = viz.cmc_curve_png({"plain": [0.5, 0.7, 0.8], "re-ranked": [0.6, 0.75, 0.9]}, tmp_path / "two.png")
    assert out2.stat().st_size > 0
    with pytest.raises(ValueError, match="non-decreasing"):
        viz.cmc_curve_png([0.5, 0.4], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="non-empty 1-D"):
        viz.cmc_curve_png(np.zeros((2, 2)), tmp_path / "bad.png")
