"""Backend selection and the round trip of arrays from other frameworks."""
import numpy as np
import pytest

import deformcp
from deformcp import _dispatch
from deformcp.ops import SPECS


class FakeDLPack:
    """An array from a framework deformcp does not know, reporting a device through DLPack."""

    __module__ = "otherframework"

    def __init__(self, device, dtype="float32"):
        self.device, self.dtype = device, dtype

    def __dlpack__(self, **kwargs):
        raise AssertionError("must not be read: the call is rejected before any data is imported")

    def __dlpack_device__(self):
        return self.device


def test_backend_context(rng):
    assert deformcp.current_backend() == "numpy"
    with deformcp.backend("host") as name:
        assert name == "host" and deformcp.current_backend() == "host"
        with deformcp.backend("numpy"):
            assert deformcp.current_backend() == "numpy"
        assert deformcp.current_backend() == "host"
    assert deformcp.current_backend() == "numpy"
    with pytest.raises(ValueError, match=r"backend: expected one of \('numpy', 'host'\), got 'cuda'"):
        with deformcp.backend("cuda"):
            pass


def test_backend_context_routes_cpu_arrays(rng, monkeypatch):
    launched = []
    real_launch = deformcp._kernels.launch

    def recording_launch(backend, *args, **kwargs):
        launched.append(backend)
        return real_launch(backend, *args, **kwargs)

    monkeypatch.setattr(deformcp._kernels, "launch", recording_launch)
    theta = rng.standard_normal((1, 2, 3))
    deformcp.affine_grid(theta, (1, 1, 2, 2))
    assert launched == []
    with deformcp.backend("host"):
        deformcp.affine_grid(theta, (1, 1, 2, 2))
    assert launched == ["host"]


def test_mixed_devices_rejected():
    with pytest.raises(ValueError, match=r"all arrays of one call must be on one device: "
                                         r"input on cpu:0, grid on cuda:0"):
        deformcp.grid_sample(FakeDLPack((1, 0)), FakeDLPack((2, 0)))


def test_unknown_dlpack_device_rejected():
    with pytest.raises(ValueError, match="unsupported DLPack device type 14"):
        deformcp.affine_grid(FakeDLPack((14, 0)), (1, 1, 2, 2))


def test_cuda_bfloat16_mixed_with_another_float_rejected():
    """On a CUDA device a bfloat16 call runs in float32 (CuPy has no bfloat16 arrays): a call mixing bfloat16 with
    another floating dtype is refused, naming every floating array, before any data is read or CuPy imported —
    the cast must not promote it silently (the torch.bfloat16 dtype string of a CUDA tensor, JAX's "bfloat16")."""
    for dtype in ("torch.bfloat16", "bfloat16"):
        with pytest.raises(TypeError, match=r"^a bfloat16 call needs every floating array in bfloat16: "
                                            r"input is bfloat16, grid is float32$"):
            deformcp.grid_sample(FakeDLPack((2, 0), dtype), FakeDLPack((2, 0), "float32"))
        with pytest.raises(TypeError, match=r"input is float16, boxes is bfloat16$"):
            _dispatch.prepare(input=FakeDLPack((2, 0), "float16"), boxes=FakeDLPack((2, 0), dtype))


def test_non_arrays_rejected():
    with pytest.raises(TypeError, match=r"theta: expected an array .*got builtins.str"):
        deformcp.affine_grid("theta", (1, 1, 2, 2))


class HasArray:
    """An object that NumPy converts through ``__array__``."""

    def __init__(self, array):
        self.array = array

    def __array__(self, dtype=None, copy=None):
        return self.array


#: Array-likes of a float64 NumPy array, as NumPy converts them.
ARRAY_LIKES = {"list": np.ndarray.tolist, "tuple": lambda a: tuple(a.tolist()) if a.ndim else a.item(),
               "memoryview": memoryview, "__array__": HasArray}


