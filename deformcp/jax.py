"""JAX bindings for deformcp: every op as a differentiable function that works under ``jax.grad`` and ``jax.jit``.

Import it explicitly (``import deformcp`` never imports JAX):

>>> import jax, jax.numpy as jnp, deformcp.jax as djax
>>> x = jnp.arange(16.0).reshape(1, 1, 4, 4)
>>> theta = jnp.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])       # identity
>>> loss = lambda x, theta: djax.grid_sample(x, djax.affine_grid(theta, x.shape)).sum()
>>> g_x, g_theta = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, theta)
>>> print(g_x[0, 0])                                               # every pixel read once, with weight 1
[[1. 1. 1. 1.]
 [1. 1. 1. 1.]
 [1. 1. 1. 1.]
 [1. 1. 1. 1.]]
>>> g_theta.shape
(1, 2, 3)
>>> conv = jax.jit(djax.deform_conv2d, static_argnames=("stride", "padding", "dilation"))
>>> weight, offset = jnp.ones((2, 1, 3, 3)), jnp.zeros((1, 2 * 9, 4, 4))
>>> float(conv(x, offset, weight, padding=1)[0, 0, 1, 1])         # zero offsets: the 3×3 sum around (1, 1)
45.0

Functions: affine_grid, grid_sample, roi_align, ps_roi_align, deform_conv2d, deform_roi_pool,
deform_ps_roi_pool, mimic_loss, ms_deform_attn, flash_deform_attn, dcnv3 and dcnv4 (and deformcp.ndimage's
map_coordinates and affine_transform), with the names, argument order and defaults of the deformcp functions
(see their docstrings and README.md for shapes and conventions). The ops whose backward can scatter with atomics
also take a keyword-only ``deterministic=False``, handed to the backward (see the deformcp ``*_backward``
functions).

How it works. Each op is a ``jax.custom_jvp`` built from its spec (``deformcp.ops.SPECS``). Its primal is a
callback whose output ``ShapeDtypeStruct`` is computed from the input shapes at trace time; the callback runs
the op's forward (the call path of the deformcp function) on JAX's buffers where they are
(``jax.experimental.buffer_callback``: NumPy arrays on the CPU, CuPy arrays on the GPU, on XLA's stream) and
writes the result into the buffer XLA gives it. Its tangent is a primitive (``deformcp_tangent``), linear in the
tangents, whose transpose runs the op's backward (that of ``deformcp.*_backward``) the same way, with
``needs_input_grad`` set to the inputs JAX differentiates, so ``jax.grad`` never evaluates the tangent and
``jax.grad`` with respect to ``grid`` alone never computes the input gradient. On a JAX without
``buffer_callback`` (before 0.7) the callbacks are ``jax.pure_callback``'s, which hand them host copies.

- Arguments. Array arguments are JAX arrays (or anything ``jnp.asarray`` takes; None where deformcp allows
  None). Everything else (sizes, output sizes, modes, flags, scales, strides, ``deterministic``) is static:
  pass Python values, and under ``jax.jit`` mark them ``static_argnames`` or close over them; a traced
  value raises a TypeError. Integer options that deformcp also takes as arrays (ms_deform_attn's
  spatial_shapes, level_start_index, points_per_level) may be concrete NumPy or JAX arrays: they become tuples
  of ints. Boxes/RoIs are arrays but not differentiable: their cotangent is zero (None inside the VJP), as are
  those of inputs JAX does not differentiate.
- Errors. At trace time the deformcp function's own argument checks run on stand-ins of the arrays (NumPy
  arrays of their shapes and dtypes that hold one zero each), so bad shapes (also between arrays, such as
  two batch sizes), dtypes and options raise deformcp's own ValueError/TypeError at the call site, eagerly
  and under ``jax.jit``; so does a ``deterministic`` that is not a bool. Only value-dependent errors (a
  box's batch index outside [0, N)) come from inside the callback, where JAX reports them as a
  ``JaxRuntimeError`` that carries deformcp's message.
- Dtypes. float32, float64, float16 and bfloat16, as in deformcp; results have the input's dtype.
  float64 requires ``jax.config.update("jax_enable_x64", True)`` (else JAX turns float64 into float32
  before deformcp sees it).
- Transformations. ``jax.grad``/``jax.vjp``/``jax.value_and_grad``/``jax.jacrev`` and ``jax.jit`` work, also
  combined. ``jax.vmap`` hands the callback the mapped axes: where every mapped array is one of the op's batch arrays
  (``spec.batch``: grid_sample's input and grid, affine_grid's theta, deform_conv2d's input, offset and mask,
  ms_deform_attn's three arrays, ...) the mapped axes fold into the op's batch axis, one call forward and one
  backward (for those arrays' gradients); otherwise (boxes, mimic_loss, ndimage, a mapped weight, a weight's
  gradient per element) the callback calls the op once per element.
- Forward mode and second derivatives. affine_grid, grid_sample (bilinear and nearest) and affine_sample also
  work under ``jax.jvp``, ``jax.jacfwd``, ``jax.linearize`` and ``jax.hessian`` (any nesting): the tangent, and
  the derivative of the backward, are JAX's derivatives of the op written in jax.numpy (deformcp._jax_reference,
  held equal to the kernels' forward and backward by the tests), run by XLA; values and reverse-mode gradients
  still come from deformcp's kernels. The other ops (and bicubic sampling) raise a NotImplementedError naming
  the op there: their tangents would need kernels of their own.
- Sharding. Under ``jax.jit`` on sharded arrays XLA gathers each callback's operands on one device and runs
  it once. Inside ``shard_map`` (under ``jax.jit``) each device runs the op on its shard; results and gradients
  vary over the mesh axes as their arrays do. An array replicated inside ``shard_map`` whose output varies
  (deform_conv2d's weight with sharded images) gets no gradient there: its per-device gradients would need a
  sum over the devices; the call raises a NotImplementedError that says so.
- Backends. CPU computations run deformcp's NumPy path, or its host backend when the op is traced inside
  ``with deformcp.backend("host"):``; the backend and ``deformcp.workspace_limit`` in force when an op is
  traced are used by its forward and backward callbacks (``jax.jit`` caches them with the trace:
  ``jax.clear_caches()`` makes the next call retrace). Where JAX's default backend is a GPU and CuPy sees a
  CUDA device, the callbacks run deformcp's CUDA kernels on JAX's device buffers, on XLA's stream, with no
  copy; bfloat16 (CuPy has none) and a JAX without ``buffer_callback`` go through the host instead: the
  operands are copied to the host (and to the GPU with CuPy for the kernels) and back. JAX preallocates most
  of the GPU's memory by default, so give CuPy room for the kernels' workspace
  (``XLA_PYTHON_CLIENT_PREALLOCATE=false`` or ``XLA_PYTHON_CLIENT_MEM_FRACTION``). The CUDA route runs in
  tests/test_jax.py's GPU test where a GPU is present; elsewhere its plumbing is checked with a stand-in for
  CuPy.
"""
from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, TypeAlias, TypeVar, Union, cast

