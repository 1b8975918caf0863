"""deformcp.jax: every op through its jax.custom_jvp, callbacks and tangent primitive, on JAX's CPU backend, in
float64.

The per-op tests run over the spec table (deformcp.ops.SPECS): every op and every parity case of its spec
(``spec.cases``), so an op added to the table is covered here without editing this file. For each case:
the forward equals the deformcp (NumPy) function; jax.vjp with a random cotangent equals deformcp's backward
(``spec.backward``) for every differentiable argument, and gives zeros to the others (boxes); jax.grad of a
random linear functional matches directional central finite differences; jax.jit gives the results of the
eager calls. The spec cases are random, so a finite difference can straddle a kink of the op (bilinear
sampling at integer coordinates, max pooling, samples crossing a border): a difference whose step crosses
one is detected (central differences at two steps disagree) and the step is halved; cases whose point
itself sits on a discontinuity are excluded from the finite differences by name (FD_EXCLUDED), and keep the
backward comparison. The CUDA route cannot run here; its plumbing is checked with a stand-in for
CuPy. Forward mode (the ops with a jax.numpy form): their forms equal the ops and their backward, jax.jvp is the
transpose of deformcp's backward, jax.hessian through affine_grid + grid_sample matches finite differences of the
gradient, and every other op refuses forward mode by name.
"""
import contextlib
import functools
import inspect
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import deformcp  # noqa: E402
import deformcp.jax as djax  # noqa: E402
from deformcp.ops import SPECS, _call  # noqa: E402

from conftest import directional_derivative  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def x64():
    """float64 in JAX for this module only (restored afterwards)."""
    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


def random_boxes(rng, N, H, W, K):
    x1, y1 = rng.uniform(-2, W - 2, K), rng.uniform(-2, H - 2, K)
    return np.stack([rng.integers(0, N, K), x1, y1, x1 + rng.uniform(1, W, K), y1 + rng.uniform(1, H, K)], axis=1)


# ------------------------------------------------------------------------------------------------ cases

class Inputs(NamedTuple):
    """One spec case, made: the op's arrays (NumPy float64, by name, absent optional ones left out) and
    its JAX and deformcp functions of those arrays, positionally, in that order."""

    spec: object
    options: dict
    names: tuple           # the array arguments given, in signature order
    arrays: tuple          # NumPy float64 arrays, one per name
    diff: tuple            # indices (into names) of the differentiable arrays

    def jax_fn(self, *arrays):
        return getattr(djax, self.spec.name)(**dict(zip(self.names, arrays)), **self.options)

    def numpy_fn(self, *arrays):
        return self.spec.function(**dict(zip(self.names, arrays)), **self.options)

    @property
    def jax_arrays(self) -> tuple:
        return tuple(jnp.asarray(a) for a in self.arrays)


def make(spec, case, rng) -> Inputs:
    made = case.make(rng)
    names = tuple(name for name in spec.arrays if name in made)
    assert set(made) == set(names), (spec.name, case.label, sorted(made))
    diff = tuple(i for i, name in enumerate(names) if name in spec.differentiable)
    return Inputs(spec, case.options, names, tuple(made[name] for name in names), diff)


def example(name, rng, label=None) -> Inputs:
    """The first spec case of op ``name`` (or the one labelled ``label``), made."""
    spec = SPECS[name]
    case = next((c for c in spec.cases if label in (None, c.label)), None)
    assert case is not None, f"{name}: no spec case labelled {label!r}"
    return make(spec, case, rng)


def case_id(spec, case) -> str:
    return f"{spec.name}-{case.label}"


CASES = [(spec, case) for spec in SPECS.values() for case in spec.cases]
IDS = [case_id(spec, case) for spec, case in CASES]

#: Cases whose finite differences mean nothing, by id, with the reason: the point itself sits on a
#: discontinuity. The backward comparison (test_vjp_equals_deformcp_backward) still covers them.
FD_EXCLUDED = {
    **{f"affine_transform-{n}d-matrix({n + 1}, {n + 1})-offset({n},)-order=1-grid-wrap":
       "a homogeneous matrix's bottom row must stay [0, …, 0, 1]: a direction that moves it is refused"
       for n in (2, 3)},
    "mimic_loss-zero-rows-and-scaled-rows": "its all-zero rows: cos jumps there (taken as 0 at a zero row), so "
                                            "every direction that moves them has a central difference of ~1/step",
}


@pytest.fixture(params=CASES, ids=IDS)
def case(request, rng):
    return make(*request.param, rng)


def functional(case, rng):
    """A random linear functional of the op's output, and its weights."""
    weights = rng.standard_normal(np.shape(case.numpy_fn(*case.arrays)))
    return (lambda *arrays: jnp.sum(weights * case.jax_fn(*arrays))), weights


def smooth_directional_derivative(f, arrays, index, direction, step=1e-6, halvings=4):
    """f's central difference along direction, at a step that crosses no kink of f.

    Between kinks the ops are polynomials of degree ≤ 2 along a line through one argument (bilinear sampling)
    or smooth, so a central difference is exact up to rounding (or O(step²)) at any small step: where the
    differences at step and step / 2 disagree, a kink (or a jump) lies within the step, which is halved (a
    sample within ~1e-6 pixel of an integer, a max-pooling tie that switches near the point). A kink at the
    point itself fails the test: such a case belongs in FD_EXCLUDED.
    """
    for k in range(halvings + 1):
        h = step / 2 ** k
        numeric = directional_derivative(f, arrays, index, direction, h)
        half = directional_derivative(f, arrays, index, direction, h / 2)
        if abs(numeric - half) <= 1e-6 * max(1.0, abs(numeric)):
            return numeric
    pytest.fail(f"argument {index}: a kink within every step from {step:.1e} down to {h / 2:.1e} (the point sits "
                f"on one?)")


