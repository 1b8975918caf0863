"""Draw the documentation's figures into docs/_static/: ``python docs/figures.py``.

Pixel (i, j) is drawn as the unit square centred on (x, y) = (j, i), so a sample at pixel coordinates (x, y)
is placed where deformcp's bilinear rule reads it. The sample positions come from deformcp itself
(affine_grid) or from the rules written on each op's page.
"""
import pathlib

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

import deformcp

STATIC = pathlib.Path(__file__).resolve().parent / "_static"
SAMPLE, BOX, POINT = "#ef4444", "#2563eb", "#22c55e"


def _figure(columns: int, width: float, height: float):
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, columns, squeeze=False)[0]


def _pixels(ax, H: int, W: int, image=None):
    """The H × W pixel squares, pixel centres at integer (x, y), y down."""
    if image is not None:
        ax.imshow(image, cmap="gray", vmin=0, vmax=1, extent=(-0.5, W - 0.5, H - 0.5, -0.5))
    for k in range(H + 1):
        ax.plot([-0.5, W - 0.5], [k - 0.5, k - 0.5], color="0.75", lw=0.5)
    for k in range(W + 1):
        ax.plot([k - 0.5, k - 0.5], [-0.5, H - 0.5], color="0.75", lw=0.5)
    ax.set_xlim(-1, W)
    ax.set_ylim(H, -1)
    ax.set_aspect("equal")
    ax.set_xticks(range(0, W, 2))
    ax.set_yticks(range(0, H, 2))


def grid_sample_figure(path):
    """affine_grid + grid_sample: where the output pixels sample the input, for both align_corners rules."""
    H = W = 8
    angle = np.deg2rad(20)
    theta = np.array([[[0.7 * np.cos(angle), -0.7 * np.sin(angle), 0.15],
                       [0.7 * np.sin(angle), 0.7 * np.cos(angle), -0.1]]])
    image = 0.35 + 0.5 * np.random.default_rng(0).random((H, W))
    figure, axes = _figure(2, 9, 4.6)
    for ax, align in zip(axes, (False, True)):
        grid = deformcp.affine_grid(theta, (1, 1, 6, 6), align_corners=align)[0]
        if align:
            x, y = (grid[..., 0] + 1) / 2 * (W - 1), (grid[..., 1] + 1) / 2 * (H - 1)
        else:
            x, y = ((grid[..., 0] + 1) * W - 1) / 2, ((grid[..., 1] + 1) * H - 1) / 2
        _pixels(ax, H, W, image)
        ax.plot(x, y, color=SAMPLE, lw=0.6)
        ax.plot(x.T, y.T, color=SAMPLE, lw=0.6)
        ax.scatter(x.ravel(), y.ravel(), s=14, c=SAMPLE, zorder=3)
        ax.scatter([x[0, 0]], [y[0, 0]], s=60, c=POINT, edgecolors="black", zorder=4)
        edge = 0.5 if not align else 0.0
        ax.add_patch(Rectangle((-edge, -edge), W - 1 + 2 * edge, H - 1 + 2 * edge, fill=False, ec=BOX, lw=1.5,
                               ls="--"))
        ax.set_title(f"align_corners={align}: ±1 = pixel {'centres' if align else 'outer edges'} (dashed)")
    figure.suptitle("grid_sample(input 8×8, affine_grid(θ, (1, 1, 6, 6))): the 6×6 sample points on the input; "
                    "green: output (0, 0)", fontsize=10)
    figure.savefig(path, dpi=80)


def roi_align_figure(path):
    """RoIAlign: a box, its 3 × 3 bins and 2 × 2 samples per bin, with and without ``aligned``."""
    H, W, box, bins, ratio = 12, 14, (2.0, 2.5, 11.0, 9.0), 3, 2
    figure, axes = _figure(2, 9, 4.2)
    for ax, aligned in zip(axes, (True, False)):
        _pixels(ax, H, W)
        shift = 0.5 if aligned else 0.0
        x1, y1, x2, y2 = (c - shift for c in box)
        bin_w, bin_h = (x2 - x1) / bins, (y2 - y1) / bins
        for k in range(bins + 1):
            ax.plot([x1, x2], [y1 + k * bin_h] * 2, color=BOX, lw=1.2)
            ax.plot([x1 + k * bin_w] * 2, [y1, y2], color=BOX, lw=1.2)
        steps = (np.arange(bins * ratio) + 0.5) / ratio
        xs, ys = np.meshgrid(x1 + steps * bin_w, y1 + steps * bin_h)
        ax.scatter(xs.ravel(), ys.ravel(), s=14, c=SAMPLE, zorder=3)
        ax.set_title(f"aligned={aligned}: " + ("box shifted by −0.5 px" if aligned else "box as given"), fontsize=10)
    figure.suptitle(f"roi_align(boxes=[[0, {', '.join(map(str, box))}]], output_size={bins}, "
                    f"sampling_ratio={ratio}): bins (blue), bilinear samples (red)", fontsize=10)
    figure.savefig(path, dpi=80)


def ms_deform_attn_figure(path):
    """One query's sampling points on every level: a reference point plus offsets, dot area ∝ attention weight."""
    shapes = [(16, 20), (8, 10), (4, 5)]
    rng = np.random.default_rng(3)
    reference = np.array([0.42, 0.55])                         # normalised (x, y), the same on every level
    locations = reference + 0.12 * rng.standard_normal((len(shapes), 4, 2))
    weights = rng.random((len(shapes), 4))
    weights /= weights.sum()
    figure, axes = _figure(len(shapes), 10, 3.6)
    for level, (ax, (H_l, W_l)) in enumerate(zip(axes, shapes)):
        _pixels(ax, H_l, W_l)
        px, py = locations[level, :, 0] * W_l - 0.5, locations[level, :, 1] * H_l - 0.5
        ax.scatter(px, py, s=900 * weights[level], c=SAMPLE, edgecolors="black", zorder=3)
        rx, ry = reference * (W_l, H_l) - 0.5
        ax.scatter([rx], [ry], s=60, c=POINT, marker="X", edgecolors="black", zorder=4)
        for x, y in zip(px, py):
            ax.plot([rx, x], [ry, y], color="0.4", lw=0.6)
        ax.set_title(f"level {level}: H={H_l}, W={W_l}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    figure.suptitle("ms_deform_attn: one query and head, L=3 levels, P=4 points at pixel (x·W_l − 0.5, y·H_l − 0.5)\n"
                    "green: reference point; dot area ∝ attention weight", fontsize=10)
    figure.savefig(path, dpi=80)


def main():
    STATIC.mkdir(exist_ok=True)
    grid_sample_figure(STATIC / "grid_sample.png")
    roi_align_figure(STATIC / "roi_align.png")
    ms_deform_attn_figure(STATIC / "ms_deform_attn.png")


if __name__ == "__main__":
    main()