import numpy as np
from numpy.typing import NDArray

try:
    import jax
    import jax.numpy as jnp
    from jax.interpreters import ad, batching, mlir
    from jax.sharding import PartitionSpec
except ImportError as _error:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(f"deformcp.jax needs JAX, which could not be imported ({_error}); install it with "
                      "pip install 'deformcp[jax]' (or pip install jax), or use deformcp's array functions "
                      "(import deformcp), which work without it") from _error

import deformcp as _dc
from deformcp import _jax_reference as _reference
from deformcp import _validate
from deformcp import testing as _testing
from deformcp._types import Imported
from deformcp.ops import SPECS, OpSpec, _call

__all__ = ["affine_grid", "grid_sample", "roi_align", "ps_roi_align", "deform_conv2d", "deform_roi_pool",
           "deform_ps_roi_pool", "mimic_loss", "ms_deform_attn", "flash_deform_attn", "dcnv3", "dcnv4",
           "map_coordinates", "affine_transform", "affine_sample"]

_TRACER: Union[type, tuple[type, ...]] = getattr(jax.core, "Tracer", ())

try:  # the extension API's home from JAX 0.4.36 on
    from jax.extend.core import Primitive
except ImportError:  # pragma: no cover - older JAX
    from jax.core import Primitive  # type: ignore[attr-defined,no-redef]

_buffer_callback: Optional[Callable[..., Any]]
try:  # JAX's buffers handed to a Python callback in place (JAX 0.7 on)
    from jax.experimental.buffer_callback import buffer_callback as _buffer_callback
except ImportError:  # older JAX: pure_callback, which hands the callback host copies
    _buffer_callback = None

# jax.pure_callback under jax.vmap: the mapped axes handed to the callback (unmapped operands get axes of size 1),
# from JAX 0.4.34 on; before, a call per element (vectorized=False, the default)
_CALLBACK_OPTIONS: dict[str, Any] = ({"vmap_method": "expand_dims"}
                     if "vmap_method" in inspect.signature(jax.pure_callback).parameters else {})


# --------------------------------------------------------------------------------------------- plumbing

_A = TypeVar("_A")


class _Where(NamedTuple):
    """Where the callbacks of one traced op run: "numpy", "host" or "cuda", the workspace limit, and whether
    they get JAX's buffers in place (buffer_callback) or host copies of them (pure_callback)."""

    backend: str
    workspace: int
    in_place: bool


#: What a callback does with the arrays JAX hands it (NumPy or CuPy arrays, the present operands) → results.
_Call: TypeAlias = Callable[[Sequence[Imported]], tuple[Imported, ...]]
#: run(operands, static options) → results, on arrays as a callback holds them (None: absent); see _over_vmap.
_Run: TypeAlias = Callable[[Sequence[Optional[Imported]], dict[str, Any]], tuple[Imported, ...]]
class _Layout(NamedTuple):
    """One traced call as its callback sees it: which operands are present (None: an absent optional array) and
    their ranks (0 where absent), without the leading axes jax.vmap adds (the callback receives those)."""

    present: tuple[bool, ...]
    ranks: tuple[int, ...]


def _with_absent(present: Sequence[bool], arrays: Iterable[_A]) -> list[Optional[_A]]:
    """The present arrays in order, with None at the absent positions."""
    given = iter(arrays)
    return [next(given) if p else None for p in present]


def _layout(operands: Sequence[Optional[jax.Array]]) -> _Layout:
    return _Layout(tuple(a is not None for a in operands), tuple(0 if a is None else a.ndim for a in operands))


@functools.lru_cache(maxsize=None)
def _cuda_ready() -> bool:
    return _testing.gpu_available() is None


def _cupy() -> Any:  # the cupy module (untyped)
    import cupy
    return cupy


def _where(arrays: Sequence[Optional[jax.Array]]) -> _Where:
    gpu = jax.default_backend() in ("gpu", "cuda")
    backend = _dc.current_backend()
    if gpu and _cuda_ready() and not any(a is not None and a.dtype.name == "bfloat16" for a in arrays):
        backend = "cuda"
    # on a GPU JAX's buffers are device memory: handed over in place to the CUDA kernels only (CuPy has no bfloat16)
    in_place = _buffer_callback is not None and (backend == "cuda" or not gpu)
    return _Where(backend, _dc.get_workspace_limit(), in_place)


