"""Benchmark: deformcp.jax under jax.vmap, against the batched call and a Python loop (and the host-copy callbacks).

Run as ``python benchmarks/jax_vmap.py`` (``--quick``: tiny shapes, 3 calls; ``--repeat``, ``--interleave``,
``--output`` as in the op benchmarks). Everything is compiled with ``jax.jit`` first; times are per call
of the whole batch, with ``jax.block_until_ready``.

Cases (float32, JAX's default backend: the CPU here, a GPU where JAX and CuPy see one):

- grid_sample: B = 8 images of 16×32×32 sampled at 32×32 points (bilinear, zeros);
- deform_conv2d: B = 8 images of 16×32×32, 3×3 kernel, 16 output channels, one weight and bias for all
  (vmapped over image, offset and mask only).

Implementations, for the forward and for forward+backward (jax.grad of the sum of squares with respect to the
image and the sampling grid or offset):

- batched: one call on the (B, ...) arrays;
- vmap: ``jax.vmap`` of the call on one image ((1, ...) arrays, mapped over a leading axis of B): deformcp.jax
  folds the mapped axis into the batch, one call;
- loop: a jitted call per image from a Python loop, results stacked;
- batched, host copies: the batched call through ``jax.pure_callback`` (deformcp.jax's fallback for a JAX
  without buffer_callback), which copies every operand and result.

Ratios are to "batched". Results: printed, and written to benchmarks/results/jax_vmap.{json,md}.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

if __package__:
    from . import harness
else:  # python benchmarks/jax_vmap.py: this folder is first on sys.path
    import harness

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import deformcp.jax as djax  # noqa: E402

B = 8
SIZES = {"full": {"C": 16, "H": 32, "W": 32}, "quick": {"C": 2, "H": 5, "W": 6}}


def cases(quick: bool, rng: np.random.Generator) -> dict:
    """Per case: (function of the arrays of one image batch, arrays with a leading batch axis B, the arrays' in_axes
    for vmap (None: shared), argnums of the differentiated arrays)."""
    s = SIZES["quick" if quick else "full"]
    C, H, W = s["C"], s["H"], s["W"]
    image = rng.standard_normal((B, C, H, W)).astype(np.float32)
    grid = rng.uniform(-1.1, 1.1, (B, H, W, 2)).astype(np.float32)
    offset = rng.normal(0, 1, (B, 18, H, W)).astype(np.float32)
    mask = rng.uniform(0, 1, (B, 9, H, W)).astype(np.float32)
    weight = (rng.standard_normal((C, C, 3, 3)) / (3 * np.sqrt(C))).astype(np.float32)
    bias = rng.standard_normal(C).astype(np.float32)

    def conv(x, o, m, w, b):
        return djax.deform_conv2d(x, o, w, b, padding=1, mask=m)

    return {"grid_sample": (djax.grid_sample, (image, grid), (0, 0), (0, 1)),
            "deform_conv2d": (conv, (image, offset, mask, weight, bias), (0, 0, 0, None, None), (0, 1))}


def implementations(fn, arrays, in_axes, argnums, backward: bool) -> dict:
    """The four implementations of one case and phase, compiled, as callables of no arguments."""
    def phase(f):
        if not backward:
            return f
        return jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=argnums)

    def one(*a):  # one image: (1, ...) batches where mapped
        return fn(*(x[None] if axis == 0 else x for x, axis in zip(a, in_axes)))

    batched = jax.jit(phase(fn))
    mapped = jax.jit(jax.vmap(phase(one), in_axes=in_axes))
    single = jax.jit(phase(one))
    previous, djax._buffer_callback = djax._buffer_callback, None
    try:  # traced without buffer_callback: pure_callback, the host copies
        copies = jax.jit(phase(fn)).lower(*arrays).compile()
    finally:
        djax._buffer_callback = previous
        jax.clear_caches()
    images = [[a[i] if axis == 0 else a for a, axis in zip(arrays, in_axes)] for i in range(B)]

    def loop():
        results = [single(*image) for image in images]
        return jax.tree_util.tree_map(lambda *r: jnp.stack(r), *results)

    return {"batched": lambda: jax.block_until_ready(batched(*arrays)),
            "vmap": lambda: jax.block_until_ready(mapped(*arrays)),
            "loop": lambda: jax.block_until_ready(loop()),
            "batched, host copies": lambda: jax.block_until_ready(copies(*arrays))}


def verify(impls_results: dict) -> None:
    reference = impls_results["batched"]
    for name, result in impls_results.items():
        for got, want in zip(jax.tree_util.tree_leaves(result), jax.tree_util.tree_leaves(reference)):
            got, want = np.asarray(got).reshape(np.shape(want)), np.asarray(want)
            error = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
            if error > 1e-5:
                raise harness.VerificationFailed(f"{name}: relative error {error:.2e} against the batched call")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 calls, nothing written")
    parser.add_argument("--repeat", type=harness.positive, default=30, help="timed calls per row (default 30)")
    parser.add_argument("--interleave", action="store_true", help="time the implementations in turns")
    parser.add_argument("--output", default=None, help="results name or path (default jax_vmap)")
    args = parser.parse_args(argv)
    repeat = 3 if args.quick else args.repeat
    rng = np.random.default_rng(0)
    rows, payload = [], []
    for case, (fn, arrays, in_axes, argnums) in cases(args.quick, rng).items():
        for phase in ("forward", "forward+backward"):
            impls = implementations(fn, arrays, in_axes, argnums, phase != "forward")
            verify({name: impl() for name, impl in impls.items()})
            if args.interleave:
                timings = harness.measure_interleaved(impls, repeat, warmup=3, warmup_time=0.25)
            else:
                timings = {name: harness.measure(impl, repeat, warmup=3, warmup_time=0.25)
                           for name, impl in impls.items()}
            base = timings["batched"].median
            for name, t in timings.items():
                rows.append([case, phase, name, harness.format_seconds(t.median),
                             f"{harness.format_seconds(t.q25)}–{harness.format_seconds(t.q75)}", t.repeat,
                             f"{t.median / base:.2f}×"])
                payload.append({"case": case, "phase": phase, "implementation": name, **t.summary(),
                                "ratio_to_batched": t.median / base})
    info = harness.machine_info({"jax": jax.__version__, "device": jax.default_backend(),
                                 "buffer_callback": djax._buffer_callback is not None})
    table = harness.markdown_table(["case", "phase", "implementation", "median", "p25–p75", "runs", "÷ batched"],
                                   rows)
    markdown = "\n\n".join([
        "# deformcp.jax under jax.vmap", __doc__.split("\n\n", 2)[2].split("\nRatios")[0].strip(),
        f"Command: `{harness.command_line()}`" + (" (interleaved)" if args.interleave else ""),
        harness.machine_markdown(info), table])
    print(markdown)
    if not args.quick or args.output:
        for path in harness.write_results(args.output or "jax_vmap", {"machine": info, "records": payload},
                                          markdown):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
