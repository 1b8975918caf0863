"""Kernel compilations are logged to "deformcp.kernels": INFO for a build, DEBUG for a cache hit; no handler."""
import contextlib
import logging
import re
import sys
import types

import pytest

from deformcp import _host, _kernels, _nvrtc


@pytest.mark.skipif(_host.compiler() is None, reason="host backend: no C++ compiler found")
def test_host_build_and_cache_hit_are_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DEFORMCP_CACHE_DIR", str(tmp_path))
    caplog.set_level(logging.DEBUG, logger="deformcp.kernels")
    _host.module("mimic_loss", "float", "int")   # an empty cache: built
    _host.HostModule("mimic_loss", "float", "int")  # the same library again: from the cache
    records = [r for r in caplog.records if r.name == "deformcp.kernels"]
    assert [r.levelno for r in records] == [logging.INFO, logging.DEBUG]
    built, hit = (r.getMessage() for r in records)
    library = re.escape(str(tmp_path / "host" / "mimic_loss-float-int-"))
    assert re.fullmatch(rf"host: built mimic_loss-float-int by {re.escape(_host.compiler())} in \d+\.\d\d s "
                        rf"\({library}\w+\.so\)", built)
    assert re.fullmatch(rf"host: loaded mimic_loss-float-int from the cache in \d+\.\d\d s \({library}\w+\.so\)",
                        hit)


@pytest.mark.skipif(_nvrtc.available() is not None, reason="no NVRTC")
def test_nvrtc_compile_check_is_logged(caplog):
    caplog.set_level(logging.INFO, logger="deformcp.kernels")
    _nvrtc.compile_family("mimic_loss", "float16", True, "sm_80")
    (record,) = [r for r in caplog.records if r.name == "deformcp.kernels"]
    assert record.levelno == logging.INFO
    assert re.fullmatch(r"nvrtc check: built mimic_loss<__half, long long> for sm_80 in \d+\.\d\d s",
                        record.getMessage())


def test_the_library_configures_no_handler():
    assert logging.getLogger("deformcp.kernels").handlers == logging.getLogger("deformcp").handlers == []


def test_cuda_build_and_cache_hit_are_logged(tmp_path, monkeypatch, caplog):
    """A stand-in for CuPy whose compile writes CuPy's cache entry the first time: INFO, then DEBUG."""
    class RawModule:
        def __init__(self, code, options, name_expressions):
            self.name_expressions = name_expressions

        def compile(self):
            (tmp_path / "module.cubin").touch()

    cupy = types.SimpleNamespace(RawModule=RawModule, cuda=types.SimpleNamespace(Device=contextlib.nullcontext))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    caplog.set_level(logging.DEBUG, logger="deformcp.kernels")
    build = _kernels._cuda_module.__wrapped__  # past the in-process memo
    for _ in range(2):
        assert build("mimic_loss", "float32", False, 0).name_expressions[0].endswith("<float, int>")
    records = [r for r in caplog.records if r.name == "deformcp.kernels"]
    assert [r.levelno for r in records] == [logging.INFO, logging.DEBUG]
    assert re.fullmatch(r"cuda: built by NVRTC mimic_loss<float, int> for device 0 in \d+\.\d\d s",
                        records[0].getMessage())
    assert re.fullmatch(r"cuda: loaded from CuPy's cache mimic_loss<float, int> for device 0 in \d+\.\d\d s",
                        records[1].getMessage())
