"""Packaging: the sdist and the wheel ship the CUDA sources and the host prelude, an installed wheel and an
editable install find them, and ``import deformcp`` needs no CuPy, PyTorch, JAX, GPU or compiler.

The builds run on a copy of the checkout's build inputs in a temporary folder (setuptools writes build/
and *.egg-info next to the sources), offline: ``python -m build --no-isolation`` and pip's
``--no-build-isolation`` use the setuptools of this environment (the ``test`` extra lists both).
"""
import email.parser
import json
import os
import pathlib
import shutil
import site
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
#: Modules that importing deformcp must not need (each may be absent, or present but unusable).
OPTIONAL = ("cupy", "cupyx", "cupy_backends", "cuda", "torch", "jax", "jaxlib", "ml_dtypes")


def _run(args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _clean_env(**extra):
    """The environment without anything that would make the checkout importable or share its caches."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH")}
    env.update(extra)
    return env


def _copy_sources(target: pathlib.Path) -> pathlib.Path:
    """The files a build reads: top-level files (setup.cfg, pyproject.toml, README.md, ...), deformcp/, kernels/,
    benchmarks/."""
    target.mkdir()
    for path in REPO.iterdir():
        if path.is_file():
            shutil.copy2(path, target / path.name)
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")
    for folder in ("deformcp", "kernels", "benchmarks"):
        shutil.copytree(REPO / folder, target / folder, ignore=junk)
    return target


def _shipped(src: pathlib.Path) -> tuple[set[str], set[str]]:
    """(paths inside the wheel, paths inside the sdist below its top folder) that must be there."""
    kernels = sorted(p.name for p in (src / "kernels").iterdir() if p.suffix in (".cu", ".cuh"))
    assert "deformcp_common.cuh" in kernels and any(k.endswith(".cu") for k in kernels)
    python = {p.relative_to(src).as_posix() for p in (src / "deformcp").rglob("*.py")}
    wheel = {*python, "deformcp/_host/prelude.h", "deformcp/kernels/__init__.py",
             *(f"deformcp/kernels/{k}" for k in kernels)}
    sdist = {*python, "deformcp/_host/prelude.h", "kernels/__init__.py", "setup.cfg", "pyproject.toml",
             *(f"kernels/{k}" for k in kernels)}
    benchmarks = sorted(p.name for p in (src / "benchmarks").glob("*.py"))
    assert "harness.py" in benchmarks and "__init__.py" in benchmarks
    wheel |= {f"deformcp/benchmarks/{b}" for b in benchmarks}
    sdist |= {f"benchmarks/{b}" for b in benchmarks}
    return wheel, sdist


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(source copy, sdist, wheel): ``python -m build`` makes the sdist, then the wheel from the sdist,
    as pip does when it installs from PyPI's sdist."""
    pytest.importorskip("build", reason="the packaging tests need `build`: pip install -e '.[test]'")
    tmp = tmp_path_factory.mktemp("packaging")
    src = _copy_sources(tmp / "src")
    dist = tmp / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)], cwd=tmp,
         env=_clean_env())
    (sdist,) = dist.glob("deformcp-*.tar.gz")
    (wheel,) = dist.glob("deformcp-*.whl")
    return src, sdist, wheel


def test_sdist_and_wheel_contain_kernels_and_prelude(built):
    src, sdist, wheel = built
    want_wheel, want_sdist = _shipped(src)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert not want_wheel - names, f"missing from {wheel.name}: {sorted(want_wheel - names)}"
    assert not any(n.startswith("kernels/") for n in names), "kernels/ must ship as deformcp/kernels/ only"
    assert wheel.name.endswith("-py3-none-any.whl"), "the wheel must be pure Python (kernels compile at run time)"
    with tarfile.open(sdist) as archive:
        names = archive.getnames()
    assert {n.partition("/")[0] for n in names} == {sdist.name[: -len(".tar.gz")]}
    members = {n.partition("/")[2] for n in names}
    assert not want_sdist - members, f"missing from {sdist.name}: {sorted(want_sdist - members)}"


#: Classifiers the metadata must carry (setup.cfg).
CLASSIFIERS = {
    "License :: OSI Approved :: BSD License", "Development Status :: 3 - Alpha",
    "Intended Audience :: Science/Research", "Operating System :: POSIX :: Linux",
    *(f"Programming Language :: Python :: 3.{minor}" for minor in range(10, 14)),
}


