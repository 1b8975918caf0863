"""The documentation: every docstring example runs as a doctest, and the Sphinx site builds with warnings as errors."""
import doctest
import importlib
import io
import pathlib
import pkgutil
import subprocess
import sys

import pytest

import deformcp

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"
FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def _public_modules() -> list[str]:
    """deformcp's modules without a private name, and the private ones that define a name of deformcp.__all__."""
    walked = [info.name for info in pkgutil.walk_packages(deformcp.__path__, "deformcp.")]
    public = [name for name in walked if not any(part.startswith("_") for part in name.split("."))]
    defining = {getattr(deformcp, name).__module__ for name in deformcp.__all__}
    return sorted({"deformcp", *public, *defining})


def _import(name: str):
    """The module, or a skip when an optional framework it needs is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        if error.name and error.name.split(".")[0] != "deformcp":
            pytest.skip(f"{name} needs {error.name}, which is not installed")
        raise


@pytest.mark.parametrize("name", _public_modules())
def test_docstring_examples(name):
    module = _import(name)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report = io.StringIO()
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):
        runner.run(test, out=report.write)
    assert runner.failures == 0, report.getvalue()


def test_sphinx_build(tmp_path):
    """``sphinx-build -W --keep-going -b html docs``: the API reference, the pages and the README's includes."""
    pytest.importorskip("sphinx")
    build = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS),
                            str(tmp_path)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    for page in ("index", "api", "conventions", "frameworks", "benchmarks", "spatial_transformer", "roi_align",
                 "deform_conv", "deform_roi_pool", "ms_deform_attn", "dcn"):
        assert (tmp_path / f"{page}.html").is_file(), page
    api = (tmp_path / "api.html").read_text()
    for name in deformcp.__all__:
        assert f'id="deformcp.{name}"' in api, name
