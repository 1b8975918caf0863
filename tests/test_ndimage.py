"""deformcp.ndimage: map_coordinates and affine_transform against scipy.ndimage itself (every order, mode, 2-D and
3-D, order 3 with and without SciPy's prefilter, random and lattice coordinates inside and outside the input, every
matrix and offset form), the prefilter against scipy.ndimage.spline_filter and its transpose by the dot-product
test, non-finite coordinates, finite differences of every gradient in float64, the host backend against the NumPy
path over the specs' cases, deterministic backwards, and bad input."""
import itertools

import numpy as np
import pytest
import scipy.ndimage

import deformcp.ndimage as dn
from deformcp import _workspace, testing
from deformcp.ops import ndimage as ops
from deformcp.reference import ndimage as reference
from deformcp.reference.ndimage import affine_coordinates, transform

from conftest import assert_close, directional_derivative, run_both, to_backend

MODES = ops.MODES
SHAPES = {2: [(5, 7), (1, 6), (4, 1), (2, 2)], 3: [(4, 3, 5), (1, 4, 2), (3, 1, 1)]}
#: lines long enough for the prefilter's boundary initialisations to differ from their limits
LONGER = {2: (9, 12), 3: (3, 13, 8)}
COORDINATES = ("random", "lattice")
#: (order, prefilter): prefilter only matters at order 3
ORDERS = [(0, True), (1, True), (3, True), (3, False)]
ORDER_IDS = ["order=0", "order=1", "order=3", "order=3-prefilter=False"]


def _coordinates(rng, shape, kind, points=60):
    """Indices from 2.5 sizes before the input to 1.5 past its end along each axis; "lattice": multiples of 1/4,
    so that integers (constant mode's borders, the folds) and halves (order 0's ties) are hit exactly."""
    n = np.array(shape, float)[:, None]
    c = rng.uniform(-2.5, 2.5, (len(shape), points)) * n + rng.uniform(-1, 1, (len(shape), points))
    c[:, : points // 3] = rng.uniform(-1.5, n + 0.5, (len(shape), points // 3))  # a third near the input
    return np.round(c * 4) / 4 if kind == "lattice" else c


def _scipy_map(x, c, **options):
    return scipy.ndimage.map_coordinates(x.astype(np.float64), c.astype(np.float64), **options)


@pytest.mark.parametrize("kind", COORDINATES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order, prefilter", ORDERS, ids=ORDER_IDS)
@pytest.mark.parametrize("ndim", [2, 3])
def test_map_coordinates_matches_scipy(any_backend, rng, ndim, order, prefilter, mode, kind):
    for shape in SHAPES[ndim] + ([LONGER[ndim]] if order == 3 else []):
        x = rng.standard_normal(shape)
        c = _coordinates(rng, shape, kind)
        options = {"order": order, "mode": mode, "cval": float(rng.uniform(-2, 2)), "prefilter": prefilter}
        expected = _scipy_map(x, c, **options)
        out = testing.run(any_backend, dn.map_coordinates, to_backend(x, any_backend), to_backend(c, any_backend),
                          **options)
        np.testing.assert_allclose(testing.to_numpy(out), expected, rtol=1e-13, atol=1e-13, err_msg=f"{shape}")
        if kind == "random":  # float32: SciPy on the float32-rounded inputs, in float64
            x32, c32 = x.astype(np.float32), c.astype(np.float32)
            out32 = testing.run(any_backend, dn.map_coordinates, to_backend(x32, any_backend),
                                to_backend(c32, any_backend), **options)
            assert testing.to_numpy(out32).dtype == np.float32
            np.testing.assert_allclose(testing.to_numpy(out32), _scipy_map(x32, c32, **options), rtol=0,
                                       atol=4e-5 * (np.abs(x).max() + abs(options["cval"])), err_msg=f"{shape}")


def _matrix_forms(rng, ndim):
    """(matrix, offset) in each of SciPy's forms."""
    m = rng.uniform(-1.3, 1.3, (ndim, ndim))
    homogeneous = np.concatenate([m, rng.uniform(-2, 2, (ndim, 1))], axis=1)
    yield "matrix, vector offset", m, rng.uniform(-2, 2, ndim)
    yield "matrix, scalar offset", m, np.asarray(rng.uniform(-2, 2))
    yield "diagonal", rng.uniform(-1.3, 1.3, ndim), rng.uniform(-2, 2, ndim)
    yield "homogeneous (ndim, ndim + 1)", homogeneous, np.asarray(0.0)
    yield "homogeneous (ndim + 1, ndim + 1)", np.concatenate([homogeneous, [[0] * ndim + [1]]]), rng.uniform(0, 1, ndim)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order, prefilter", ORDERS, ids=ORDER_IDS)
@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_transform_matches_scipy(any_backend, rng, ndim, order, prefilter, mode):
    x = rng.standard_normal((6, 5) if ndim == 2 else (4, 5, 3))
    output_shape = (7, 4) if ndim == 2 else (3, 2, 5)
    for label, matrix, offset in _matrix_forms(rng, ndim):
        for shape in (None, output_shape):
            options = {"output_shape": shape, "order": order, "mode": mode, "cval": 0.25, "prefilter": prefilter}
            expected = scipy.ndimage.affine_transform(x, matrix, offset, **options)
            arrays = (to_backend(a, any_backend) for a in (x, matrix, offset))
            out = testing.run(any_backend, dn.affine_transform, *arrays, **options)
            np.testing.assert_allclose(testing.to_numpy(out), expected, rtol=1e-13, atol=1e-13, err_msg=label)


def test_python_numbers_and_lists_take_the_input_dtype():
    """SciPy-style calls: offset=0.0 (the default), a matrix or coordinates as lists, with float32 input."""
    x = np.arange(20, dtype=np.float32).reshape(4, 5)
    out = dn.affine_transform(x, [[0.5, 0.0], [0.25, 1.0]], offset=1.5)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, scipy.ndimage.affine_transform(x, [[0.5, 0.0], [0.25, 1.0]], 1.5, order=1),
                               atol=1e-5)
    out = dn.map_coordinates(x, [[0.5, 3.0], [1.25, 4.0]])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [3.75, 19.0])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order, prefilter", ORDERS, ids=ORDER_IDS)
