"""The lab as a user installs it: a wheel of this checkout in a fresh venv, run in a directory of its own.

Every other test runs the checkout (``python train.py`` at the repo root, or the editable install),
where a config file missing from the package data, a module imported from the repo root or a path
taken relative to the checkout all go unnoticed. Here the wheel is built from a copy of the
checkout's sources (so the build writes nothing into the checkout), installed with ``pip install
--no-deps`` into a new venv in tmp_path, and its console scripts are run in an empty directory.
The project's dependencies (torch among them) are not installed again: a ``.pth`` file in the new
venv names the test environment's site-packages, which puts that folder on ``sys.path`` without
running the ``.pth`` files in it, so the editable install of this checkout there (its
``__editable__`` finder) is never loaded, and the new venv's own copy of the lab comes first.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

#: The console scripts pyproject.toml declares ([project.scripts]); README.md documents them.
SCRIPTS = tuple(f"alexnet-lab-{name}" for name in ("train", "eval", "predict", "preprocess", "report"))

#: Config groups ``alexnet-lab-train --help`` must list, whatever else conf/ holds.
GROUPS = ("callbacks", "data", "debug", "experiment", "logger", "model", "optim", "paths", "scheduler", "trainer")

#: A seconds-long run: debug=fdr (one batch of train, val and test) on 30 generated images of 64 px.
#: Without them debug=fdr first generates the full embedded data set: about 45 s on 2 CPU cores.
SMALL_FDR = [
    "debug=fdr",
    "data.synthetic.counts={cat:18,dog:12}",
    "data.image_size=64",
    "data.batch_size=8",
    "data.workers=1",
    "data.progress=false",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
]

#: Top-level entries of the checkout that are not sources of the wheel: outputs, data, builds, tools' state.
NOT_SOURCES = {"build", "dist", "outputs", "multirun", "data", "mutants", "lightning_logs"}


def _sources(directory: str, names: list[str]) -> set[str]:
    """shutil.copytree's ignore: what a build of the checkout must not see (old builds, caches, runs)."""
    ignored = {name for name in names if name == "__pycache__" or name.endswith((".egg-info", ".pyc"))}
    if Path(directory) == ROOT:
        ignored |= {name for name in names if name in NOT_SOURCES or name.startswith(".")}
    return ignored


