"""bfloat16 DLPack arrays on the CPU (deformcp._dispatch): PyTorch tensors and JAX arrays go in without a copy,
results come back in the caller's bfloat16, through deformcp's functions and the deformcp.torch / deformcp.jax
wrappers; the errors without ml_dtypes, for arrays NumPy cannot read, and on CUDA (test_dispatch.py)."""
import sys

import numpy as np
import pytest

import deformcp
from deformcp import _dispatch, _host, testing
from deformcp.ops import SPECS

ml_dtypes = pytest.importorskip("ml_dtypes")

BF16 = np.dtype(ml_dtypes.bfloat16)
TOLERANCE = testing.TOLERANCE["bfloat16"]
CASES = [(spec, case) for spec in SPECS.values() for case in spec.cases]
IDS = [f"{spec.name}-{case.label}" for spec, case in CASES]


@pytest.fixture(params=["numpy", "host"])
def cpu_backend(request):
    if request.param == "host" and _host.compiler() is None:
        pytest.skip("host backend: no C++ compiler found")
    return request.param


def assert_grads(grads, expected_grads: dict, dtype, values):
    """Each gradient present where expected, of dtype, its values (read by values) close to the expectation."""
    for name, want in expected_grads.items():
        got = getattr(grads, name)
        assert (got is None) == (want is None), name
        if got is not None:
            assert got.dtype == dtype, name
            assert_close(values(got), want)


def bfloat16_case(spec, case, rng):
    """The case's arrays rounded to bfloat16 (NumPy), a bfloat16 grad_output, and what deformcp computes in float32
    on those very values, rounded to bfloat16: the forward, and the gradients by name (None where absent)."""
    arrays = {name: a.astype(BF16) for name, a in case.make(rng).items()}
    as_float32 = {name: a.astype(np.float32) for name, a in arrays.items()}
    forward = spec.function(**as_float32, **case.options)
    grad_output = rng.standard_normal(np.shape(forward)).astype(BF16)
    grads = spec.backward(grad_output.astype(np.float32), **as_float32, **case.options)
    rounded = {name: None if g is None else g.astype(BF16) for name, g in grads._asdict().items()}
    return arrays, grad_output, forward.astype(BF16), rounded


def assert_close(actual, expected):
    """actual (any framework's bfloat16, as float32 NumPy) within TOLERANCE["bfloat16"] of the rounded float32."""
    assert actual.shape == expected.shape
    error = testing.relative_error(actual, expected.astype(np.float64))
    assert error <= TOLERANCE, f"relative error {error:.3e}"


def aligned_bfloat16(shape, alignment=64):
    """A NumPy bfloat16 array whose buffer starts at a multiple of alignment bytes."""
    size = int(np.prod(shape)) * BF16.itemsize
    raw = np.zeros(size + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + size].view(BF16).reshape(shape)


# ---------------------------------------------------------------------------------------------- PyTorch

def torch_bfloat16(a):
    torch = pytest.importorskip("torch")
    return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)


def torch_values(t):
    return t.float().cpu().numpy()


@pytest.mark.parametrize("spec, case", CASES, ids=IDS)
def test_torch_bfloat16_equals_float32_rounded(spec, case, cpu_backend, rng):
    """Forward and backward on bfloat16 tensors give bfloat16 tensors within TOLERANCE["bfloat16"] of the float32
    computation rounded; the inputs are left as they were (bitwise)."""
    torch = pytest.importorskip("torch")
    arrays, grad_output, expected, expected_grads = bfloat16_case(spec, case, rng)
    tensors = {name: torch_bfloat16(a) for name, a in arrays.items()}
    before = {name: t.clone() for name, t in tensors.items()}
    with deformcp.backend(cpu_backend):
        out = spec.function(**tensors, **case.options)
        grads = spec.backward(torch_bfloat16(grad_output), **tensors, **case.options)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    assert_close(torch_values(out), expected)
    assert_grads(grads, expected_grads, torch.bfloat16, torch_values)
    for name, t in tensors.items():
        assert torch.equal(t, before[name]), f"{name} was modified"


