"""The host backend: kernels/*.cu compiled by the host C++ compiler and run on the CPU.

The translation unit is ``prelude.h`` (CUDA's built-ins for the CPU), the family's CUDA source, and one
``extern "C"`` launcher per kernel instantiation taking ``(grid, block, void **args)`` — the argument
convention of ``cuLaunchKernel`` — and the number of threads, so a host kernel is called exactly like a
:class:`cupy.RawKernel`.
Shared libraries are cached on disk under :func:`cache_dir`, named by a hash of the translation unit,
the compiler and its flags, each beside the ``.cpp`` it was built from and the SHA-256 of the library as
built (``.sha256``): a library whose bytes no longer match (truncated, overwritten) is built again before
dlopen sees it. Several modules live in one process side by side. Builds are logged (INFO) to the
``deformcp.kernels`` logger, libraries found in the cache at DEBUG.

A launch spreads its blocks over :func:`threads` OpenMP threads. GNU OpenMP's threads do not survive fork: in
a process forked from one that had libgomp loaded (by a host library, or by torch, whose copy the host
libraries then share), launches run on the calling thread alone, without calling OpenMP, where a parallel
region would wait forever for threads the child does not have.

Environment:
    ``CXX``                      the compiler: one program, a name on PATH or a path. Unset or empty: the first
                                 of ``c++``, ``g++``, ``clang++`` on PATH. Set to what is not a program: a
                                 RuntimeError naming CXX, never a fall-back to another compiler.
    ``DEFORMCP_CACHE_DIR``       cache root (default: ``$XDG_CACHE_HOME/deformcp`` or ``~/.cache/deformcp``). A
                                 cache that cannot be written is a RuntimeError naming the folder and this variable.
    ``DEFORMCP_NUM_THREADS``     OpenMP threads of a launch, as the NumPy path's pool (default: the CPUs this
                                 process may run on; anything but a positive integer is a ValueError).
    ``DEFORMCP_HOST_SANITIZE``   e.g. ``address`` or ``address,undefined``: build with those sanitizers (with
                                 ``undefined`` also ``float-cast-overflow``, which GCC leaves out of it).
                                 AddressSanitizer's runtime must be loaded first, so run Python as
                                 ``LD_PRELOAD=$(c++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0``.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
from typing import Callable, Sequence

import numpy as np

from .. import _sources
from .._workspace import num_threads

PRELUDE = pathlib.Path(__file__).with_name("prelude.h")
BASE_FLAGS = ("-std=c++17", "-O3", "-fPIC", "-shared", "-fopenmp", "-w")
#: Looked for on PATH, in this order, when CXX is unset.
DEFAULT_COMPILERS = ("c++", "g++", "clang++")
NO_COMPILER = (f"the host backend needs a C++ compiler: none of {', '.join(DEFAULT_COMPILERS)} is on PATH "
               f"(install one, or set CXX to a C++ compiler)")

log = logging.getLogger("deformcp.kernels")

#: Whether OpenMP must not be called here: a process forked from one that had GNU OpenMP loaded.
_openmp_lost = False


def _libgomp_loaded() -> bool:
    """Whether GNU OpenMP is mapped into this process (True where that cannot be told)."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libgomp" in line for line in maps)
    except OSError:
        return True


def _after_fork_in_child() -> None:
    # The parent's OpenMP threads may have been started by deformcp or by anything sharing its libgomp (torch
    # loads one that the host libraries then bind to): neither can be told apart from the child, so a child of
    # any process with libgomp loaded keeps off OpenMP.
    global _openmp_lost
    _openmp_lost = _openmp_lost or _libgomp_loaded()


os.register_at_fork(after_in_child=_after_fork_in_child)


def threads() -> int:
    """OpenMP threads a launch uses here: :func:`deformcp._workspace.num_threads`, or 1 in a process forked
    from one that had GNU OpenMP loaded."""
    return 1 if _openmp_lost else num_threads()


