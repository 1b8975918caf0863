"""python -m deformcp viz: where a regular and a deformable convolution sample, drawn over an image.

The figure of the Deformable ConvNets papers (Dai et al. 2017, https://arxiv.org/abs/1703.06211, Fig. 5):
one output point (green) of two stacked 3×3 convolutions, the 9 locations the second layer samples on
the first layer's output (orange), and the 9 × 9 = 81 locations on the input that the first layer samples
for them (red); a regular convolution (zero offsets: a 5×5 patch) beside a deformable one. Written to a
PNG with matplotlib (an optional extra: ``pip install 'deformcp[viz]'``).

The offsets are those of deform_conv2d (layout (1, 18, H, W): channel 2k is Δy and 2k + 1 is Δx of tap
k = 3i + j), for two layers with stride 1 and padding = dilation, so that every map has the input's size
H × W: ``--offset1`` for the first layer (applied to the input), ``--offset2`` for the second. Without
them, a built-in example: a bright ellipse on noise, with offsets that spread the taps over the object
and keep them on it, and leave them regular on the background.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Any, NamedTuple, Optional, Sequence, Union

import numpy as np
from numpy.typing import NDArray

from deformcp._types import ArrayLike

MISSING_MATPLOTLIB = "python -m deformcp viz needs matplotlib: pip install 'deformcp[viz]'"
DEFAULT_OUTPUT = "deformcp_sampling.png"
COLORS = {"point": "#22c55e", "layer2": "#f59e0b", "layer1": "#ef4444"}   # green, orange, red


class SamplingLocations(NamedTuple):
    """Where one output point of two stacked 3×3 layers samples, as (y, x) pixel coordinates."""

    point: np.ndarray    # (2,): the output point
    layer2: np.ndarray   # (9, 2): tap k of the second layer, on the first layer's output
    layer1: np.ndarray   # (9, 9, 2): [k, l] = tap l of the first layer, on the input, for layer-2 tap k


def taps(dilation: float = 1) -> np.ndarray:
    """The regular 3×3 grid's displacements (9, 2) as (Δy, Δx), tap k = 3i + j at ((i − 1)·d, (j − 1)·d):
    deform_conv2d's order."""
    i, j = np.divmod(np.arange(9), 3)
    return np.stack([i - 1, j - 1], axis=1).astype(np.float64) * dilation


def _field(offset: Optional[ArrayLike], name: str) -> Optional[NDArray[np.float64]]:
    """An offset array (1, 18, H, W) or (18, H, W) as a float64 (18, H, W) field, or None."""
    if offset is None:
        return None
    field = np.asarray(offset, dtype=np.float64)
    shape = field.shape
    if field.ndim == 4 and field.shape[0] == 1:
        field = field[0]
    if field.ndim != 3 or field.shape[0] != 18:
        raise ValueError(f"{name}: expected deform_conv2d offsets of one image and one offset group for a 3×3 "
                         f"kernel, (1, 18, H, W) or (18, H, W), got shape {shape}")
    return field


def _interpolate(field: NDArray[np.float64], y: NDArray[np.float64], x: NDArray[np.float64]) -> NDArray[np.float64]:
    """``field`` (C, H, W) bilinearly interpolated at (y, x), coordinates clamped into the map: (..., C)."""
    _, H, W = field.shape
    y = np.clip(y, 0.0, H - 1.0)
    x = np.clip(x, 0.0, W - 1.0)
    y0 = np.minimum(np.floor(y).astype(np.int64), max(H - 2, 0))
    x0 = np.minimum(np.floor(x).astype(np.int64), max(W - 2, 0))
    y1, x1 = np.minimum(y0 + 1, H - 1), np.minimum(x0 + 1, W - 1)
    ly, lx = (y - y0)[..., None], (x - x0)[..., None]

    def at(yy: NDArray[np.int64], xx: NDArray[np.int64]) -> NDArray[np.float64]:
        return np.moveaxis(field[:, yy, xx], 0, -1)

    return ((1 - ly) * ((1 - lx) * at(y0, x0) + lx * at(y0, x1))
            + ly * ((1 - lx) * at(y1, x0) + lx * at(y1, x1)))