# ------------------------------------------------------------------------------------------------ tests

def test_every_spec_has_a_jax_function():
    """An op added to SPECS needs its function in deformcp.jax, with the deformcp function's arguments (names,
    order, kinds, defaults) and a keyword-only ``deterministic=False`` where its backward takes one."""
    assert sorted(djax.__all__) == sorted(SPECS)
    for name, spec in SPECS.items():
        expected = [p.replace(annotation=inspect.Parameter.empty)  # the types are documented once, in deformcp
                    for p in inspect.signature(spec.function).parameters.values()]
        if spec.deterministic:
            expected.append(inspect.Parameter("deterministic", inspect.Parameter.KEYWORD_ONLY, default=False))
        assert list(inspect.signature(getattr(djax, name)).parameters.values()) == expected, name


def test_forward_equals_numpy(case):
    actual = case.jax_fn(*case.jax_arrays)
    expected = case.numpy_fn(*case.arrays)
    assert isinstance(actual, jax.Array) and actual.dtype == expected.dtype == np.float64
    np.testing.assert_array_equal(np.asarray(actual), expected)


def test_vjp_equals_deformcp_backward(case, rng):
    """jax.vjp with a random cotangent: deformcp's backward for every differentiable argument (exactly:
    the same NumPy path runs in the callback), zeros for the others (boxes/RoIs)."""
    arrays = case.jax_arrays
    assert all(a.dtype == jnp.float64 for a in arrays)
    out, vjp = jax.vjp(case.jax_fn, *arrays)
    cotangent = rng.standard_normal(out.shape)
    grads = vjp(jnp.asarray(cotangent))
    expected = case.spec.backward(cotangent, **dict(zip(case.names, case.arrays)), **case.options)
    for i, (name, grad) in enumerate(zip(case.names, grads)):
        assert grad.shape == case.arrays[i].shape and grad.dtype == jnp.float64, name
        if i in case.diff:
            np.testing.assert_array_equal(np.asarray(grad), getattr(expected, name), err_msg=name)
        else:
            assert not np.any(np.asarray(grad)), name


def test_grad_matches_finite_differences(case, rng, request):
    reason = FD_EXCLUDED.get(case_id(*request.node.callspec.params["case"]))
    if reason is not None:
        pytest.skip(f"finite differences not meaningful: {reason}")
    loss, weights = functional(case, rng)
    grads = jax.grad(loss, argnums=case.diff)(*case.jax_arrays)

    def numpy_loss(*arrays):  # the same functional of deformcp's forward (equal to JAX's: test_forward_equals_numpy)
        return float(np.sum(weights * case.numpy_fn(*arrays)))

    for index, grad in zip(case.diff, grads):
        direction = rng.standard_normal(case.arrays[index].shape)
        numeric = smooth_directional_derivative(numpy_loss, case.arrays, index, direction)
        analytic = float(np.sum(np.asarray(grad) * direction))
        assert grad.shape == case.arrays[index].shape
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (case.names[index], analytic, numeric)


def test_fd_exclusions_name_existing_cases():
    assert set(FD_EXCLUDED) <= set(IDS)


def test_jit_equals_eager(case, rng):
    loss, _ = functional(case, rng)
    arrays = case.jax_arrays
    np.testing.assert_array_equal(np.asarray(jax.jit(case.jax_fn)(*arrays)), np.asarray(case.jax_fn(*arrays)))
    eager = jax.grad(loss, argnums=case.diff)(*arrays)
    jitted = jax.jit(jax.grad(loss, argnums=case.diff))(*arrays)
    for a, b in zip(jitted, eager):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13, atol=1e-13)


def test_boxes_as_a_list_of_per_image_arrays(rng):
    input, boxes = rng.standard_normal((2, 4, 7, 8)), random_boxes(rng, 2, 7, 8, 5)
    per_image = [boxes[boxes[:, 0] == n, 1:] for n in range(2)]
    expected = deformcp.roi_align(input, per_image, 2, sampling_ratio=2)
    np.testing.assert_array_equal(np.asarray(djax.roi_align(input, per_image, 2, sampling_ratio=2)), expected)


@pytest.fixture
def asked(monkeypatch):
    """What deformcp.jax asks the backward for: (op, needs_input_grad, deterministic) per call of
    deformcp.ops._call.run_backward (the one backward every VJP callback calls). The callbacks run on JAX's
    runtime thread, asynchronously: read it after jax.block_until_ready on the gradients."""
    calls = []
    original = _call.run_backward

    def run_backward(spec, grad_output, arrays, options, needs_input_grad, deterministic=False):
        calls.append((spec.name, tuple(needs_input_grad), deterministic))
        return original(spec, grad_output, arrays, options, needs_input_grad, deterministic)

    monkeypatch.setattr(_call, "run_backward", run_backward)
    return calls


