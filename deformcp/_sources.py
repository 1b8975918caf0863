"""Where the folders shipped beside the package are found, and the kernels' CUDA text.

The top-level folders ``kernels/`` and ``benchmarks/`` of the source tree are installed as the subpackages
``deformcp.kernels`` and ``deformcp.benchmarks`` (setup.cfg's package_dir). One rule finds either, in a checkout,
an editable install and a wheel alike: the folder beside the imported ``deformcp`` package when it is there (a
checkout, also one imported from its own folder while another tree is installed editable), else the installed
subpackage.
"""
from __future__ import annotations

import functools
import importlib
import importlib.resources
import importlib.util
import pathlib
import re
import sys
from types import ModuleType

COMMON_HEADER = "deformcp_common.cuh"
#: A file each shipped folder holds, telling a real one from a stray folder of the same name.
_MARKERS = {"kernels": COMMON_HEADER, "benchmarks": "harness.py"}


def _beside_package(name: str) -> pathlib.Path | None:
    folder = pathlib.Path(__file__).resolve().parent.parent / name
    return folder if (folder / _MARKERS[name]).is_file() else None


def folder(name: str) -> pathlib.Path:
    """The folder of the shipped subpackage ``deformcp.<name>`` ("kernels" or "benchmarks")."""
    return _beside_package(name) or pathlib.Path(str(importlib.resources.files(f"deformcp.{name}")))


def subpackage(name: str) -> ModuleType:
    """The module ``deformcp.<name>``, imported from :func:`folder` (ModuleNotFoundError where none is shipped)."""
    qualified = f"deformcp.{name}"
    checkout = _beside_package(name)
    if qualified not in sys.modules and checkout is not None:
        spec = importlib.util.spec_from_file_location(qualified, checkout / "__init__.py",
                                                      submodule_search_locations=[str(checkout)])
        assert spec is not None and spec.loader is not None  # a .py file's location always has both
        sys.modules[qualified] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[qualified])
    return importlib.import_module(qualified)


def kernel_dir() -> pathlib.Path:
    """Folder of the CUDA sources (``kernels/``)."""
    return folder("kernels")


def families() -> list[str]:
    """Names of every kernel family (the ``kernels/*.cu`` files)."""
    return sorted(p.stem for p in kernel_dir().glob("*.cu"))


@functools.lru_cache(maxsize=None)
def source(family: str) -> str:
    """The complete CUDA translation unit of one family: the shared header, then the family."""
    kernels = kernel_dir()
    return (kernels / COMMON_HEADER).read_text() + "\n" + (kernels / f"{family}.cu").read_text()


@functools.lru_cache(maxsize=None)
def kernel_names(family: str) -> tuple[str, ...]:
    """The ``__global__`` kernel templates defined by one family."""
    return tuple(re.findall(r"__global__\s+void\s+(\w+)\s*\(", source(family)))