def _files(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder`` (bytecode caches left out)."""
    if not folder.is_dir():
        return {}
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def _entries(folder: Path) -> set[str]:
    """Every path under ``folder``, relative (empty when there is no such folder)."""
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*")} if folder.is_dir() else set()


def _checkout_state() -> dict[str, object]:
    """What a run of the installed lab could write into the checkout by a path taken from the wrong place."""
    return {
        "top": sorted(path.name for path in ROOT.iterdir()),
        "outputs": _entries(ROOT / "outputs"),
        "data": _entries(ROOT / "data"),
        "conf": _files(ROOT / "alexnet_lab" / "conf"),
    }


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel of the checkout as it is now, built from a copy of its sources (nothing written to the checkout)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(ROOT, source, symlinks=True, ignore=_sources)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--quiet", "-w", str(work / "dist")]
    try:  # the build backend of the test environment (pyproject's [build-system]): no download
        import setuptools  # noqa: F401

        command.append("--no-build-isolation")
    except ImportError:  # pip fetches setuptools into an isolated build environment
        command.remove("--no-index")
    result = subprocess.run([*command, str(source)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (built,) = (work / "dist").glob("alexnet_lab-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A new venv holding the wheel, and the test environment's packages (not its alexnet_lab) on its path."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    # the test environment's pip, running in the new venv's interpreter: it sees only that venv yet
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index"]
    result = subprocess.run([*install, "--quiet", str(wheel)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # a path line: appended to sys.path after the venv's own site-packages, its .pth files not run
    deps = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (Path(site) / "_alexnet_lab_test_deps.pth").write_text("".join(f"{path}\n" for path in deps))
    return root


def _env(venv: Path) -> dict[str, str]:
    """The environment of a user who activated the new venv: nothing of the test process's own paths."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "HYDRA_FULL_ERROR", "VIRTUAL_ENV")
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    env["PYTHONNOUSERSITE"] = "1"  # no ~/.local packages
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no .pyc files written into the test environment's site-packages
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(venv: Path, args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=_env(venv), capture_output=True, text=True, timeout=timeout)


def _site_packages(venv: Path) -> Path:
    (site,) = venv.glob("lib/python*/site-packages")
    return site


def test_the_wheel_ships_every_config_file_module_and_command(wheel):
    """A yaml of alexnet_lab/conf left out of [tool.setuptools.package-data] breaks only installed labs.

    Compared with the checkout's files, so a new group (or a deeper folder than the globs reach)
    cannot be forgotten: every yaml under alexnet_lab/conf, every module of each package the
    wheel holds, py.typed, and the five console scripts pointing into alexnet_lab.cli.
    """
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    conf = ROOT / "alexnet_lab" / "conf"
    yamls = {path.relative_to(ROOT).as_posix() for path in conf.rglob("*.yaml")}
    assert len(yamls) > 20 and "alexnet_lab/conf/config.yaml" in yamls
    assert not yamls - names, f"config files missing from the wheel: {sorted(yamls - names)}"
    packages = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert "alexnet_lab" in packages
    if (ROOT / "hydra_plugins").is_dir():  # the search's sweeper: Hydra finds sweepers only there
        assert "hydra_plugins" in packages, "hydra_plugins/ is not in the wheel: an installed search finds no sweeper"
    modules = {
        path.relative_to(ROOT).as_posix()
        for package in packages
        for path in (ROOT / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert not modules - names, f"modules missing from the wheel: {sorted(modules - names)}"
    assert "alexnet_lab/py.typed" in names
    for script in SCRIPTS:
        function = script.removeprefix("alexnet-lab-") + "_command"
        assert re.search(rf"^{script} = alexnet_lab\.cli:{function}$", scripts, re.M), scripts


def test_the_installed_lab_is_the_wheel_and_sees_its_dependencies(venv, tmp_path):
    """Guards the other tests' setup: without it they could pass on the checkout's own copy.

    The new venv must import alexnet_lab (its config tree too) from its own site-packages, load
    no finder of the test environment's editable install, and still find torch and Lightning
    (found, not imported: that takes seconds, and the training run below imports them).
    """
    probe = textwrap.dedent(
        """
        import importlib.util, json, sys
        import alexnet_lab, alexnet_lab.cli
        missing = [name for name in ("torch", "pytorch_lightning") if importlib.util.find_spec(name) is None]
        try:
            import hydra_plugins
            plugins = list(hydra_plugins.__path__)
        except ImportError:
            plugins = []
        finders = [f"{getattr(finder, '__module__', '')}: {finder!r}" for finder in sys.meta_path]
        found = {"lab": alexnet_lab.__file__, "conf": alexnet_lab.cli.CONF, "plugins": plugins, "finders": finders,
                 "missing": missing}
        print(json.dumps(found))
        """
    )
    result = _run(venv, [str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.splitlines()[-1])
    site = _site_packages(venv)
    assert Path(found["lab"]).is_relative_to(site), found["lab"]
    assert Path(found["conf"]) == site / "alexnet_lab" / "conf", found["conf"]
    assert not any("editable" in finder for finder in found["finders"]), found["finders"]
    assert not found["missing"], f"dependencies not found from the new venv: {found['missing']}"
    if (site / "hydra_plugins").is_dir():
        assert str(site / "hydra_plugins") in found["plugins"], found["plugins"]


@pytest.mark.slow
def test_the_installed_lab_trains_in_an_empty_directory(venv, tmp_path):
    """``alexnet-lab-train debug=fdr`` from the wheel, in a directory holding nothing of the lab.

    It must end with exit 0 and put everything where the ``paths`` group says, relative to the
    directory it runs in: the run dir (metrics.json: ok) under ./outputs/debug/runs, the generated
    data set and its cache under ./data. The config comes from the installed package, and nothing
    is written into the checkout or into the installed package (its conf/ above all).
    """
    work = tmp_path / "work"
    work.mkdir()
    package = _site_packages(venv) / "alexnet_lab"
    installed_before, checkout_before = _files(package), _checkout_state()
    result = _run(venv, [str(venv / "bin" / "alexnet-lab-train"), *SMALL_FDR], cwd=work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    (run_dir,) = (work / "outputs" / "debug" / "runs").iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "ok"
    # the config tree Hydra read: the installed package's, not the checkout's
    runtime = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"]
    sources = {source["provider"]: source["path"] for source in runtime["config_sources"]}
    assert Path(sources["main"]) == package / "conf" and Path(runtime["cwd"]) == work, (sources, runtime["cwd"])
    images = [path for path in (work / "data").rglob("*") if path.suffix in (".jpg", ".png")]
    assert len(images) >= 30, "the generated data set is not under ./data"
    assert any((work / "data").rglob("images.npy")), "the preprocessed cache is not under ./data"
    assert sorted(path.name for path in work.iterdir()) == ["data", "outputs"]
    assert _files(package) == installed_before, "the run wrote into the installed package"
    assert _checkout_state() == checkout_before, "the run wrote into the checkout"


@pytest.mark.slow
def test_every_installed_command_answers_help_and_writes_nothing(venv, tmp_path):
    """The five console scripts exist in the venv's bin/, and ``--help`` of each works anywhere.

    ``alexnet-lab-train --help`` lists every config group (read from the installed conf/); eval,
    predict and preprocess are Hydra apps as well, report is argparse. Asking for help creates
    no outputs/ or data/ in the directory it is asked in.
    """
    for script in SCRIPTS:
        assert (venv / "bin" / script).is_file(), f"{script} is not installed"
    groups = {path.name for path in (ROOT / "alexnet_lab" / "conf").iterdir() if path.is_dir()} - {"hydra"}
    assert set(GROUPS) <= groups
    for script in SCRIPTS:
        result = _run(venv, [str(venv / "bin" / script), "--help"], cwd=tmp_path, timeout=120)
        assert result.returncode == 0, (script, result.stderr[-3000:])
        assert result.stdout.strip() and "Traceback" not in result.stdout + result.stderr, script
        if script == "alexnet-lab-train":
            listed = set(re.findall(r"^(\w+): ", result.stdout, re.M))
            assert groups <= listed, f"groups missing from --help: {sorted(groups - listed)}"
        if script == "alexnet-lab-report":
            assert result.stdout.startswith("usage: alexnet-lab-report"), result.stdout[:500]
        assert not list(tmp_path.iterdir()), f"{script} --help wrote {[p.name for p in tmp_path.iterdir()]}"