def test_only_the_differentiated_inputs_get_gradients(rng, asked):
    """jax.grad with respect to some inputs asks deformcp for those gradients only (symbolic zeros); the
    others, and non-differentiable boxes, get zeros."""
    sample = example("grid_sample", rng, "bilinear-zeros-align_corners=False")
    loss, weights = functional(sample, rng)
    expected = deformcp.grid_sample_backward(weights, *sample.arrays, **sample.options).grid
    asked.clear()  # deformcp's own backward goes through run_backward too
    grad_grid = jax.block_until_ready(jax.grad(loss, argnums=1)(*sample.jax_arrays))
    assert asked == [("grid_sample", (False, True), False)]
    np.testing.assert_array_equal(np.asarray(grad_grid), expected)

    conv = example("deform_conv2d", rng, "v2")
    assert "mask" in conv.names
    loss, _ = functional(conv, rng)
    jax.block_until_ready(jax.jit(jax.grad(loss, argnums=conv.names.index("weight")))(*conv.jax_arrays))
    assert asked[1:] == [("deform_conv2d", (False, False, True, False, False), False)]

    roi = example("roi_align", rng)
    loss, _ = functional(roi, rng)
    grad_input, grad_boxes = jax.block_until_ready(jax.grad(loss, argnums=(0, 1))(*roi.jax_arrays))
    assert asked[2:] == [("roi_align", (True,), False)]
    assert not np.any(np.asarray(grad_boxes)) and grad_boxes.shape == roi.arrays[1].shape
    assert np.any(np.asarray(grad_input))


@pytest.mark.parametrize("name", list(SPECS))
def test_the_gradient_of_one_argument_is_the_only_one_asked_for(name, rng, asked):
    """Every op, every differentiable argument of its last case alone: needs_input_grad asks for it only;
    ``deterministic=True`` reaches the backward where the op takes it."""
    spec = SPECS[name]
    inputs = make(spec, spec.cases[-1], rng)
    flag = {"deterministic": True} if spec.deterministic else {}

    def loss(*arrays):
        return jnp.sum(getattr(djax, name)(**dict(zip(inputs.names, arrays)), **inputs.options, **flag))

    for index in inputs.diff:
        asked.clear()
        jax.block_until_ready(jax.grad(loss, argnums=index)(*inputs.jax_arrays))
        needs = tuple(field == inputs.names[index] for field in spec.differentiable)
        assert asked == [(name, needs, spec.deterministic)], inputs.names[index]


@pytest.fixture(params=["buffers", "copies"])
def mechanism(request, monkeypatch):
    """The callbacks get JAX's buffers in place (buffer_callback), or host copies (pure_callback: JAX without
    buffer_callback)."""
    if request.param == "buffers" and djax._buffer_callback is None:
        pytest.skip("this JAX has no buffer_callback")
    if request.param == "copies":
        monkeypatch.setattr(djax, "_buffer_callback", None)
    return request.param


@pytest.fixture
def runs(monkeypatch):
    """The ops' forward and backward runs, as ("forward" or "backward", op) per call of _call.run_forward and
    _call.run_backward (read after jax.block_until_ready: the callbacks run on JAX's runtime thread)."""
    calls = []
    forward, backward = _call.run_forward, _call.run_backward
    monkeypatch.setattr(_call, "run_forward",
                        lambda spec, *a: calls.append(("forward", spec.name)) or forward(spec, *a))
    monkeypatch.setattr(_call, "run_backward",
                        lambda spec, *a: calls.append(("backward", spec.name)) or backward(spec, *a))
    return calls


def test_operands_reach_deformcp_without_copies(rng, monkeypatch):
    """On the CPU deformcp runs on JAX's own buffers (buffer_callback): the arrays the forward gets are the JAX
    arrays' memory, eagerly and under jax.jit, and so are the backward's under jax.jit."""
    if djax._buffer_callback is None:
        pytest.skip("this JAX has no buffer_callback: its callbacks get copies")
    seen = []
    forward, backward = _call.run_forward, _call.run_backward

    def addresses(arrays):
        seen.append([a.__array_interface__["data"][0] for a in arrays.values()])

    monkeypatch.setattr(_call, "run_forward", lambda spec, arrays, *a: addresses(arrays) or forward(spec, arrays, *a))
    monkeypatch.setattr(_call, "run_backward",
                        lambda spec, g, arrays, *a: addresses(arrays) or backward(spec, g, arrays, *a))
    sample = example("grid_sample", rng)
    arrays = sample.jax_arrays
    expected = [[a.unsafe_buffer_pointer() for a in arrays]]
    jax.block_until_ready(sample.jax_fn(*arrays))
    jax.block_until_ready(jax.jit(sample.jax_fn)(*arrays))
    assert seen == expected * 2
    seen.clear()
    jax.block_until_ready(jax.jit(jax.grad(lambda *a: jnp.sum(sample.jax_fn(*a)), argnums=(0, 1)))(*arrays))
    assert seen and all(s == expected[0] for s in seen)  # the backward (XLA drops the unused forward) in place


FIRST_CASES = [(spec, spec.cases[0]) for spec in SPECS.values()]


@pytest.mark.parametrize("spec, case", FIRST_CASES, ids=[spec.name for spec, _ in FIRST_CASES])
def test_vmap_equals_a_loop_in_one_call(spec, case, rng, mechanism, runs):
    """jax.vmap over 3 draws of a case equals the op on each. Where every array mapped is one of the op's batch
    arrays (spec.batch) the op runs once, the vmapped axis folded into its batch, forward and backward (for
    those arrays' gradients); otherwise once per element (deform_conv2d here: its weight is mapped too)."""
    draws = [make(spec, case, rng) for _ in range(3)]
    stacked = [np.stack(arrays) for arrays in zip(*(d.arrays for d in draws))]
    expected = np.stack([d.numpy_fn(*d.arrays) for d in draws])
    folds = bool(spec.batch) and set(draws[0].names) <= set(spec.batch)  # every array mapped is a batch array
    runs.clear()
    out = jax.block_until_ready(jax.vmap(draws[0].jax_fn)(*stacked))
    assert runs == [("forward", spec.name)] * (1 if folds else 3)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-13, atol=1e-13)

    runs.clear()
    names = draws[0].names
    batch_only = [i for i in draws[0].diff if names[i] in spec.batch]
    g = rng.standard_normal(expected.shape)
    argnums = tuple(batch_only or draws[0].diff)  # the batch arrays' gradients alone where the op has them

    def pullback(*arrays_and_g):
        *arrays, cotangent = arrays_and_g

        def of_differentiated(*differentiated):
            return draws[0].jax_fn(*(differentiated[argnums.index(i)] if i in argnums else a
                                     for i, a in enumerate(arrays)))

        return jax.vjp(of_differentiated, *(arrays[i] for i in argnums))[1](cotangent)

    grads = jax.block_until_ready(jax.vmap(pullback)(*stacked, g))
    assert runs.count(("backward", spec.name)) == (1 if folds and batch_only else 3)
    for b, d in enumerate(draws):
        want = spec.backward(g[b], **dict(zip(names, d.arrays)), **d.options)
        for i, got in zip(argnums, grads):
            np.testing.assert_allclose(np.asarray(got)[b], getattr(want, names[i]), rtol=1e-12, atol=1e-12,
                                       err_msg=names[i])