def _on_host(where: _Where, call: _Call, arrays: Sequence[NDArray[Any]]) -> tuple[NDArray[Any], ...]:
    """call(arrays) on NumPy arrays (or on CuPy arrays for the CUDA route); results as NumPy arrays (pure_callback)."""
    with _dc.workspace_limit(where.workspace):
        if where.backend == "cuda":
            cupy = _cupy()
            results = call(tuple(cupy.asarray(np.asarray(a)) for a in arrays))
            to_numpy = cupy.asnumpy
        else:
            with _dc.backend(where.backend):
                results = call(tuple(np.asarray(a) for a in arrays))
            to_numpy = np.asarray
    return tuple(to_numpy(r) for r in results)


def _in_place(where: _Where, call: _Call, ctx: Any, outs: Sequence[Any], buffers: Sequence[Any]) -> None:
    """call(arrays) on JAX's buffers where they are (NumPy arrays on the CPU; CuPy arrays on the GPU, run on XLA's
    stream), its results written into the buffers ``outs`` (buffer_callback)."""
    with _dc.workspace_limit(where.workspace):
        if where.backend == "cuda":
            cupy = _cupy()
            arrays = tuple(cupy.asarray(b) for b in buffers)
            with arrays[0].device, cupy.cuda.ExternalStream(ctx.stream):
                for out, result in zip(outs, call(arrays)):
                    cupy.asarray(out)[...] = result
        else:
            with _dc.backend(where.backend):
                for out, result in zip(outs, call(tuple(np.asarray(b) for b in buffers))):
                    np.asarray(out)[...] = result


def _over_vmap(spec: OpSpec, static: dict[str, Any], operands: list[Optional[Imported]], ranks: tuple[int, ...],
               run: _Run, batch: tuple[int, ...]) -> tuple[Imported, ...]:
    """run(operands, static) → results, for operands with k ≥ 0 leading axes added by jax.vmap (each of the mapped
    size, or 1 where an operand is not mapped: vmap_method "expand_dims") → results with those axes. One call where
    exactly the operands at positions ``batch`` (those whose axis 0 is the op's batch N, as the results') are
    mapped: the mapped axes fold into N (and into the option spec.batch_size); otherwise a call per element."""
    present: list[tuple[int, Imported]] = [(i, a) for i, a in enumerate(operands) if a is not None]
    k = present[0][1].ndim - ranks[present[0][0]]
    if k == 0:
        return run(operands, static)
    lead = tuple(np.broadcast_shapes(*(a.shape[:k] for _, a in present)))
    size = math.prod(lead)
    if batch and {i for i, a in present if a.shape[:k] == lead} == {i for i, _ in present if i in batch}:
        first = operands[batch[0]]
        assert first is not None  # the op's first array (or the backward's grad_output): always present
        n = first.shape[k]
        folded = [None if a is None else a.reshape((size * n,) + a.shape[k + 1:]) if i in batch
                  else a.reshape(a.shape[k:]) for i, a in enumerate(operands)]
        if spec.batch_size is not None and static.get(spec.batch_size) is not None:
            static = {**static, spec.batch_size: (size * n, *static[spec.batch_size][1:])}
        return tuple(r.reshape(lead + (n,) + r.shape[1:]) for r in run(folded, static))
    each = [run([None if a is None else a[tuple(min(j, s - 1) for j, s in zip(index, a.shape[:k]))]
                 for a in operands], static) for index in np.ndindex(*lead)]
    xp = np if isinstance(each[0][0], np.ndarray) else _cupy()
    return tuple(xp.stack([results[r] for results in each]).reshape(lead + each[0][r].shape)
                 for r in range(len(each[0])))


def _callback(where: _Where, spec: OpSpec, static: dict[str, Any], layout: _Layout, run: _Run,
              batch: tuple[int, ...]) -> Callable[..., object]:
    """The callable JAX calls for one op call: buffer_callback's (ctx, outs, *buffers), or pure_callback's
    (*arrays) → results; the present operands in, run's results out (see _over_vmap)."""
    def call(arrays: Sequence[Imported]) -> tuple[Imported, ...]:
        return _over_vmap(spec, static, _with_absent(layout.present, arrays), layout.ranks, run, batch)

    if where.in_place:
        return lambda ctx, outs, *buffers: _in_place(where, call, ctx, outs, buffers)
    return lambda *arrays: _on_host(where, call, arrays)


def _zero(arrays: Iterable[Optional[jax.Array]], dtype: np.dtype[Any]) -> jax.Array:
    """A 0-d zero that varies, inside shard_map, over the mesh axes any of the arrays varies over."""
    return sum((jnp.zeros_like(a, shape=(), dtype=dtype) for a in arrays if a is not None), jnp.zeros((), dtype))


def _varying_as(result: jax.Array, arrays: Iterable[Optional[jax.Array]]) -> jax.Array:
    """result typed to vary over the mesh axes the arrays vary over inside shard_map: a callback's result varies
    over none, so JAX would take it as the same on every device (adding the zero changes the type only)."""
    if not isinstance(result, _TRACER) or not hasattr(jax, "typeof"):
        return result
    zero = _zero(arrays, result.dtype)
    return result if jax.typeof(zero) == jax.typeof(jnp.zeros((), result.dtype)) else result + zero


