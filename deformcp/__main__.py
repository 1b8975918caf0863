"""python -m deformcp [--version] info [--kernels] | check [--op NAME] [--backend NAME] [--seed N] | bench [...] |
viz [...]"""
from __future__ import annotations

import argparse
import platform
import shutil
import sys
from types import ModuleType
from typing import Callable, Optional, Sequence

import numpy as np

import deformcp


class Progress:
    """``progress(n, total, label)`` before item n (from 1) of total, on stderr: on a terminal one line rewritten
    in place (a bar, n/total, the item), elsewhere one line per item. Leaving it as a context clears the bar."""

    BAR = 20

    def __init__(self, title: str):
        self.title, self.stream = title, sys.stderr
        self.shown = 0  # characters written on the line

    def __call__(self, n: int, total: int, label: str) -> None:
        if not self.stream.isatty():
            print(f"{self.title} {n}/{total}: {label}", file=self.stream, flush=True)
            return
        filled = self.BAR * (n - 1) // total
        line = f"{self.title} [{'#' * filled}{'.' * (self.BAR - filled)}] {n}/{total} {label}"
        line = line[:shutil.get_terminal_size().columns - 1]  # a wrapped line cannot be rewritten
        self.stream.write("\r" + line.ljust(self.shown))
        self.stream.flush()
        self.shown = max(self.shown, len(line))  # what is on the terminal, padding included

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.shown:
            self.stream.write("\r" + " " * self.shown + "\r")
            self.stream.flush()


def _version(module: str) -> str:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:
        return "not installed"


def info(kernels: bool) -> int:
    from deformcp import _host, _nvrtc, _sources, testing

    gpu_problem = testing.gpu_available()
    nvrtc_problem = _nvrtc.available()
    lines = [
        ("deformcp", deformcp.__version__),
        ("python", platform.python_version()),
        ("numpy", np.__version__),
        ("scipy", _version("scipy")),
        ("array-api-compat", _version("array-api-compat")),
        ("cupy", _version("cupy-cuda12x") if _version("cupy-cuda12x") != "not installed"
         else _version("cupy-cuda13x")),
        ("torch", _version("torch")),
        ("jax", _version("jax")),
        ("kernel sources", str(_sources.kernel_dir())),
        ("kernel families", ", ".join(_sources.families())),
        ("backend numpy", "available (default for CPU arrays)"),
        ("backend host", f"available, compiler {_host.compiler()}" if _host.available() is None
         else f"unavailable: {_host.available()}"),
        ("host cache", str(_host.cache_dir())),
        ("host sanitizers", ", ".join(_host.sanitizers()) or "none (DEFORMCP_HOST_SANITIZE)"),
        ("backend cuda", "available" if gpu_problem is None else f"unavailable: {gpu_problem}"),
        ("nvrtc", "unavailable: " + nvrtc_problem if nvrtc_problem else _nvrtc_version()),
    ]
    if gpu_problem is None:
        import cupy
        device = cupy.cuda.Device()
        lines.append(("gpu", f"{cupy.cuda.runtime.getDeviceProperties(device.id)['name'].decode()} "
                             f"(compute capability {device.compute_capability})"))
    width = max(len(k) for k, _ in lines)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in lines))
    if kernels:
        if nvrtc_problem:
            print(f"\nkernel report unavailable: {nvrtc_problem}")
            return 1
        with Progress("kernels") as progress:
            reports = _nvrtc.check_all(progress=progress)
        print("\nptxas report (NVRTC, no GPU needed):")
        print(_nvrtc.format_report(reports))
    return 0


def _nvrtc_version() -> str:
    from cupy_backends.cuda.libs import nvrtc
    major, minor = nvrtc.getVersion()
    return f"{major}.{minor}"


def check(ops: Optional[Sequence[str]], backends: Optional[Sequence[str]], seed: Optional[int]) -> int:
    from deformcp import testing

    for backend in backends or ():
        problem = testing.backend_problem(backend)
        if problem:
            print(f"check --backend {backend}: {problem}. Nothing checked; run without --backend {backend} to "
                  "check the other backends.", file=sys.stderr)
            return 2
    backends = backends or testing.available_backends()
    if not backends:
        print("no backend besides the NumPy reference is available:", *testing.skipped(backends), sep="\n")
        return 1
    try:
        with Progress("check") as progress:
            results = testing.check(ops=ops, backends=backends, seed=seed, progress=progress)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(testing.format_results(results))
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed", *testing.skipped(backends), sep="\n")
    return 1 if failed else 0


def benchmarks_harness() -> ModuleType:
    """``deformcp.benchmarks.harness``, from the benchmarks/ folder that :func:`deformcp._sources.folder` finds."""
    import importlib

    from deformcp import _sources

    _sources.subpackage("benchmarks")
    return importlib.import_module("deformcp.benchmarks.harness")


def bench(argv: Sequence[str]) -> int:
    """python -m deformcp bench: the benchmarks' own command line (deformcp.benchmarks.harness.main)."""
    try:
        harness = benchmarks_harness()
    except ModuleNotFoundError as error:
        if error.name not in ("deformcp.benchmarks", "deformcp.benchmarks.harness"):
            raise
        print("python -m deformcp bench: this deformcp has no benchmarks (deformcp.benchmarks); run it from a "
              "source checkout", file=sys.stderr)
        return 2
    harness_main: Callable[[Sequence[str]], int] = harness.main  # a module found at run time: untyped
    return harness_main(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deformcp", description=__doc__)
    parser.add_argument("--version", action="version", version=f"deformcp {deformcp.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser("info", help="versions, backends, compilers, caches")
    info_parser.add_argument("--kernels", action="store_true",
                             help="compile every kernel with NVRTC and show ptxas's registers and spills")
    check_parser = commands.add_parser("check", help="every op through every backend against NumPy float64")
    check_parser.add_argument("--op", action="append", help="only this op (repeatable)")
    check_parser.add_argument("--backend", action="append", choices=("host", "cuda"),
                              help="only this backend (repeatable)")
    check_parser.add_argument("--seed", type=int, default=None, help="random seed (default: fresh)")
    commands.add_parser("bench", help="time every op against torch/torchvision (bench --help)")
    commands.add_parser("viz", help="draw deformable sampling locations to a PNG (viz --help)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "bench":  # its own options, parsed by the benchmarks' harness
        return bench(argv[1:])
    if argv and argv[0] == "viz":  # its own options, parsed by deformcp.viz
        from deformcp import viz
        return viz.main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "info":
        return info(args.kernels)
    return check(args.op, args.backend, args.seed)


if __name__ == "__main__":
    sys.exit(main())