def test_vmap_with_shared_weights_folds_unless_their_gradient_is_asked(rng, runs):
    """deform_conv2d vmapped over images, offsets and masks with one weight and bias: one call, and one backward
    for the image, offset and mask gradients; the weight's gradient per element is a call per element."""
    conv = example("deform_conv2d", rng, "v2")
    assert conv.names == ("input", "offset", "weight", "bias", "mask")
    draws = [make(SPECS["deform_conv2d"], SPECS["deform_conv2d"].cases[1], rng) for _ in range(3)]
    input, offset, mask = (np.stack([d.arrays[i] for d in draws]) for i in (0, 1, 4))
    weight, bias = conv.arrays[2], conv.arrays[3]

    def f(input, offset, mask, weight):
        return djax.deform_conv2d(input, offset, weight, bias, mask=mask, **conv.options)

    out = jax.block_until_ready(jax.vmap(f, in_axes=(0, 0, 0, None))(input, offset, mask, weight))
    assert runs == [("forward", "deform_conv2d")]
    for b in range(3):
        np.testing.assert_allclose(np.asarray(out[b]), conv.spec.function(input[b], offset[b], weight, bias,
                                                                           mask=mask[b], **conv.options),
                                   rtol=1e-13, atol=1e-13)
    runs.clear()
    loss = lambda *a: jnp.sum(f(*a) ** 2)  # noqa: E731
    jax.block_until_ready(jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, 0, 0, None))(input, offset, mask,
                                                                                                weight))
    assert runs.count(("backward", "deform_conv2d")) == 1
    runs.clear()
    per_image = jax.block_until_ready(jax.vmap(jax.grad(loss, argnums=3), in_axes=(0, 0, 0, None))(
        input, offset, mask, weight))
    assert runs.count(("backward", "deform_conv2d")) == 3
    for b in range(3):
        expected = jax.grad(loss, argnums=3)(input[b], offset[b], mask[b], weight)
        np.testing.assert_allclose(np.asarray(per_image[b]), np.asarray(expected), rtol=1e-13, atol=1e-13)


def test_nested_vmap_folds_both_axes(rng, runs):
    sample = example("grid_sample", rng)
    input, grid = (np.stack([np.stack([a * (1 + i + 2 * j) for i in range(2)]) for j in range(3)])
                   for a in sample.arrays)
    out = jax.block_until_ready(jax.vmap(jax.vmap(sample.jax_fn))(input, grid))
    assert runs == [("forward", "grid_sample")]
    assert out.shape == (3, 2) + sample.numpy_fn(*sample.arrays).shape
    np.testing.assert_allclose(np.asarray(out[2, 1]), sample.numpy_fn(input[2, 1], grid[2, 1]), rtol=1e-13,
                               atol=1e-13)


def test_vmap_of_affine_grid_folds_into_its_size(rng, runs):
    theta = rng.standard_normal((4, 3, 2, 3))
    out = jax.block_until_ready(jax.vmap(lambda t: djax.affine_grid(t, (3, 1, 5, 6)))(theta))
    assert out.shape == (4, 3, 5, 6, 2) and runs == [("forward", "affine_grid")]
    np.testing.assert_allclose(np.asarray(out[3]), deformcp.affine_grid(theta[3], (3, 1, 5, 6)), rtol=1e-13)


def test_sharded_batches_equal_the_unsharded_call():
    """On 2 host devices: grid_sample, deform_conv2d and their gradients on batches sharded over the devices,
    under jax.jit (XLA gathers the operands for the callback) and inside shard_map (a call per device on its
    shard), equal the unsharded calls; a weight replicated inside shard_map refuses its gradient by name."""
    code = (REPO / "tests" / "data" / "jax_sharding.py").read_text()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == "sharded: ok"


def test_float32_stays_float32(rng):
    input, grid = (a.astype(np.float32) for a in example("grid_sample", rng).arrays)
    out = djax.grid_sample(input, grid)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), deformcp.grid_sample(input, grid))
    grads = jax.grad(lambda i, g: jnp.sum(djax.grid_sample(i, g)), argnums=(0, 1))(input, grid)
    assert [g.dtype for g in grads] == [jnp.float32, jnp.float32]


