"""The workspace limit: how much scratch memory an op may take for its column buffers at once.

deform_conv2d processes its batch in chunks whose scratch memory stays under the limit: several whole images
when they fit, else a range of output rows of one image (:func:`chunks`), so any batch size and any image
size works with bounded extra memory. Set it for a block of code:

>>> with deformcp.workspace_limit(64 * 2**20):    # 64 MiB
...     out = deformcp.deform_conv2d(x, offset, weight)
"""
from __future__ import annotations

import contextlib
import contextvars
import operator

from . import _dispatch

DEFAULT = 512 * 2**20
_LIMIT = contextvars.ContextVar("deformcp_workspace_limit", default=DEFAULT)


@contextlib.contextmanager
def workspace_limit(nbytes: int):
    """Limit the scratch memory of ops inside the ``with`` block to ``nbytes`` (default 512 MiB)."""
    try:
        nbytes = operator.index(nbytes)
    except TypeError:
        raise TypeError(f"workspace_limit: expected an int number of bytes, got {nbytes!r}") from None
    if nbytes <= 0:
        raise ValueError(f"workspace_limit: expected a positive number of bytes, got {nbytes}")
    with _dispatch.scoped(_LIMIT, nbytes):
        yield nbytes


def get_workspace_limit() -> int:
    """The scratch-memory limit in force here, in bytes."""
    return _LIMIT.get()


def chunks(N: int, rows: int, per_row: int, op: str, per_image: int = 0) -> list[tuple[int, int, int, int]]:
    """Chunks (n0, n1, r0, r1) — images [n0, n1), output rows [r0, r1) of each — whose scratch memory
    (``per_image`` per image in the chunk plus ``per_row`` per output row) fits the limit, in order: as many
    whole images as fit when one does, else each image's rows in near-equal ranges. ValueError when one row
    does not fit."""
    if N == 0:
        return []
    limit = get_workspace_limit()
    row_bytes, image_bytes = per_image + per_row, per_image + rows * per_row
    if row_bytes > limit:
        raise ValueError(f"{op}: one output row needs {row_bytes} bytes of workspace, more than the limit of "
                         f"{limit} bytes; raise it with deformcp.workspace_limit(...)")
    if image_bytes <= limit:
        step = limit // image_bytes
        return [(a, min(a + step, N), 0, rows) for a in range(0, N, step)]
    pieces = -(-rows // ((limit - per_image) // per_row))
    step = -(-rows // pieces)
    return [(n, n + 1, r, min(r + step, rows)) for n in range(N) for r in range(0, rows, step)]