def test_non_finite_coordinates_give_cval_and_no_gradient(any_backend, rng, order, prefilter, mode):
    x = rng.standard_normal((3, 4, 5))
    c = rng.uniform(0, 2, (3, 6))
    c[0, 0], c[1, 1], c[2, 2], c[0, 3], c[1, 3] = np.nan, np.inf, -np.inf, np.nan, np.inf
    options = {"order": order, "mode": mode, "cval": 3.5, "prefilter": prefilter}
    out = testing.to_numpy(testing.run(any_backend, dn.map_coordinates, to_backend(x, any_backend),
                                       to_backend(c, any_backend), **options))
    np.testing.assert_array_equal(out[:4], 3.5)
    np.testing.assert_allclose(out[4:], _scipy_map(x, c[:, 4:], **options), rtol=1e-13, atol=1e-13)
    grads = testing.run(any_backend, dn.map_coordinates_backward, to_backend(np.ones(6), any_backend),
                        to_backend(x, any_backend), to_backend(c, any_backend), **options)
    gc = testing.to_numpy(grads.coordinates)
    assert np.isfinite(gc).all()
    np.testing.assert_array_equal(gc[:, :4], 0)
    expected = dn.map_coordinates_backward(np.ones(2), x, c[:, 4:], **options).input
    np.testing.assert_allclose(testing.to_numpy(grads.input), expected, rtol=1e-13, atol=1e-15)


# ------------------------------------------------------------------------------------ batched over leading axes

@pytest.mark.parametrize("order, prefilter", ORDERS, ids=ORDER_IDS)
@pytest.mark.parametrize("batch, shape", [((3,), (5, 7)), ((2, 2), (6, 4)), ((2,), (4, 3, 5)), ((0,), (5, 7))],
                         ids=["3x2d", "2x2x2d", "2x3d", "0x2d"])