def test_license_changelog_and_classifiers_are_shipped(built):
    """LICENSE in the sdist and the wheel's dist-info, CHANGELOG.md in the sdist, the classifiers and the license
    in both archives' metadata."""
    src, sdist, wheel = built
    top = sdist.name[: -len(".tar.gz")]
    with tarfile.open(sdist) as archive:
        read = {name: archive.extractfile(f"{top}/{name}").read().decode() for name in
                ("LICENSE", "CHANGELOG.md", "PKG-INFO")}
    assert read["LICENSE"] == (src / "LICENSE").read_text() and "BSD 3-Clause License" in read["LICENSE"]
    assert read["CHANGELOG.md"] == (src / "CHANGELOG.md").read_text() and "## [Unreleased]" in read["CHANGELOG.md"]
    with zipfile.ZipFile(wheel) as archive:
        (license_file,) = [n for n in archive.namelist() if n.endswith((".dist-info/licenses/LICENSE",
                                                                        ".dist-info/LICENSE"))]
        (metadata_file,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        assert archive.read(license_file).decode() == read["LICENSE"]
        metadata = archive.read(metadata_file).decode()
    for text in (read["PKG-INFO"], metadata):
        fields = email.parser.Parser().parsestr(text)
        assert not CLASSIFIERS - set(fields.get_all("Classifier")), fields.get_all("Classifier")
        assert fields.get_all("License-File") == ["LICENSE"]
        assert "BSD-3-Clause" in (fields["License-Expression"], fields["License"])


INSTALLED_CHECK = textwrap.dedent("""
    import json, pathlib, sys
    import numpy as np
    import deformcp
    from deformcp import _host, _sources

    result = {
        "file": deformcp.__file__,
        "kernel_dir": str(_sources.kernel_dir()),
        "families": _sources.families(),
        "common": (_sources.kernel_dir() / _sources.COMMON_HEADER).is_file(),
        "prelude": str(_host.PRELUDE) if _host.PRELUDE.is_file() else None,
        "cupy_after_import": sorted(m for m in sys.modules if m.split(".")[0] in ("cupy", "cupy_backends")),
        "compiler": _host.compiler(),
    }
    theta = np.array([[[0.9, -0.2, 0.1], [0.3, 1.1, -0.2]]])
    grid = deformcp.affine_grid(theta, (1, 1, 3, 4))
    x = np.arange(12.0).reshape(1, 1, 3, 4)
    sampled = deformcp.grid_sample(x, grid, padding_mode="border")
    if result["compiler"]:
        with deformcp.backend("host"):
            host_grid = deformcp.affine_grid(theta, (1, 1, 3, 4))
            host_sampled = deformcp.grid_sample(x, grid, padding_mode="border")
        result["host_error"] = max(float(np.max(np.abs(host_grid - grid))),
                                   float(np.max(np.abs(host_sampled - sampled))))
        result["host_libraries"] = sorted(p.name for p in _host.cache_dir().glob("*.so"))
    print(json.dumps(result))
""")


def _check_installed(result: dict, package: pathlib.Path, kernels: pathlib.Path, families: list[str]):
    assert pathlib.Path(result["file"]).resolve() == (package / "__init__.py").resolve()
    assert pathlib.Path(result["kernel_dir"]).resolve() == kernels.resolve()
    assert result["families"] == families and families
    assert result["common"], f"{kernels} lacks deformcp_common.cuh"
    assert pathlib.Path(result["prelude"]).resolve() == (package / "_host" / "prelude.h").resolve()
    assert result["cupy_after_import"] == [], "import deformcp imported CuPy"
    if result["compiler"]:
        assert result["host_error"] < 1e-12
        assert any(name.startswith("spatial_transformer-double-int-") for name in result["host_libraries"])


def test_wheel_installs_and_runs_outside_the_checkout(built, tmp_path):
    src, _, wheel = built
    target = tmp_path / "target"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile", "--quiet",
          "--target", str(target), str(wheel)], cwd=tmp_path, env=_clean_env())
    families = sorted(p.stem for p in (src / "kernels").glob("*.cu"))
    # cwd is tmp_path, so neither the checkout nor the source copy is importable: only target is.
    env = _clean_env(PYTHONPATH=str(target), DEFORMCP_CACHE_DIR=str(tmp_path / "cache"))
    out = _run([sys.executable, "-c", INSTALLED_CHECK], cwd=tmp_path, env=env).stdout
    _check_installed(json.loads(out.splitlines()[-1]), target / "deformcp", target / "deformcp" / "kernels",
                     families)
    info = _run([sys.executable, "-m", "deformcp", "info"], cwd=tmp_path, env=env).stdout
    assert str(target / "deformcp" / "kernels") in info and ", ".join(families) in info
    bench = _run([sys.executable, "-m", "deformcp", "bench", "--quick", "--repeat", "1", "roi_align"], cwd=tmp_path,
                 env=env).stdout
    assert "roi_align: ok" in bench


