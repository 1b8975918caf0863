"""Compile-check every kernel instantiation with NVRTC, without a GPU.

Each (family, dtype, index type, architecture) is compiled to a CUBIN with ``ptxas -v``, whose report
gives the registers, spills and stack frame of every kernel. Only NVRTC itself is needed (CuPy's
``cupy_backends`` bindings and the NVRTC library), neither a driver nor a device; CuPy is imported
here lazily, so that importing :mod:`deformcp` never requires it. Each compilation is logged (INFO) to the
``deformcp.kernels`` logger.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import re
import time
from typing import Callable, Optional, Sequence

from . import _kernels, _sources

ARCHITECTURES = ("sm_70", "sm_80", "sm_90")
#: Options that CuPy (14) adds to every RawModule compilation.
CUPY_ADDED_OPTIONS = ("--device-as-default-execution-space", "-ftz=true")

_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


@dataclasses.dataclass(frozen=True)
class KernelReport:
    """What ptxas reported for one kernel instantiation on one architecture."""

    family: str
    expression: str  # e.g. "grid_sample_forward<float, int>"
    arch: str
    lowered_name: str  # the mangled entry-function name
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack_frame: int  # bytes


def available() -> str | None:
    """None when NVRTC can be used, else why not."""
    if importlib.util.find_spec("cupy_backends") is None:
        return "CuPy is not installed"
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as e:  # ImportError, OSError or NVRTCError, depending on how loading fails
        return f"the NVRTC library cannot be loaded: {e}"
    return None


def _parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """Mangled entry-function name → registers, spill_stores, spill_loads, stack_frame, from a -v log."""
    stats: dict[str, dict[str, int]] = {}
    entry = properties = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            entry = m.group(1)
        elif m := _PROPERTIES.search(line):
            properties = m.group(1)
        elif (m := _FRAME.search(line)) and properties is not None:
            stack, stores, loads = map(int, m.groups())
            stats.setdefault(properties, {}).update(stack_frame=stack, spill_stores=stores, spill_loads=loads)
        elif (m := _REGISTERS.search(line)) and entry is not None:
            stats.setdefault(entry, {})["registers"] = int(m.group(1))
    return stats


def _compile(family: str, source: str, expressions: list[str], arch: str) -> list[KernelReport]:
    """Compile ``source`` as one program instantiating ``expressions``; one report per expression.

    Raises RuntimeError, with NVRTC's full log, when the compilation fails or ptxas did not report on
    every kernel.
    """
    from cupy_backends.cuda.libs import nvrtc

    # the options cupy.RawModule compiles with, so that the check sees what the CUDA backend runs
    options = [f"-arch={arch}", "-Xptxas=-v", *_kernels.nvrtc_options(), *CUPY_ADDED_OPTIONS]
    program = nvrtc.createProgram(source, f"{family}.cu", [], [])
    try:
        for expression in expressions:
            nvrtc.addNameExpression(program, expression)
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as e:
            raise RuntimeError(
                f"NVRTC failed to compile {family} for {arch} ({e}), options {options}:\n"
                f"{nvrtc.getProgramLog(program)}"
            ) from None
        log = nvrtc.getProgramLog(program)
        lowered = {expression: nvrtc.getLoweredName(program, expression) for expression in expressions}
    finally:
        nvrtc.destroyProgram(program)
    stats = _parse_ptxas(log)
    reports = []
    for expression, name in lowered.items():
        kernel = stats.get(name, {})
        if len(kernel) != 4:
            raise RuntimeError(f"no complete ptxas report for {expression} ({name}) on {arch}:\n{log}")
        reports.append(KernelReport(family, expression, arch, name, **kernel))
    return reports


def compile_family(family: str, dtype_name: str, index64: bool, arch: str) -> list[KernelReport]:
    """Compile every kernel of ``family`` for one dtype name (a key of ``C_TYPES``) and index type."""
    expressions = [_kernels.name_expression(k, dtype_name, index64) for k in _sources.kernel_names(family)]
    start = time.perf_counter()
    reports = _compile(family, _sources.source(family), expressions, arch)
    _kernels.log.info("nvrtc check: built %s for %s in %.2f s", _kernels.name_expression(family, dtype_name, index64),
                      arch, time.perf_counter() - start)
    return reports


def check_all(architectures: Sequence[str] = ARCHITECTURES,
              progress: Optional[Callable[[int, int, str], object]] = None) -> list[KernelReport]:
    """Compile every family × dtype × index type × architecture; RuntimeError at the first failure.

    ``progress(n, total, label)``, where given, is called before each architecture × family ("deform_conv
    sm_80"), n counting from 1."""
    pairs = list(itertools.product(architectures, _sources.families()))
    reports = []
    for n, (arch, family) in enumerate(pairs, 1):
        if progress is not None:
            progress(n, len(pairs), f"{family} {arch}")
        reports += [report for dtype_name in _kernels.C_TYPES for index64 in (False, True)
                    for report in compile_family(family, dtype_name, index64, arch)]
    return reports


def format_report(reports: Sequence[KernelReport]) -> str:
    """A plain text table of reports: family, kernel, arch, registers, spills (stores/loads), stack."""
    header = ("family", "kernel", "arch", "registers", "spills (B st/ld)", "stack (B)")
    rows = [header] + [
        (r.family, r.expression, r.arch, str(r.registers), f"{r.spill_stores}/{r.spill_loads}",
         str(r.stack_frame))
        for r in reports
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    )