def test_bad_arguments_raise_deformcp_errors_at_trace_time(rng):
    input, grid = example("grid_sample", rng).arrays
    with pytest.raises(ValueError, match="mode: expected one of"):
        djax.grid_sample(input, grid, mode="area")
    with pytest.raises(ValueError, match="grid: expected"):
        jax.jit(djax.grid_sample)(input, grid[..., :1])
    with pytest.raises(TypeError, match="one dtype"):
        djax.roi_align(input, random_boxes(rng, 2, 5, 6, 3).astype(np.float32), 2)
    with pytest.raises(TypeError, match="spatial_scale: expected a Python value"):
        jax.jit(lambda x, b, s: djax.roi_align(x, b, 2, spatial_scale=s))(input, random_boxes(rng, 2, 5, 6, 3), 0.5)


@pytest.mark.parametrize("name", SPECS)
def test_the_array_functions_refuse_traced_values_by_name(name, rng):
    """deformcp's array functions (deformcp.<op>, deformcp.<op>_backward) run on concrete arrays: a traced value
    (jax.jit, jax.grad) is a TypeError naming the argument and pointing at deformcp.jax, never a raw
    AttributeError, whichever array argument is traced."""
    inputs = example(name, rng)

    def message(argument):
        return (rf"^{argument}: a traced JAX value \(inside jax.jit, grad or vmap\); call the function of the same "
                r"name in deformcp.jax instead")

    for i, traced in enumerate(inputs.names):
        def loss(x, i=i):  # the other arrays concrete (NumPy): the traced one is named first
            arrays = list(inputs.arrays)
            arrays[i] = x
            return jnp.sum(inputs.numpy_fn(*arrays))

        with pytest.raises(TypeError, match=message(traced)):
            jax.jit(loss)(inputs.jax_arrays[i])
        if i in inputs.diff:
            with pytest.raises(TypeError, match=message(traced)):
                jax.grad(loss)(inputs.jax_arrays[i])
    grad_output = jnp.asarray(inputs.numpy_fn(*inputs.arrays))
    with pytest.raises(TypeError, match=message("grad_output")):
        jax.jit(lambda g: inputs.spec.backward(g, **dict(zip(inputs.names, inputs.arrays)), **inputs.options))(
            grad_output)


def test_value_errors_come_from_the_callback(rng):
    input = rng.standard_normal((2, 3, 5, 6))
    boxes = random_boxes(rng, 2, 5, 6, 3)
    boxes[1, 0] = 7
    with pytest.raises(Exception, match=r"batch indices \(column 0\) that are integers in \[0, 2\)"):
        jax.block_until_ready(djax.roi_align(input, boxes, 2))


class _OnDevice(np.ndarray):
    """A NumPy array standing in for a CuPy one: its ``device`` is a context (CuPy's: the array's GPU)."""

    @property
    def device(self):
        return contextlib.nullcontext()


def _fake_cupy(moved):
    """A stand-in for CuPy (NumPy underneath) that records what moves: "in" per array made from an operand or a
    result buffer, "out" per result copied back to the host, "stream" per use of XLA's stream."""
    def asarray(a):
        moved.append("in")
        return np.asarray(a).view(_OnDevice)

    def external_stream(pointer):
        moved.append("stream")
        return contextlib.nullcontext()

    return types.SimpleNamespace(asarray=asarray, asnumpy=lambda a: moved.append("out") or np.asarray(a),
                                 cuda=types.SimpleNamespace(ExternalStream=external_stream))