def _venv_seeing_this_environment(venv: pathlib.Path) -> pathlib.Path:
    """A new venv that sees the packages of the environment running the tests (numpy, setuptools, pip, ...)
    after its own site-packages; returns its python.

    Not ``venv --system-site-packages``: run from a venv, that shows the base interpreter's packages, not
    this venv's. A .pth file in the new site-packages appends this environment's site folders to sys.path
    (their .pth files run too), behind the new venv's own site-packages.
    """
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                   env=_clean_env()).stdout.strip()
    ours = {*site.getsitepackages(), site.getusersitepackages()}
    folders = [p for p in dict.fromkeys(sys.path) if p in ours and os.path.isdir(p)]
    assert folders, f"no site-packages on sys.path: {sys.path}"
    pth = pathlib.Path(purelib) / "outer_environment.pth"
    pth.write_text("".join(f"import site; site.addsitedir({p!r})\n" for p in folders))
    return python


def test_editable_install_maps_kernels(tmp_path):
    """``pip install -e .`` maps deformcp.kernels onto the top-level kernels/ folder, live."""
    src = _copy_sources(tmp_path / "src")
    venv = tmp_path / "venv"
    python = _venv_seeing_this_environment(venv)
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation", "--quiet",
          "-e", str(src)], cwd=tmp_path, env=_clean_env())
    (src / "kernels" / "zz_added_later.cu").write_text("// a kernel family added after installing\n")
    families = sorted(p.stem for p in (src / "kernels").glob("*.cu"))
    assert "zz_added_later" in families
    env = _clean_env(DEFORMCP_CACHE_DIR=str(tmp_path / "cache"))
    out = _run([str(python), "-c", INSTALLED_CHECK], cwd=tmp_path, env=env).stdout
    _check_installed(json.loads(out.splitlines()[-1]), src / "deformcp", src / "kernels", families)
    # Through the package's import machinery, not kernel_dir()'s fallback for a bare checkout:
    code = "import importlib.util; print(importlib.util.find_spec('deformcp.kernels').origin)"
    origin = _run([str(python), "-c", code], cwd=tmp_path, env=env).stdout.strip()
    assert pathlib.Path(origin).resolve() == (src / "kernels" / "__init__.py").resolve()
    # Another checkout imported from its own folder reads its own kernels, not the editable install's
    other = _copy_sources(tmp_path / "other")
    code = "import deformcp, deformcp._sources as s; print(deformcp.__file__); print(s.kernel_dir())"
    package, kernels = _run([str(python), "-c", code], cwd=other, env=env).stdout.split()
    assert pathlib.Path(package).resolve() == (other / "deformcp" / "__init__.py").resolve()
    assert pathlib.Path(kernels).resolve() == (other / "kernels").resolve()


BLOCKED_IMPORT = textwrap.dedent("""
    import sys
    for name in {optional!r}:
        sys.modules[name] = None  # import name raises ImportError, find_spec(name) returns None
    import numpy as np
    import deformcp
    import deformcp.testing, deformcp._host, deformcp._kernels, deformcp._nvrtc, deformcp.__main__
    theta = np.array([[[1.0, 0.2, 0.0], [-0.1, 0.9, 0.3]]])
    x = np.random.default_rng(0).standard_normal((1, 2, 3, 4))
    grid = deformcp.affine_grid(theta, x.shape)
    out = deformcp.grid_sample(x, grid)
    grads = deformcp.grid_sample_backward(np.ones_like(out), x, grid)
    assert out.shape == (1, 2, 3, 4) and grads.input.shape == x.shape and grads.grid.shape == grid.shape
    assert deformcp.testing.gpu_available() == "CuPy is not installed"
    assert deformcp._nvrtc.available() == "CuPy is not installed"
    assert deformcp._host.compiler() is None, deformcp._host.compiler()
    assert deformcp.testing.available_backends() == []
    assert deformcp.__main__.main(["info"]) == 0
    print("OK")
""")


def test_import_needs_no_cupy_torch_jax_gpu_or_compiler(tmp_path):
    """With CuPy, PyTorch and JAX unimportable, no GPU and no compiler on PATH, deformcp imports, its
    NumPy path runs and ``python -m deformcp info`` reports the backends unavailable."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = _clean_env(PYTHONPATH=str(REPO), PATH=str(empty_bin), CUDA_VISIBLE_DEVICES="")
    env.pop("CXX", None)
    result = _run([sys.executable, "-c", BLOCKED_IMPORT.format(optional=OPTIONAL)], cwd=tmp_path, env=env)
    assert result.stdout.splitlines()[-1] == "OK"
    assert "backend host" in result.stdout and "unavailable: the host backend needs a C++ compiler" in result.stdout


def test_import_does_not_import_cupy(tmp_path):
    code = ("import sys, deformcp; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {optional!r}))").format(optional=OPTIONAL)
    result = _run([sys.executable, "-c", code], cwd=tmp_path, env=_clean_env(PYTHONPATH=str(REPO)))
    assert result.stdout.strip() == "[]", f"import deformcp imported {result.stdout.strip()}"