@pytest.mark.parametrize("spec, case", CASES, ids=IDS)
def test_torch_cuda_bfloat16_equals_float32_rounded(spec, case, rng):
    """On a CUDA device (one documented cast: bfloat16 → float32 → bfloat16): bfloat16 CUDA tensors out, within
    TOLERANCE["bfloat16"] of the float32 computation rounded, as on the CPU; inputs left as they were."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available() or testing.gpu_available() is not None:
        pytest.skip("CUDA: no GPU for torch and CuPy")
    arrays, grad_output, expected, expected_grads = bfloat16_case(spec, case, rng)
    tensors = {name: torch_bfloat16(a).cuda() for name, a in arrays.items()}
    before = {name: t.clone() for name, t in tensors.items()}
    out = spec.function(**tensors, **case.options)
    grads = spec.backward(torch_bfloat16(grad_output).cuda(), **tensors, **case.options)
    assert out.dtype == torch.bfloat16 and out.is_cuda
    assert_close(torch_values(out), expected)
    assert_grads(grads, expected_grads, torch.bfloat16, torch_values)
    for name, t in tensors.items():
        assert torch.equal(t, before[name]), f"{name} was modified"


def test_torch_bfloat16_input_is_read_in_place(rng, imported):
    """The imported array is the tensor's memory: same address, and a write to the tensor shows through it."""
    x = torch_bfloat16(rng.standard_normal((2, 3, 5, 6)))
    grid = torch_bfloat16(rng.uniform(-1, 1, (2, 4, 4, 2)))
    deformcp.grid_sample(x, grid)
    seen_x, seen_grid = imported
    assert seen_x.dtype == BF16 and seen_x.ctypes.data == x.data_ptr()
    assert seen_grid.dtype == BF16 and seen_grid.ctypes.data == grid.data_ptr()
    x[1, 2, 4, 5] = 7.0
    assert seen_x[1, 2, 4, 5] == 7.0


def test_noncontiguous_torch_bfloat16_is_read_in_place(rng, imported):
    x = torch_bfloat16(rng.standard_normal((2, 3, 5, 6))).transpose(2, 3)
    grid = torch_bfloat16(rng.uniform(-1, 1, (2, 4, 4, 2)))
    assert not x.is_contiguous()
    out = deformcp.grid_sample(x, grid)
    seen_x = imported[0]
    assert seen_x.ctypes.data == x.data_ptr() and seen_x.strides == tuple(2 * s for s in x.stride())
    expected = deformcp.grid_sample(np.ascontiguousarray(x.float().numpy()), grid.float().numpy()).astype(BF16)
    np.testing.assert_array_equal(torch_values(out), expected.astype(np.float32))


def test_torch_bfloat16_result_is_handed_back_in_place():
    """The exported tensor is the memory deformcp wrote: same address, and a write to it shows in the tensor."""
    torch = pytest.importorskip("torch")
    call = _dispatch.prepare(x=torch.zeros((2, 3), dtype=torch.bfloat16))
    result = np.arange(6, dtype=np.float32).reshape(2, 3).astype(BF16)
    out = call.export(result)
    assert out.dtype == torch.bfloat16 and out.data_ptr() == result.ctypes.data
    np.testing.assert_array_equal(torch_values(out), result.astype(np.float32))
    result[1, 2] = -3.0
    assert out[1, 2].item() == -3.0
    scalar = call.export(np.asarray(2.5, dtype=BF16))   # a 0-d result (mimic_loss)
    assert scalar.dtype == torch.bfloat16 and scalar.shape == () and scalar.item() == 2.5


