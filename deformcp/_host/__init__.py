"""The host backend: kernels/*.cu compiled by the host C++ compiler and run on the CPU.

The translation unit is ``prelude.h`` (CUDA's built-ins for the CPU), the family's CUDA source, and one
``extern "C"`` launcher per kernel instantiation taking ``(grid, block, void **args)`` — the argument
convention of ``cuLaunchKernel`` — so a host kernel is called exactly like a :class:`cupy.RawKernel`.
Shared libraries are cached on disk under :func:`cache_dir`, named by a hash of the translation unit,
the compiler and its flags, each beside the ``.cpp`` it was built from and the SHA-256 of the library as
built (``.sha256``): a library whose bytes no longer match (truncated, overwritten) is built again before
dlopen sees it. Several modules live in one process side by side.

Environment:
    ``CXX``                      the compiler (default: ``c++``).
    ``DEFORMCP_CACHE_DIR``       cache root (default: ``$XDG_CACHE_HOME/deformcp`` or ``~/.cache/deformcp``).
    ``DEFORMCP_HOST_SANITIZE``   e.g. ``address`` or ``address,undefined``: build with those sanitizers.
                                 AddressSanitizer's runtime must be loaded first, so run Python as
                                 ``LD_PRELOAD=$(c++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0``.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import numpy as np

from .. import _kernels

PRELUDE = pathlib.Path(__file__).with_name("prelude.h")
BASE_FLAGS = ("-std=c++17", "-O3", "-fPIC", "-shared", "-fopenmp", "-w")


def cache_dir() -> pathlib.Path:
    root = os.environ.get("DEFORMCP_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "deformcp")
    return pathlib.Path(root) / "host"


def compiler() -> str | None:
    """Path of the host C++ compiler, or None when there is none."""
    return shutil.which(os.environ.get("CXX") or "c++") or shutil.which("g++") or shutil.which("clang++")


def sanitizers() -> tuple[str, ...]:
    value = os.environ.get("DEFORMCP_HOST_SANITIZE", "")
    return tuple(sorted(s.strip() for s in value.split(",") if s.strip()))


def flags() -> tuple[str, ...]:
    extra = sanitizers()
    if not extra:
        return BASE_FLAGS
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

    def __init__(self, function, expression: str):
        self._function = function
        self.name = expression

    def __call__(self, grid, block, args) -> None:
        grid3 = (ctypes.c_uint * 3)(*(tuple(grid) + (1, 1))[:3])
        block3 = (ctypes.c_uint * 3)(*(tuple(block) + (1, 1))[:3])
        values = []  # each argument's bytes, kept alive for the call
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
        status = self._function(grid3, block3, pointers)
        if status != 0:
            raise RuntimeError(f"{self.name}: host launch failed with status {status}")


class HostModule:
    """The shared library built from one family for one (C type, index type)."""

    def __init__(self, family: str, ctype: str, itype: str):
        self.expressions = [f"{k}<{ctype}, {itype}>" for k in _kernels.kernel_names(family)]
        launchers = "".join(
            f'extern "C" int deformcp_launch_{i}(const unsigned int* grid, const unsigned int* block, '
            f"void** args) {{ return deformcp_host::launch(&{e}, grid, block, args); }}\n"
            for i, e in enumerate(self.expressions))
        unit = "\n".join([PRELUDE.read_text(), _kernels.source(family), launchers])
        stem = f"{family}-{ctype.replace(' ', '').strip('_')}-{itype.replace(' ', '')}"
        self.path = _build(unit, stem)
        self._library = ctypes.CDLL(str(self.path))

    def get_function(self, expression: str) -> HostKernel:
        function = getattr(self._library, f"deformcp_launch_{self.expressions.index(expression)}")
        function.restype = ctypes.c_int
        function.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
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


def _build(unit: str, stem: str) -> pathlib.Path:
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("the host backend needs a C++ compiler: none found (set CXX, or install g++)")
    _check_asan_runtime()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([unit, cxx, version, *flags()]).encode()).hexdigest()[:20]
    folder = cache_dir()
    target = folder / f"{stem}-{key}.so"
    if _intact(target):
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        cpp = pathlib.Path(scratch) / f"{stem}.cpp"
        cpp.write_text(unit)
        built = pathlib.Path(scratch) / "module.so"
        result = subprocess.run([cxx, *flags(), str(cpp), "-o", str(built)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"host compilation of {stem} failed:\n{result.stderr[-4000:]}")
        digest = pathlib.Path(scratch) / "module.sha256"
        digest.write_text(_digest(built))
        os.replace(cpp, target.with_suffix(".cpp"))  # kept beside the library: sanitizer reports cite it
        # Each rename is atomic. Two builders racing may leave one's digest beside the other's library where
        # their bytes differ (with -g, the scratch folder's name is in the debug information): a later load
        # then finds the pair mismatched and builds once more, never loads a damaged file.
        os.replace(digest, target.with_suffix(".sha256"))
        os.replace(built, target)
    return target


def module(family: str, ctype: str, itype: str) -> HostModule:
    """The loaded module of one family for one (C type, index type), built on first use."""
    return _module(family, ctype, itype, str(cache_dir()), flags())


@functools.lru_cache(maxsize=None)
def _module(family: str, ctype: str, itype: str, folder: str, build_flags: tuple) -> HostModule:
    del folder, build_flags  # part of the memo key only: a new cache or new flags build anew
    return HostModule(family, ctype, itype)