def cache_dir() -> pathlib.Path:
    """The folder of the host libraries: ``$DEFORMCP_CACHE_DIR/host``, by default under the user's cache."""
    root = os.environ.get("DEFORMCP_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "deformcp")
    return pathlib.Path(root) / "host"


def compiler() -> str | None:
    """Path of the host C++ compiler: CXX's, else the first of DEFAULT_COMPILERS on PATH; None when CXX is unset
    and none of them is found. Raises RuntimeError when CXX is set to something that is not a program."""
    wanted = os.environ.get("CXX", "").strip()
    if not wanted:
        return next(filter(None, map(shutil.which, DEFAULT_COMPILERS)), None)
    found = shutil.which(wanted)
    if found is None:
        where = "no executable file" if os.sep in wanted else "not a program on PATH"
        raise RuntimeError(f"CXX={wanted!r} is {where}: set CXX to a C++ compiler (one program, a name on PATH "
                           f"or a path), or unset it to use the first of {', '.join(DEFAULT_COMPILERS)} on PATH")
    return found


def available() -> str | None:
    """None when the host backend has a compiler, else why not."""
    try:
        return None if compiler() else NO_COMPILER
    except RuntimeError as error:
        return str(error)


def sanitizers() -> tuple[str, ...]:
    value = os.environ.get("DEFORMCP_HOST_SANITIZE", "")
    return tuple(sorted(s.strip() for s in value.split(",") if s.strip()))


def flags() -> tuple[str, ...]:
    """The compiler's flags: BASE_FLAGS, and the sanitizers' when DEFORMCP_HOST_SANITIZE asks for them."""
    extra = sanitizers()
    if not extra:
        return BASE_FLAGS
    if "undefined" in extra:  # GCC's "undefined" leaves out float → integer conversions that overflow
        extra = tuple(sorted({*extra, "float-cast-overflow"}))
    return (*BASE_FLAGS, "-g", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all",
            f"-fsanitize={','.join(extra)}")


def _check_asan_runtime() -> None:
    if "address" not in sanitizers():
        return
    with open("/proc/self/maps") as maps:
        if "libasan" in maps.read():
            return
    raise RuntimeError(
        "DEFORMCP_HOST_SANITIZE=address needs AddressSanitizer's runtime loaded before Python: run "
        "LD_PRELOAD=$(c++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 python ...")


class HostKernel:
    """One kernel instantiation, called as ``kernel(grid, block, args)`` like a cupy.RawKernel."""

    def __init__(self, function: Callable[..., None], expression: str) -> None:
        self._function = function
        self.name = expression

    def __call__(self, grid: Sequence[int], block: Sequence[int], args: Sequence[object]) -> None:
        grid3 = (ctypes.c_uint * 3)(*(tuple(grid) + (1, 1))[:3])
        block3 = (ctypes.c_uint * 3)(*(tuple(block) + (1, 1))[:3])
        # each argument's bytes, kept alive for the call
        values: list[ctypes.c_void_p | ctypes.Array[ctypes.c_char]] = []
        for arg in args:
            if isinstance(arg, np.ndarray):
                if not arg.flags.c_contiguous:
                    raise ValueError(f"{self.name}: array arguments must be C-contiguous")
                values.append(ctypes.c_void_p(arg.ctypes.data))
            elif isinstance(arg, np.generic):
                values.append(ctypes.create_string_buffer(arg.tobytes(), arg.nbytes))
            else:
                raise TypeError(f"{self.name}: kernel arguments must be NumPy arrays or NumPy scalars, "
                                f"got {type(arg).__name__}")
        pointers = (ctypes.c_void_p * max(len(values), 1))(*(ctypes.addressof(v) for v in values))
        status = self._function(grid3, block3, pointers, threads())
        if status != 0:
            raise RuntimeError(f"{self.name}: host launch failed with status {status}")


class HostModule:
    """The shared library built from one family for one (C type, index type)."""

    def __init__(self, family: str, ctype: str, itype: str):
        self.expressions = [f"{k}<{ctype}, {itype}>" for k in _sources.kernel_names(family)]
        launchers = "".join(
            f'extern "C" int deformcp_launch_{i}(const unsigned int* grid, const unsigned int* block, '
            f"void** args, int threads) {{ return deformcp_host::launch(&{e}, grid, block, args, threads); }}\n"
            for i, e in enumerate(self.expressions))
        unit = "\n".join([PRELUDE.read_text(), _sources.source(family), launchers])
        stem = f"{family}-{ctype.replace(' ', '').strip('_')}-{itype.replace(' ', '')}"
        self.path = _build(unit, stem)
        self._library = ctypes.CDLL(str(self.path))

    def get_function(self, expression: str) -> HostKernel:
        function = getattr(self._library, f"deformcp_launch_{self.expressions.index(expression)}")
        function.restype = ctypes.c_int
        function.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
        return HostKernel(function, expression)


def _digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(library: pathlib.Path) -> bool:
    """Whether a cached library holds the bytes its build wrote. dlopen is no check: a library cut after its
    program headers maps past the end of the file and kills the process with SIGBUS."""
    try:
        return _digest(library) == library.with_suffix(".sha256").read_text()
    except OSError:  # no library or no digest
        return False


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run the compiler; RuntimeError naming it when it cannot be started."""
    try:
        return subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        raise RuntimeError(f"the C++ compiler {command[0]} cannot be run ({error}): set CXX to a C++ compiler "
                           f"(one program, a name on PATH or a path)") from error


def _failure(stem: str, cxx: str, result: subprocess.CompletedProcess[str]) -> str:
    status = (f"exited with status {result.returncode}" if result.returncode > 0
              else f"was killed by signal {-result.returncode}")
    said = (result.stderr.strip() + "\n" + result.stdout.strip()).strip()
    said = f":\n{said[-4000:]}" if said else " without a message (is it a C++ compiler? set CXX to one)"
    return f"host compilation of {stem} failed: the C++ compiler {cxx} {status}{said}"


def _unwritable(folder: pathlib.Path, error: OSError) -> RuntimeError:
    variable = os.environ.get("DEFORMCP_CACHE_DIR")
    setting = f"DEFORMCP_CACHE_DIR={variable!r}: " if variable else ""
    return RuntimeError(f"{setting}the host kernel cache {folder} cannot be written ({error.strerror or error}): "
                        f"set DEFORMCP_CACHE_DIR to a folder you can write")


def _build(unit: str, stem: str) -> pathlib.Path:
    cxx = compiler()
    if cxx is None:
        raise RuntimeError(NO_COMPILER)
    _check_asan_runtime()
    start = time.perf_counter()
    version = _run([cxx, "--version"]).stdout
    key = hashlib.sha256("\0".join([unit, cxx, version, *flags()]).encode()).hexdigest()[:20]
    folder = cache_dir()
    target = folder / f"{stem}-{key}.so"
    if _intact(target):
        log.debug("host: loaded %s from the cache in %.2f s (%s)", stem, time.perf_counter() - start, target)
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            cpp = pathlib.Path(scratch) / f"{stem}.cpp"
            cpp.write_text(unit)
            built = pathlib.Path(scratch) / "module.so"
            result = _run([cxx, *flags(), str(cpp), "-o", str(built)])
            if result.returncode != 0:
                raise RuntimeError(_failure(stem, cxx, result))
            digest = pathlib.Path(scratch) / "module.sha256"
            digest.write_text(_digest(built))
            os.replace(cpp, target.with_suffix(".cpp"))  # kept beside the library: sanitizer reports cite it
            # Each rename is atomic. Two builders racing may leave one's digest beside the other's library
            # where their bytes differ (with -g, the scratch folder's name is in the debug information): a
            # later load then finds the pair mismatched and builds once more, never loads a damaged file.
            os.replace(digest, target.with_suffix(".sha256"))
            os.replace(built, target)
    except OSError as error:  # the compiler's own failures are RuntimeErrors, above
        raise _unwritable(folder, error) from error
    log.info("host: built %s by %s in %.2f s (%s)", stem, cxx, time.perf_counter() - start, target)
    return target


def module(family: str, ctype: str, itype: str) -> HostModule:
    """The loaded module of one family for one (C type, index type), built on first use."""
    return _module(family, ctype, itype, str(cache_dir()), flags())


@functools.lru_cache(maxsize=None)
def _module(family: str, ctype: str, itype: str, folder: str, build_flags: tuple[str, ...]) -> HostModule:
    del folder, build_flags  # part of the memo key only: a new cache or new flags build anew
    return HostModule(family, ctype, itype)