def test_torch_bfloat16_boxes_as_a_list(rng):
    torch = pytest.importorskip("torch")
    x = torch_bfloat16(rng.standard_normal((2, 3, 6, 6)))
    boxes = [torch_bfloat16(np.array([[0.5, 0.5, 4.0, 5.0]])), torch_bfloat16(np.array([[1.0, 0.0, 5.0, 3.5]]))]
    out = deformcp.roi_align(x, boxes, 2)
    rois = np.array([[0, 0.5, 0.5, 4.0, 5.0], [1, 1.0, 0.0, 5.0, 3.5]], np.float32)
    assert out.dtype == torch.bfloat16
    assert_close(torch_values(out), deformcp.roi_align(x.float().numpy(), rois, 2).astype(BF16))


@pytest.mark.parametrize("spec, case", CASES, ids=IDS)
def test_torch_autograd_bfloat16(spec, case, rng):
    """deformcp.torch's autograd functions on bfloat16 tensors: a bfloat16 output and bfloat16 gradients for the
    differentiable inputs, within TOLERANCE["bfloat16"] of the float32 computation rounded."""
    torch = pytest.importorskip("torch")
    dtorch = pytest.importorskip("deformcp.torch")
    arrays, grad_output, expected, expected_grads = bfloat16_case(spec, case, rng)
    tensors = {name: torch_bfloat16(a).requires_grad_(name in spec.differentiable) for name, a in arrays.items()}
    out = getattr(dtorch, spec.name)(**tensors, **case.options)
    assert out.dtype == torch.bfloat16 and out.requires_grad
    assert_close(torch_values(out.detach()), expected)
    out.backward(torch_bfloat16(grad_output))
    for name, t in tensors.items():
        if name in spec.differentiable:
            assert t.grad is not None and t.grad.dtype == torch.bfloat16, name
            assert_close(torch_values(t.grad), expected_grads[name])
        else:
            assert t.grad is None, name


# -------------------------------------------------------------------------------------------------- JAX

def jax_bfloat16(a):
    jnp = pytest.importorskip("jax.numpy")
    return jnp.asarray(a.astype(BF16))


def jax_values(a):
    return np.asarray(a).astype(np.float32)


@pytest.mark.parametrize("spec, case", CASES, ids=IDS)
def test_jax_bfloat16_equals_float32_rounded(spec, case, cpu_backend, rng):
    jnp = pytest.importorskip("jax.numpy")
    arrays, grad_output, expected, expected_grads = bfloat16_case(spec, case, rng)
    jax_arrays = {name: jax_bfloat16(a) for name, a in arrays.items()}
    with deformcp.backend(cpu_backend):
        out = spec.function(**jax_arrays, **case.options)
        grads = spec.backward(jax_bfloat16(grad_output), **jax_arrays, **case.options)
    assert type(out).__module__.startswith("jax") and out.dtype == jnp.bfloat16
    assert_close(jax_values(out), expected)
    assert_grads(grads, expected_grads, jnp.bfloat16, jax_values)
    for name, a in jax_arrays.items():
        np.testing.assert_array_equal(np.asarray(a), arrays[name], err_msg=f"{name} was modified")


def test_jax_bfloat16_input_is_read_in_place(rng, imported):
    x = jax_bfloat16(rng.standard_normal((2, 3, 5, 6)))
    grid = jax_bfloat16(rng.uniform(-1, 1, (2, 4, 4, 2)))
    deformcp.grid_sample(x, grid)
    seen_x, seen_grid = imported
    assert seen_x.dtype == BF16 and seen_x.ctypes.data == x.unsafe_buffer_pointer()
    assert seen_grid.dtype == BF16 and seen_grid.ctypes.data == grid.unsafe_buffer_pointer()


def test_jax_bfloat16_result_is_handed_back():
    """Through jax.device_put on the input's device: in place where the buffer is 64-byte aligned (as JAX's
    from_dlpack), else copied."""
    jnp = pytest.importorskip("jax.numpy")
    template = jax_bfloat16(np.zeros((2, 3)))
    call = _dispatch.prepare(x=template)
    aligned = aligned_bfloat16((4, 8))
    aligned[:] = np.arange(32).reshape(4, 8)
    unaligned = aligned_bfloat16((5, 8), alignment=128)[1:]   # starts 16 bytes past a 128-byte boundary
    unaligned[:] = 1.5
    for result in (aligned, unaligned):
        out = call.export(result)
        assert out.dtype == jnp.bfloat16 and out.devices() == template.devices()
        np.testing.assert_array_equal(np.asarray(out), result)
    assert call.export(aligned).unsafe_buffer_pointer() == aligned.ctypes.data