def _gradient_typed(name: str, field: str, gradient: jax.Array, array: Optional[jax.Array], g: jax.Array) -> jax.Array:
    """The gradient of ``array`` typed as it (see _varying_as). Inside shard_map an array replicated over mesh axes
    that the output varies over has per-device gradients that would need a sum over devices: refused."""
    if isinstance(gradient, _TRACER) and hasattr(jax, "typeof"):
        own, with_output = _zero((array,), gradient.dtype), _zero((array, g), gradient.dtype)
        if jax.typeof(own) != jax.typeof(with_output):
            raise NotImplementedError(
                f"{name}: the gradient of {field}, which is replicated over mesh axes that the output varies over "
                f"inside shard_map, would need a sum over devices: shard {field} as the output is, or differentiate "
                f"outside shard_map (jax.jit on sharded arrays)")
    return _varying_as(gradient, (array,))


def _invoke(where: _Where, callback: Callable[..., object], structs: tuple[jax.ShapeDtypeStruct, ...],
            operands: Sequence[Optional[jax.Array]]) -> tuple[jax.Array, ...]:
    """The callback's results (structs: their shapes and dtypes) on the present operands."""
    present = [a for a in operands if a is not None]
    results: tuple[jax.Array, ...]  # as structs (both callbacks' results are untyped)
    if where.in_place and _buffer_callback is not None:  # in place is chosen only where it exists
        results = _buffer_callback(callback, structs, vmap_method="expand_dims")(*present)
    else:
        results = jax.pure_callback(callback, structs, *present, **_CALLBACK_OPTIONS)
    return results


def _static(name: str, value: object) -> Hashable:
    """A static argument as a hashable Python value (lists become tuples, NumPy scalars Python scalars)."""
    if isinstance(value, (list, tuple)):
        return tuple(_static(name, v) for v in value)
    if isinstance(value, _TRACER):
        raise TypeError(f"{name}: expected a Python value (a static argument), got a traced array; under "
                        f"jax.jit pass it with static_argnames or close over it")
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else _static(name, value.tolist())
    try:
        hash(value)
    except TypeError:
        raise TypeError(f"{name}: expected a hashable Python value (a static argument), got "
                        f"{type(value).__name__} {value!r}") from None
    return value


def _stand_in(a: Optional[jax.Array]) -> Optional[NDArray[Any]]:
    """A NumPy array of a's shape and dtype that takes no memory (one zero, broadcast with zero strides)."""
    return None if a is None else np.broadcast_to(np.zeros((), a.dtype), tuple(a.shape))


def _output_struct(spec: OpSpec, arrays: Sequence[Optional[jax.Array]], options: dict[str, Any]
                   ) -> jax.ShapeDtypeStruct:
    """The output's shape and dtype: the deformcp forward's own argument checks, run at trace time on stand-ins
    of the arrays (their shapes and dtypes, no data), so bad arguments raise deformcp's errors here."""
    with _dc.backend("numpy"):
        shape = _call.output_shape(spec, dict(zip(spec.arrays, map(_stand_in, arrays))), options)
    assert arrays[0] is not None  # every op's first array is required: the checks above refuse None
    return jax.ShapeDtypeStruct(tuple(shape), arrays[0].dtype)  # type: ignore[no-untyped-call]  # unannotated in JAX


class _Op(NamedTuple):
    """One op with one set of static arguments ((name, value, repr) triples, deterministic included) and the place
    its callbacks run: the hashable key of its function, callbacks and tangent primitive."""

    name: str
    static_items: tuple[tuple[str, Hashable, str], ...]
    where: _Where

    @property
    def spec(self) -> OpSpec:
        return SPECS[self.name]

    @property
    def options(self) -> dict[str, Any]:
        """The forward's options (deterministic, the backward's flag, left out)."""
        return {key: value for key, value, _ in self.static_items if key != "deterministic"}

    @property
    def deterministic(self) -> bool:
        return bool(dict((key, value) for key, value, _ in self.static_items).get("deterministic", False))


def _batch_positions(spec: OpSpec) -> tuple[int, ...]:
    return tuple(i for i, array in enumerate(spec.arrays) if array in spec.batch)


# The callbacks are made once per op, layout (and set of wanted gradients for the backward): JAX compiles a callback
# per callable, so a new one at each call would compile again at every eager call (~10 ms each).
@functools.lru_cache(maxsize=None)
def _forward_callback(op: _Op, layout: _Layout) -> Callable[..., object]:
    spec = op.spec

    def run(arrays: Sequence[Optional[Imported]], options: dict[str, Any]) -> tuple[Imported, ...]:
        return (_call.run_forward(spec, dict(zip(spec.arrays, arrays)), options),)

    return _callback(op.where, spec, op.options, layout, run, _batch_positions(spec))


@functools.lru_cache(maxsize=None)
def _backward_callback(op: _Op, wanted: tuple[bool, ...], layout: _Layout) -> Callable[..., object]:
    spec = op.spec
    needs = tuple(wanted[spec.arrays.index(field)] for field in spec.differentiable)

    def run(operands: Sequence[Optional[Imported]], options: dict[str, Any]) -> tuple[Imported, ...]:
        grads = _call.run_backward(spec, operands[0], dict(zip(spec.arrays, operands[1:])), options, needs,
                                   op.deterministic)
        return tuple(getattr(grads, array) for array, w in zip(spec.arrays, wanted) if w)

    # folded only where every gradient asked for is a batch array's (a shared array's would be summed)
    folds = all(array in spec.batch for array, w in zip(spec.arrays, wanted) if w)
    return _callback(op.where, spec, op.options, layout, run, (0, *(1 + i for i in _batch_positions(spec)))
                     if folds else ())


