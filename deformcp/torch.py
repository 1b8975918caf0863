"""PyTorch autograd for deformcp: functions with torch.nn.functional's and torchvision's names, and nn.Modules.

Import it explicitly (``import deformcp`` never imports torch):

>>> import torch
>>> import deformcp.torch as dtorch
>>> layer = dtorch.ModulatedDeformConv2dPack(4, 8, 3, padding=1)           # DCNv2 layer (mmcv's)
>>> x = torch.randn(2, 4, 16, 16, requires_grad=True)
>>> layer(x).shape
torch.Size([2, 8, 16, 16])
>>> offset, mask = torch.zeros(2, 18, 16, 16), torch.ones(2, 9, 16, 16)   # no deformation, no modulation
>>> out = dtorch.deform_conv2d(x, offset, layer.weight, layer.bias, padding=1, mask=mask)  # differentiable
>>> torch.allclose(out, torch.nn.functional.conv2d(x, layer.weight, layer.bias, padding=1), atol=1e-5)
True
>>> out.sum().backward()
>>> x.grad.shape
torch.Size([2, 4, 16, 16])

Every op and its backward are torch.library ops generated from the op table (``deformcp.ops.SPECS``):
``torch.ops.deformcp.<op>`` and ``torch.ops.deformcp.<op>_backward``, with fake kernels (torch.compile,
torch.export), the autograd formula and a vmap rule; eager calls go through one ``torch.autograd.Function``
(so that torch.func transforms can differentiate them), compiled graphs call the ops. The forward runs the
deformcp op on the tensors (imported through DLPack without a copy, so CPU tensors run on
deformcp's NumPy path or, inside ``with deformcp.backend("host"):``, on the host backend, and CUDA tensors on
deformcp's CUDA kernels through CuPy), and the backward runs the op's backward for the inputs that need a
gradient (``ctx.needs_input_grad``). Non-differentiable arguments (boxes, RoIs, sizes, options) get None. The
backend and ``deformcp.workspace_limit`` in force at the forward are used again by the backward. The
backward passes ``deterministic=torch.are_deterministic_algorithms_enabled()``, so
``torch.use_deterministic_algorithms(True)`` makes the gradients bitwise reproducible on every backend.

Double backward is not supported: the gradients that these functions return cannot be differentiated
again. Under ``create_graph=True`` (and torch.func.grad) they are tied to the op's inputs and grad_output, and
differentiating them with respect to any of those (``torch.autograd.grad``, also with ``allow_unused=True``,
``backward()``, nested ``torch.func.grad``) raises a RuntimeError that says so, rather than silently dropping
the second-order terms.

Under ``torch.autocast`` the floating arrays of a call take the dtype of its first array (the input's); outside
it, mixed dtypes are an error. The backend and workspace limit of the forward are those in force when an eager
forward runs; a compiled graph's backward runs under the settings in force when it runs.

Shapes and conventions are those of the deformcp functions (see README.md): N batch, C channels, (H, W)
input size, K boxes, (PH, PW) output bins, G offset groups, (kh, kw) kernel size; for multi-scale deformable
attention S = ΣH_l·W_l input rows over L levels, Lq queries, M heads of D channels, P points. Its integer options
(spatial_shapes, level_start_index, points_per_level) may be tensors, read once on the host with ``.tolist()``
(under torch.compile a graph break): give Python lists for fullgraph compilation and torch.export.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
from typing import Any, Callable, Iterator, NamedTuple, NoReturn, Optional, Sequence, TypeAlias, Union, cast

import numpy as np
from numpy.typing import NDArray

try:
    import torch
    from torch import nn
except ImportError as _error:  # pragma: no cover - exercised in a subprocess by the tests
    from deformcp._dispatch import TORCH_CPU_INSTALL
    raise ImportError(f"deformcp.torch needs PyTorch, which could not be imported ({_error}); install it with "
                      f"pip install 'deformcp[torch]', or its CPU build (without the CUDA libraries, several GB) with "
                      f"{TORCH_CPU_INSTALL}; or use deformcp's array functions (import deformcp), which work "
                      "without it") from _error

import deformcp as _dc
from deformcp import _validate
from deformcp.ops import SPECS, OpSpec, _call
from deformcp.ops import deform_conv as _deform_conv
from deformcp.ops import roi_align as _roi_align
from deformcp.ops import spatial_transformer as _spatial_transformer
from deformcp.ops._spec import IntPair, IntSequence, LevelShapes

Tensor = torch.Tensor
#: RoIs (K, 5), or a list of per-image (L, 4) boxes.
Boxes = Union[Tensor, Sequence[Tensor]]

__all__ = [
    "affine_grid", "grid_sample", "roi_align", "ps_roi_align", "deform_conv2d", "deform_roi_pool",
    "deform_ps_roi_pool", "mimic_loss", "ms_deform_attn", "flash_deform_attn", "dcnv3", "dcnv4", "map_coordinates",
    "affine_transform", "affine_sample",
    "DeformConv2d", "DeformConv2dPack", "ModulatedDeformConv2dPack", "RoIAlign", "PSRoIAlign",
    "DeformRoIPool", "DeformRoIPoolPack", "ModulatedDeformRoIPool", "ModulatedDeformRoIPoolPack",
    "SpatialTransformer", "MSDeformAttn", "DCNv3", "DCNv4",
]


# --------------------------------------------------------------------------------------------- plumbing

#: An autograd context (torch.autograd.Function's, or a torch.library op's): torch's own attributes and those that
#: _save and _remember set on it.
_Context: TypeAlias = Any
#: A backward's result: one gradient (or None) per argument of the forward.
_Gradients: TypeAlias = tuple[Optional[Tensor], ...]


def _plain(t: object) -> object:
    """t without autograd history (None and non-tensors kept), ready for deformcp's DLPack import."""
    if not isinstance(t, torch.Tensor):
        return t
    return t.detach().resolve_conj().resolve_neg()


def _remember(ctx: _Context) -> None:
    """Record the deformcp settings of the forward, so that the backward runs under the same ones."""
    ctx.deformcp_backend = _dc.current_backend()
    ctx.deformcp_workspace = _dc.get_workspace_limit()


@contextlib.contextmanager
def _as_in_forward(ctx: _Context) -> Iterator[None]:
    with _dc.backend(ctx.deformcp_backend), _dc.workspace_limit(ctx.deformcp_workspace):
        yield


def _deterministic() -> bool:
    return bool(torch.are_deterministic_algorithms_enabled())


