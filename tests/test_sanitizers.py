"""The host backend's tests under AddressSanitizer and UndefinedBehaviorSanitizer.

The kernels are compiled with ``DEFORMCP_HOST_SANITIZE=address,undefined`` into a fresh cache, in a
Python whose ASan runtime is preloaded (Python itself is not instrumented; ASan must still come first).
A negative control compiles deliberately broken kernels through the same machinery and checks that the
sanitizers catch them, so a green run means "checked", not "sanitizers silently off".

Deselect with ``-m "not sanitizer"``.
"""
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from deformcp import _host

pytestmark = pytest.mark.sanitizer

REPO = pathlib.Path(__file__).resolve().parent.parent
#: Test files whose host-backend tests (``-k host``) run under the sanitizers.
TEST_FILES = ("tests/test_spatial_transformer.py", "tests/test_roi_align.py", "tests/test_deform_conv.py",
              "tests/test_deform_roi_pool.py", "tests/test_deform_ps_roi_pool.py", "tests/test_mimic_loss.py",
              "tests/test_adversarial.py", "tests/test_resources.py", "tests/test_byte_order.py",
              "tests/test_ms_deform_attn.py", "tests/test_dcn.py", "tests/test_ndimage.py")
SANITIZERS = "address,undefined"
FOUND = ("ERROR: AddressSanitizer", "runtime error:")


def _runtime(cxx: str, library: str) -> str | None:
    """Absolute path of a sanitizer runtime that cxx links against, or None."""
    try:
        path = subprocess.run([cxx, f"-print-file-name={library}"], capture_output=True, text=True,
                              timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.fixture(scope="module")
def asan_env(tmp_path_factory):
    """The environment of a Python run under ASan + UBSan, with its own kernel cache."""
    cxx = _host.compiler()
    if cxx is None:
        pytest.skip("host backend: no C++ compiler found")
    asan = _runtime(cxx, "libasan.so")
    if asan is None:
        pytest.skip(f"{cxx} has no AddressSanitizer runtime (libasan.so): install libasan, or set CXX to a "
                    f"GCC that has it")
    if _runtime(cxx, "libubsan.so") is None:
        pytest.skip(f"{cxx} has no UndefinedBehaviorSanitizer runtime (libubsan.so)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTHONPATH")}
    preload = env.get("LD_PRELOAD", "")
    env.update(
        LD_PRELOAD=f"{asan} {preload}".strip(),
        # No leak check: CPython and NumPy keep allocations alive at exit on purpose.
        ASAN_OPTIONS="detect_leaks=0",
        UBSAN_OPTIONS="print_stacktrace=1",
        DEFORMCP_HOST_SANITIZE=SANITIZERS,
        DEFORMCP_CACHE_DIR=str(tmp_path_factory.mktemp("sanitized-cache")),
        DEFORMCP_TEST_SEED=os.environ.get("DEFORMCP_TEST_SEED") or str(np.random.SeedSequence().entropy % 2**32),
        PYTHONPATH=str(REPO),
        PYTHONFAULTHANDLER="1",
    )
    return env


def _output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def _run_under_sanitizers(asan_env, test_file: str, keyword: str) -> None:
    """Run ``pytest test_file -k keyword`` under the sanitizers; fail on a report, a failure or no test run."""
    assert (REPO / test_file).is_file(), f"{test_file} is missing"
    # -s: UBSan stops the process at its first report, which pytest's captured output would lose
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-x", "-p", "no:cacheprovider", test_file, "-k", keyword]
    result = subprocess.run(command, cwd=REPO, env=asan_env, capture_output=True, text=True, timeout=1200)
    output = _output(result)
    replay = (f"replay: cd {REPO} && LD_PRELOAD={asan_env['LD_PRELOAD']} ASAN_OPTIONS=detect_leaks=0 "
              f"DEFORMCP_HOST_SANITIZE={SANITIZERS} DEFORMCP_TEST_SEED={asan_env['DEFORMCP_TEST_SEED']} "
              f"python {' '.join(command[1:])}\n")
    for needle in FOUND:
        assert needle not in output, f"sanitizer report under {test_file}:\n{replay}{output[-20000:]}"
    assert result.returncode == 0, f"exit code {result.returncode}:\n{replay}{output[-20000:]}"
    summary = re.search(r"^=*\s*(.*\b(\d+) passed\b.*) in [\d.]+s", result.stdout, re.MULTILINE)
    assert summary and int(summary.group(2)) > 0, f"no test passed:\n{replay}{output[-5000:]}"