@pytest.mark.parametrize("spec, case", CASES, ids=IDS)
def test_jax_vjp_bfloat16(spec, case, rng):
    """deformcp.jax (its callbacks get NumPy bfloat16 arrays from JAX): forward and VJP in bfloat16."""
    jax = pytest.importorskip("jax")
    djax = pytest.importorskip("deformcp.jax")
    arrays, grad_output, expected, expected_grads = bfloat16_case(spec, case, rng)
    names = tuple(arrays)

    def function(*a):
        return getattr(djax, spec.name)(**dict(zip(names, a)), **case.options)

    out, vjp = jax.vjp(function, *(jax_bfloat16(arrays[name]) for name in names))
    assert out.dtype == jax.numpy.bfloat16
    assert_close(jax_values(out), expected)
    for name, grad in zip(names, vjp(jax_bfloat16(grad_output))):
        if name in spec.differentiable:
            assert grad.dtype == jax.numpy.bfloat16, name
            assert_close(jax_values(grad), expected_grads[name])


# ------------------------------------------------------------------------------------ other frameworks

class OtherArray:
    """A bfloat16 array of a framework deformcp does not know: DLPack as NumPy's own (which cannot say
    bfloat16), NumPy's array protocol, and an array namespace with asarray."""

    __module__ = "otherframework"

    def __init__(self, data, array_protocol=True):
        self.data, self.dtype, self.shape = data, data.dtype, data.shape
        if array_protocol:
            self.__array__ = lambda dtype=None, copy=None: self.data

    def __dlpack__(self, **kwargs):
        return self.data.__dlpack__(**kwargs)   # raises: NumPy's DLPack has no bfloat16

    def __dlpack_device__(self):
        return (1, 0)

    def __array_namespace__(self, api_version=None):
        return OtherNamespace


class OtherNamespace:
    @staticmethod
    def asarray(a):
        return OtherArray(np.asarray(a))


def test_other_frameworks_go_through_the_array_protocol(rng, imported):
    theta = rng.standard_normal((2, 2, 3)).astype(BF16)
    out = deformcp.affine_grid(OtherArray(theta), (2, 1, 3, 4))
    assert imported[0].ctypes.data == theta.ctypes.data
    assert isinstance(out, OtherArray) and out.dtype == BF16
    expected = deformcp.affine_grid(theta.astype(np.float32), (2, 1, 3, 4)).astype(BF16)
    assert_close(out.data.astype(np.float32), expected)


def test_other_frameworks_without_the_array_protocol_are_refused():
    theta = OtherArray(np.zeros((1, 2, 3), BF16), array_protocol=False)
    with pytest.raises(TypeError, match=r"theta: cannot import the bfloat16 otherframework.OtherArray: NumPy's "
                                        r"DLPack has no bfloat16, and np.asarray gave dtype\('O'\)"):
        deformcp.affine_grid(theta, (1, 1, 2, 2))


# ----------------------------------------------------------------------------------------------- errors

def test_bfloat16_without_ml_dtypes_says_to_install_it(monkeypatch):
    torch = pytest.importorskip("torch")
    theta = torch.zeros((1, 2, 3), dtype=torch.bfloat16)
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)   # import ml_dtypes raises ImportError
    with pytest.raises(TypeError, match=r"^theta: a bfloat16 array needs ml_dtypes, .*\(pip install ml_dtypes\)$"):
        deformcp.affine_grid(theta, (1, 1, 2, 2))
    x = torch.zeros((1, 1, 2, 2), dtype=torch.float32)
    with pytest.raises(TypeError, match=r"^grid: a bfloat16 array needs ml_dtypes"):
        deformcp.grid_sample(x, torch.zeros((1, 1, 1, 2), dtype=torch.bfloat16))