class _DoubleBackwardError(torch.autograd.Function):
    """``apply(name, count, *grads, *sources)``: the first ``count`` tensors (gradients computed under
    create_graph=True) as they are, attached to ``sources`` (what the gradients depend on: the op's inputs and
    grad_output), so that differentiating them with respect to any of those raises."""

    generate_vmap_rule = True

    @staticmethod
    def forward(name: str, count: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(g.view_as(g) for g in tensors[:count])

    @staticmethod
    def setup_context(ctx: _Context, inputs: tuple[Any, ...], output: object) -> None:
        ctx.name = inputs[0]

    @staticmethod
    def backward(ctx: _Context, *_: object) -> NoReturn:
        raise RuntimeError(f"deformcp.torch.{ctx.name}: double backward is not supported (its backward is "
                           "not differentiable); the gradient computed with create_graph=True cannot be "
                           "differentiated again")


def _first_order(backward: Callable[..., _Gradients]) -> Callable[..., _Gradients]:
    """Decorate a Function's backward: run it without building a graph, and, under create_graph=True,
    attach the gradients to the op's inputs and grad_output through a node whose backward raises a clear
    error (like torch.autograd.function.once_differentiable, but also where grad_output does not require
    grad). The gradients computed without a graph have no history: left so, differentiating them with
    respect to the op's inputs would find no path (torch's "appears to not have been used in the graph",
    or a silent None with allow_unused=True) and second-order terms through this op would be dropped."""
    @functools.wraps(backward)
    def wrapper(ctx: _Context, *grad_outputs: Optional[Tensor]) -> _Gradients:
        with torch.no_grad():
            grads = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():
            return grads
        present = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
        sources = [t for t in (*ctx.saved_tensors, *grad_outputs) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not present:
            return grads
        marked = _DoubleBackwardError.apply(  # type: ignore[no-untyped-call]  # unannotated in torch
            ctx.spec.name, len(present), *(grads[i] for i in present), *sources)
        attached = list(grads)
        for i, g in zip(present, marked):
            attached[i] = g
        return tuple(attached)
    return wrapper


def _align_corners(value: object) -> bool:
    """torch's align_corners: None means False (without torch's warning); anything else must be a bool."""
    return False if value is None else _validate.flag("align_corners", value)


# ------------------------------------------------------------------------------- the ops, in torch.library

#: The schema type of each kind of option annotation of the deformcp functions (deformcp.ops.OpSpec.option_types).
_SCHEMA_TYPES: dict[object, str] = {
    bool: "bool", int: "int", float: "float", str: "str", IntPair: "int[]", Sequence[int]: "SymInt[]",
    Optional[int]: "int?", LevelShapes: "SymInt[]", Optional[Sequence[int]]: "SymInt[]?",
    Optional[IntSequence]: "SymInt[]?"}

#: The option kinds that also come as integer arrays (spatial_shapes, level_start_index, points_per_level).
_INTEGER_ARRAYS = (LevelShapes, Optional[Sequence[int]], Optional[IntSequence])


def _listed(kind: object, value: Any) -> Any:
    """An option of a kind in _INTEGER_ARRAYS given as an array of any framework (a tensor, a NumPy array) as
    (nested) Python lists: its one read on the host (a CUDA tensor: one device→host copy). Anything else as
    given; in a traced graph, reading a tensor's values breaks the graph (give Python ints there)."""
    if kind in _INTEGER_ARRAYS and hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        return value.tolist()
    return value


def _host_integers(name: str, value: object, pairs: bool) -> tuple[Any, ...]:
    """A flat sequence of ints, or of (H, W) int pairs, as (nested) tuples by deformcp's rules (no bools or floats;
    symbolic sizes kept), else an error naming ``name``: what a schema int list can hold."""
    items: tuple[Any, ...] = _validate.host_integers(name, value, None)
    rows = items if pairs else (items,)
    if any(not isinstance(row, tuple) or any(isinstance(i, tuple) for i in row) or (pairs and len(row) != 2)
           for row in rows):
        raise ValueError(f"{name}: expected {'rows (H_l, W_l) of two ints' if pairs else 'a flat sequence of ints'}"
                         f", got {value!r}")
    return items


def _schema_value(name: str, kind: object, value: Any) -> object:
    """An option as its schema type (an int pair as a list of two ints, NumPy scalars as Python's, level shapes
    as one flat list (H_0, W_0, H_1, ...), integer arrays as lists), its type checked by deformcp's rules, also in a
    traced call (where the arrays' checks run in the fake kernel), so that the schema never coerces it (an int
    given for a bool); ranges are checked with the arrays."""
    value = _listed(kind, value)
    if kind is Sequence[int]:  # sizes, symbolic in a traced graph: checked with the arrays
        return list(value)
    if kind is LevelShapes:
        return [size for row in _host_integers(name, value, pairs=True) for size in row]
    if kind == Optional[Sequence[int]] or kind == Optional[IntSequence]:
        return None if value is None else list(_host_integers(name, value, pairs=False))
    if kind is IntPair:
        return list(_validate.pair(name, value, minimum=0, maximum=2**63 - 1))
    if kind is bool:
        return _validate.flag(name, value)
    if kind is int or (kind == Optional[int] and value is not None):
        return _validate.integer(name, value, maximum=2**63 - 1)
    if kind is float:
        return _validate.real(name, value)
    return value


def _array_schema(spec: OpSpec) -> str:
    defaults = inspect.signature(spec.function).parameters
    return ", ".join(f"Tensor{'?' if defaults[name].default is None else ''} {name}" for name in spec.arrays)


#: Each op's (option, annotation) pairs in signature order, read once (OpSpec.option_types reads the type hints).
_KINDS = {name: tuple(spec.option_types.items()) for name, spec in SPECS.items()}


def _option_schema(spec: OpSpec) -> str:
    return "".join(f", {_SCHEMA_TYPES[kind]} {name}" for name, kind in _KINDS[spec.name])


def _from_schema(name: str, kind: object, value: Any) -> object:
    """An option as the op's schema holds it, back in deformcp's form: level shapes' flat list as (H, W) pairs."""
    if kind is not LevelShapes:
        return value
    if len(value) % 2:
        raise ValueError(f"{name}: expected (H_l, W_l) pairs, flattened, got {len(value)} values: {value!r}")
    return tuple(zip(value[0::2], value[1::2]))


def _split(spec: OpSpec, args: Sequence[Any]) -> tuple[dict[str, Optional[Tensor]], dict[str, object]]:
    """An op's positional arguments (arrays, then options in their schema form) as (arrays by name, options by
    name in deformcp's form)."""
    n = len(spec.arrays)
    options = zip(_KINDS[spec.name], args[n:])
    return dict(zip(spec.arrays, args[:n])), {name: _from_schema(name, kind, value) for (name, kind), value in options}


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    name = str(dtype).rpartition(".")[2]
    if name == "bfloat16":
        import ml_dtypes  # noqa: F401  (registers "bfloat16" with NumPy)
    return np.dtype(name)


def _stand_in(t: Optional[Tensor]) -> Optional[NDArray[Any]]:
    """A NumPy array of t's shape and dtype that takes no memory (deformcp's checks read shapes and dtypes)."""
    if t is None:
        return None
    return np.broadcast_to(np.zeros((), _numpy_dtype(t.dtype)), tuple(int(s) for s in t.shape))


def _output_shape(spec: OpSpec, arrays: dict[str, Optional[Tensor]], options: dict[str, object]) -> tuple[int, ...]:
    """The op's output shape by deformcp's own checks on stand-ins of the tensors (its errors, no data read)."""
    with _dc.backend("numpy"):
        return _call.output_shape(spec, {k: _stand_in(v) for k, v in arrays.items()}, options)


class _Traced(NamedTuple):
    """A traced tensor as deformcp's checks see it: its shape (symbolic sizes stay symbolic) and dtype."""

    shape: tuple[Union[int, torch.SymInt], ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


def _traced_output_shape(spec: OpSpec, tensors: dict[str, Optional[Tensor]], values: dict[str, object]
                         ) -> tuple[int, ...]:
    """The op's output shape in a traced graph: deformcp's checks on the tensors' shapes, which may be symbolic
    (torch.compile with dynamic shapes, torch.export's dynamic_shapes): a check becomes a guard, no size is fixed
    unless a check needs its value."""
    shapes = [None if t is None else _Traced(tuple(t.shape), _numpy_dtype(t.dtype)) for t in tensors.values()]
    return spec.output(spec.check(None, *shapes, **values))[0]


def _register(library: torch.library.Library, spec: OpSpec) -> Callable[..., Tensor]:
    """deformcp::<op> and deformcp::<op>_backward: CPU and CUDA kernels (deformcp's call path), fake kernels
    (shapes from deformcp's checks), the autograd formula and a vmap rule."""
    name, arrays, options = spec.name, _array_schema(spec), _option_schema(spec)
    # Library's methods and torch.compiler.disable are unannotated in torch
    library.define(f"{name}({arrays}{options}) -> Tensor")  # type: ignore[no-untyped-call]
    library.define(f"{name}_backward(Tensor grad_output, {arrays}{options}, bool[] needs_input_grad, "  # type: ignore[no-untyped-call]
                   f"bool deterministic) -> Tensor[]")
    forward_op: Callable[..., Tensor] = getattr(torch.ops.deformcp, name)

    # the kernels run deformcp's call path on real tensors: never traced
    @torch.compiler.disable  # type: ignore[untyped-decorator]
    def forward(*args: Any) -> Tensor:
        tensors, values = _split(spec, args)
        out = cast(Tensor, _call.run_forward(spec, {k: _plain(t) for k, t in tensors.items()}, values))  # torch's
        return out.contiguous()

    def forward_fake(*args: Any) -> Tensor:
        tensors, values = _split(spec, args)
        first = cast(Tensor, tensors[spec.arrays[0]])  # the first array is required (Tensor, not Tensor?)
        return first.new_empty(_traced_output_shape(spec, tensors, values))

    @torch.compiler.disable  # type: ignore[untyped-decorator]
    def backward(grad_output: Tensor, *args: Any) -> list[Tensor]:
        tensors, values = _split(spec, args)
        needs, deterministic = args[-2:]
        grads = _call.run_backward(spec, _plain(grad_output), {k: _plain(t) for k, t in tensors.items()}, values,
                                   tuple(needs), deterministic)
        # as the fake kernels say; the call path hands back torch's tensors
        return [grad_output.new_empty(0) if g is None else cast(Tensor, g).contiguous() for g in grads]

    def backward_fake(grad_output: Tensor, *args: Any) -> list[Tensor]:
        tensors, _ = _split(spec, args)
        needs = args[-2]
        wanted = [tensors[field] if need else None for field, need in zip(spec.differentiable, needs)]
        return [grad_output.new_empty(0) if t is None else t.new_empty(t.shape) for t in wanted]

    for qualname, kernel, fake in ((name, forward, forward_fake), (f"{name}_backward", backward, backward_fake)):
        library.impl(qualname, kernel, "CPU")  # type: ignore[no-untyped-call]
        library.impl(qualname, kernel, "CUDA")  # type: ignore[no-untyped-call]
        torch.library.register_fake(f"deformcp::{qualname}", fake, lib=library)
        torch.library.register_vmap(f"deformcp::{qualname}", _vmap_by_loop(getattr(torch.ops.deformcp, qualname)),
                                    lib=library)
    torch.library.register_autograd(f"deformcp::{name}", _gradients,
                                    setup_context=lambda ctx, inputs, output: _save(ctx, spec, inputs), lib=library)
    return forward_op


def _save(ctx: _Context, spec: OpSpec, args: Sequence[Any]) -> None:
    """The autograd context of op ``spec`` called with ``args`` (arrays, then options)."""
    tensors = _split(spec, args)[0]
    ctx.spec, ctx.options = spec, tuple(args[len(spec.arrays):])  # in their schema form, for the backward op
    ctx.save_for_backward(*tensors.values())
    _remember(ctx)


@_first_order
def _gradients(ctx: _Context, grad: Tensor) -> _Gradients:
    """The gradients of the op's arguments (arrays, then None for each option), by its backward op."""
    spec = ctx.spec
    tensors = dict(zip(spec.arrays, ctx.saved_tensors))
    asked = dict(zip(spec.arrays, ctx.needs_input_grad[-len(spec.arrays) - len(ctx.options):]))
    needs = [asked[field] and tensors[field] is not None for field in spec.differentiable]
    with _as_in_forward(ctx):
        grads = getattr(torch.ops.deformcp, f"{spec.name}_backward")(grad, *tensors.values(), *ctx.options, needs,
                                                                     _deterministic())
    by_name = {field: g if need else None for field, g, need in zip(spec.differentiable, grads, needs)}
    return tuple(by_name.get(array) for array in spec.arrays) + (None,) * len(ctx.options)


class _Function(torch.autograd.Function):
    """An op with its autograd formula as an autograd.Function (``_Function.apply(name, *arrays, *options)``),
    which torch.func transforms can differentiate (they cannot differentiate a torch.library op's registered
    formula); vmap goes through the ops' vmap rules."""

    generate_vmap_rule = True

    @staticmethod
    def forward(name: str, *args: Any) -> Tensor:
        out: Tensor = getattr(torch.ops.deformcp, name)(*args)
        return out

    @staticmethod
    def setup_context(ctx: _Context, inputs: tuple[Any, ...], output: object) -> None:
        _save(ctx, SPECS[inputs[0]], inputs[1:])

    @staticmethod
    def backward(ctx: _Context, grad: Tensor) -> _Gradients:
        return (None, *_gradients(ctx, grad))


def _vmap_by_loop(op: Callable[..., Any]) -> Callable[..., tuple[Any, Any]]:
    """A vmap rule that runs op once per batch element and stacks the results (correct for every op; the
    batch is not folded into the op's own batch dimension)."""
    def rule(info: Any, in_dims: tuple[Optional[int], ...], *args: Any
             ) -> tuple[Union[Tensor, list[Tensor]], Union[int, list[int]]]:
        def element(i: int) -> Any:
            return op(*(a.select(d, i) if isinstance(a, torch.Tensor) and d is not None else a
                        for a, d in zip(args, in_dims)))

        results = [element(i) for i in range(info.batch_size)]
        if isinstance(results[0], torch.Tensor):
            return torch.stack(results), 0
        return [torch.stack(column) for column in zip(*results)], [0] * len(results[0])
    return rule


class _Entry(NamedTuple):
    """What the front door needs of an op, computed once (plain tuples: torch.compile reads them as constants)."""

    op: Callable[..., Tensor]       # torch.ops.deformcp.<name>
    spec: OpSpec
    arrays: tuple[str, ...]
    kinds: tuple[tuple[str, object], ...]  # (option, annotation) in signature order


_LIBRARY = torch.library.Library("deformcp", "DEF")  # type: ignore[no-untyped-call]  # unannotated in torch
_OPS = {name: _Entry(_register(_LIBRARY, spec), spec, spec.arrays, _KINDS[name])
        for name, spec in SPECS.items()}


def _tracing(*tensors: object) -> bool:
    """Whether the call is being traced (torch.compile / export, torch.fx): deformcp's argument checks then run
    in the ops' fake kernels, on the traced shapes."""
    return torch.compiler.is_compiling() or any(isinstance(t, torch.fx.Proxy) for t in tensors)


def _autocast(tensors: dict[str, Optional[Tensor]], first: str) -> dict[str, Optional[Tensor]]:
    """Under torch.autocast (on the first array's device type): every floating-point array in the first array's
    dtype (the input's: offsets, masks, grids, boxes and weights follow it), so the op runs in that dtype (16-bit
    dtypes sum in float32, as always). Elsewhere the arrays are as given (mixed dtypes are an error)."""
    reference = tensors[first]
    if not isinstance(reference, torch.Tensor) or not torch.is_autocast_enabled(reference.device.type):
        return tensors
    return {name: t.to(reference.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for name, t in tensors.items()}


def _apply(name: str, arguments: dict[str, Any]) -> Tensor:
    """Op ``name`` called with ``arguments`` (a function's locals()): per-image box lists become (K, 5) RoIs; the
    arguments are checked by deformcp's rules (named errors) before the op sees them."""
    entry = _OPS[name]
    tensors = {array: arguments[array] for array in entry.arrays}
    boxes = entry.spec.boxes
    if boxes and isinstance(tensors[boxes], (list, tuple)):
        tensors[boxes] = _validate.boxes_to_rois(boxes, tensors[boxes], tensors["input"])
    tensors = _autocast(tensors, entry.arrays[0])
    options = {option: _listed(kind, arguments[option]) for option, kind in entry.kinds}
    if not _tracing(*tensors.values()):
        _output_shape(entry.spec, tensors, options)
    args = (*tensors.values(), *(_schema_value(option, kind, options[option]) for option, kind in entry.kinds))
    # compiled graphs call the op itself (AOTAutograd differentiates it by its registered formula); Function.apply
    # is unannotated in torch
    return entry.op(*args) if torch.compiler.is_compiling() else _Function.apply(name, *args)  # type: ignore[no-untyped-call]


# ------------------------------------------------------------------------------------------- functions

def affine_grid(theta: Tensor, size: Sequence[int], align_corners: Optional[bool] = None) -> Tensor:
    """Differentiable :func:`deformcp.affine_grid`, as ``torch.nn.functional.affine_grid`` (2-D and 3-D).

    Args:
        theta (Tensor[N, 2, 3] or Tensor[N, 3, 4]): affine matrices mapping output to input coordinates.
        size (sequence of 4 or 5 ints): (N, C, H_out, W_out) of the output image, or (N, C, D_out, H_out, W_out)
            of the output volume with theta (N, 3, 4).
        align_corners (bool or None): None means False (torch's default, without its warning).

    Returns:
        Tensor[N, H_out, W_out, 2] or Tensor[N, D_out, H_out, W_out, 3]: normalised (x, y) or (x, y, z) sampling
        locations. Gradient: theta.
    """
    align_corners = _align_corners(align_corners)
    return _apply("affine_grid", locals())


def grid_sample(input: Tensor, grid: Tensor, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: Optional[bool] = None) -> Tensor:
    """Differentiable :func:`deformcp.grid_sample`, as ``torch.nn.functional.grid_sample`` (4-D and 5-D input).

    Args:
        input (Tensor[N, C, H, W] or Tensor[N, C, D, H, W]).
        grid (Tensor[N, H_out, W_out, 2] or Tensor[N, D_out, H_out, W_out, 3]): normalised (x, y) or (x, y, z)
            in [-1, 1].
        mode (str): "bilinear" (trilinear for volumes), "nearest" (the grid gets a zero gradient) or "bicubic"
            (tricubic for volumes, which torch lacks).
        padding_mode (str): "zeros", "border" or "reflection".
        align_corners (bool or None): None means False.

    Returns:
        Tensor[N, C, H_out, W_out] or Tensor[N, C, D_out, H_out, W_out]. Gradients: input and grid.
    """
    align_corners = _align_corners(align_corners)
    return _apply("grid_sample", locals())



def affine_sample(input: Tensor, theta: Tensor, size: Optional[Sequence[int]] = None, mode: str = "bilinear",
                  padding_mode: str = "zeros", align_corners: Optional[bool] = None) -> Tensor:
    """Differentiable :func:`deformcp.affine_sample`: ``grid_sample(input, affine_grid(theta, size), ...)`` without
    the grid, for images (theta (N, 2, 3)) and volumes (theta (N, 3, 4)); size None: the input's. align_corners None
    means False. Gradients: input and theta."""
    align_corners = _align_corners(align_corners)
    return _apply("affine_sample", locals())

def roi_align(input: Tensor, boxes: Boxes, output_size: IntPair, spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False, pool_mode: str = "avg") -> Tensor:
    """Differentiable :func:`deformcp.roi_align`, as ``torchvision.ops.roi_align`` (plus mmcv's max pooling).

    Args:
        input (Tensor[N, C, H, W]).
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): [batch_index, x1, y1, x2, y2], or one [x1, y1, x2, y2]
            tensor per image; same dtype as input. No gradient.
        output_size (int or pair of int): (PH, PW).
        spatial_scale (float), sampling_ratio (int), aligned (bool): as torchvision.
        pool_mode (str): "avg" (torchvision) or "max" (mmcv).

    Returns:
        Tensor[K, C, PH, PW]. Gradient: input.
    """
    return _apply("roi_align", locals())


def ps_roi_align(input: Tensor, boxes: Boxes, output_size: IntPair, spatial_scale: float = 1.0,
                 sampling_ratio: int = -1) -> Tensor:
    """Differentiable :func:`deformcp.ps_roi_align`, as ``torchvision.ops.ps_roi_align``.

    Args:
        input (Tensor[N, C, H, W]): C a multiple of PH·PW.
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): as in :func:`roi_align`. No gradient.
        output_size (int or pair of int): (PH, PW).

    Returns:
        Tensor[K, C / (PH·PW), PH, PW]. Gradient: input.
    """
    return _apply("ps_roi_align", locals())


def deform_conv2d(input: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1,
                  padding: IntPair = 0, dilation: IntPair = 1, mask: Optional[Tensor] = None) -> Tensor:
    """Differentiable :func:`deformcp.deform_conv2d`, as ``torchvision.ops.deform_conv2d`` (v2 with mask).

    Args:
        input (Tensor[N, C_in, H, W]).
        offset (Tensor[N, 2·G·kh·kw, H_out, W_out]): (Δy, Δx) per tap and offset group G.
        weight (Tensor[C_out, C_in / groups, kh, kw]).
        bias (Tensor[C_out] or None).
        stride, padding, dilation (int or pair of int).
        mask (Tensor[N, G·kh·kw, H_out, W_out] or None): modulation scalars (DCNv2).

    Returns:
        Tensor[N, C_out, H_out, W_out]. Gradients: input, offset, weight, bias, mask.
    """
    return _apply("deform_conv2d", locals())


def deform_roi_pool(input: Tensor, rois: Boxes, offset: Optional[Tensor] = None, output_size: IntPair = 7,
                    spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1,
                    mask: Optional[Tensor] = None) -> Tensor:
    """Differentiable :func:`deformcp.deform_roi_pool`, as ``mmcv.ops.deform_roi_pool`` (times ``mask``, as
    mmcv's modulated pooling).

    Args:
        input (Tensor[N, C, H, W]).
        rois (Tensor[K, 5] or list of Tensor[L, 4]): [batch_index, x1, y1, x2, y2]. No gradient.
        offset (Tensor[K, 2, PH, PW] or None): (Δx, Δy) per bin in units of gamma · RoI size.
        output_size (int or pair of int): (PH, PW).
        mask (Tensor[K, 1, PH, PW] or None): multiplies each pooled bin.

    Returns:
        Tensor[K, C, PH, PW]. Gradients: input, offset, mask.
    """
    return _apply("deform_roi_pool", locals())


def deform_ps_roi_pool(input: Tensor, rois: Boxes, offset: Optional[Tensor], output_dim: int, group_size: int,
                       pooled_size: int, part_size: Optional[int] = None, sample_per_part: int = 4,
                       spatial_scale: float = 1.0, trans_std: float = 0.0, no_trans: bool = False) -> Tensor:
    """Differentiable :func:`deformcp.deform_ps_roi_pool` (DCNv1's deformable position-sensitive RoI pooling).

    Args:
        input (Tensor[N, output_dim·group_size², H, W]): score maps.
        rois (Tensor[K, 5] or list of Tensor[L, 4]): [batch_index, x1, y1, x2, y2]. No gradient.
        offset (Tensor[K, 2·num_classes, part_size, part_size] or None): (Δx, Δy) per class and part.
        output_dim, group_size, pooled_size, part_size, sample_per_part, spatial_scale, trans_std, no_trans:
            as deformcp.deform_ps_roi_pool.

    Returns:
        Tensor[K, output_dim, pooled_size, pooled_size]. Gradients: input, offset.
    """
    return _apply("deform_ps_roi_pool", locals())


def map_coordinates(input: Tensor, coordinates: Tensor, order: int = 1, mode: str = "constant", cval: float = 0.0,
                    prefilter: bool = True) -> Tensor:
    """Differentiable :func:`deformcp.ndimage.map_coordinates` (scipy.ndimage's): input (2-D or 3-D) sampled at
    index coordinates ``(ndim, *output_shape)`` → output_shape. Gradients: input and coordinates."""
    return _apply("map_coordinates", locals())


def affine_transform(input: Tensor, matrix: Tensor, offset: Union[Tensor, float, Sequence[float]] = 0.0,
                     output_shape: Optional[Sequence[int]] = None, order: int = 1, mode: str = "constant",
                     cval: float = 0.0, prefilter: bool = True) -> Tensor:
    """Differentiable :func:`deformcp.ndimage.affine_transform` (scipy.ndimage's): input (2-D or 3-D), matrix in
    any of SciPy's forms and offset (a tensor, or a number) mapping output to input indices. Gradients: input,
    matrix and offset (a number's: none)."""
    if not isinstance(offset, torch.Tensor):
        offset = torch.as_tensor(offset, dtype=input.dtype, device=input.device)
    return _apply("affine_transform", locals())


def mimic_loss(f_a: Tensor, f_b: Tensor) -> Tensor:
    """Differentiable :func:`deformcp.mimic_loss`: ``Σ_k [1 − cos(f_a[k], f_b[k])]`` (DCNv2 feature mimicking).

    Args:
        f_a, f_b (Tensor[K, D]): one feature vector per row.

    Returns:
        Tensor[()]: the summed loss. Gradients: f_a, f_b.
    """
    return _apply("mimic_loss", locals())


def ms_deform_attn(value: Tensor, spatial_shapes: LevelShapes, level_start_index: Optional[IntSequence],
                   sampling_locations: Tensor, attention_weights: Tensor, im2col_step: Optional[int] = None, *,
                   points_per_level: Optional[IntSequence] = None, method: str = "default") -> Tensor:
    """Differentiable :func:`deformcp.ms_deform_attn`, multi-scale deformable attention, called as Deformable DETR's
    ``MSDeformAttnFunction.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
    im2col_step)``.

    Args:
        value (Tensor[N, S, M, D]): the L levels' features, level-major along S, each row-major; M heads of D.
        spatial_shapes (list of L pairs (H_l, W_l), or integer Tensor[L, 2]): S = ΣH_l·W_l. A tensor is read
            once with ``.tolist()`` (from a GPU: one device→host copy); a Python list reads nothing, and is
            what torch.compile(fullgraph=True) and torch.export need.
        level_start_index (list of L int, integer Tensor[L] or None): the first row of each level in S, checked;
            None computes it.
        sampling_locations (Tensor[N, Lq, M, L, P, 2]): normalised (x, y) in [0, 1]; with points_per_level,
            Tensor[N, Lq, M, ΣP_l, 2].
        attention_weights (Tensor[N, Lq, M, L, P] or [N, Lq, M, ΣP_l]): used as given (no softmax).
        im2col_step (any): accepted for Deformable DETR's signature and ignored (any batch size runs).
        points_per_level (list of L int, integer Tensor[L] or None): P_l per level (RT-DETRv2). Default: None.
        method (str): "default" (bilinear) or "discrete" (RT-DETRv2's nearest). Default: "default".

    Returns:
        Tensor[N, Lq, M·D]. Gradients: value, sampling_locations, attention_weights.
    """
    return _apply("ms_deform_attn", locals())


def flash_deform_attn(value: Tensor, spatial_shapes: LevelShapes, level_start_index: Optional[IntSequence],
                      sampling_loc_attn: Tensor, num_points: int, im2col_step: Optional[int] = None) -> Tensor:
    """Differentiable :func:`deformcp.flash_deform_attn` (DCNv4's FlashDeformAttn: the softmax over each head's
    L·P logits inside the op).

    Args:
        value (Tensor[N, S, M, D]), spatial_shapes, level_start_index: as :func:`ms_deform_attn`.
        sampling_loc_attn (Tensor[N, Lq, M, L·P·3]): per head, L·P (x, y) pairs (level-major, then point), then
            the L·P attention logits in the same order.
        num_points (int): P, the points per level.
        im2col_step (any): accepted, as in :func:`ms_deform_attn`, and ignored.

    Returns:
        Tensor[N, Lq, M·D]. Gradients: value, sampling_loc_attn.
    """
    return _apply("flash_deform_attn", locals())


def dcnv3(input: Tensor, offset: Tensor, mask: Tensor, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int,
          pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int,
          offset_scale: float, im2col_step: Optional[int] = None, remove_center: bool = False) -> Tensor:
    """Differentiable :func:`deformcp.dcnv3`, called as InternImage's ``DCNv3Function.apply(input, offset, mask,
    kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
    offset_scale, im2col_step, remove_center)``.

    Args:
        input (Tensor[N, H, W, G·Cg]): channels-last.
        offset (Tensor[N, H_out, W_out, G·P·2]): per group, per tap, (Δx, Δy).
        mask (Tensor[N, H_out, W_out, G·P]): used as given.
        kernel_h, ..., offset_scale, remove_center: the geometry, as :func:`deformcp.dcnv3`.
        im2col_step (any): accepted in InternImage's position and ignored (any batch size runs at once).

    Returns:
        Tensor[N, H_out, W_out, G·Cg]. Gradients: input, offset, mask.
    """
    del im2col_step
    return _apply("dcnv3", locals())


def dcnv4(input: Tensor, offset_mask: Tensor, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int,
          pad_w: int, dilation_h: int, dilation_w: int, group: int, group_channels: int, offset_scale: float,
          im2col_step: Optional[int] = None, remove_center: bool = False, d_stride: Optional[int] = None,
          block_thread: Optional[int] = None, softmax: bool = False) -> Tensor:
    """Differentiable :func:`deformcp.dcnv4`, called as DCNv4's ``DCNv4Function.apply(input, offset_mask, kernel_h,
    ..., offset_scale, im2col_step, remove_center, d_stride, block_thread, softmax)``.

    Args:
        input (Tensor[N, H, W, G·Cg]): channels-last.
        offset_mask (Tensor[N, H_out, W_out, P_pad]): per group 2P offsets then P modulation values, then padding.
        kernel_h, ..., offset_scale, remove_center, softmax: as :func:`deformcp.dcnv4`.
        im2col_step, d_stride, block_thread (any): DCNv4's CUDA tuning, accepted in its positions and ignored.

    Returns:
        Tensor[N, H_out, W_out, G·Cg]. Gradients: input, offset_mask.
    """
    del im2col_step, d_stride, block_thread
    return _apply("dcnv4", locals())


# torch.fx.symbolic_trace records a call of each function as one node (its arguments may be Proxies).
for _function in ("affine_grid", "grid_sample", "roi_align", "ps_roi_align", "deform_conv2d", "deform_roi_pool",
                  "deform_ps_roi_pool", "mimic_loss", "ms_deform_attn", "flash_deform_attn", "dcnv3",
                  "dcnv4"):
    torch.fx.wrap(_function)


# ---------------------------------------------------------------------------------------------- modules

def _offset_groups(offset_groups: Optional[int], deform_groups: Optional[int], in_channels: int) -> Optional[int]:
    """The offset groups G of a deformable convolution module, given as offset_groups or by mmcv's name,
    deform_groups (not both), checked (a divisor of in_channels); None if neither is given."""
    if offset_groups is not None and deform_groups is not None:
        raise TypeError(f"offset_groups, deform_groups: expected one of them (deform_groups is mmcv's name for "
                        f"offset_groups), got both: offset_groups={offset_groups!r}, deform_groups={deform_groups!r}")
    name, value = ("offset_groups", offset_groups) if deform_groups is None else ("deform_groups", deform_groups)
    if value is None:
        return None
    value = _validate.integer(name, value, minimum=1)
    if in_channels % value != 0:
        raise ValueError(f"in_channels: expected a multiple of {name} = {value}, got {in_channels}")
    return value


class DeformConv2d(nn.Module):
    """Deformable convolution with the parameters of ``torchvision.ops.DeformConv2d`` (``weight``
    [C_out, C_in / groups, kh, kw] and ``bias`` [C_out] or None, same initialisation), so state_dicts load
    either way, and mmcv's ``DeformConv2d`` (``weight`` only) too: a state_dict without ``bias`` loads into a
    layer built with one, which then drops its bias (load before making the optimiser).

    Args:
        in_channels, out_channels (int), kernel_size, stride, padding, dilation (int or pair of int),
        groups (int), bias (bool): as torch.nn.Conv2d.
        offset_groups (int or None): G, checked against offset's shape in forward; None reads it from there.
            Default: None. mmcv's name, ``deform_groups=``, is accepted too (not both).

    forward(input, offset, mask=None):
        input (Tensor[N, C_in, H, W]), offset (Tensor[N, 2·G·kh·kw, H_out, W_out]), mask (Tensor[N,
        G·kh·kw, H_out, W_out] or None) → Tensor[N, C_out, H_out, W_out].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1, bias: bool = True,
                 offset_groups: Optional[int] = None, *, deform_groups: Optional[int] = None) -> None:
        super().__init__()
        in_channels = _validate.integer("in_channels", in_channels, minimum=1)
        out_channels = _validate.integer("out_channels", out_channels, minimum=1)
        self.kernel_size = _validate.pair("kernel_size", kernel_size, minimum=1)
        self.stride, self.padding, self.dilation = _deform_conv.parse_conv_arguments(stride, padding, dilation)
        groups = _validate.integer("groups", groups, minimum=1)
        bias = _validate.flag("bias", bias)
        if in_channels % groups != 0:
            raise ValueError(f"in_channels: expected a multiple of groups = {groups}, got {in_channels}")
        if out_channels % groups != 0:
            raise ValueError(f"out_channels: expected a multiple of groups = {groups}, got {out_channels}")
        self.offset_groups = _offset_groups(offset_groups, deform_groups, in_channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias: Optional[nn.Parameter] = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        if self.bias is not None and prefix + "weight" in state_dict and prefix + "bias" not in state_dict:
            self.bias = None  # a bias-free layer's state_dict (mmcv's DeformConv2d, DeformConv2dPack)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, input: Tensor, offset: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        taps = self.kernel_size[0] * self.kernel_size[1]
        if self.offset_groups is not None and not _tracing(offset) and offset.shape[1] != 2 * self.offset_groups * taps:
            raise ValueError(f"offset: expected 2·offset_groups·kh·kw = {2 * self.offset_groups * taps} channels "
                             f"(offset_groups = {self.offset_groups}), got shape {tuple(offset.shape)}")
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        s += f", padding={self.padding}" if self.padding != (0, 0) else ""
        s += f", dilation={self.dilation}" if self.dilation != (1, 1) else ""
        s += f", groups={self.groups}" if self.groups != 1 else ""
        s += ", bias=False" if self.bias is None else ""
        s += f", offset_groups={self.offset_groups}" if self.offset_groups not in (None, 1) else ""
        return s


class DeformConv2dPack(DeformConv2d):
    """Deformable convolution v1 that predicts its own offsets (mmcv's DeformConv2dPack: its state_dicts, which
    have no ``bias``, load as they are; see :class:`DeformConv2d`).

    ``conv_offset`` is a regular nn.Conv2d (same kernel size, stride, padding and dilation as the deformable
    one) mapping the input to 2·G·kh·kw offset channels; it is zero-initialised, so the layer starts as the
    regular convolution ``torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation,
    groups)``. ``weight`` and ``bias`` are :class:`DeformConv2d`'s (torchvision's names).

    The arguments are :class:`DeformConv2d`'s, but for offset_groups' default.

    Args:
        offset_groups (int): G, offset groups (mmcv's ``deform_groups=``, accepted too, not both); divides
            in_channels. Default: 1.

    forward(input): Tensor[N, C_in, H, W] → Tensor[N, C_out, H_out, W_out].
    """

    mask_channels_per_tap = 0

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1, bias: bool = True,
                 offset_groups: Optional[int] = None, *, deform_groups: Optional[int] = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         offset_groups, deform_groups=deform_groups)
        if self.offset_groups is None:
            self.offset_groups = 1
        taps = self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = nn.Conv2d(in_channels, (2 + self.mask_channels_per_tap) * taps, self.kernel_size,
                                     self.stride, self.padding, self.dilation, bias=True)
        self.init_offset()

    def init_offset(self) -> None:
        """Zero the offset (and mask) branch: offsets 0 (and masks sigmoid(0) = 0.5), as DCNv1/v2."""
        nn.init.zeros_(self.conv_offset.weight)
        assert self.conv_offset.bias is not None  # built with bias=True
        nn.init.zeros_(self.conv_offset.bias)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "conv_offset"):
            self.init_offset()

    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]  # torchvision's Pack takes no offset
        return deform_conv2d(input, self.conv_offset(input), self.weight, self.bias, self.stride, self.padding,
                             self.dilation)


class ModulatedDeformConv2dPack(DeformConv2dPack):
    """Modulated deformable convolution (DCNv2) that predicts its own offsets and masks (mmcv's
    ModulatedDeformConv2dPack; :class:`DeformConv2d` is the variant that takes them as inputs).

    ``conv_offset`` is a regular nn.Conv2d producing 3·G·kh·kw channels: the first 2·G·kh·kw are the offsets
    (deform_conv2d's layout), the last G·kh·kw the mask logits, passed through a sigmoid. It is
    zero-initialised as in the DCNv2 paper (offsets 0, masks 0.5), so at initialisation the layer is a
    regular convolution with halved weights: ``conv2d(input, 0.5 · weight, bias, stride, padding,
    dilation, groups)``.

    Args:
        as :class:`DeformConv2dPack`.

    forward(input): Tensor[N, C_in, H, W] → Tensor[N, C_out, H_out, W_out].
    """

    mask_channels_per_tap = 1

    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]  # as DeformConv2dPack's
        out = self.conv_offset(input)
        assert self.offset_groups is not None  # DeformConv2dPack's default: 1
        split = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        offset, mask = out[:, :split], torch.sigmoid(out[:, split:])
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)


class RoIAlign(nn.Module):
    """RoIAlign as ``torchvision.ops.RoIAlign`` (and mmcv's max pooling with ``pool_mode="max"``).

    forward(input, rois): input (Tensor[N, C, H, W]), rois (Tensor[K, 5] or list of Tensor[L, 4]) →
    Tensor[K, C, PH, PW].
    """

    def __init__(self, output_size: IntPair, spatial_scale: float = 1.0, sampling_ratio: int = -1,
                 aligned: bool = False, pool_mode: str = "avg") -> None:
        super().__init__()
        # raises here, not at the first forward
        _roi_align.parse_roi_options(output_size, spatial_scale, sampling_ratio, aligned, pool_mode)
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.pool_mode = pool_mode

    def forward(self, input: Tensor, rois: Boxes) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned,
                         self.pool_mode)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, pool_mode={self.pool_mode!r}")


class PSRoIAlign(nn.Module):
    """Position-sensitive RoIAlign as ``torchvision.ops.PSRoIAlign``.

    forward(input, rois): input (Tensor[N, C, H, W], C a multiple of PH·PW), rois (Tensor[K, 5] or list of
    Tensor[L, 4]) → Tensor[K, C / (PH·PW), PH, PW].
    """

    def __init__(self, output_size: IntPair, spatial_scale: float = 1.0, sampling_ratio: int = -1) -> None:
        super().__init__()
        _roi_align.parse_roi_options(output_size, spatial_scale, sampling_ratio, True, "avg")  # raises here
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio

    def forward(self, input: Tensor, rois: Boxes) -> Tensor:
        return ps_roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}")


def _offset_fc(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, out_features))


class DeformRoIPool(nn.Module):
    """Deformable RoI pooling with its own offset branch (mmcv's DeformRoIPoolPack, same parameter names).

    The RoIs are first pooled without offsets; ``offset_fc`` (Linear → ReLU → Linear → ReLU → Linear, the
    last zero-initialised, so the layer starts as plain aligned RoIAlign) maps each RoI's pooled features
    (C·PH·PW) to 2·PH·PW offsets (Δx, Δy per bin, in units of gamma · RoI size), with which the RoIs are
    pooled again.

    Args:
        output_size (int or pair of int): (PH, PW).
        output_channels (int): C, the channels of the input.
        deform_fc_channels (int): hidden width of the offset branch. Default: 1024.
        spatial_scale (float), sampling_ratio (int), gamma (float): as :func:`deform_roi_pool`.

    forward(input, rois): input (Tensor[N, C, H, W]), rois (Tensor[K, 5] or list of Tensor[L, 4]) →
    Tensor[K, C, PH, PW].
    """

    def __init__(self, output_size: IntPair, output_channels: int, deform_fc_channels: int = 1024,
                 spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1) -> None:
        super().__init__()
        self.output_size = _roi_align.parse_roi_options(output_size, spatial_scale, sampling_ratio, True, "avg")[:2]
        _validate.real("gamma", gamma)
        output_channels = _validate.integer("output_channels", output_channels, minimum=1)
        deform_fc_channels = _validate.integer("deform_fc_channels", deform_fc_channels, minimum=1)
        self.output_channels = output_channels
        self.deform_fc_channels = deform_fc_channels
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.gamma = gamma
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = _offset_fc(bins * output_channels, deform_fc_channels, 2 * bins)
        last = self.offset_fc[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def _pool(self, input: Tensor, rois: Boxes, offset: Optional[Tensor] = None,
              mask: Optional[Tensor] = None) -> Tensor:
        return deform_roi_pool(input, rois, offset, self.output_size, self.spatial_scale, self.sampling_ratio,
                               self.gamma, mask)

    def _offset(self, pooled: Tensor) -> Tensor:
        offset: Tensor = self.offset_fc(pooled.flatten(1))  # a Module's call is untyped in torch
        return offset.view(-1, 2, *self.output_size)

    def forward(self, input: Tensor, rois: Boxes) -> Tensor:
        pooled = self._pool(input, rois)
        return self._pool(input, rois, self._offset(pooled))

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, output_channels={self.output_channels}, "
                f"deform_fc_channels={self.deform_fc_channels}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}")


class ModulatedDeformRoIPool(DeformRoIPool):
    """Modulated deformable RoI pooling (DCNv2) with offset and mask branches (mmcv's
    ModulatedDeformRoIPoolPack, same parameter names).

    As :class:`DeformRoIPool`, plus ``mask_fc`` (Linear → ReLU → Linear → Sigmoid, the last Linear
    zero-initialised, so masks start at 0.5) mapping the pooled features to one mask per bin, which
    multiplies the pooled value.

    forward(input, rois): input (Tensor[N, C, H, W]), rois (Tensor[K, 5] or list of Tensor[L, 4]) →
    Tensor[K, C, PH, PW].
    """

    def __init__(self, output_size: IntPair, output_channels: int, deform_fc_channels: int = 1024,
                 spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1) -> None:
        super().__init__(output_size, output_channels, deform_fc_channels, spatial_scale, sampling_ratio, gamma)
        bins = self.output_size[0] * self.output_size[1]
        mask_logits = nn.Linear(deform_fc_channels, bins)
        self.mask_fc = nn.Sequential(nn.Linear(bins * output_channels, deform_fc_channels), nn.ReLU(inplace=True),
                                     mask_logits, nn.Sigmoid())
        nn.init.zeros_(mask_logits.weight)
        nn.init.zeros_(mask_logits.bias)

    def forward(self, input: Tensor, rois: Boxes) -> Tensor:
        pooled = self._pool(input, rois)
        mask = self.mask_fc(pooled.flatten(1)).view(-1, 1, *self.output_size)
        return self._pool(input, rois, self._offset(pooled), mask)


#: mmcv's names for the modules above.
DeformRoIPoolPack = DeformRoIPool
ModulatedDeformRoIPoolPack = ModulatedDeformRoIPool


class SpatialTransformer(nn.Module):
    """Spatial transformer (Jaderberg et al. 2015): a localisation net predicts θ, then
    ``grid_sample(input, affine_grid(θ, size))``.

    Args:
        in_channels (int): C.
        output_size (pair of int or None): (H_out, W_out); None keeps the input's (H, W). Default: None.
        localization (nn.Module or None): maps Tensor[N, C, H, W] to features Tensor[N, F]; None uses a
            small conv net (conv 3×3 → ReLU → conv 3×3 → ReLU → adaptive average pool 4×4 → Linear → ReLU)
            with F = 32, for any input size. Default: None.
        localization_features (int or None): F, required with a custom ``localization``.
        hidden_channels (int): channels of the default localisation net's convolutions. Default: 16.
        mode, padding_mode, align_corners: as :func:`grid_sample`.

    ``fc_loc`` (Linear(F, 6)) has zero weights and the identity as its bias, so the module starts as the
    identity transform (output = input when output_size is the input size).

    forward(input): Tensor[N, C, H, W] → Tensor[N, C, H_out, W_out]. ``theta(input)`` gives θ,
    Tensor[N, 2, 3].
    """

    def __init__(self, in_channels: int, output_size: Optional[IntPair] = None,
                 localization: Optional[nn.Module] = None, localization_features: Optional[int] = None,
                 hidden_channels: int = 16, mode: str = "bilinear", padding_mode: str = "zeros",
                 align_corners: Optional[bool] = False) -> None:
        super().__init__()
        in_channels = _validate.integer("in_channels", in_channels, minimum=1)
        output_size = None if output_size is None else _validate.pair("output_size", output_size, minimum=0)
        if localization_features is not None:
            localization_features = _validate.integer("localization_features", localization_features, minimum=1)
        hidden_channels = _validate.integer("hidden_channels", hidden_channels, minimum=1)
        _validate.choice("mode", mode, _spatial_transformer.MODES)
        _validate.choice("padding_mode", padding_mode, _spatial_transformer.PADDING_MODES)
        align_corners = _align_corners(align_corners)
        if localization is None:
            localization_features = 32
            localization = nn.Sequential(
                nn.Conv2d(in_channels, hidden_channels, 3, padding=1), nn.ReLU(inplace=True),
                nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1), nn.ReLU(inplace=True),
                nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                nn.Linear(16 * hidden_channels, localization_features), nn.ReLU(inplace=True))
        elif localization_features is None:
            raise ValueError("localization_features: required with a custom localization net (its output size F)")
        self.in_channels = in_channels
        self.output_size = output_size
        self.mode, self.padding_mode, self.align_corners = mode, padding_mode, align_corners
        self.localization = localization
        self.fc_loc = nn.Linear(localization_features, 6)
        nn.init.zeros_(self.fc_loc.weight)
        with torch.no_grad():
            self.fc_loc.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def theta(self, input: Tensor) -> Tensor:
        """The predicted affine transforms, Tensor[N, 2, 3]."""
        theta: Tensor = self.fc_loc(self.localization(input))  # a Module's call is untyped in torch
        return theta.view(-1, 2, 3)

    def forward(self, input: Tensor) -> Tensor:
        N, C, H, W = input.shape
        size = (N, C) + (self.output_size or (H, W))
        grid = affine_grid(self.theta(input), size, self.align_corners)
        return grid_sample(input, grid, self.mode, self.padding_mode, self.align_corners)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, output_size={self.output_size}, mode={self.mode!r}, "
                f"padding_mode={self.padding_mode!r}, align_corners={self.align_corners}")


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al., Deformable DETR, https://arxiv.org/abs/2010.04159, eq. 3) with
    Deformable DETR's parameters (names, shapes, initialisation: its state_dicts load either way).

    Per query and head m: ``Σ_l Σ_p A_mlp · W_m x_l(φ_l(p̂_q) + Δp_mlp)``, the offsets Δp_mlp and the logits of
    A_mlp (soft-maxed over the L·P points of each head) linear in the query, the values ``value_proj`` of the input,
    the heads concatenated and mapped by ``output_proj``.

    Args:
        d_model (int): C, the channels of queries and inputs; a multiple of n_heads. Default: 256.
        n_levels (int): L. Default: 4.
        n_heads (int): M. Default: 8.
        n_points (int): P, sampling points per head and level. Default: 4.

    Parameters: ``sampling_offsets`` Linear(C, M·L·P·2) (weight 0, bias: head m's direction (cos, sin)(2πm/M)
    scaled to max-norm 1, times p + 1 for point p); ``attention_weights`` Linear(C, M·L·P) (0 and 0: uniform
    attention); ``value_proj`` and ``output_proj`` Linear(C, C) (Xavier-uniform weights, bias 0).

    forward(query, reference_points, input_flatten, input_spatial_shapes, input_level_start_index,
    input_padding_mask=None):
    query (Tensor[N, Lq, C]); reference_points (Tensor[N, Lq, L, 2]: normalised (x, y), the offsets divided by
    (W_l, H_l); or Tensor[N, Lq, L, 4]: boxes (x, y, w, h), the offsets times (w, h) / (2P));
    input_flatten (Tensor[N, S, C]), the levels level-major, each row-major; input_spatial_shapes (list of L
    pairs (H_l, W_l) or integer Tensor[L, 2]), input_level_start_index (list, integer Tensor[L] or None): as
    :func:`ms_deform_attn`; input_padding_mask (bool Tensor[N, S] or None): True where the input is padding
    (its values are 0) → Tensor[N, Lq, C].
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        d_model = _validate.integer("d_model", d_model, minimum=1)
        n_levels = _validate.integer("n_levels", n_levels, minimum=1)
        n_heads = _validate.integer("n_heads", n_heads, minimum=1)
        n_points = _validate.integer("n_points", n_points, minimum=1)
        if d_model % n_heads != 0:
            raise ValueError(f"d_model: expected a multiple of n_heads = {n_heads}, got {d_model}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(self._initial_offsets().flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def _initial_offsets(self) -> Tensor:
        """Tensor[M, L, P, 2]: head m's direction (cos, sin)(2πm/M), scaled to max-norm 1, times p + 1 (computed in
        float32, as Deformable DETR does)."""
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().amax(-1, keepdim=True)
        scale = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        return (directions[:, None, None, :] * scale[None, None, :, None]).repeat(1, self.n_levels, 1, 1)

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor, input_spatial_shapes: LevelShapes,
                input_level_start_index: Optional[IntSequence], input_padding_mask: Optional[Tensor] = None) -> Tensor:
        N, Lq, _ = query.shape
        S = input_flatten.shape[1]
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.d_model // M)
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = torch.softmax(self.attention_weights(query).view(N, Lq, M, L * P), -1).view(N, Lq, M, L, P)
        locations = self._locations(reference_points, offsets, input_spatial_shapes)
        out = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights)
        projected: Tensor = self.output_proj(out)  # a Module's call is untyped in torch
        return projected

    def _locations(self, reference_points: Tensor, offsets: Tensor, spatial_shapes: LevelShapes) -> Tensor:
        """Tensor[N, Lq, M, L, P, 2]: the sampling locations of offsets (Tensor[N, Lq, M, L, P, 2]) around
        reference_points (Tensor[N, Lq, L, 2 or 4])."""
        N, Lq, M, L = offsets.shape[:4]
        if (reference_points.ndim != 4 or tuple(reference_points.shape[:3]) != (N, Lq, L)
                or reference_points.shape[-1] not in (2, 4)):
            raise ValueError(f"reference_points: expected ({N}, {Lq}, {L}, 2) points or ({N}, {Lq}, {L}, 4) boxes "
                             f"(N, Lq, L, ·), got shape {tuple(reference_points.shape)}")
        centre = reference_points[:, :, None, :, None, :2]
        if reference_points.shape[-1] == 2:
            shapes = torch.as_tensor(spatial_shapes, dtype=offsets.dtype, device=offsets.device)
            return centre + offsets / shapes.flip(-1)[None, None, None, :, None, :]  # (W_l, H_l)
        return centre + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, n_points={self.n_points}"


class _ChannelsLast(nn.Module):
    """(N, C, H, W) → (N, H, W, C), a view (InternImage's ``to_channels_last``)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


#: InternImage's act_layer names (ReLU and SiLU in place, as there).
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"ReLU": lambda: nn.ReLU(inplace=True),
                                                     "SiLU": lambda: nn.SiLU(inplace=True), "GELU": nn.GELU}


def _norm_to_channels_last(channels: int, norm_layer: str) -> nn.Sequential:
    """InternImage's build_norm_layer(channels, norm_layer, 'channels_first', 'channels_last'): "LN" permutes, then
    LayerNorm (eps 1e-6; keys ``1.weight``, ``1.bias``); "BN" is BatchNorm2d (keys ``0.*``), then permutes."""
    if norm_layer == "LN":
        return nn.Sequential(_ChannelsLast(), nn.LayerNorm(channels, eps=1e-6))
    return nn.Sequential(nn.BatchNorm2d(channels), _ChannelsLast())


class _DCNArguments(NamedTuple):
    channels: int
    kernel_size: int
    stride: int
    pad: int
    dilation: int
    group: int
    offset_scale: float
    remove_center: bool
    dw_kernel_size: Optional[int]


def _dcn_arguments(channels: object, kernel_size: object, stride: object, pad: object, dilation: object,
                   group: object, offset_scale: object, remove_center: object,
                   dw_kernel_size: object) -> _DCNArguments:
    """The DCNv3 / DCNv4 modules' arguments, checked. The offsets are predicted at each input pixel, so the output
    must have the input's size: stride 1 and 2·pad = dilation·(kernel_size − 1)."""
    channels = _validate.integer("channels", channels, minimum=1)
    kernel_size = _validate.integer("kernel_size", kernel_size, minimum=1)
    stride = _validate.integer("stride", stride, minimum=1)
    pad = _validate.integer("pad", pad, minimum=0)
    dilation = _validate.integer("dilation", dilation, minimum=1)
    group = _validate.integer("group", group, minimum=1)
    scale = _validate.real("offset_scale", offset_scale)
    remove_center = _validate.flag("remove_center", remove_center)
    dw = None if dw_kernel_size is None else _validate.integer("dw_kernel_size", dw_kernel_size, minimum=1)
    if channels % group != 0:
        raise ValueError(f"channels: expected a multiple of group = {group}, got {channels}")
    if remove_center and kernel_size % 2 == 0:
        raise ValueError(f"remove_center: expected an odd kernel_size (a centre tap to remove), got kernel_size = "
                         f"{kernel_size}")
    same_size = "the offsets are predicted at each input pixel: the output must have the input's size"
    if stride != 1:
        raise ValueError(f"stride: expected 1 ({same_size}), got {stride}")
    if dilation * (kernel_size - 1) % 2:
        raise ValueError(f"kernel_size: expected dilation·(kernel_size − 1) even ({same_size}, with pad = "
                         f"dilation·(kernel_size − 1) / 2), got kernel_size = {kernel_size}, dilation = {dilation}")
    if dilation * (kernel_size - 1) != 2 * pad:
        raise ValueError(f"pad: expected dilation·(kernel_size − 1) / 2 = {dilation * (kernel_size - 1) // 2} "
                         f"({same_size}), got {pad}")
    if dw is not None and dw % 2 == 0:
        raise ValueError(f"dw_kernel_size: expected an odd int (its padding (k − 1) // 2 keeps the input's size), "
                         f"got {dw}")
    return _DCNArguments(channels, kernel_size, stride, pad, dilation, group, scale, remove_center, dw)


def _center_feature_scale(module: nn.Module, channels: int, group: int) -> None:
    """Register ``center_feature_scale_proj_weight`` (G, C) and ``center_feature_scale_proj_bias`` (G,), both 0
    in float32, on the module (as DCNv3 and DCNv4 do)."""
    module.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels, dtype=torch.float))
    module.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group, dtype=torch.float))


def _blend(module: nn.Module, x: Tensor, x_proj: Tensor, query: Tensor, group_channels: int) -> Tensor:
    """``x·(1 − s) + x_proj·s``, s = sigmoid(query·Wᵀ + b) (N, H, W, G) repeated over each group's Cg channels."""
    weight, bias = module.center_feature_scale_proj_weight, module.center_feature_scale_proj_bias
    scale = torch.sigmoid(nn.functional.linear(query, cast(Tensor, weight), cast(Tensor, bias)))
    scale = scale[..., None].expand(*scale.shape, group_channels).flatten(-2)
    return x * (1 - scale) + x_proj * scale


class DCNv3(nn.Module):
    """InternImage's DCNv3 module (Wang et al., https://arxiv.org/abs/2211.05778) with its parameters (names,
    shapes, initialisation: its state_dicts load either way), running :func:`dcnv3`.

    Channels-last. ``input_proj`` (Linear(C, C)) gives the values; ``dw_conv`` (depth-wise Conv2d(C, C,
    dw_kernel_size, padding (dw_kernel_size − 1) // 2) → norm → activation, channels-last out) the features, from
    which ``offset`` (Linear(C, G·P·2)) predicts the (Δx, Δy) of each group's P = kernel_size² (− 1 with
    remove_center) taps and ``mask`` (Linear(C, G·P)) their logits, soft-maxed over each group's P taps;
    :func:`dcnv3` samples the values; ``output_proj`` (Linear(C, C)) maps the result. With center_feature_scale
    the result is first ``x·(1 − s) + input_proj(input)·s``, s = sigmoid(features·Wᵀ + b) per group (parameters
    ``center_feature_scale_proj_weight`` (G, C) and ``center_feature_scale_proj_bias`` (G,), both 0).

    Args:
        channels (int): C, a multiple of group. Default: 64.
        kernel_size (int): the square kernel's size. Default: 3.
        dw_kernel_size (int or None): the depth-wise convolution's (odd) size; None: kernel_size. Default: None.
        stride, pad, dilation (int): the kernel's geometry; the output has the input's size (stride 1,
            2·pad = dilation·(kernel_size − 1)). Defaults: 1, 1, 1.
        group (int): G, groups of Cg = C / G channels. Default: 4.
        offset_scale (float): as :func:`deformcp.dcnv3`. Default: 1.0.
        act_layer (str): "GELU", "ReLU" or "SiLU". Default: "GELU".
        norm_layer (str): "LN" (LayerNorm, eps 1e-6) or "BN" (BatchNorm2d). Default: "LN".
        center_feature_scale, remove_center (bool): Defaults: False.

    Initialisation: ``offset`` and ``mask`` 0 (zero offsets, modulation 1/P); ``input_proj`` and ``output_proj``
    Xavier-uniform weights, bias 0; ``dw_conv`` torch's defaults.

    forward(input): Tensor[N, H, W, C] → Tensor[N, H, W, C].
    """

    def __init__(self, channels: int = 64, kernel_size: int = 3, dw_kernel_size: Optional[int] = None,
                 stride: int = 1, pad: int = 1, dilation: int = 1, group: int = 4, offset_scale: float = 1.0,
                 act_layer: str = "GELU", norm_layer: str = "LN", center_feature_scale: bool = False,
                 remove_center: bool = False) -> None:
        super().__init__()
        a = _dcn_arguments(channels, kernel_size, stride, pad, dilation, group, offset_scale, remove_center,
                           kernel_size if dw_kernel_size is None else dw_kernel_size)
        _validate.choice("act_layer", act_layer, tuple(_ACTIVATIONS))
        _validate.choice("norm_layer", norm_layer, ("LN", "BN"))
        self.center_feature_scale = _validate.flag("center_feature_scale", center_feature_scale)
        self.channels, self.kernel_size, self.dw_kernel_size = a.channels, a.kernel_size, cast(int, a.dw_kernel_size)
        self.stride, self.pad, self.dilation, self.group = a.stride, a.pad, a.dilation, a.group
        self.group_channels = a.channels // a.group
        self.offset_scale, self.remove_center = a.offset_scale, a.remove_center
        self.act_layer, self.norm_layer = act_layer, norm_layer
        C, dw, P = a.channels, self.dw_kernel_size, a.kernel_size * a.kernel_size - a.remove_center
        self.dw_conv = nn.Sequential(nn.Conv2d(C, C, dw, stride=1, padding=(dw - 1) // 2, groups=C),
                                     _norm_to_channels_last(C, norm_layer), _ACTIVATIONS[act_layer]())
        self.offset = nn.Linear(C, a.group * P * 2)
        self.mask = nn.Linear(C, a.group * P)
        self.input_proj = nn.Linear(C, C)
        self.output_proj = nn.Linear(C, C)
        self._reset_parameters()
        if self.center_feature_scale:
            _center_feature_scale(self, C, a.group)

    def _reset_parameters(self) -> None:
        for linear in (self.offset, self.mask):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        for linear in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, input: Tensor) -> Tensor:
        N, H, W, _ = input.shape
        x = self.input_proj(input)
        features = self.dw_conv(input.permute(0, 3, 1, 2))
        offset = self.offset(features)
        mask = torch.softmax(self.mask(features).reshape(N, H, W, self.group, -1), -1)
        mask = mask.reshape(N, H, W, -1).to(x.dtype)
        k, s, p, d = self.kernel_size, self.stride, self.pad, self.dilation
        out = dcnv3(x, offset, mask, k, k, s, s, p, p, d, d, self.group, self.group_channels, self.offset_scale,
                    remove_center=self.remove_center)
        if self.center_feature_scale:
            out = _blend(self, out, x, features, self.group_channels)
        projected: Tensor = self.output_proj(out)  # a Module's call is untyped in torch
        return projected

    def extra_repr(self) -> str:
        s = (f"channels={self.channels}, kernel_size={self.kernel_size}, dw_kernel_size={self.dw_kernel_size}, "
             f"stride={self.stride}, pad={self.pad}, dilation={self.dilation}, group={self.group}, "
             f"offset_scale={self.offset_scale}")
        s += ", center_feature_scale=True" if self.center_feature_scale else ""
        return s + (", remove_center=True" if self.remove_center else "")


class DCNv4(nn.Module):
    """DCNv4's module (Xiong et al., https://arxiv.org/abs/2401.06197) with its parameters (names, shapes,
    initialisation: its state_dicts load either way), running :func:`dcnv4` (``softmax=False``: the modulation
    unbounded).

    ``value_proj`` (Linear(C, C)) gives the values; ``offset_mask`` (Linear(C, ceil(3·G·P / 8)·8)) predicts, from
    the input (or from ``offset_mask_dw``, a depth-wise Conv2d(C, C, dw_kernel_size) of it), each group's P
    (Δx, Δy) pairs, then its P modulation scalars, P = kernel_size² (− 1 with remove_center), the groups padded to
    a multiple of 8; :func:`dcnv4` samples the values; ``output_proj`` (Linear(C, C), bias if output_bias) maps the
    result. without_pointwise drops value_proj and output_proj. With center_feature_scale the result is first
    ``x·(1 − s) + values·s``, s = sigmoid(x·Wᵀ + b) per group of the sampled x itself (as DCNv4 does; DCNv3 takes
    its features), parameters as :class:`DCNv3`'s.

    Args:
        channels (int): C, a multiple of group (any Cg; DCNv4's CUDA kernels want a multiple of 16). Default: 64.
        kernel_size, stride, pad, dilation, group, offset_scale: as :class:`DCNv3`.
        dw_kernel_size (int or None): the (odd) size of ``offset_mask_dw``; None: none. Default: None.
        center_feature_scale, remove_center (bool): as :class:`DCNv3`. Defaults: False.
        output_bias (bool): output_proj's bias. Default: True.
        without_pointwise (bool): no value_proj and output_proj. Default: False.
        **kwargs: accepted and ignored, as by DCNv4's module (its networks pass their blocks' options).

    Initialisation: ``offset_mask`` 0; ``value_proj`` and ``output_proj`` Xavier-uniform weights, bias 0.

    forward(input, shape=None): input Tensor[N, H·W, C] (row-major), shape (H, W) (None: a square image) →
    Tensor[N, H·W, C].
    """

    def __init__(self, channels: int = 64, kernel_size: int = 3, stride: int = 1, pad: int = 1, dilation: int = 1,
                 group: int = 4, offset_scale: float = 1.0, dw_kernel_size: Optional[int] = None,
                 center_feature_scale: bool = False, remove_center: bool = False, output_bias: bool = True,
                 without_pointwise: bool = False, **kwargs: Any) -> None:
        super().__init__()
        a = _dcn_arguments(channels, kernel_size, stride, pad, dilation, group, offset_scale, remove_center,
                           dw_kernel_size)
        self.center_feature_scale = _validate.flag("center_feature_scale", center_feature_scale)
        output_bias = _validate.flag("output_bias", output_bias)
        self.without_pointwise = _validate.flag("without_pointwise", without_pointwise)
        self.channels, self.kernel_size, self.dw_kernel_size = a.channels, a.kernel_size, a.dw_kernel_size
        self.stride, self.pad, self.dilation, self.group = a.stride, a.pad, a.dilation, a.group
        self.group_channels = a.channels // a.group
        self.offset_scale, self.remove_center = a.offset_scale, a.remove_center
        self.K = a.group * (a.kernel_size * a.kernel_size - a.remove_center)
        C = a.channels
        if a.dw_kernel_size is not None:
            dw = a.dw_kernel_size
            self.offset_mask_dw = nn.Conv2d(C, C, dw, stride=1, padding=(dw - 1) // 2, groups=C)
        self.offset_mask = nn.Linear(C, math.ceil(3 * self.K / 8) * 8)
        if not self.without_pointwise:
            self.value_proj = nn.Linear(C, C)
            self.output_proj = nn.Linear(C, C, bias=output_bias)
        self._reset_parameters()
        if self.center_feature_scale:
            _center_feature_scale(self, C, a.group)

    def _reset_parameters(self) -> None:
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        if not self.without_pointwise:
            nn.init.xavier_uniform_(self.value_proj.weight)
            nn.init.zeros_(self.value_proj.bias)
            nn.init.xavier_uniform_(self.output_proj.weight)
            if self.output_proj.bias is not None:
                nn.init.zeros_(self.output_proj.bias)

    def forward(self, input: Tensor, shape: Optional[IntPair] = None) -> Tensor:
        N, L, C = input.shape
        if shape is None:
            H = W = int(L ** 0.5)
            if H * W != L:
                raise ValueError(f"input: expected a square image (L = H·W with H = W) when shape is None, got shape "
                                 f"{tuple(input.shape)}")
        else:
            H, W = _validate.pair("shape", shape)
            if H * W != L:
                raise ValueError(f"shape: expected (H, W) with H·W = L = {L} (input (N, L, C)), got {shape!r}")
        x = input if self.without_pointwise else self.value_proj(input)
        x = x.reshape(N, H, W, -1)
        features = input
        if self.dw_kernel_size is not None:
            image = input.reshape(N, H, W, C).permute(0, 3, 1, 2)
            features = self.offset_mask_dw(image).permute(0, 2, 3, 1).reshape(N, L, C)
        offset_mask = self.offset_mask(features).reshape(N, H, W, -1)
        k, s, p, d = self.kernel_size, self.stride, self.pad, self.dilation
        out = dcnv4(x, offset_mask, k, k, s, s, p, p, d, d, self.group, self.group_channels, self.offset_scale,
                    remove_center=self.remove_center)
        if self.center_feature_scale:
            out = _blend(self, out, x, out, self.group_channels)
        out = out.reshape(N, L, -1)
        return out if self.without_pointwise else self.output_proj(out)

    def extra_repr(self) -> str:
        s = (f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, pad={self.pad}, "
             f"dilation={self.dilation}, group={self.group}, offset_scale={self.offset_scale}")
        s += f", dw_kernel_size={self.dw_kernel_size}" if self.dw_kernel_size is not None else ""
        s += ", center_feature_scale=True" if self.center_feature_scale else ""
        s += ", remove_center=True" if self.remove_center else ""
        return s + (", without_pointwise=True" if self.without_pointwise else "")