def _reference_function(op: _Op) -> Callable[..., jax.Array]:
    """The op in jax.numpy (deformcp._jax_reference) with its options, taking the arrays in the spec's order."""
    if op.name not in _reference.FUNCTIONS:
        raise NotImplementedError(
            f"deformcp.jax.{op.name}: forward-mode differentiation (jax.jvp, jax.jacfwd, jax.hessian) is not "
            f"supported: deformcp.jax differentiates {', '.join(sorted(_reference.FUNCTIONS))} in forward mode and "
            f"twice, {op.name} in reverse mode (jax.grad, jax.vjp, jax.jacrev) once")
    function, options = _reference.FUNCTIONS[op.name], op.options
    return lambda *arrays: function(**dict(zip(op.spec.arrays, arrays)), **options)


def _over_leading_axes(function: Callable[..., Any], lead: int) -> Callable[..., Any]:
    """function mapped over ``lead`` leading axes of every argument (the tangent primitive's vmapped axes)."""
    for _ in range(lead):
        function = jax.vmap(function)
    return function


@functools.lru_cache(maxsize=None)
def _gradients(op: _Op, wanted: tuple[bool, ...], present: tuple[bool, ...]) -> jax.custom_jvp[Any]:
    """(g, *present arrays) → the gradients of the wanted arrays (wanted: over spec.arrays, each present), by the
    op's backward; differentiable again (jax.hessian) through the op's jax.numpy form where it has one."""
    spec = op.spec

    @jax.custom_jvp
    def gradients(g: jax.Array, *present_arrays: jax.Array) -> tuple[jax.Array, ...]:
        arrays = _with_absent(present, present_arrays)
        # a wanted array is present; ShapeDtypeStruct is unannotated in JAX
        differentiated = [cast(jax.Array, a) for a, w in zip(arrays, wanted) if w]
        structs = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in differentiated)  # type: ignore[no-untyped-call]
        grads = _invoke(op.where, _backward_callback(op, wanted, _layout((g, *arrays))), structs, (g, *arrays))
        return tuple(_gradient_typed(op.name, field, grad, a, g)
                     for grad, (field, a) in zip(grads, [(f, a) for f, a, w in zip(spec.arrays, arrays, wanted) if w]))

    @gradients.defjvp
    def gradients_jvp(primals: tuple[jax.Array, ...], tangents: tuple[jax.Array, ...]
                      ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        reference = _reference_function(op)

        def through_reference(g: jax.Array, *present_arrays: jax.Array) -> tuple[jax.Array, ...]:
            arrays = _with_absent(present, present_arrays)
            positions = [i for i, w in enumerate(wanted) if w]
            return tuple(jax.vjp(_of_some(reference, arrays, positions), *[arrays[i] for i in positions])[1](g))

        return gradients(*primals), jax.jvp(through_reference, primals, tangents)[1]

    return gradients


def _of_some(function: Callable[..., jax.Array], arrays: Sequence[Optional[jax.Array]], positions: Sequence[int]
             ) -> Callable[..., jax.Array]:
    """function(*arrays) as a function of the arrays at positions alone, the others held."""
    def of_some(*chosen: jax.Array) -> jax.Array:
        full = list(arrays)
        for i, a in zip(positions, chosen):
            full[i] = a
        return function(*full)

    return of_some


def _tangent_operands(operands: Sequence[Any], present: tuple[bool, ...], tangent_of: tuple[int, ...]
                      ) -> tuple[list[Optional[Any]], list[Optional[Any]]]:
    """The tangent primitive's operands (the present arrays, then the tangents of those at tangent_of) as two lists
    over spec.arrays: arrays (None: absent) and tangents (None: none, zero)."""
    arrays = _with_absent(present, operands[:sum(present)])
    tangents: list[Optional[Any]] = [None] * len(arrays)
    for i, t in zip(tangent_of, operands[sum(present):]):
        tangents[i] = t
    return arrays, tangents


def _tangent_impl(*operands: jax.Array, op: _Op, present: tuple[bool, ...], tangent_of: tuple[int, ...],
                  lead: int) -> jax.Array:
    """The tangent: JAX's forward-mode derivative of the op's jax.numpy form."""
    reference = _reference_function(op)

    def tangent(*operands: jax.Array) -> jax.Array:
        arrays, tangents = _tangent_operands(operands, present, tangent_of)
        tangent: jax.Array = jax.jvp(_of_some(reference, arrays, tangent_of), [arrays[i] for i in tangent_of],
                                     [tangents[i] for i in tangent_of])[1]
        return tangent

    return cast(jax.Array, _over_leading_axes(tangent, lead)(*operands))


def _tangent_abstract_eval(*avals: Any, op: _Op, present: tuple[bool, ...], tangent_of: tuple[int, ...],
                           lead: int) -> Any:
    arrays, _ = _tangent_operands(avals, present, tangent_of)
    unmapped = [None if a is None else jax.ShapeDtypeStruct(a.shape[lead:], a.dtype)  # type: ignore[no-untyped-call]
                for a in arrays]
    struct = _output_struct(op.spec, cast(list[Optional[jax.Array]], unmapped), op.options)  # reads shape, dtype
    shape = tuple(avals[0].shape[:lead]) + tuple(struct.shape)
    # inside shard_map it varies over the mesh axes its operands vary over (those of the widest: their union where
    # they nest, as they do where the batch is sharded)
    widest = max(avals, key=lambda a: len(_varying_axes(a)))
    if not hasattr(widest, "sharding"):  # an older JAX's abstract values have none
        return widest.update(shape=shape, dtype=struct.dtype)
    return widest.update(shape=shape, dtype=struct.dtype, sharding=widest.sharding.update(
        spec=PartitionSpec()))  # type: ignore[no-untyped-call]  # unannotated in JAX


def _varying_axes(aval: Any) -> frozenset[str]:
    """The mesh axes an abstract value varies over inside shard_map (JAX 0.10: manual_axis_type; before: vma)."""
    kind = getattr(aval, "manual_axis_type", None)
    return frozenset(kind.varying if kind is not None else getattr(aval, "vma", frozenset()))


def _tangent_transpose(g: Any, *operands: Any, op: _Op, present: tuple[bool, ...], tangent_of: tuple[int, ...],
                       lead: int) -> Sequence[Optional[jax.Array]]:
    """The tangent's transpose: the op's backward, for the tangents JAX differentiates."""
    n = sum(present)
    wanted_at = [i for i, t in zip(tangent_of, operands[n:]) if ad.is_undefined_primal(t)]  # type: ignore[no-untyped-call]
    if isinstance(g, ad.Zero) or not wanted_at:
        return [None for _ in operands]
    wanted = tuple(i in wanted_at for i in range(len(present)))
    grads = dict(zip(wanted_at, _over_leading_axes(_gradients(op, wanted, present), lead)(g, *operands[:n])))
    return [None] * n + [grads.get(i) for i in tangent_of]


def _tangent_jvp(primals: Sequence[jax.Array], tangents: Sequence[Any], **params: Any
                 ) -> tuple[jax.Array, jax.Array]:
    tangents = [ad.instantiate_zeros(t) for t in tangents]  # type: ignore[no-untyped-call]
    return cast(tuple[jax.Array, jax.Array], jax.jvp(functools.partial(_tangent_impl, **params), tuple(primals),
                                                     tuple(tangents)))


def _tangent_batch(operands: Sequence[jax.Array], dims: Sequence[Optional[int]], *, lead: int, **params: Any
                   ) -> tuple[jax.Array, int]:
    """Under jax.vmap: the mapped axis first in every operand (the others broadcast to it), one more leading axis."""
    size = next(a.shape[d] for a, d in zip(operands, dims) if d is not None)
    moved = [jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
             for a, d in zip(operands, dims)]
    return _tangent_p.bind(*moved, lead=lead + 1, **params), 0  # type: ignore[no-untyped-call]


#: An op's tangent, linear in the tangents of its differentiable arrays: JAX transposes it into the op's backward
#: (reverse mode: jax.grad never computes it) and evaluates it only in forward mode.
_tangent_p = Primitive("deformcp_tangent")
_tangent_p.def_impl(_tangent_impl)  # type: ignore[no-untyped-call]  # the Primitive API is unannotated
_tangent_p.def_abstract_eval(_tangent_abstract_eval)  # type: ignore[no-untyped-call]
mlir.register_lowering(_tangent_p, mlir.lower_fun(_tangent_impl, multiple_results=False))
ad.primitive_jvps[_tangent_p] = _tangent_jvp
ad.primitive_transposes[_tangent_p] = _tangent_transpose
batching.primitive_batchers[_tangent_p] = _tangent_batch


@functools.lru_cache(maxsize=None)
def _differentiable(op: _Op) -> jax.custom_jvp[jax.Array]:
    """The op as a JAX function: its forward computes the value; its tangent (a primitive) transposes into its
    backward."""
    spec = op.spec
    differentiable = tuple(array in spec.differentiable for array in spec.arrays)

    @jax.custom_jvp
    def function(*arrays: Optional[jax.Array]) -> jax.Array:
        out = _invoke(op.where, _forward_callback(op, _layout(arrays)), (_output_struct(spec, arrays, op.options),),
                      arrays)[0]
        return _varying_as(out, arrays)

    @function.defjvp
    def function_jvp(primals: tuple[Optional[jax.Array], ...], tangents: tuple[Optional[jax.Array], ...]
                     ) -> tuple[jax.Array, jax.Array]:
        present = tuple(a is not None for a in primals)
        tangent_of = tuple(i for i, (a, d) in enumerate(zip(primals, differentiable)) if a is not None and d)
        operands = [a for a in primals if a is not None] + [tangents[i] for i in tangent_of]
        tangent = _tangent_p.bind(*operands, op=op, present=present, tangent_of=tangent_of,  # type: ignore[no-untyped-call]
                                  lead=0)
        return function(*primals), tangent

    return function


def _apply(name: str, arguments: dict[str, Any]) -> jax.Array:
    """Op ``name`` called with ``arguments`` (a function's locals()): arrays as JAX arrays, per-image box lists as
    (K, 5) RoIs, every other argument static."""
    spec = SPECS[name]
    if spec.boxes:
        arguments = dict(arguments, **{spec.boxes: _boxes(arguments["input"], arguments[spec.boxes], spec.boxes)})
    arrays = tuple(None if arguments[a] is None else jnp.asarray(arguments[a]) for a in spec.arrays)
    items = tuple((key, _static(key, value)) for key, value in arguments.items() if key not in spec.arrays)
    if "deterministic" in arguments:  # the backward's flag: checked now, not when the gradient is first taken
        _validate.flag("deterministic", dict(items)["deterministic"])
    # The cache key tells True from 1 and 2 from 2.0 (equal and alike in hash), which deformcp tells apart.
    key = tuple((k, v, repr(v)) for k, v in items)
    return _differentiable(_Op(name, key, _where(arrays)))(*arrays)


def _boxes(input: ArrayLike, boxes: object, name: str) -> object:
    """A list of per-image (L, 4) boxes as one (K, 5) array [batch_index, x1, y1, x2, y2], by deformcp's own
    conversion and checks (_validate.boxes_to_rois, in jax.numpy: traceable); anything else is returned as it is."""
    if not isinstance(boxes, (list, tuple)):
        return boxes
    return _validate.boxes_to_rois(name, [jnp.asarray(b) for b in boxes], jnp.asarray(input))


# ---------------------------------------------------------------------------------------------- the ops

if TYPE_CHECKING:
    # The signatures with their types, for type checkers. At run time the functions below carry no annotations
    # (tests/test_jax.py holds their parameters equal to the deformcp functions' without annotations); JAX arrays
    # or what jnp.asarray takes in (jax.typing.ArrayLike), jax.Array out.
    from jax.typing import ArrayLike

    from deformcp.ops._spec import IntPair, IntSequence, LevelShapes

    #: RoIs (K, 5), or a list of per-image (L, 4) boxes.
    Boxes = Union[ArrayLike, Sequence[ArrayLike]]

    def affine_grid(theta: ArrayLike, size: Sequence[int], align_corners: bool = False) -> jax.Array: ...

    def grid_sample(input: ArrayLike, grid: ArrayLike, mode: str = "bilinear", padding_mode: str = "zeros",
                    align_corners: bool = False, *, deterministic: bool = False) -> jax.Array: ...

    def affine_sample(input: ArrayLike, theta: ArrayLike, size: Optional[Sequence[int]] = None,
                      mode: str = "bilinear", padding_mode: str = "zeros", align_corners: bool = False, *,
                      deterministic: bool = False) -> jax.Array: ...

    def roi_align(input: ArrayLike, boxes: Boxes, output_size: IntPair, spatial_scale: float = 1.0,
                  sampling_ratio: int = -1, aligned: bool = False, pool_mode: str = "avg", *,
                  deterministic: bool = False) -> jax.Array: ...

    def ps_roi_align(input: ArrayLike, boxes: Boxes, output_size: IntPair, spatial_scale: float = 1.0,
                     sampling_ratio: int = -1, *, deterministic: bool = False) -> jax.Array: ...

    def deform_conv2d(input: ArrayLike, offset: ArrayLike, weight: ArrayLike, bias: Optional[ArrayLike] = None,
                      stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1,
                      mask: Optional[ArrayLike] = None, *, deterministic: bool = False) -> jax.Array: ...

    def deform_roi_pool(input: ArrayLike, rois: Boxes, offset: Optional[ArrayLike] = None, output_size: IntPair = 7,
                        spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1,
                        mask: Optional[ArrayLike] = None, *, deterministic: bool = False) -> jax.Array: ...

    def deform_ps_roi_pool(input: ArrayLike, rois: Boxes, offset: Optional[ArrayLike], output_dim: int,
                           group_size: int, pooled_size: int, part_size: Optional[int] = None,
                           sample_per_part: int = 4, spatial_scale: float = 1.0, trans_std: float = 0.0,
                           no_trans: bool = False, *, deterministic: bool = False) -> jax.Array: ...

    def mimic_loss(f_a: ArrayLike, f_b: ArrayLike) -> jax.Array: ...

    def map_coordinates(input: ArrayLike, coordinates: ArrayLike, order: int = 1, mode: str = "constant",
                        cval: float = 0.0, prefilter: bool = True, *, deterministic: bool = False) -> jax.Array: ...

    def affine_transform(input: ArrayLike, matrix: ArrayLike, offset: ArrayLike = 0.0,
                         output_shape: Optional[Sequence[int]] = None, order: int = 1, mode: str = "constant",
                         cval: float = 0.0, prefilter: bool = True, *, deterministic: bool = False) -> jax.Array: ...

    def ms_deform_attn(value: ArrayLike, spatial_shapes: LevelShapes, level_start_index: Optional[IntSequence],
                       sampling_locations: ArrayLike, attention_weights: ArrayLike,
                       points_per_level: Optional[IntSequence] = None, method: str = "default", *,
                       deterministic: bool = False) -> jax.Array: ...

    def flash_deform_attn(value: ArrayLike, spatial_shapes: LevelShapes, level_start_index: Optional[IntSequence],
                          sampling_loc_attn: ArrayLike, num_points: int, *,
                          deterministic: bool = False) -> jax.Array: ...

    def dcnv3(input: ArrayLike, offset: ArrayLike, mask: ArrayLike, kernel_h: int, kernel_w: int, stride_h: int,
              stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int,
              group_channels: int, offset_scale: float, remove_center: bool = False, *,
              deterministic: bool = False) -> jax.Array: ...

    def dcnv4(input: ArrayLike, offset_mask: ArrayLike, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int,
              pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
              offset_scale: float, remove_center: bool = False, softmax: bool = False, *,
              deterministic: bool = False) -> jax.Array: ...
else:

    def affine_grid(theta, size, align_corners=False):
        """Differentiable :func:`deformcp.affine_grid`: the sampling grid (N, H, W, 2) of theta (N, 2, 3) for
        the output size (N, C, H, W) (static), or (N, D, H, W, 3) of theta (N, 3, 4) for (N, C, D, H, W). Gradient:
        theta."""
        return _apply("affine_grid", locals())


    def grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=False, *, deterministic=False):
        """Differentiable :func:`deformcp.grid_sample`: input (N, C, H, W) sampled at grid (N, H_out, W_out, 2)
        → (N, C, H_out, W_out), or a volume (N, C, D, H, W) at (N, D_out, H_out, W_out, 3) → (N, C, D_out, H_out,
        W_out). Gradients: input and grid (0 for the grid with mode "nearest")."""
        return _apply("grid_sample", locals())


    def affine_sample(input, theta, size=None, mode="bilinear", padding_mode="zeros", align_corners=False, *,
                      deterministic=False):
        """Differentiable :func:`deformcp.affine_sample`: input (N, C, H, W) or (N, C, D, H, W) sampled at
        affine_grid(theta, size) without the grid (size static; None: the input's). Gradients: input and theta."""
        return _apply("affine_sample", locals())

    def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, pool_mode="avg", *,
                  deterministic=False):
        """Differentiable :func:`deformcp.roi_align`: input (N, C, H, W), boxes (K, 5) or a list of per-image
        (L, 4) arrays → (K, C, PH, PW). Gradient: input (boxes get zero)."""
        return _apply("roi_align", locals())


    def ps_roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, *, deterministic=False):
        """Differentiable :func:`deformcp.ps_roi_align` → (K, C / (PH·PW), PH, PW). Gradient: input."""
        return _apply("ps_roi_align", locals())


    def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None, *,
                      deterministic=False):
        """Differentiable :func:`deformcp.deform_conv2d` (v1, or v2 with ``mask``) → (N, C_out, H_out, W_out).
        Gradients: input, offset, weight, bias and mask (those given)."""
        return _apply("deform_conv2d", locals())


    def deform_roi_pool(input, rois, offset=None, output_size=7, spatial_scale=1.0, sampling_ratio=0, gamma=0.1,
                        mask=None, *, deterministic=False):
        """Differentiable :func:`deformcp.deform_roi_pool` → (K, C, PH, PW). Gradients: input, offset and mask
        (those given); rois get zero."""
        return _apply("deform_roi_pool", locals())


    def deform_ps_roi_pool(input, rois, offset, output_dim, group_size, pooled_size, part_size=None, sample_per_part=4,
                           spatial_scale=1.0, trans_std=0.0, no_trans=False, *, deterministic=False):
        """Differentiable :func:`deformcp.deform_ps_roi_pool`: rois (K, 5) or a list of per-image (L, 4) arrays
        → (K, output_dim, P, P). Gradients: input and offset (zero with ``no_trans``); rois get zero."""
        return _apply("deform_ps_roi_pool", locals())


    def mimic_loss(f_a, f_b):
        """Differentiable :func:`deformcp.mimic_loss`: f_a, f_b (K, D) → a 0-d loss. Gradients: f_a and f_b."""
        return _apply("mimic_loss", locals())


    def map_coordinates(input, coordinates, order=1, mode="constant", cval=0.0, prefilter=True, *, deterministic=False):
        """Differentiable :func:`deformcp.ndimage.map_coordinates`: input (2-D or 3-D) at index coordinates
        ``(ndim, *output_shape)`` → output_shape (options static). Gradients: input and coordinates."""
        return _apply("map_coordinates", locals())


    def affine_transform(input, matrix, offset=0.0, output_shape=None, order=1, mode="constant", cval=0.0,
                         prefilter=True, *, deterministic=False):
        """Differentiable :func:`deformcp.ndimage.affine_transform`: input (2-D or 3-D), matrix and offset (SciPy's
        forms; offset may be a number) → output_shape (options static). Gradients: input, matrix and offset."""
        offset = jnp.asarray(offset, dtype=input.dtype)
        return _apply("affine_transform", locals())


    def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                       points_per_level=None, method="default", *, deterministic=False):
        """Differentiable :func:`deformcp.ms_deform_attn`: value (N, S, M, D), sampling_locations (N, Lq, M, L, P, 2) or
        (N, Lq, M, ΣP_l, 2), attention_weights (N, Lq, M, L, P) or (N, Lq, M, ΣP_l) → (N, Lq, M·D). spatial_shapes
        ((H_l, W_l) per level), level_start_index, points_per_level and method are static (Python values, or concrete
        integer arrays). Gradients: value, sampling_locations and attention_weights."""
        return _apply("ms_deform_attn", locals())


    def flash_deform_attn(value, spatial_shapes, level_start_index, sampling_loc_attn, num_points, *,
                          deterministic=False):
        """Differentiable :func:`deformcp.flash_deform_attn`: value (N, S, M, D), sampling_loc_attn (N, Lq, M, L·P·3)
        → (N, Lq, M·D); spatial_shapes, level_start_index and num_points static. Gradients: value and
        sampling_loc_attn (locations and logits)."""
        return _apply("flash_deform_attn", locals())

    def dcnv3(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
              group, group_channels, offset_scale, remove_center=False, *, deterministic=False):
        """Differentiable :func:`deformcp.dcnv3`: input (N, H, W, G·Cg), offset (N, H_out, W_out, G·P·2) and mask
        (N, H_out, W_out, G·P) → (N, H_out, W_out, G·Cg); the geometry static. Gradients: input, offset, mask."""
        return _apply("dcnv3", locals())

    def dcnv4(input, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
              group_channels, offset_scale, remove_center=False, softmax=False, *, deterministic=False):
        """Differentiable :func:`deformcp.dcnv4`: input (N, H, W, G·Cg), offset_mask (N, H_out, W_out, P_pad) →
        (N, H_out, W_out, G·Cg); the geometry and softmax static. Gradients: input, offset_mask."""
        return _apply("dcnv4", locals())
