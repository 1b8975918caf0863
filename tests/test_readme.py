"""Every ```python block of README.md runs; the blocks under one heading share a namespace, in order.

A block is skipped when it imports a framework that is not installed, imports CuPy without a GPU, uses the host
backend without a C++ compiler, or follows a ``<!-- skip: reason -->`` line. ```bash blocks are not run.
"""
import contextlib
import importlib.util
import io
import pathlib
import re

import pytest

from deformcp import testing

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^(#+ [^\n]*)$|(?:<!-- skip: ([^\n]*?) -->\n+)?^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
IMPORT = re.compile(r"^\s*(?:import|from)\s+([\w.]+(?:\s*,\s*[\w.]+)*)", re.MULTILINE)


def _sections() -> dict[str, list[tuple[str, str]]]:
    """{heading: [(code, skip marker or ""), ...]} for the headings that have python blocks."""
    sections, heading = {}, "README"
    for match in BLOCK.finditer(README.read_text(encoding="utf-8")):
        if match[1]:
            heading = match[1].lstrip("# ")
        elif match[3] == "python":
            sections.setdefault(heading, []).append((match[4], match[2] or ""))
    return sections


def _skip_reason(code: str, marker: str) -> str:
    if marker:
        return marker
    names = {name.strip().split(".")[0] for group in IMPORT.findall(code) for name in group.split(",")}
    names = {name.split(" as ")[0].strip() for name in names}
    missing = sorted(name for name in names if importlib.util.find_spec(name) is None)
    if missing:
        return f"needs {', '.join(missing)}"
    if "cupy" in names and testing.gpu_available():
        return f"needs a GPU: {testing.gpu_available()}"
    if 'backend("host")' in code and "host" not in testing.available_backends():
        return "needs the host backend (a C++ compiler)"
    return ""


SECTIONS = _sections()


def test_readme_has_python_blocks():
    assert sum(len(blocks) for blocks in SECTIONS.values()) >= 8, SECTIONS.keys()


@pytest.mark.parametrize("heading", list(SECTIONS))
def test_readme_section(heading, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                       # blocks that write files (model.onnx) write here
    namespace, ran, skipped = {"__name__": "__readme__"}, 0, []
    for code, marker in SECTIONS[heading]:
        reason = _skip_reason(code, marker)
        if reason:
            skipped.append(reason)
            continue
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, f"README.md ({heading})", "exec"), namespace)
        assert not re.search(r"(^|\s)False(\s|$)", printed.getvalue()), printed.getvalue()   # a failed comparison
        ran += 1
    if not ran:
        pytest.skip("; ".join(skipped))