@pytest.mark.parametrize("kind", ARRAY_LIKES)
@pytest.mark.parametrize("name", SPECS)
def test_array_likes_are_what_numpy_asarray_makes_of_them(name, kind, rng):
    """Every op takes, for each array argument, what numpy.asarray takes (a nested list of floats is float64), with
    the results of the NumPy arrays, forward and backward. A RoI op's boxes stay an array: a list of boxes is a list
    of per-image arrays (test_per_image_boxes_may_be_array_likes)."""
    spec = SPECS[name]
    case = spec.cases[0]
    arrays = case.make(rng)
    convert = ARRAY_LIKES[kind]
    likes = {k: v if k == spec.boxes else convert(v) for k, v in arrays.items()}
    expected = spec.function(**arrays, **case.options)
    out = spec.function(**likes, **case.options)
    assert type(out) is np.ndarray and out.dtype == np.float64
    np.testing.assert_array_equal(out, expected)
    grad_output = rng.standard_normal(np.shape(expected))
    got = spec.backward(convert(grad_output), **likes, **case.options)
    for field, want in zip(spec.differentiable, spec.backward(grad_output, **arrays, **case.options)):
        np.testing.assert_array_equal(getattr(got, field), want, err_msg=field)


def test_per_image_boxes_may_be_array_likes(rng):
    x = rng.standard_normal((2, 3, 5, 6))
    per_image = [rng.uniform(0, 4, (2, 4)), rng.uniform(0, 4, (1, 4))]
    expected = deformcp.roi_align(x, per_image, 2)
    np.testing.assert_array_equal(deformcp.roi_align(x.tolist(), [b.tolist() for b in per_image], 2), expected)


def test_array_likes_meet_the_dtype_rules():
    """ints and bools stay ints and bools, which the floating ops refuse by their dtype rule; a float32 array and a
    list of floats (float64) are mixed dtypes; a list beside a tensor is a mixed call."""
    grid = np.zeros((1, 1, 1, 2))
    with pytest.raises(TypeError, match=r"^input: expected a floating-point array \(.*\), got dtype int64$"):
        deformcp.grid_sample([[[[1, 2]]]], grid)
    with pytest.raises(TypeError, match=r"^input: expected a floating-point array \(.*\), got dtype bool$"):
        deformcp.grid_sample([[[[True]]]], grid)
    with pytest.raises(TypeError, match="one dtype: input is float32, grid is float64"):
        deformcp.grid_sample(np.zeros((1, 1, 2, 2), np.float32), grid.tolist())
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="one framework: input is torch.Tensor, grid is builtins.list"):
        deformcp.grid_sample(torch.zeros(1, 1, 2, 2, dtype=torch.float64), grid.tolist())


class BadArray:
    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("no values here")


@pytest.mark.parametrize("value, got", [
    ("abc", r"builtins.str 'abc' \(numpy.asarray: dtype <U3\)"),
    (b"ab", r"builtins.bytes b'ab' \(numpy.asarray: dtype \|S2\)"),
    ([[1.0, 2.0], [3.0]], r"builtins.list \(numpy.asarray: setting an array element with a sequence.*inhomogeneous"),
    ([1.0, None], r"builtins.list \[1.0, None\] \(numpy.asarray: dtype object\)"),
    (object(), r"builtins.object <object object at .*\(numpy.asarray: dtype object\)"),
    (BadArray(), r"test_dispatch.BadArray \(numpy.asarray: no values here\)"),
])
def test_what_numpy_cannot_make_a_numeric_array_of_is_refused(value, got):
    expected = (r"expected an array \(numpy.ndarray, cupy.ndarray, an array supporting DLPack, or what numpy.asarray "
                r"makes a numeric array of\), got ")
    with pytest.raises(TypeError, match="^grid: " + expected + got):
        deformcp.grid_sample(np.zeros((1, 1, 2, 2)), value)
    with pytest.raises(TypeError, match="^boxes\\[0\\]: " + expected + got):
        deformcp.roi_align(np.zeros((1, 1, 2, 2)), [value], 2)