def sampling_locations(offset1: Optional[ArrayLike] = None, offset2: Optional[ArrayLike] = None,
                       point: Sequence[float] = (0, 0), dilation: float = 1) -> SamplingLocations:
    """The sampling locations of output ``point`` (y, x) of two stacked 3×3 deformable convolutions.

    Args:
        offset1: the first layer's offsets (applied to the input), (1, 18, H, W) or (18, H, W) in
            deform_conv2d's layout (channel 2k: Δy, 2k + 1: Δx of tap k = 3i + j), or None for zeros.
        offset2: the second layer's offsets (applied to the first layer's output), likewise.
        point: the output point (y, x); integer pixel indices inside the maps where an offset is given.
        dilation: both layers' dilation (stride 1 and padding = dilation, so every map is H × W).

    Returns:
        :class:`SamplingLocations`: ``layer2[k] = point + tap_k + offset2[:, point][k]`` and
        ``layer1[k, l] = layer2[k] + tap_l + offset1 at layer2[k]``, where the first layer's offsets at
        the fractional location layer2[k] are interpolated bilinearly (clamped into the map) — what the
        second layer's bilinear sampling of the first layer's output computes, so for an input that is
        linear in (y, x) the two stacked deform_conv2d with one-hot weights read exactly there (inside
        the image). Zero offsets give the regular pattern: the 9 points of a 3×3 grid and the 81 points
        of their 3×3 grids, which cover a 5×5 grid (dilation 1) with multiplicities.
    """
    field1, field2 = _field(offset1, "offset1"), _field(offset2, "offset2")
    if field1 is not None and field2 is not None and field1.shape != field2.shape:
        raise ValueError(f"offset1 and offset2: expected the same map size, got {field1.shape[1:]} and "
                         f"{field2.shape[1:]}")
    p = np.asarray(point, dtype=np.float64).reshape(2)
    grid = taps(dilation)
    if field2 is None:
        layer2 = p + grid
    else:
        H, W = field2.shape[1:]
        py, px = (int(v) for v in p)
        if (py, px) != tuple(float(v) for v in p) or not (0 <= py < H and 0 <= px < W):
            raise ValueError(f"point: expected integer pixel indices (y, x) inside the {H}×{W} offset map, "
                             f"got {tuple(point)}")
        layer2 = p + grid + field2[:, py, px].reshape(9, 2)
    if field1 is None:
        layer1 = layer2[:, None, :] + grid[None, :, :]
    else:
        shift = _interpolate(field1, layer2[:, 0], layer2[:, 1]).reshape(9, 9, 2)
        layer1 = layer2[:, None, :] + grid[None, :, :] + shift
    return SamplingLocations(p, layer2, layer1)


# ---------------------------------------------------------------------------------------- built-in example