@pytest.mark.parametrize("in_place", [True, False], ids=["buffers", "copies"])
def test_cuda_route_plumbing(rng, monkeypatch, in_place):
    """Where JAX runs on a GPU and CuPy sees one, the callbacks run deformcp's CUDA kernels on CuPy arrays: made
    from JAX's device buffers where they are, on XLA's stream (buffer_callback), or, without it, copied from the
    host and back (pure_callback). Here a stand-in for CuPy records the moves; the real route needs a GPU."""
    moved = []
    monkeypatch.setattr(djax, "_cupy", lambda: _fake_cupy(moved))
    monkeypatch.setattr(djax, "_cuda_ready", lambda: True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    if in_place:  # XLA's CPU runtime has no stream to give
        from jax.experimental.buffer_callback import ExecutionContext
        monkeypatch.setattr(ExecutionContext, "stream", property(lambda ctx: 0))
    else:
        monkeypatch.setattr(djax, "_buffer_callback", None)
    bf16 = djax._where((jnp.zeros(1, jnp.bfloat16),))
    assert bf16.backend == "numpy" and not bf16.in_place  # CuPy has no bfloat16: host copies
    conv = example("deform_conv2d", rng, "v1")
    assert conv.names[:2] == ("input", "offset") and "mask" not in conv.names
    assert djax._where(conv.jax_arrays) == djax._Where("cuda", deformcp.get_workspace_limit(), in_place)
    out = conv.jax_fn(*conv.arrays)
    np.testing.assert_array_equal(np.asarray(out), conv.numpy_fn(*conv.arrays))
    # the arrays given (mask is None: not moved), then the result: written into its buffer, or copied back
    assert moved == (["in"] * len(conv.arrays) + ["stream", "in"] if in_place
                     else ["in"] * len(conv.arrays) + ["out"])
    moved.clear()
    grads = jax.grad(lambda *a: jnp.sum(conv.jax_fn(*a)), argnums=(0, 1))(*conv.arrays)
    expected = deformcp.deform_conv2d_backward(np.ones(out.shape), *conv.arrays, **conv.options)
    np.testing.assert_allclose(np.asarray(grads[0]), expected.input, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(np.asarray(grads[1]), expected.offset, rtol=1e-13, atol=1e-13)
    # forward again under grad, then the backward: grad_output and the arrays in, two gradients out
    assert moved.count("out") == (0 if in_place else 1 + 2)
    assert moved.count("stream") == (2 if in_place else 0)


def test_cuda_kernels_run_on_jax_device_buffers(rng, monkeypatch):
    """On a GPU (JAX's default backend, CuPy sees a device): the CUDA kernels read JAX's device buffers in place
    (the CuPy arrays deformcp gets are at the JAX arrays' addresses) and the results and gradients equal the
    NumPy path's; under jax.vmap too."""
    if jax.default_backend() not in ("gpu", "cuda") or not djax._cuda_ready():
        pytest.skip("CUDA: JAX and CuPy see no GPU")
    if djax._buffer_callback is None:
        pytest.skip("this JAX has no buffer_callback: its callbacks get host copies")
    seen = []
    forward = _call.run_forward
    monkeypatch.setattr(_call, "run_forward", lambda spec, arrays, *a: seen.append(
        [a.data.ptr for a in arrays.values()]) or forward(spec, arrays, *a))
    sample = example("grid_sample", rng)
    arrays = sample.jax_arrays
    out = jax.block_until_ready(jax.jit(sample.jax_fn)(*arrays))
    assert seen == [[a.unsafe_buffer_pointer() for a in arrays]]
    np.testing.assert_allclose(np.asarray(out), sample.numpy_fn(*sample.arrays), rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(out.shape)
    grads = jax.jit(lambda *a: jax.vjp(sample.jax_fn, *a)[1](jnp.asarray(g)))(*arrays)
    expected = deformcp.grid_sample_backward(g, *sample.arrays, **sample.options)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)
    stacked = [np.stack([a, 2 * a]) for a in sample.arrays]
    mapped = jax.vmap(sample.jax_fn)(*stacked)
    np.testing.assert_allclose(np.asarray(mapped[1]), sample.numpy_fn(*(a[1] for a in stacked)), rtol=1e-12,
                               atol=1e-12)


def test_backend_and_workspace_limit_are_captured_at_trace_time():
    with deformcp.backend("host"), deformcp.workspace_limit(1 << 20):
        where = djax._where(())
    assert where == djax._Where("host", 1 << 20, djax._buffer_callback is not None)


def test_import_without_jax_says_how_to_install():
    code = ("import sys; sys.modules['jax'] = None\n"
            "import deformcp\n"
            "try:\n    import deformcp.jax\nexcept ImportError as e:\n    print('ImportError:', e)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert "ImportError: deformcp.jax needs JAX" in result.stdout and "pip install" in result.stdout


def mismatches(rng):
    """(name, function of arrays, arrays, expected message) for arguments whose shapes disagree with each
    other: deformcp's plain function raises a ValueError naming the argument; so must deformcp.jax, at trace
    time (these used to pass tracing and surface from the callback as a JaxRuntimeError)."""
    x, grid = rng.standard_normal((2, 3, 5, 6)), rng.uniform(-1, 1, (2, 4, 3, 2))
    # deform_conv2d: groups 2, offset groups 2, kernel 3×3, stride (2, 1), padding 1, dilation (1, 2): 3×3 out.
    conv = tuple(rng.standard_normal(shape) for shape in [(2, 4, 6, 5), (2, 36, 3, 3), (4, 2, 3, 3), (4,),
                                                          (2, 18, 3, 3)])
    rois = random_boxes(rng, 2, 8, 9, 4)
    pool = (rng.standard_normal((2, 3, 8, 9)), rois, rng.standard_normal((4, 2, 2, 3)),  # output (2, 3)
            rng.uniform(0, 1, (4, 1, 2, 3)))
    ps = (rng.standard_normal((2, 8, 8, 9)), rois, rng.standard_normal((4, 4, 2, 2)))  # output_dim 2, P 2
    boxes = random_boxes(rng, 2, 5, 6, 3)
    conv_options = dict(stride=(2, 1), padding=1, dilation=(1, 2))
    ps_options = dict(output_dim=2, group_size=2, pooled_size=2, part_size=2, sample_per_part=2, trans_std=0.1)
    return [
        ("grid_sample", lambda i, g: djax.grid_sample(i, g), (x, grid[:1]), r"^grid: expected batch size N = 2"),
        ("affine_grid", lambda t: djax.affine_grid(t, (3, 1, 4, 4)), (rng.standard_normal((2, 2, 3)),),
         r"^size: expected N = 2 \(theta's batch\)"),
        ("mimic_loss", djax.mimic_loss, (rng.standard_normal((2, 5)), rng.standard_normal((3, 5))),
         r"^f_b: expected shape \(2, 5\)"),
        ("deform_conv2d-offset", lambda *a: djax.deform_conv2d(*a[:4], mask=a[4], **conv_options),
         (conv[0], conv[1][:1]) + conv[2:], r"^offset: expected shape \(2, "),
        ("deform_conv2d-mask", lambda *a: djax.deform_conv2d(*a[:4], mask=a[4], **conv_options),
         conv[:4] + (conv[4][:1],), r"^mask: expected shape \(2, "),
        ("deform_roi_pool-offset", lambda i, r, o, m: djax.deform_roi_pool(i, r, o, (2, 3), mask=m),
         (pool[0], pool[1], pool[2][:3], pool[3]), r"^offset: expected shape \(4, 2, 2, 3\)"),
        ("deform_roi_pool-mask", lambda i, r, o, m: djax.deform_roi_pool(i, r, o, (2, 3), mask=m),
         (pool[0], pool[1], pool[2], pool[3][:3]), r"^mask: expected shape \(4, 1, 2, 3\)"),
        ("deform_ps_roi_pool-offset", lambda i, r, o: djax.deform_ps_roi_pool(i, r, o, **ps_options),
         (ps[0], ps[1], ps[2][:3]), r"^offset: expected shape \(4, \*, 2, 2\)"),
        ("roi_align-empty-batch", lambda i, b: djax.roi_align(i, b, 2), (x[:0], boxes),
         r"^boxes: expected no RoIs for an empty batch \(input N = 0\), got 3"),
        ("roi_align-empty-image", lambda i, b: djax.roi_align(i, b, 2), (x[:, :, :0], boxes),
         r"^input: expected non-empty spatial size H, W"),
        ("ps_roi_align-empty-batch", lambda i, b: djax.ps_roi_align(i, b, 1), (x[:0], boxes),
         r"^boxes: expected no RoIs for an empty batch"),
        ("roi_align-more-images-than-input", lambda i, *b: djax.roi_align(i, list(b), 2), (x,) + (boxes[:, 1:],) * 3,
         r"^boxes: expected at most N = 2 per-image arrays \(input's batch\), got 3"),
        ("roi_align-per-image-shape", lambda i, b: djax.roi_align(i, [b], 2), (x, boxes),
         r"^boxes\[0\]: expected shape \(\*, 4\)"),
        ("deform_roi_pool-per-image-rank", lambda i, r: djax.deform_roi_pool(i, [r], None, 2), (x, boxes[0, 1:]),
         r"^rois\[0\]: expected a 2-D array"),
    ]


MISMATCHES = [name for name, *_ in mismatches(np.random.default_rng(0))]


@pytest.mark.parametrize("name", MISMATCHES)
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_mismatched_shapes_raise_deformcp_errors_at_trace_time(name, jit, rng):
    """The forward's own argument checks run at trace time on stand-ins of the arrays (shapes and dtypes),
    so the user gets deformcp's ValueError, eagerly and under jax.jit, and no callback runs."""
    _, fn, arrays, message = next(m for m in mismatches(rng) if m[0] == name)
    with pytest.raises(ValueError, match=message) as error:
        jax.block_until_ready((jax.jit(fn) if jit else fn)(*arrays))
    assert type(error.value) is ValueError


def test_the_trace_time_check_reads_no_data(rng, monkeypatch):
    """The stand-ins are zero-stride views of one zero: a huge batch costs no memory at trace time."""
    seen = []
    original = djax._stand_in

    def recording(a):
        s = original(a)
        seen.append(s)
        return s

    monkeypatch.setattr(djax, "_stand_in", recording)
    x = jax.ShapeDtypeStruct((4096, 64, 256, 256), jnp.float32)  # 64 GiB if it were allocated
    grid = jax.ShapeDtypeStruct((4096, 8, 8, 2), jnp.float32)
    out = jax.eval_shape(djax.grid_sample, x, grid)
    assert out.shape == (4096, 64, 8, 8) and out.dtype == jnp.float32
    assert [s.shape for s in seen] == [x.shape, grid.shape] and all(s.strides == (0,) * s.ndim for s in seen)


def test_deterministic_must_be_a_bool_at_trace_time(rng):
    input, grid = example("grid_sample", rng).arrays
    with pytest.raises(TypeError, match=r"^deterministic: expected a bool, got int 1"):
        djax.grid_sample(input, grid, deterministic=1)


@pytest.mark.parametrize("op", ["roi_align", "ps_roi_align", "deform_roi_pool"])
def test_an_empty_list_of_boxes_gives_an_empty_result(op, rng):
    input = rng.standard_normal((2, 4, 5, 6))
    out = getattr(djax, op)(input, [], output_size=2)
    expected = getattr(deformcp, op)(input, [], output_size=2)
    assert out.shape == expected.shape == ((0, 1, 2, 2) if op == "ps_roi_align" else (0, 4, 2, 2))
    grad = jax.grad(lambda x: jnp.sum(getattr(djax, op)(x, [], output_size=2)))(input)
    np.testing.assert_array_equal(np.asarray(grad), np.zeros_like(input))


# ----------------------------------------------------------------------------------------------- forward mode

from deformcp import _jax_reference  # noqa: E402

FORWARD_CASES = [(spec, case) for spec, case in CASES
                 if spec.name in _jax_reference.FUNCTIONS and case.options.get("mode") != "bicubic"]
FORWARD_IDS = [case_id(spec, case) for spec, case in FORWARD_CASES]


@pytest.fixture(params=FORWARD_CASES, ids=FORWARD_IDS)
def forward_case(request, rng):
    return make(*request.param, rng)


def with_non_finite(inputs, rng):
    """The case's arrays with NaN, ±inf and the exact borders ±1 among the grid's values (grid_sample)."""
    arrays = [a.copy() for a in inputs.arrays]
    if "grid" in inputs.names:
        grid = arrays[inputs.names.index("grid")].reshape(-1)
        grid[rng.choice(grid.size, 5, replace=False)] = [np.nan, np.inf, -np.inf, -1.0, 1.0]
    return arrays


def test_jax_numpy_forms_equal_the_ops_and_their_backward(forward_case, rng):
    """deformcp._jax_reference (what forward mode differentiates) gives deformcp's forward and, through jax.vjp,
    deformcp's backward: the same conventions, NaN and ±inf grid values included."""
    arrays = with_non_finite(forward_case, rng)
    form = functools.partial(_jax_reference.FUNCTIONS[forward_case.spec.name], **forward_case.options)
    named = lambda *a: form(**dict(zip(forward_case.names, a)))  # noqa: E731
    out = forward_case.numpy_fn(*arrays)
    np.testing.assert_allclose(np.asarray(named(*map(jnp.asarray, arrays))), out, rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(out.shape)
    grads = jax.vjp(named, *map(jnp.asarray, arrays))[1](jnp.asarray(g))
    expected = forward_case.spec.backward(g, **dict(zip(forward_case.names, arrays)), **forward_case.options)
    for name, grad in zip(forward_case.names, grads):
        np.testing.assert_allclose(np.asarray(grad), getattr(expected, name), rtol=1e-11, atol=1e-11, err_msg=name)


def test_jvp_is_the_transpose_of_deformcps_backward(forward_case, rng):
    """⟨g, J·t⟩ from jax.jvp equals ⟨Jᵀ·g, t⟩ from deformcp's backward, for random tangents of every array at
    once; the primal output is deformcp's forward; eager and jitted."""
    arrays = forward_case.jax_arrays
    tangents = tuple(jnp.asarray(rng.standard_normal(a.shape)) for a in arrays)
    out, tangent = jax.jvp(forward_case.jax_fn, arrays, tangents)
    jitted = jax.jit(lambda a, t: jax.jvp(forward_case.jax_fn, a, t)[1])(arrays, tangents)
    np.testing.assert_allclose(np.asarray(out), forward_case.numpy_fn(*forward_case.arrays), rtol=1e-13, atol=1e-13)
    g = rng.standard_normal(out.shape)
    grads = forward_case.spec.backward(g, **dict(zip(forward_case.names, forward_case.arrays)),
                                       **forward_case.options)
    expected = sum(float(np.vdot(getattr(grads, name), t)) for name, t in zip(forward_case.names, tangents))
    for result in (tangent, jitted):
        assert float(np.vdot(g, result)) == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_jacfwd_equals_jacrev(rng):
    inputs = example("grid_sample", rng)
    input, grid = (a[:1, :1] for a in inputs.jax_arrays)
    f = lambda x, g: djax.grid_sample(x, g, align_corners=True)  # noqa: E731
    for argnum in (0, 1):
        np.testing.assert_allclose(np.asarray(jax.jacfwd(f, argnums=argnum)(input, grid)),
                                   np.asarray(jax.jacrev(f, argnums=argnum)(input, grid)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("volumetric", [False, True])
def test_hessian_through_affine_grid_and_grid_sample(volumetric, rng):
    """jax.hessian of a loss through affine_grid + grid_sample with respect to theta (eager, jitted, and through
    affine_sample) equals the central differences of its gradient (reverse mode: deformcp's kernels)."""
    shape = (2, 2, 4, 5, 6) if volumetric else (2, 3, 6, 7)
    x = jnp.asarray(rng.standard_normal(shape))
    theta = jnp.asarray(rng.standard_normal((2, 3, 4) if volumetric else (2, 2, 3)) * 0.6)

    def loss(theta):
        return jnp.sum(jnp.sin(djax.grid_sample(x, djax.affine_grid(theta, shape), padding_mode="border")) ** 2)

    hessian = np.asarray(jax.hessian(loss)(theta)).reshape(theta.size, theta.size)
    gradient, step = jax.jit(jax.grad(loss)), 1e-6
    differences = np.stack([np.asarray(gradient(theta + step * e) - gradient(theta - step * e)).ravel() / (2 * step)
                            for e in np.eye(theta.size).reshape(theta.size, *theta.shape)])
    np.testing.assert_allclose(hessian, differences, rtol=1e-5, atol=1e-5 * np.abs(hessian).max())
    assert np.abs(hessian - hessian.T).max() <= 1e-10 * np.abs(hessian).max()
    np.testing.assert_allclose(np.asarray(jax.jit(jax.hessian(loss))(theta)).reshape(hessian.shape), hessian,
                               rtol=1e-12, atol=1e-12)
    fused = lambda t: jnp.sum(jnp.sin(djax.affine_sample(x, t, padding_mode="border")) ** 2)  # noqa: E731
    np.testing.assert_allclose(np.asarray(jax.hessian(fused)(theta)).reshape(hessian.shape), hessian, rtol=1e-10,
                               atol=1e-10 * np.abs(hessian).max())


def test_vmap_of_jvp_equals_a_loop(rng):
    input, grid = example("grid_sample", rng).jax_arrays
    tangent = jnp.asarray(rng.standard_normal(grid.shape))
    one = lambda x, g, t: jax.jvp(lambda g: djax.grid_sample(x[None], g[None]), (g,), (t,))[1][0]  # noqa: E731
    mapped = jax.vmap(one)(input, grid, tangent)
    for n in range(input.shape[0]):
        np.testing.assert_allclose(np.asarray(mapped[n]), np.asarray(one(input[n], grid[n], tangent[n])),
                                   rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", sorted(set(SPECS) - set(_jax_reference.FUNCTIONS)) + ["grid_sample-bicubic"])
def test_forward_mode_elsewhere_is_refused_by_name(name, rng):
    """jax.jvp, jax.jacfwd and jax.hessian of the ops without a jax.numpy form raise a NotImplementedError naming
    the op (eager and jitted); jax.grad of them still works."""
    op, _, mode = name.partition("-")
    inputs = example(op, rng, next((c.label for c in SPECS[op].cases if c.options.get("mode") == mode), None)
                     if mode else None)
    arrays, at = inputs.jax_arrays, inputs.diff[0]

    def of_one(a):
        return jnp.sum(inputs.jax_fn(*arrays[:at], a, *arrays[at + 1:]))

    for transform in (lambda a: jax.jvp(of_one, (a,), (a,)), jax.jit(lambda a: jax.jvp(of_one, (a,), (a,))),
                      jax.hessian(of_one)):
        with pytest.raises(NotImplementedError, match=rf"deformcp\.jax\.{op}: forward-mode"):
            transform(arrays[at])
    assert jax.grad(of_one)(arrays[at]).shape == arrays[at].shape
