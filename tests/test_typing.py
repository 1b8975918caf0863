"""The type annotations: ``mypy --strict`` passes on the whole package (pyproject.toml's [tool.mypy]: strict, no
module relaxed) and on a user script that calls every public function
(tests/data/typing/usage.py), and rejects each of the snippets tests/data/typing/reject_*.py on the line marked
``# error: [code]``, with that code — so the annotations say something. One mypy run, with a fresh cache in a
temporary folder, for the running interpreter's Python version. The package ships a py.typed marker."""
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "typing"
USAGE = DATA / "usage.py"
REJECTS = sorted(DATA.glob("reject_*.py"))
MARK = re.compile(r"#\s*error:\s*\[([a-z-]+)\]")
#: mypy's lines: "path:line: error: message  [code]"
ERROR = re.compile(r"^(?P<path>[^:\n]+):(?P<line>\d+): error: .*\[(?P<code>[a-z-]+)\]$", re.M)


def _expected(path: pathlib.Path) -> tuple[int, str]:
    """(line, code) of the one line a snippet marks with ``# error: [code]``."""
    marked = [(i, m[1]) for i, text in enumerate(path.read_text().splitlines(), 1) if (m := MARK.search(text))]
    assert len(marked) == 1, f"{path.name}: expected one line marked '# error: [code]', got {marked}"
    return marked[0]


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory) -> dict[str, list[tuple[int, str, str]]]:
    """mypy --strict on the package, the user script and the snippets: errors by file (path relative to the
    repository), each (line, code, whole line)."""
    pytest.importorskip("mypy")
    for framework in ("torch", "jax"):  # the user script and snippets import them: mypy reads their stubs
        pytest.importorskip(framework)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    command = [sys.executable, "-m", "mypy", "--strict", "--python-version", version, "--cache-dir",
               str(tmp_path_factory.mktemp("mypy_cache")), "--no-color-output", "--no-error-summary",
               "--show-error-codes", "deformcp", str(USAGE.relative_to(ROOT)),
               *(str(p.relative_to(ROOT)) for p in REJECTS)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode in (0, 1), run.stdout + run.stderr  # 2: mypy itself failed (a crash, a bad option)
    errors: dict[str, list[tuple[int, str, str]]] = {}
    for m in ERROR.finditer(run.stdout):
        errors.setdefault(pathlib.PurePath(m["path"]).as_posix(), []).append((int(m["line"]), m["code"], m[0]))
    return errors


def test_package_is_strict_clean(mypy_errors):
    package = [line for path, found in mypy_errors.items() if path.startswith("deformcp/") for *_, line in found]
    assert not package, "\n".join(package)


def test_user_script_is_strict_clean(mypy_errors):
    found = mypy_errors.get(USAGE.relative_to(ROOT).as_posix(), [])
    assert not found, "\n".join(line for *_, line in found)


@pytest.mark.parametrize("snippet", REJECTS, ids=[p.stem for p in REJECTS])
def test_snippet_is_rejected(mypy_errors, snippet):
    """Each snippet fails on its marked line with its marked error code, and nowhere else."""
    line, code = _expected(snippet)
    found = mypy_errors.get(snippet.relative_to(ROOT).as_posix(), [])
    assert [(n, c) for n, c, _ in found] == [(line, code)], "\n".join(text for *_, text in found) or "no error"


def test_user_script_uses_every_public_name():
    """An op or module added to deformcp.__all__, deformcp.torch or deformcp.jax needs a call in the user script
    (its annotations are then checked from a caller's side)."""
    import deformcp
    text = USAGE.read_text()
    names = [f"deformcp.{name}" for name in deformcp.__all__]
    for module, alias in (("deformcp.torch", "dtorch"), ("deformcp.jax", "djax")):
        try:
            imported = __import__(module, fromlist=["__all__"])
        except ImportError:
            continue
        names += [f"{alias}.{name}" for name in imported.__all__]
    missing = [name for name in names if not re.search(re.escape(name) + r"\b", text)]
    assert not missing, f"tests/data/typing/usage.py does not use {missing}"


def test_user_script_runs():
    """The checked script is a real use: it runs (NumPy, torch and JAX calls; shapes and gradient fields)."""
    for framework in ("torch", "jax"):
        pytest.importorskip(framework)
    run = subprocess.run([sys.executable, str(USAGE)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr


def test_py_typed_is_shipped():
    """PEP 561: the marker beside the package, and setup.cfg's package_data puts it in the wheel."""
    assert (ROOT / "deformcp" / "py.typed").is_file()
    setup = (ROOT / "setup.cfg").read_text()
    data = setup.split("[options.package_data]", 1)[1].split("\n[", 1)[0]
    assert re.search(r"^deformcp\s*=\s*.*py\.typed", data, re.M), data