def example(size: tuple[int, int] = (72, 96), seed: int = 0
            ) -> tuple[NDArray[np.float64], NDArray[np.float32], NDArray[np.float32], tuple[int, int]]:
    """The built-in example: (image (H, W) in [0, 1], offset1, offset2 (1, 18, H, W) float32, point (y, x)).

    The image is a bright ellipse on noise. On the object, both layers' offsets spread the 3×3 grid to the
    object's scale (the second layer's taps half its semi-axes apart, the first layer's a quarter) and pull
    taps that would land off the object back inside it; on the background the grid stays regular (a soft
    transition in between) — the receptive field following the object, as the papers show learned
    offsets do."""
    H, W = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    cy, cx, ay, ax = 0.5 * H, 0.56 * W, 0.3 * H, 0.33 * W            # centre and semi-axes
    radius = np.sqrt(((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2)  # 1 on the ellipse's edge
    inside = 1.0 / (1.0 + np.exp(12.0 * (radius - 1.0)))             # soft indicator of the object
    image = np.clip(0.2 + 0.6 * inside + 0.08 * rng.standard_normal((H, W)), 0.0, 1.0)

    def offsets(fraction: float) -> NDArray[np.float32]:
        field = np.empty((18, H, W))
        for k, (ry, rx) in enumerate(taps()):
            ty = yy + ry * (1.0 + (fraction * ay - 1.0) * inside)    # the tap, spread on the object
            tx = xx + rx * (1.0 + (fraction * ax - 1.0) * inside)
            rho = np.sqrt(((ty - cy) / ay) ** 2 + ((tx - cx) / ax) ** 2)
            shrink = np.minimum(1.0, 0.9 / np.maximum(rho, 1e-9))   # onto the ellipse at 0.9 of its size
            ty += inside * (cy + (ty - cy) * shrink - ty)
            tx += inside * (cx + (tx - cx) * shrink - tx)
            field[2 * k], field[2 * k + 1] = ty - (yy + ry), tx - (xx + rx)
        return field[None].astype(np.float32)

    point = (int(round(cy - 0.2 * ay)), int(round(cx + 0.45 * ax)))
    return image, offsets(0.25), offsets(0.5), point


def synthetic_image(H: int, W: int, seed: int = 0) -> np.ndarray:
    """The built-in example's image at size H × W (for offsets given without an image)."""
    return example((H, W), seed)[0]


# ---------------------------------------------------------------------------------------------- drawing

def _display(image: np.ndarray) -> tuple[np.ndarray, Optional[str]]:
    """``image`` (H, W) or (H, W, 3) scaled to [0, 1] for imshow, and the colour map (gray for (H, W))."""
    image = np.asarray(image, dtype=np.float64)
    low, high = np.nanmin(image), np.nanmax(image)
    scaled = (image - low) / (high - low) if high > low else np.zeros_like(image)
    return np.nan_to_num(scaled), ("gray" if image.ndim == 2 else None)


def render(image: np.ndarray, regular: SamplingLocations, deformable: SamplingLocations,
           output: Union[str, os.PathLike[str]], dpi: int = 150, title: Optional[str] = None) -> pathlib.Path:
    """Draw ``regular`` | ``deformable`` over ``image`` side by side and save a PNG to ``output``.

    Uses matplotlib's object-oriented API on an Agg canvas (no pyplot, no global backend change); raises
    ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    shown, cmap = _display(image)
    H, W = shown.shape[:2]
    width = 11.0                                        # inches; each panel about width / 2 − 0.3
    figure = Figure(figsize=(width, width * (H / W) / 2 + 1.3), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    pixel = (width / 2 - 0.3) * 72.0 / W                # points per image pixel, about
    diameter = {"layer1": max(0.45 * pixel, 2.5), "layer2": max(0.85 * pixel, 4.0), "point": max(1.1 * pixel, 6.0)}
    area = {k: d * d for k, d in diameter.items()}      # scatter sizes are areas in points²
    for ax, locations, name in zip(axes, (regular, deformable), ("regular convolution", "deformable convolution")):
        ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        layer1 = locations.layer1.reshape(-1, 2)
        ax.scatter(layer1[:, 1], layer1[:, 0], s=area["layer1"], c=COLORS["layer1"], alpha=0.8,
                   linewidths=0.3, edgecolors="white", zorder=2)
        ax.scatter(locations.layer2[:, 1], locations.layer2[:, 0], s=area["layer2"],
                   c=COLORS["layer2"], linewidths=0.6, edgecolors="black", zorder=3)
        ax.scatter([locations.point[1]], [locations.point[0]], s=area["point"], c=COLORS["point"],
                   marker="o", linewidths=0.8, edgecolors="black", zorder=4)
        outside = int(np.sum((layer1[:, 0] <= -1) | (layer1[:, 0] >= H) | (layer1[:, 1] <= -1) | (layer1[:, 1] >= W)))
        ax.set_title(name + (f" ({outside} of 81 input samples outside the image)" if outside else ""))
        ax.set_xlim(-0.5, W - 0.5)
        ax.set_ylim(H - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [Line2D([], [], linestyle="", marker="o", markersize=9, markerfacecolor=COLORS["point"],
                      markeredgecolor="black", label="output point"),
               Line2D([], [], linestyle="", marker="o", markersize=7, markerfacecolor=COLORS["layer2"],
                      markeredgecolor="black", label="layer 2: 9 samples on layer 1's output"),
               Line2D([], [], linestyle="", marker="o", markersize=5, markerfacecolor=COLORS["layer1"],
                      markeredgecolor="white", label="layer 1: 81 samples on the input")]
    figure.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)
    figure.suptitle(title or "Sampling locations of one output point through two stacked 3×3 layers")
    output = pathlib.Path(output)
    figure.savefig(output, dpi=dpi)
    return output


# ------------------------------------------------------------------------------------------------- main

def _load(path: str, name: str) -> np.ndarray:
    try:
        array: NDArray[Any] = np.load(path, allow_pickle=False)  # untyped in NumPy's stubs
        return array
    except Exception as e:
        raise ValueError(f"{name}: cannot read {path} as a .npy array ({type(e).__name__}: {e})") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deformcp viz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--offset1", metavar="PATH.npy",
                        help="the first layer's offsets, (1, 18, H, W) as for deform_conv2d (Δy, Δx per tap)")
    parser.add_argument("--offset2", metavar="PATH.npy",
                        help="the second layer's offsets, likewise (a layer without offsets: zeros)")
    parser.add_argument("--image", metavar="PATH.npy",
                        help="the input image, (H, W) or (H, W, 3), H × W the offsets' map size (default: the "
                             "built-in synthetic image); needs --offset1 and/or --offset2")
    parser.add_argument("--point", type=int, nargs=2, metavar=("Y", "X"),
                        help="the output point (default: the example's, or the map's centre)")
    parser.add_argument("--dilation", type=int, default=1, help="both layers' dilation (default 1)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, metavar="PATH.png",
                        help=f"where to write the PNG (default {DEFAULT_OUTPUT})")
    parser.add_argument("--dpi", type=int, default=150, help="resolution (default 150)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import matplotlib  # noqa: F401  (optional: the [viz] extra)
    except ImportError:
        print(MISSING_MATPLOTLIB, file=sys.stderr)
        return 2
    offset1: Optional[NDArray[Any]]
    offset2: Optional[NDArray[Any]]
    try:
        if args.offset1 is None and args.offset2 is None:
            if args.image is not None:
                raise ValueError("--image needs --offset1 and/or --offset2 (the built-in offsets belong to the "
                                 "built-in image)")
            image, offset1, offset2, point = example()
            title = "Built-in example: sampling locations of one output point through two stacked 3×3 layers"
        else:
            offset1 = _load(args.offset1, "--offset1") if args.offset1 else None
            offset2 = _load(args.offset2, "--offset2") if args.offset2 else None
            given = _field(offset1 if offset1 is not None else offset2, "--offset1" if offset1 is not None
                           else "--offset2")
            assert given is not None  # one of them was given (else the built-in example above)
            H, W = given.shape[1:]
            if args.image is not None:
                image = _load(args.image, "--image")
                if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3) or image.shape[:2] != (H, W):
                    raise ValueError(f"--image: expected (H, W) or (H, W, 3) with H × W = {H}×{W} (the offsets' "
                                     f"map), got shape {image.shape}")
            else:
                image = synthetic_image(H, W)
            point = (H // 2, W // 2)
            title = None
        if args.point is not None:
            point = tuple(args.point)
        regular = sampling_locations(None, None, point, args.dilation)
        deformable = sampling_locations(offset1, offset2, point, args.dilation)
        path = render(image, regular, deformable, args.output, dpi=args.dpi, title=title)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write {args.output}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
