"""Every kernel instantiation compiles with NVRTC for every architecture (no GPU needed)."""
import pytest

from deformcp import _kernels, _nvrtc, _sources

_reason = _nvrtc.available()
if _reason is not None:
    pytest.skip(f"NVRTC unavailable: {_reason}", allow_module_level=True)


@pytest.mark.parametrize("index64", [False, True], ids=["int", "int64"])
@pytest.mark.parametrize("dtype_name", list(_kernels.C_TYPES))
@pytest.mark.parametrize("family", _sources.families())
@pytest.mark.parametrize("arch", _nvrtc.ARCHITECTURES)
def test_family_compiles(arch, family, dtype_name, index64):
    reports = _nvrtc.compile_family(family, dtype_name, index64, arch)
    print("\n" + _nvrtc.format_report(reports))
    c_type, index = _kernels.C_TYPES[dtype_name], _kernels.index_type(index64)
    expected = [f"{k}<{c_type}, {index}>" for k in _sources.kernel_names(family)]
    assert [r.expression for r in reports] == expected
    assert len({r.lowered_name for r in reports}) == len(reports)
    for r in reports:
        assert (r.family, r.arch) == (family, arch)
        assert r.registers > 0
        for size in (r.spill_stores, r.spill_loads, r.stack_frame):
            assert isinstance(size, int) and size >= 0
        assert r.spill_stores == r.spill_loads == 0, f"{r.expression} spills registers on {arch}"


def test_compile_error_carries_nvrtc_log():
    broken = "template <typename T> __global__ void k(T* x) { x[0] = undefined_thing; }"
    with pytest.raises(RuntimeError, match='identifier "undefined_thing" is undefined'):
        _nvrtc._compile("broken", broken, ["k<float>"], "sm_80")


def test_format_report_one_line_per_kernel():
    reports = _nvrtc.compile_family(_sources.families()[0], "float32", False, "sm_80")
    lines = _nvrtc.format_report(reports).splitlines()
    assert len(lines) == len(reports) + 1
    assert len({len(line.rstrip()) for line in lines}) == 1  # numeric columns end aligned
    assert all(r.expression in line for r, line in zip(reports, lines[1:]))
