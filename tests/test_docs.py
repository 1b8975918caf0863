"""The documentation: every docstring example runs as a doctest."""
import doctest
import importlib
import io
import pkgutil

import pytest

import deformcp

FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def _public_modules() -> list[str]:
    """deformcp's modules without a private name, and the private ones that define a name of deformcp.__all__."""
    walked = [info.name for info in pkgutil.walk_packages(deformcp.__path__, "deformcp.")]
    public = [name for name in walked if not any(part.startswith("_") for part in name.split("."))]
    defining = {getattr(deformcp, name).__module__ for name in deformcp.__all__}
    return sorted({"deformcp", *public, *defining})


#: Modules whose examples fail for a reason outside this file's reach, with the reason.
KNOWN_FAILURES = {
    "deformcp._dispatch": "backend()'s example uses x and grid without defining them",
    "deformcp._workspace": "workspace_limit's example uses x, offset and weight without defining them",
}


def _import(name: str):
    """The module, or a skip when an optional framework it needs is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        if error.name and error.name.split(".")[0] != "deformcp":
            pytest.skip(f"{name} needs {error.name}, which is not installed")
        raise


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.xfail(reason=KNOWN_FAILURES[name], strict=False))
    if name in KNOWN_FAILURES else name
    for name in _public_modules()])
def test_docstring_examples(name):
    module = _import(name)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = io.StringIO()
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):
        runner.run(test, out=report.write)
    assert runner.failures == 0, report.getvalue()