@pytest.mark.parametrize("test_file", TEST_FILES)
def test_host_backend_tests_pass_under_sanitizers(asan_env, test_file):
    _run_under_sanitizers(asan_env, test_file, "host")


#: Kernels that break the rules, compiled and launched through deformcp._kernels / deformcp._host exactly
#: as kernels/*.cu are (a family in a folder that stands in for kernels/).
BROKEN_FAMILY = textwrap.dedent("""
    template <typename T, typename I>
    __global__ void write_past_end(T* out, I n) {
      for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < n; i += (I)blockDim.x * gridDim.x)
        out[i + 1] = T(1);  // out has n elements: the last thread writes one past its end
    }

    template <typename T, typename I>
    __global__ void overflow_int(T* out, I n) {
      for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < n; i += (I)blockDim.x * gridDim.x) {
        int big = 2147483647 - (int)(n / 2);
        out[i] = T(big + (int)i);  // signed overflow for i > n / 2
      }
    }

    template <typename T, typename I>
    __global__ void overflow_float_cast(T* out, I n) {
      for (I i = blockIdx.x * (I)blockDim.x + threadIdx.x; i < n; i += (I)blockDim.x * gridDim.x) {
        float huge = 1e30f * (float)(i + 1);
        out[i] = T((long long)huge % 7);  // past long long's range: GCC's "undefined" alone does not check it
      }
    }
""")

LAUNCH_BROKEN = textwrap.dedent("""
    import pathlib, shutil, sys
    import numpy as np
    from deformcp import _kernels, _sources

    folder = pathlib.Path(sys.argv[1])
    shutil.copy(_sources.kernel_dir() / _sources.COMMON_HEADER, folder / _sources.COMMON_HEADER)
    _sources.kernel_dir = lambda: folder
    n = 1000
    out = np.zeros(n, np.float32)
    _kernels.launch("host", "broken", sys.argv[2], out.dtype, n, (out,), (n,))
    print("LAUNCHED WITHOUT A SANITIZER REPORT", flush=True)
""")


@pytest.mark.parametrize("kernel, report", [
    ("write_past_end", "ERROR: AddressSanitizer: heap-buffer-overflow"),
    ("overflow_int", "runtime error: signed integer overflow"),
    ("overflow_float_cast", "is outside the range of representable values of type 'long long"),
])
def test_sanitizers_catch_broken_kernels(asan_env, tmp_path, kernel, report):
    """Negative control: the sanitizers are live in the host backend's build and in the process."""
    (tmp_path / "broken.cu").write_text(BROKEN_FAMILY)
    result = subprocess.run([sys.executable, "-c", LAUNCH_BROKEN, str(tmp_path), kernel], cwd=tmp_path,
                            env=asan_env, capture_output=True, text=True, timeout=600)
    output = _output(result)
    assert "host compilation of" not in output, output[-5000:]
    assert result.returncode != 0 and report in output, (
        f"{kernel}: expected {report!r} and a failed process, got exit code {result.returncode}:\n"
        f"{output[-5000:]}")
    assert "LAUNCHED WITHOUT A SANITIZER REPORT" not in output


@pytest.mark.parametrize("keyword", ["deform_conv_tap_positions", "attention_level_start_past_int32"])
def test_index64_cases_under_sanitizers(asan_env, keyword):
    """tests/test_index64.py's 64-bit cases on the host backend under ASan + UBSan: no signed overflow, no bad
    access, the expected results. deform_conv2d with tap positions past 2**31 - 1 though every size is below it;
    ms_deform_attn and flash_deform_attn over a level that starts at row 2**31 of value (about 1.2 GiB resident
    under ASan: the lazily allocated 8 GiB arrays' shadow)."""
    _run_under_sanitizers(asan_env, "tests/test_index64.py", keyword)
