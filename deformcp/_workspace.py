"""How work is split: the workspace limit, and the chunk sizes of the NumPy path.

The workspace limit is how much scratch memory an op may take for its column buffers at once. deform_conv2d
processes its batch in chunks whose scratch memory stays under the limit: several whole images when they fit,
else a range of output rows of one image (:func:`chunks`), so any batch size and any image size works with
bounded extra memory. Set it for a block of code:

>>> import numpy as np, deformcp
>>> x, offset, weight = np.ones((1, 2, 6, 6)), np.zeros((1, 18, 6, 6)), np.ones((3, 2, 3, 3))
>>> with deformcp.workspace_limit(64 * 2**20):    # 64 MiB
...     out = deformcp.deform_conv2d(x, offset, weight, padding=1)
>>> out.shape
(1, 3, 6, 6)

The NumPy path of the other ops splits its work by the fixed sizes below, into ranges (start, stop) of images,
channels, RoIs or bins (:func:`ranges` and the helpers after it), which run on its thread pool
(``_bilinear.for_each_chunk``); deform_conv2d's chunks run there too, as tasks of cache-sized blocks.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import operator
import os
import pathlib
from typing import Iterator, Optional

import numpy as np

from . import _dispatch

DEFAULT = 512 * 2**20
_LIMIT = contextvars.ContextVar("deformcp_workspace_limit", default=DEFAULT)

# The NumPy path's fixed split sizes.
#: grid_sample: bytes of one chunk's channels-last images, small enough for the cache, large enough to amortise
#: calls (:func:`image_chunks`).
IMAGE_CHUNK_BYTES = 1 << 20
#: roi_align, ps_roi_align, deform_roi_pool: bytes of one block of channels of the channels-last images
#: (:func:`channel_blocks`).
CHANNEL_BLOCK_BYTES = 4 << 20
#: roi_align, ps_roi_align, deform_roi_pool: samples (four bilinear corners each) per chunk of RoIs, bounding
#: the extra memory.
ROI_SAMPLES_PER_CHUNK = 1 << 20
#: deform_ps_roi_pool: samples per chunk of RoIs.
PS_ROI_SAMPLES_PER_CHUNK = 1 << 19
#: ms_deform_attn, flash_deform_attn: bytes of one chunk of queries' sampling plan (about 32 a corner) in the
#: forward, and in the backward, where each chunk's value gradient is a dense product the size of the image's value
#: (fewer chunks, fewer of them). Of 1, 2, 4, 8 and 16 MiB, 4 MiB was the fastest forward and 16 MiB the fastest
#: backward on Deformable DETR's encoder (one thread).
MSDA_CHUNK_BYTES = 4 << 20
MSDA_BACKWARD_CHUNK_BYTES = 16 << 20
#: ms_deform_attn, flash_deform_attn backward: bytes of corner values gathered at once (kept in cache).
MSDA_GATHER_BYTES = 256 << 10
#: map_coordinates, affine_transform: bytes of one chunk of points' taps (indices, weights, gathered values).
NDIMAGE_CHUNK_BYTES = 4 << 20
#: ps_roi_align: tasks its bin positions are split into (:func:`even_ranges`).
BIN_GROUPS = 4
#: deform_conv2d: bytes of one block's columns (output rows or whole images sampled and multiplied at once).
DEFORM_CONV_BLOCK_BYTES = 4 << 20
#: deform_conv2d: tasks each chunk's blocks are split into (consecutive blocks; one weight gradient each).
DEFORM_CONV_TASKS = 8
#: deform_conv2d: bytes of channels-last pixels transposed at a time (kept in cache).
TRANSPOSE_BLOCK_BYTES = 256 << 10


@contextlib.contextmanager
def workspace_limit(nbytes: int) -> Iterator[int]:
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
        return [(a, b, 0, rows) for a, b in ranges(N, limit // image_bytes)]
    pieces = -(-rows // ((limit - per_image) // per_row))
    return [(n, n + 1, r0, r1) for n in range(N) for r0, r1 in even_ranges(rows, pieces)]


def ranges(n: int, step: int) -> list[tuple[int, int]]:
    """Ranges (start, stop) of at most step (≥ 1) items covering [0, n), in order."""
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def even_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """At most ``parts`` near-equal ranges covering [0, n)."""
    return ranges(n, max(1, -(-n // parts)))


def cost_ranges(costs: np.ndarray, budget: float) -> list[tuple[int, int]]:
    """Ranges of consecutive items (costs (n,), an item never split), a new one starting where the running
    total of the costs passes a multiple of budget."""
    if not len(costs):
        return []
    chunk_of = np.floor(np.cumsum(costs) / budget).astype(np.int64)
    bounds = [0, *(np.flatnonzero(np.diff(chunk_of)) + 1).tolist(), len(costs)]
    return list(zip(bounds[:-1], bounds[1:]))


def image_chunks(N: int, C: int, H: int, W: int, itemsize: int) -> list[tuple[int, int]]:
    """Ranges of N images, each chunk about IMAGE_CHUNK_BYTES of channels-last pixels (C, H·W + 1 each)."""
    return ranges(N, max(1, IMAGE_CHUNK_BYTES // max(1, C * (H * W + 1) * itemsize)))


def channel_blocks(C: int, rows: int, itemsize: int) -> list[tuple[int, int]]:
    """Ranges of C channels whose channels-last images (rows pixels a channel) are about CHANNEL_BLOCK_BYTES."""
    return ranges(C, max(1, CHANNEL_BLOCK_BYTES // max(1, rows * itemsize)))


def num_threads() -> int:
    """Threads of the NumPy path's pool and of a host-backend launch: ``DEFORMCP_NUM_THREADS`` when set, else
    :func:`available_cpus`."""
    value = os.environ.get("DEFORMCP_NUM_THREADS", "").strip()
    if not value:
        return available_cpus()
    threads = int(value) if value.isdecimal() else 0
    if threads < 1:
        raise ValueError(f"DEFORMCP_NUM_THREADS: expected a positive integer (or unset, for one thread per CPU), "
                         f"got {value!r}")
    return threads


def host_atomics() -> bool:
    """Whether the host backend's backward runs its atomic kernels where ``deterministic=False`` — those the CUDA
    backend runs — as ``DEFORMCP_HOST_ATOMICS=1`` asks (the tests do, so that every kernel runs). By default it
    runs the deterministic kernels, which are the faster ones on the CPU, where atomics are compare-and-swap
    loops."""
    value = os.environ.get("DEFORMCP_HOST_ATOMICS", "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"DEFORMCP_HOST_ATOMICS: expected 0 or 1 (or unset, for 0), got {value!r}")
    return value == "1"


def available_cpus() -> int:
    """The CPUs this process may use: those of its affinity mask, at most its cgroup's CPU quota rounded up (a
    container limited to 2 CPUs on a 64-core machine gets 2)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cpus, quota)) if quota else cpus


#: Where cgroups keep the CPU quota: v2's cpu.max ("quota period" or "max period"), v1's two cfs files.
CGROUP_V2_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_V1_CPU = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")


@functools.lru_cache(maxsize=None)
def cgroup_cpu_quota() -> Optional[int]:
    """The cgroup CPU quota in whole CPUs (rounded up), or None where there is none (no cgroups, no limit)."""
    try:
        with open(CGROUP_V2_CPU_MAX) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        try:
            quota, period = (pathlib.Path(name).read_text().strip() for name in CGROUP_V1_CPU)
        except OSError:
            return None
    if quota in ("max", "-1") or not (quota.isdecimal() and period.isdecimal()) or int(period) == 0:
        return None
    return max(1, -(-int(quota) // int(period)))