def test_batch_axes_sample_every_image_alike(any_backend, rng, batch, shape, order, prefilter):
    """Input axes before the sampled ones are a batch: each image equals SciPy on it alone, with the same
    coordinates or matrix; the input gradient is each image's, the coordinate, matrix and offset gradients the sums
    of the images' (float64, every backend)."""
    ndim = len(shape)
    x = rng.standard_normal(batch + shape)
    count = int(np.prod(batch))
    images = x.reshape((count,) + shape)
    c = _coordinates(rng, shape, "random", 30).reshape(ndim, 5, 6)
    options = {"order": order, "mode": "nearest" if order == 3 else "grid-constant", "cval": 0.5,
               "prefilter": prefilter}
    out = testing.to_numpy(testing.run(any_backend, dn.map_coordinates, to_backend(x, any_backend),
                                       to_backend(c, any_backend), **options))
    assert out.shape == batch + (5, 6)
    expected = [_scipy_map(image, c, **options) for image in images]
    np.testing.assert_allclose(out.reshape(count, 5, 6), np.reshape(expected, (count, 5, 6)), rtol=1e-13, atol=1e-13)
    g = rng.standard_normal(out.shape)
    grads = testing.run(any_backend, dn.map_coordinates_backward, to_backend(g, any_backend),
                        to_backend(x, any_backend), to_backend(c, any_backend), **options)
    alone = [dn.map_coordinates_backward(gi, image, c, **options) for gi, image in zip(g.reshape(count, 5, 6), images)]
    np.testing.assert_allclose(testing.to_numpy(grads.input), np.reshape([a.input for a in alone], x.shape),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(testing.to_numpy(grads.coordinates), sum((a.coordinates for a in alone),
                                                                        np.zeros_like(c)), rtol=1e-12, atol=1e-12)
    m = np.eye(ndim) * 0.8 + rng.uniform(-0.1, 0.1, (ndim, ndim))
    offset = rng.uniform(-1, 1, ndim)
    out_shape = tuple(n + 1 for n in shape)
    for given in (out_shape, batch + out_shape):  # the sampled axes' sizes, or SciPy's whole shape
        warped = testing.to_numpy(testing.run(any_backend, dn.affine_transform, to_backend(x, any_backend),
                                              to_backend(m, any_backend), to_backend(offset, any_backend),
                                              output_shape=given, **options))
        expected = [scipy.ndimage.affine_transform(image, m, offset, out_shape, **options) for image in images]
        np.testing.assert_allclose(warped, np.reshape(expected, batch + out_shape), rtol=1e-13, atol=1e-13)
    g = rng.standard_normal(batch + out_shape)
    grads = testing.run(any_backend, dn.affine_transform_backward, to_backend(g, any_backend),
                        to_backend(x, any_backend), to_backend(m, any_backend), to_backend(offset, any_backend),
                        output_shape=out_shape, **options)
    alone = [dn.affine_transform_backward(gi, image, m, offset, out_shape, **options)
             for gi, image in zip(g.reshape((count,) + out_shape), images)]
    np.testing.assert_allclose(testing.to_numpy(grads.input), np.reshape([a.input for a in alone], x.shape),
                               rtol=1e-12, atol=1e-12)
    for name in ("matrix", "offset"):
        total = sum((getattr(a, name) for a in alone), np.zeros(m.shape if name == "matrix" else ndim))
        np.testing.assert_allclose(testing.to_numpy(getattr(grads, name)), total, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("kind", ["affine", "scattered"])
def test_numpy_path_chunks_give_the_same_results(monkeypatch, rng, order, kind):
    """The NumPy path's points in many small chunks (the input gradient added chunk by chunk over the compact span
    of an affine warp's taps, or point by point where random points scatter) equals one chunk, batched, forward
    and backward."""
    x = rng.standard_normal((2, 12, 9, 7))
    if kind == "affine":
        c = affine_coordinates(transform(np, np.eye(3) * 0.9, np.full(3, 0.4), 3, np.float64), (12, 9, 7))
    else:
        c = _coordinates(rng, (12, 9, 7), "random", 500)
    g = rng.standard_normal((2, *c.shape[1:]))
    options = {"order": order, "mode": "mirror"}
    whole = (dn.map_coordinates(x, c, **options), dn.map_coordinates_backward(g, x, c, **options))
    monkeypatch.setattr(_workspace, "NDIMAGE_CHUNK_BYTES", 20_000)
    assert len(reference._point_ranges(c[0].size, 2, ops.NdimageConfig((12, 9, 7), c.shape[1:], order, "mirror",
                                                                         0.0, True, (2,)))) > 10
    chunked = (dn.map_coordinates(x, c, **options), dn.map_coordinates_backward(g, x, c, **options))
    np.testing.assert_array_equal(chunked[0], whole[0])
    np.testing.assert_array_equal(chunked[1].coordinates, whole[1].coordinates)
    np.testing.assert_allclose(chunked[1].input, whole[1].input, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("span", [50, 10**6])
def test_add_at_adds_repeated_indices(rng, span):
    """The NumPy path's scatter-add, over a compact span (a bincount) and a wide one (numpy.add.at)."""
    index = rng.integers(0, span, 300)
    index[:20] = index[20]  # repeats
    weights = rng.standard_normal(300)
    target, expected = np.ones(span + 5), np.ones(span + 5)
    reference._add_at(target, index, weights)
    np.add.at(expected, index, weights)
    np.testing.assert_allclose(target, expected, rtol=1e-14, atol=1e-14)


def test_a_square_matrix_reads_as_scipy_reads_it(rng):
    """A square matrix maps that many trailing axes (SciPy's (n, n)), unless it is (n + 1, n + 1) for all of
    input's n axes (SciPy's homogeneous form): a (3, 3) matrix on (2, H, W) input is a 3-D linear map, on (H, W)
    a homogeneous 2-D one."""
    x = rng.standard_normal((2, 6, 5))
    m = np.array([[1.0, 0.1, 0.0], [0.0, 0.9, 0.2], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(dn.affine_transform(x, m), scipy.ndimage.affine_transform(x, m, order=1),
                               rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(dn.affine_transform(x[0], m), scipy.ndimage.affine_transform(x[0], m, order=1),
                               rtol=1e-13, atol=1e-13)
    batched = dn.affine_transform(x, m[:2])  # (2, 3): homogeneous 2-D, each image alike
    np.testing.assert_allclose(batched, [scipy.ndimage.affine_transform(image, m, order=1) for image in x],
                               rtol=1e-13, atol=1e-13)


# --------------------------------------------------------------------------------------- the spline prefilter

def _config(shape, mode, cval=0.0):
    return ops.NdimageConfig(tuple(shape), (1,), 3, "reflect" if mode == "grid-mirror" else mode, cval, True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(1, 7), (2, 5), (3, 4), (9, 12), (2, 1, 3), (3, 13, 8)])
def test_prefilter_matches_scipy_spline_filter(rng, shape, mode):
    """The coefficients equal scipy.ndimage.spline_filter of order 3 in the mode, on the input padded as SciPy pads
    it ("nearest": 12 edge values, "grid-constant": 12 cvals); each image of a batch (the leading axis) alike."""
    x = rng.standard_normal((2, *shape))
    cfg = _config(shape, mode, cval=0.75)
    coefficients = reference.spline_coefficients(x, cfg)
    for image, c in zip(x, coefficients):
        padded = {"nearest": np.pad(image, 12, mode="edge"),
                  "grid-constant": np.pad(image, 12, constant_values=0.75)}.get(mode, image)
        np.testing.assert_allclose(c, scipy.ndimage.spline_filter(padded, 3, mode=mode), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(1, 7), (2, 5), (3, 4), (9, 12), (2, 1, 3), (3, 13, 8)])
def test_prefilter_transpose_by_the_dot_product_test(rng, shape, mode):
    """<A x, y> = <x, Aᵀ y> for the prefilter A (padding included; SciPy's "reflect" initialisation makes A
    asymmetric, so Aᵀ is not A)."""
    cfg = _config(shape, mode)
    x = rng.standard_normal((2, *shape))  # a batch of two images
    ax = reference.spline_coefficients(x, cfg)
    y = rng.standard_normal(ax.shape)
    aty = reference.spline_coefficients_adjoint(y, cfg)
    assert aty.shape == x.shape
    # the sums' rounding scales with their terms, not with the sums (which can cancel)
    np.testing.assert_allclose(np.sum(ax * y), np.sum(x * aty), rtol=1e-13, atol=1e-13 * np.sum(np.abs(ax * y)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ndim", [2, 3])
def test_input_gradient_is_the_transpose(any_backend, rng, ndim, mode):
    """With cval 0, map_coordinates at order 3 is linear in input: <S x, g> = <x, Sᵀ g>, Sᵀ g its input gradient
    (the prefilter's transpose run by each backend)."""
    shape = LONGER[ndim]
    x, g = rng.standard_normal(shape), rng.standard_normal(40)
    c = _coordinates(rng, shape, "random", 40)
    options = {"order": 3, "mode": mode, "cval": 0.0}
    out = testing.to_numpy(testing.run(any_backend, dn.map_coordinates, to_backend(x, any_backend),
                                       to_backend(c, any_backend), **options))
    grads = testing.run(any_backend, dn.map_coordinates_backward, to_backend(g, any_backend),
                        to_backend(x, any_backend), to_backend(c, any_backend), needs_input_grad=(True, False),
                        **options)
    np.testing.assert_allclose(np.sum(out * g), np.sum(x * testing.to_numpy(grads.input)), rtol=1e-12,
                               atol=1e-12 * np.sum(np.abs(out * g)))  # the sums' rounding scales with their terms


# ----------------------------------------------------------------------------------------- finite differences

def _near_integers(c):
    """Where a coordinate is within 1e-3 of an integer: every kink (and jump: "constant"'s borders, "wrap"'s
    seam) of linear interpolation and of the modes' folds lies on one, and central differences across it fail."""
    return np.abs(c - np.round(c)) < 1e-3


def _smooth_forms(rng, ndim, output_shape):
    """_matrix_forms whose sampled coordinates all stay 1e-3 away from integers (redrawn until they do)."""
    for number in range(5):
        while True:
            label, matrix, offset = list(_matrix_forms(rng, ndim))[number]
            t = transform(np, matrix, offset, ndim, np.dtype(np.float64))
            if not _near_integers(affine_coordinates(t, output_shape)).any():
                break
        yield label, matrix, offset


def _check_gradients(function, backward, arrays: dict, options: dict, rng, zero=()):
    """Every gradient of backward against central differences of <grad_output, function> along a random
    direction (float64); the arrays named in ``zero`` must get gradient 0."""
    out = function(**arrays, **options)
    g = rng.standard_normal(np.shape(out))
    grads = backward(g, **arrays, **options)
    names = list(arrays)
    for name, grad in zip(grads._fields, grads):
        assert grad.shape == np.shape(arrays[name]) and grad.dtype == arrays[name].dtype, name
        if name in zero:
            np.testing.assert_array_equal(grad, 0, err_msg=name)
            continue
        direction = rng.standard_normal(np.shape(arrays[name]))

        def loss(*values):
            return np.sum(g * function(**dict(zip(names, values)), **options))

        numeric = directional_derivative(loss, list(arrays.values()), names.index(name), direction)
        np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order, prefilter", ORDERS, ids=ORDER_IDS)
@pytest.mark.parametrize("ndim", [2, 3])
def test_map_coordinates_gradients_by_finite_differences(any_backend, rng, ndim, order, prefilter, mode):
    shape = (5, 6) if ndim == 2 else (4, 3, 5)
    c = _coordinates(rng, shape, "random", 40)
    arrays = {"input": rng.standard_normal(shape), "coordinates": np.where(_near_integers(c), c + 0.01, c)}

    def on(fn):
        return lambda *args, **kwargs: testing.to_numpy(testing.run(
            any_backend, fn, *(to_backend(a, any_backend) for a in args),
            **{k: to_backend(v, any_backend) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}))

    def backward(*args, **kwargs):
        grads = testing.run(any_backend, dn.map_coordinates_backward,
                            *(to_backend(a, any_backend) for a in args),
                            **{k: to_backend(v, any_backend) if isinstance(v, np.ndarray) else v
                               for k, v in kwargs.items()})
        return type(grads)(*(testing.to_numpy(v) for v in grads))

    _check_gradients(on(dn.map_coordinates), backward, arrays,
                     {"order": order, "mode": mode, "cval": 0.75, "prefilter": prefilter}, rng,
                     zero=("coordinates",) if order == 0 else ())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order, prefilter", ORDERS, ids=ORDER_IDS)
@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_transform_gradients_by_finite_differences(any_backend, rng, ndim, order, prefilter, mode):
    x = rng.standard_normal((5, 6) if ndim == 2 else (4, 3, 5))
    options = {"output_shape": (6, 5) if ndim == 2 else (3, 4, 4), "order": order, "mode": mode, "cval": -0.5,
               "prefilter": prefilter}

    def forward(**arrays):
        return testing.to_numpy(testing.run(any_backend, dn.affine_transform,
                                            **{k: to_backend(v, any_backend) for k, v in arrays.items()}, **options))

    def backward(g, **arrays):
        grads = testing.run(any_backend, dn.affine_transform_backward, to_backend(g, any_backend),
                            **{k: to_backend(v, any_backend) for k, v in arrays.items()}, **options)
        return type(grads)(*(testing.to_numpy(v) for v in grads))

    for label, matrix, offset in _smooth_forms(rng, ndim, options["output_shape"]):
        homogeneous = matrix.ndim == 2 and matrix.shape[1] == ndim + 1
        zero = ("matrix", "offset") if order == 0 else ("offset",) if homogeneous else ()
        arrays = {"input": x, "matrix": matrix, "offset": offset}
        if matrix.shape[0] == ndim + 1:  # the bottom row is fixed at [0, ..., 1]: perturb the rest only
            grads = backward(rng.standard_normal(options["output_shape"]), **arrays)
            np.testing.assert_array_equal(grads.matrix[-1], 0, err_msg=label)
            continue
        _check_gradients(lambda **a: forward(**a), lambda g, **a: backward(g, **a), arrays, {}, rng, zero=zero)


# ------------------------------------------------------------------------ host backend against the NumPy path

CASES = [(spec, case) for spec in ops.SPECS for case in spec.cases]


@pytest.mark.parametrize("dtype", testing.dtypes())
@pytest.mark.parametrize("spec, case", CASES, ids=[f"{s.name}-{c.label}" for s, c in CASES])
def test_backend_matches_numpy_path(backend, rng, spec, case, dtype):
    """Forward and every gradient of each parity case, outputs poisoned and inputs checked unmodified, atomic and
    deterministic backwards."""
    arrays = {name: a.astype(dtype) for name, a in case.make(rng).items()}
    names = list(arrays)

    def call(fn, *leading, **extra):
        return lambda *values: fn(*values[:len(leading)], **dict(zip(names, values[len(leading):])),
                                  **case.options, **extra)

    out, expected = run_both(backend, call(spec.function), *arrays.values())
    assert_close(out, expected, dtype)
    g = rng.standard_normal(np.shape(expected)).astype(dtype)
    for deterministic in (False, True):
        grads, expected_grads = run_both(backend, call(spec.backward, g, deterministic=deterministic), g,
                                         *arrays.values())
        for got, want in zip(grads, expected_grads):
            assert_close(got, want, dtype)


@pytest.mark.parametrize("spec", ops.SPECS, ids=lambda s: s.name)
def test_deterministic_backward_is_bitwise_reproducible(backend, rng, spec):
    case = spec.cases[-1]
    arrays = {k: a.astype(np.float32) for k, a in case.make(rng).items()}
    g = to_backend(rng.standard_normal(np.shape(spec.function(**arrays, **case.options))).astype(np.float32), backend)
    arrays = {k: to_backend(a, backend) for k, a in arrays.items()}
    first, second = (testing.run(backend, spec.backward, g, **arrays, **case.options, deterministic=True)
                     for _ in range(2))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(testing.to_numpy(a), testing.to_numpy(b))


def test_needs_input_grad_subsets():
    rng = np.random.default_rng(0)
    spec = ops.AFFINE_TRANSFORM
    case = spec.cases[0]
    arrays = case.make(rng)
    g = rng.standard_normal(case.options["output_shape"])
    full = dn.affine_transform_backward(g, **arrays, **case.options)
    for needs in itertools.product((False, True), repeat=3):
        for backend in ("numpy", "host"):
            grads = testing.run(backend, dn.affine_transform_backward, g, **arrays, **case.options,
                                needs_input_grad=needs)
            for got, want, asked in zip(grads, full, needs):
                assert (got is None) == (not asked)
                if asked:
                    assert_close(got, want, "float64")


# ------------------------------------------------------------------------------------------------ bad input

X = np.zeros((4, 5))
C = np.zeros((2, 3))


@pytest.mark.parametrize("call, error, words", [
    (lambda: dn.map_coordinates(X, C, order=2), ValueError, ["order", "0, 1 or 3", "got 2"]),
    (lambda: dn.map_coordinates(X, C, order=5), ValueError, ["order", "0, 1 or 3", "got 5"]),
    (lambda: dn.map_coordinates(X, C, order=True), TypeError, ["order", "int", "True"]),
    (lambda: dn.map_coordinates(X, C, order=1.0), TypeError, ["order", "int", "1.0"]),
    (lambda: dn.map_coordinates(X, C, mode="edge"), ValueError, ["mode", "grid-wrap", "'edge'"]),
    (lambda: dn.map_coordinates(X, C, cval=float("nan")), ValueError, ["cval", "finite", "nan"]),
    (lambda: dn.map_coordinates(X, C, prefilter=1), TypeError, ["prefilter", "bool", "1"]),
    (lambda: dn.map_coordinates(np.zeros(5), C), ValueError, ["input", "at least 2 axes", "(5,)"]),
    (lambda: dn.map_coordinates(np.zeros((2, 3, 4, 5)), np.zeros((4, 3))), ValueError,
     ["coordinates", "2 or 3", "(4, 3)"]),
    (lambda: dn.map_coordinates(np.zeros((0, 5)), C), ValueError, ["input", "non-empty", "(0, 5)"]),
    (lambda: dn.map_coordinates(np.zeros((3, 0, 5)), C), ValueError, ["input", "non-empty", "(3, 0, 5)"]),
    (lambda: dn.map_coordinates(X.astype(int), C), TypeError, ["input", "floating", "int64"]),
    (lambda: dn.map_coordinates(X, np.zeros((3, 4))), ValueError,
     ["coordinates", "(ndim, ...)", "2 or 3", "(4, 5)", "(3, 4)"]),
    (lambda: dn.map_coordinates(X, np.zeros(())), ValueError, ["coordinates", "(ndim, ...)", "()"]),
    (lambda: dn.map_coordinates(X, C.astype(np.float32)), TypeError, ["input is float64", "coordinates is float32"]),
    (lambda: dn.map_coordinates_backward(np.zeros(4), X, C), ValueError, ["grad_output", "(3,)", "(4,)"]),
    (lambda: dn.affine_transform(X, np.eye(3)[:2, :2].ravel()), ValueError, ["matrix", "(n, n + 1)", "(4, 5)", "(4,)"]),
    (lambda: dn.affine_transform(X, np.ones((3, 3))), ValueError, ["matrix", "bottom row", "[0, 0, 1]"]),
    (lambda: dn.affine_transform(X, np.eye(2), np.zeros(3)), ValueError, ["offset", "() or (2,)", "(3,)"]),
    (lambda: dn.affine_transform(X, np.eye(2), output_shape=(3,)), ValueError, ["output_shape", "2 integers"]),
    (lambda: dn.affine_transform(X, np.eye(2), output_shape=(3, 2.0)), TypeError, ["output_shape", "2.0"]),
    (lambda: dn.affine_transform(np.zeros((2, 4, 5)), np.eye(2), output_shape=(3, 4, 5)), ValueError,
     ["output_shape", "batch", "(2,)", "(3, 4, 5)"]),
    (lambda: dn.affine_transform(np.zeros((2, 3, 4, 5)), np.eye(4)), ValueError, ["matrix", "(n, n)", "(4, 4)"]),
    (lambda: dn.affine_transform(X, np.eye(2, dtype=np.float32)), TypeError, ["matrix is float32"]),
    (lambda: dn.affine_transform(X, "eye"), TypeError, ["matrix"]),
    (lambda: dn.affine_transform_backward(np.zeros((4, 4)), X, np.eye(2)), ValueError, ["grad_output", "(4, 5)"]),
])
def test_bad_input_is_named(call, error, words):
    with pytest.raises(error) as raised:
        call()
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("mode", MODES)
def test_huge_coordinates_read_inside_the_input(mode, order):
    """Coordinates past 2**53 (folded as precisely as floating point allows): a finite value, the same on the host
    backend as on the NumPy path (run under the sanitizers too: no read outside the input)."""
    x = np.arange(12.0).reshape(3, 4)
    c = np.array([[1e30, -1e30, 1e300, 3e15, 0.5], [0.5, 2.0, -1e300, -3e15, 1e20]])
    expected = dn.map_coordinates(x, c, order=order, mode=mode, cval=-1.0)
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(testing.run("host", dn.map_coordinates, x, c, order=order, mode=mode, cval=-1.0),
                               expected, rtol=1e-14, atol=1e-14)
