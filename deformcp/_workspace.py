"""The workspace limit: how much scratch memory an op may take for its column buffers at once.

deform_conv2d processes its batch in chunks of images whose scratch memory stays under the limit, so any
batch size works with bounded extra memory. Set it for a block of code:

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


def batch_chunks(N: int, bytes_per_image: int, op: str) -> list[tuple[int, int]]:
    """(start, stop) ranges of the batch whose scratch memory fits the limit; ValueError when one image
    alone does not fit."""
    limit = get_workspace_limit()
    if N and bytes_per_image > limit:
        raise ValueError(f"{op}: one image needs {bytes_per_image} bytes of workspace, more than the limit of "
                         f"{limit} bytes; raise it with deformcp.workspace_limit(...)")
    step = max(1, limit // max(1, bytes_per_image))
    return [(a, min(a + step, N)) for a in range(0, N, step)]
