"""Pictures for reviewers: ranked lists of retrieved gallery images and CMC curves, as PIL images / PNG files.

A ranked list shows the query (blue border) followed by its nearest gallery images in the evaluation protocol's
order (distance, ties by gallery index; see ``reid_core.metrics.rank``): a green border is a correct match (same
person, another camera), red a wrong person, grey a *junk* image (same person, same camera), which the protocol
removes from the ranking: it is shown where the model put it but carries no rank number.

No storage access here: pass images already opened, as bytes, or as local paths (``reid_core.storage`` reads S3).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

QUERY_COLOR = (40, 90, 220)
CORRECT_COLOR = (0, 170, 0)
WRONG_COLOR = (220, 0, 0)
JUNK_COLOR = (150, 150, 150)
BORDER = 4  # border width in pixels
GAP = 6  # pixels between cells
_QUERY_GAP = 18  # extra pixels between the query and the gallery images
_CAPTION = 30  # pixels of caption under each cell


def to_pil_image(image) -> Image.Image:
    """An RGB PIL image from a PIL image, encoded bytes, a local path, an (H, W[, 3]) numpy array (uint8, or float
    in [0, 1]) or a (3, H, W) / (H, W) torch tensor (uint8, or float in [0, 1])."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image)).convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        image = (t.permute(1, 2, 0) if t.ndim == 3 else t).numpy()
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3):
            raise ValueError(f"image array must be (H, W) or (H, W, 3) (tensors (3, H, W)), got shape {image.shape}")
        if a.dtype != np.uint8:
            a = np.clip(np.asarray(a, dtype=np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    raise ValueError(f"cannot make an image from {type(image).__name__}: pass a PIL image, bytes, a path or an array")


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _cell(image, border_color: tuple[int, int, int], cell_size: tuple[int, int]) -> Image.Image:
    h, w = cell_size
    framed = Image.new("RGB", (w + 2 * BORDER, h + 2 * BORDER), border_color)
    framed.paste(to_pil_image(image).resize((w, h), Image.Resampling.BILINEAR), (BORDER, BORDER))
    return framed


def nearest_gallery(distances, *, count: int) -> np.ndarray:
    """Indices of the ``count`` smallest distances, ordered by (distance, gallery index), without a full sort.

    Args:
        distances: (G,) one query's distances to the gallery.
        count: how many to return (clipped to G).
    """
    d = np.asarray(distances.detach().cpu().numpy() if isinstance(distances, torch.Tensor) else distances)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"distances must be a non-empty 1-D array (one query's row), got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("distances contain NaN or infinite values")
    count = min(int(count), d.size)
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    kth = np.partition(d, count - 1)[count - 1]
    candidates = np.flatnonzero(d <= kth)  # increasing index; the stable sort keeps it among equal distances
    return candidates[np.argsort(d[candidates], kind="stable")][:count]


def ranked_list_figure(
    query_image,
    gallery_images: Sequence | Callable[[int], object],
    distances,
    *,
    query_pid: int,
    query_camid: int,
    gallery_pids,
    gallery_camids,
    top_k: int = 10,
    show_junk: bool = True,
    cell_size: tuple[int, int] = (128, 64),
    path: str | os.PathLike | None = None,
) -> Image.Image:
    """One row: the query, then its ``top_k`` highest-ranked gallery images with right/wrong/junk borders.

    Args:
        query_image: the query picture (anything ``to_pil_image`` accepts).
        gallery_images: gallery pictures indexed by gallery index (a list of paths is fine: only the shown ones are
            opened), or a function from gallery index to picture.
        distances: (G,) the query's distances to the gallery (smaller = more similar).
        query_pid, query_camid: the query's person and camera ids.
        gallery_pids, gallery_camids: (G,) the gallery's person and camera ids.
        top_k: how many ranked (non-junk) gallery images to show.
        show_junk: also show, in grey and unnumbered, junk images ranked among them.
        cell_size: (height, width) of each picture in pixels (re-ID crops are 2:1).
        path: if given, the figure is also written there as PNG (parent folders created).

    Returns:
        The RGB figure.
    """
    g_pids = np.asarray(gallery_pids)
    g_cams = np.asarray(gallery_camids)
    d = np.asarray(distances.detach().cpu().numpy() if isinstance(distances, torch.Tensor) else distances)
    if not (d.ndim == 1 and g_pids.shape == d.shape and g_cams.shape == d.shape):
        raise ValueError(
            f"distances, gallery_pids and gallery_camids must be 1-D of equal length, got shapes {d.shape}, "
            f"{g_pids.shape}, {g_cams.shape}"
        )
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    junk = (g_pids == query_pid) & (g_cams == query_camid)
    order = nearest_gallery(d, count=top_k + int(junk.sum()))
    entries: list[tuple[int, int | None]] = []  # (gallery index, rank or None for junk)
    rank = 0
    for gi in order:
        if junk[gi]:
            if show_junk:
                entries.append((int(gi), None))
            continue
        rank += 1
        entries.append((int(gi), rank))
        if rank == top_k:
            break

    load = gallery_images if callable(gallery_images) else gallery_images.__getitem__
    h, w = cell_size
    cw, ch = w + 2 * BORDER, h + 2 * BORDER
    width = GAP + cw + _QUERY_GAP + len(entries) * (cw + GAP)
    figure = Image.new("RGB", (width, ch + _CAPTION + 2 * GAP), (255, 255, 255))
    draw = ImageDraw.Draw(figure)
    font = _font(11)
    figure.paste(_cell(query_image, QUERY_COLOR, cell_size), (GAP, GAP))
    draw.text((GAP, GAP + ch + 2), f"query\nid {query_pid} c{query_camid}", fill=(0, 0, 0), font=font)
    x = GAP + cw + _QUERY_GAP
    for gi, r in entries:
        if r is None:
            color, caption = JUNK_COLOR, "junk"
        else:
            color = CORRECT_COLOR if g_pids[gi] == query_pid else WRONG_COLOR
            caption = f"#{r} "
        figure.paste(_cell(load(gi), color, cell_size), (x, GAP))
        caption += f" id {g_pids[gi]}\nc{g_cams[gi]} d={d[gi]:.3g}"
        draw.text((x, GAP + ch + 2), caption, fill=(0, 0, 0), font=font)
        x += cw + GAP
    if path is not None:
        _save_png(figure, path)
    return figure


def ranked_lists_page(figures: Sequence[Image.Image], *, path: str | os.PathLike | None = None) -> Image.Image:
    """Stack ranked-list figures (one query per row) into one page; optionally write it as PNG."""
    if not figures:
        raise ValueError("ranked_lists_page needs at least one figure")
    width = max(f.width for f in figures)
    page = Image.new("RGB", (width, sum(f.height for f in figures)), (255, 255, 255))
    y = 0
    for f in figures:
        page.paste(f, (0, y))
        y += f.height
    if path is not None:
        _save_png(page, path)
    return page


def _save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    image.save(p, format="PNG")
    return p


def cmc_curve_png(
    cmc: np.ndarray | Sequence[float] | Mapping[str, np.ndarray | Sequence[float]],
    path: str | os.PathLike,
    *,
    title: str = "CMC",
    max_rank: int | None = None,
) -> Path:
    """Write a CMC curve (or several, given as ``{name: cmc}``) as a PNG; returns the path.

    Args:
        cmc: (R,) matching rates in [0, 1] for ranks 1..R (``RankResult.cmc``), or a mapping of names to such arrays.
        path: the PNG file to write (parent folders created).
        title: the plot's title.
        max_rank: plot ranks 1..max_rank only (default: all).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # a dependency of mlflow; imported when plotting
    from matplotlib.figure import Figure

    curves = dict(cmc) if isinstance(cmc, Mapping) else {"": cmc}
    if not curves:
        raise ValueError("cmc_curve_png needs at least one curve")
    fig = Figure(figsize=(5, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, values in curves.items():
        v = np.asarray(values, dtype=np.float64)
        if v.ndim != 1 or v.size == 0:
            raise ValueError(f"CMC curve {name!r} must be a non-empty 1-D array, got shape {v.shape}")
        if not np.all(np.isfinite(v)) or v.min() < 0 or v.max() > 1 or np.any(np.diff(v) < 0):
            raise ValueError(f"CMC curve {name!r} must be non-decreasing values in [0, 1]")
        if max_rank is not None:
            v = v[:max_rank]
        label = f"{name} (rank-1 {100 * v[0]:.1f}%)" if name else f"rank-1 {100 * v[0]:.1f}%"
        ax.plot(np.arange(1, len(v) + 1), 100 * v, marker="." if len(v) <= 50 else None, label=label)
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png")
    return p


def lambda_heatmap_png(
    grids: Mapping[str, np.ndarray],
    lambda1: Sequence[float],
    lambda2: Sequence[float],
    path: str | os.PathLike,
    *,
    title: str = "",
) -> Path:
    """Write heat maps of retrieval metrics over the λ1 × λ2 grid (one panel per metric, side by side) as a PNG.

    Args:
        grids: {panel title, e.g. "mAP": (len(lambda1), len(lambda2)) values in [0, 1]}; NaN = no result (a trial
            that failed or was stopped early), drawn grey and marked "–". Values are shown in percent.
        lambda1, lambda2: the grid's axis values (rows: λ1, columns: λ2).
        path: the PNG file to write (parent folders created).
        title: the figure's title (e.g. the guidance mode and the dataset).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not grids:
        raise ValueError("lambda_heatmap_png needs at least one metric grid")
    shape = (len(lambda1), len(lambda2))
    fig = Figure(figsize=(1.6 + 2.2 * len(grids) + 0.5 * len(grids) * max(shape[1] - 3, 0), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    for k, (name, values) in enumerate(grids.items()):
        v = np.asarray(values, dtype=np.float64)
        if v.shape != shape:
            raise ValueError(f"heat map {name!r}: expected shape {shape} (λ1 × λ2), got {v.shape}")
        finite = v[np.isfinite(v)]
        if finite.size and (finite.min() < 0 or finite.max() > 1):
            raise ValueError(f"heat map {name!r}: values must be fractions in [0, 1]")
        ax = fig.add_subplot(1, len(grids), k + 1)
        cmap = colormaps["viridis"].with_extremes(bad=(0.8, 0.8, 0.8))
        image = ax.imshow(100 * np.ma.masked_invalid(v), cmap=cmap, origin="lower", aspect="auto")
        bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        bar.formatter.set_useOffset(False)  # close values: plain numbers, not an offset
        for i in range(shape[0]):
            for j in range(shape[1]):
                finite_cell = bool(np.isfinite(v[i, j]))
                text = f"{100 * v[i, j]:.2f}" if finite_cell else "–"
                bright = finite_cell and image.norm(100 * v[i, j]) > 0.6  # dark text on viridis' yellow end
                color = "k" if bright or not finite_cell else "w"
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(shape[1]), [f"{x:g}" for x in lambda2])
        ax.set_yticks(range(shape[0]), [f"{x:g}" for x in lambda1])
        ax.set_xlabel("λ2 (generated)")
        ax.set_ylabel("λ1 (real)")
        ax.set_title(f"{name} (%)")
    return save_figure(fig, path, title=title)


def save_figure(fig, path: str | os.PathLike, *, title: str = "") -> Path:
    """Give a matplotlib ``Figure`` its title, lay it out and write it as a PNG at ``path`` (folders made)."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, format="png")
    return p


def ablation_png(summary: list[dict], path: str | os.PathLike, *, title: str = "") -> Path:
    """Bar chart: Rank-1, mAP, mINP (%) per recipe and condition, mean with ± sd error bars."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not summary:
        raise ValueError("ablation_png: nothing to plot")
    fig = Figure(figsize=(10, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    labels = [f"{e['recipe']}\n{e['condition']}" for e in summary]
    for k, (m, name) in enumerate(zip(("rank1", "mAP", "mINP"), ("Rank-1", "mAP", "mINP"), strict=True)):
        ax = fig.add_subplot(1, 3, k + 1)
        means = np.array([100 * e[f"{m}_mean"] for e in summary], dtype=float)
        sds = np.nan_to_num(np.array([100 * e[f"{m}_sd"] for e in summary], dtype=float))
        colors = ["#888888" if e["condition"] == "none" else "#2b7bba" if e["condition"] == "distractor_class"
                  else "#e08a1e" for e in summary]  # fmt: skip
        ax.bar(range(len(summary)), np.nan_to_num(means), yerr=sds, color=colors, capsize=3)
        ax.set_xticks(range(len(summary)), labels, fontsize=7)
        ax.set_title(f"{name} (%)")
        ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path, title=title)