def test_dispatch_prepare_passes_none_through(rng):
    x = rng.standard_normal(3)
    call = _dispatch.prepare(a=x, b=None)
    assert call.arrays[0] is x and call.arrays[1] is None and call.backend == "numpy"


# ---------------------------------------------------------------------------------------------- PyTorch

def test_torch_tensors_round_trip(rng):
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((2, 3, 5, 6)))
    grid = torch.from_numpy(rng.uniform(-1, 1, (2, 4, 4, 2)))
    for backend in ("numpy", "host"):
        with deformcp.backend(backend):
            out = deformcp.grid_sample(x, grid, align_corners=True)
            grads = deformcp.grid_sample_backward(torch.ones_like(out), x, grid, align_corners=True)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.device.type == "cpu"
        assert all(isinstance(g, torch.Tensor) for g in grads)
        expected = torch.nn.functional.grid_sample(x, grid, align_corners=True)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-13)


def test_torch_result_shares_memory_with_what_deformcp_wrote(rng):
    torch = pytest.importorskip("torch")
    theta = torch.from_numpy(rng.standard_normal((1, 2, 3)))
    grid = deformcp.affine_grid(theta, (1, 1, 3, 3))
    view = np.from_dlpack(grid)       # the same memory, seen from NumPy
    view[0, 0, 0, 0] = 123.0
    assert grid[0, 0, 0, 0].item() == 123.0


def test_torch_input_is_read_in_place(rng, imported):
    torch = pytest.importorskip("torch")
    theta = torch.from_numpy(rng.standard_normal((1, 2, 3)))
    deformcp.affine_grid(theta, (1, 1, 2, 2))
    assert imported[0].ctypes.data == theta.data_ptr()  # imported without a copy


def test_torch_requires_grad_rejected(rng):
    torch = pytest.importorskip("torch")
    theta = torch.zeros((1, 2, 3), dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"theta: the tensor requires grad; pass tensor.detach\(\)"):
        deformcp.affine_grid(theta, (1, 1, 2, 2))


def test_mixed_frameworks_rejected(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((1, 1, 2, 2))
    with pytest.raises(TypeError, match=r"one framework: input is numpy.ndarray, grid is torch.Tensor"):
        deformcp.grid_sample(x, torch.zeros((1, 1, 1, 2), dtype=torch.float64))


# -------------------------------------------------------------------------------------------------- JAX

def test_jax_arrays_round_trip(rng):
    jnp = pytest.importorskip("jax.numpy")
    theta = rng.standard_normal((2, 2, 3))
    grid = deformcp.affine_grid(jnp.asarray(theta, dtype=jnp.float32), (2, 1, 3, 4))
    assert type(grid).__module__.startswith("jax")
    np.testing.assert_allclose(np.asarray(grid), deformcp.affine_grid(theta.astype(np.float32), (2, 1, 3, 4)))


def test_noncontiguous_torch_tensors(rng):
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(rng.standard_normal((2, 3, 5, 6))).transpose(2, 3)   # strided view, (2, 3, 6, 5)
    grid = torch.from_numpy(rng.uniform(-1, 1, (2, 4, 4, 2)))
    assert not x.is_contiguous()
    out = deformcp.grid_sample(x, grid)
    expected = deformcp.grid_sample(np.ascontiguousarray(x.numpy()), grid.numpy())
    assert isinstance(out, torch.Tensor)
    np.testing.assert_array_equal(out.numpy(), expected)


def test_jax_input_is_read_in_place(rng, imported):
    jax = pytest.importorskip("jax")
    theta = jax.numpy.asarray(rng.standard_normal((1, 2, 3)).astype(np.float32))
    grid = deformcp.affine_grid(theta, (1, 1, 2, 3))
    assert imported[0].ctypes.data == theta.unsafe_buffer_pointer()  # imported without a copy
    assert list(grid.devices())[0].platform == "cpu"
