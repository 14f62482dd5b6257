"""binder/ builds an environment in which notebooks/quickstart.ipynb runs, proved offline.

mybinder.org builds the image with repo2docker's Python buildpack from exactly three files:
``binder/runtime.txt`` picks the Python, ``binder/requirements.txt`` is pip-installed into the
kernel's environment, then ``./binder/postBuild`` runs from the repository root with that
environment's ``bin`` first on ``PATH`` (it installs this checkout). This test repeats those
steps with the files verbatim, in a fresh ``python -m venv`` (no system site-packages) of the
Python that runtime.txt names, and then, with only what that venv holds:

* ``import taskapp_notebook`` is this checkout (version and every module byte for byte);
* ``jupyter labextension list`` shows ``@jupyter-widgets/jupyterlab-manager`` enabled and OK,
  from the venv's ``share/jupyter`` (the widget renders in JupyterLab);
* ``jupyter kernelspec list`` has ``python3``, inside the venv;
* the venv's own ``jupyter nbconvert --execute`` runs a copy of quickstart.ipynb top to bottom
  on that kernel: no error output, every ``%%taskapp`` cell displays the widget
  (``application/vnd.jupyter.widget-view+json``), and afterwards no process it started is
  left (the kernel ran the venv's Python), every port they listened on (kernel, task apps,
  relay) is free again, and the kernel's connection file is gone.

What this does not prove: mybinder.org itself is not exercised (no network here but the
package registries). repo2docker's conda base image (its own jupyterlab/notebook, Ubuntu,
the Docker build, the start command) is not built, so a venv stands in for
``${KERNEL_PYTHON_PREFIX}`` and packages are resolved from the registries configured on this
machine, at today's versions. JupyterLab is not opened in a browser here (tests/e2e/test_lab.py
drives the widget), and the kernel runs as this user rather than ``jovyan``.

The user's Jupyter/IPython configuration is kept out (config, data, runtime and IPython
directories are fresh temporary ones; ``VIRTUAL_ENV``, ``PYTHONPATH`` and the outer venv's
``bin`` are dropped). Overriding ``JUPYTER_DATA_DIR`` only replaces the per-user data
directory; the venv's ``share/jupyter`` stays on the data path, which the test checks.
pip uses its normal download cache for requirements.txt; postBuild keeps its own
``--no-cache-dir`` (it keeps the cache out of mybinder's image) and runs unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
import pytest
from support import port_is_free

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
BINDER = REPO / "binder"
QUICKSTART = REPO / "notebooks" / "quickstart.ipynb"
PACKAGE = REPO / "taskapp_notebook"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
LAB_MANAGER = "@jupyter-widgets/jupyterlab-manager"
MARKER = "TASKAPP_BINDER_TEST_RUN"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
LOOPBACK_PORT = re.compile(r"(?:127\.0\.0\.1|localhost):(\d{2,5})\b")


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def _run(
    cmd: list[str], *, env: dict[str, str], cwd: Path, timeout: float, what: str
) -> str:
    """Run ``cmd`` (its own session, so a timeout kills its children too); fail the test with
    the output's tail when it exits non-zero or times out. Returns stdout+stderr."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, text=True, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out = proc.stdout.read() if proc.stdout else ""
        pytest.fail(f"{what} timed out after {timeout:.0f} s: {cmd}\n{_tail(out)}")
    if proc.returncode != 0:
        pytest.fail(f"{what} failed (exit {proc.returncode}): {cmd}\n{_tail(out)}")
    return out


def _outer_path_entries() -> list[str]:
    """``PATH`` without the outer venv (the one running pytest) and without empty entries."""
    outer = Path(sys.prefix).resolve()
    keep = []
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if entry and not Path(entry).resolve().is_relative_to(outer):
            keep.append(entry)
    return keep


def _base_env() -> dict[str, str]:
    """This process's environment minus everything that points into a Python or Jupyter setup
    (pip's own settings stay: they say where this machine's registries are)."""
    drop_prefixes = ("PYTHON", "JUPYTER", "IPYTHON", "CONDA", "PYTEST_", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes)}
    env["PATH"] = os.pathsep.join(_outer_path_entries())
    return env


def _runtime_version() -> tuple[int, int]:
    text = (BINDER / "runtime.txt").read_text()
    match = re.fullmatch(r"python-(\d+)\.(\d+)", text.strip())
    assert match, f"binder/runtime.txt must be one line 'python-X.Y', not {text!r}"
    return int(match[1]), int(match[2])


def _interpreter(wanted: tuple[int, int]) -> tuple[str, str]:
    """An interpreter of the ``wanted`` version (pyenv shims resolved to the real binary), else
    ``sys.executable``. Returns it and a note saying which one and why."""
    name = f"python{wanted[0]}.{wanted[1]}"
    env = _base_env()
    for candidate in (shutil.which(name, path=env["PATH"]), sys.executable):
        if not candidate:
            continue
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys; print(*sys.version_info[:2], sys.executable)"],
                env=env, capture_output=True, text=True, timeout=60, check=True,
            )
            major, minor, executable = probe.stdout.split(maxsplit=2)
        except (OSError, subprocess.SubprocessError, ValueError):
            continue
        if (int(major), int(minor)) == wanted:
            return executable.strip(), f"Python {major}.{minor} as runtime.txt asks: {candidate}"
    found = ".".join(map(str, sys.version_info[:2]))
    return sys.executable, (
        f"no {name} found (runtime.txt asks for it); using sys.executable, Python {found}: "
        f"{sys.executable}"
    )


def _marked(marker: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``marker``: everything the test started."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _describe(procs: Iterable[psutil.Process]) -> str:
    rows = []
    for proc in procs:
        try:
            rows.append(f"pid {proc.pid}: {' '.join(proc.cmdline())}")
        except psutil.Error:
            rows.append(f"pid {proc.pid}")
    return "\n".join(rows)


def _listening_ports(proc: psutil.Process) -> set[int]:
    try:
        conns = proc.net_connections(kind="inet")
    except psutil.Error:
        return set()
    return {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN and c.laddr}


def _file_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and (p.suffix == ".py" or p.name == "py.typed")
        and "__pycache__" not in p.parts
    }


def test_binder_environment_runs_the_quickstart(tmp_path: Path) -> None:
    timings: dict[str, float] = {}
    started = time.monotonic()

    def lap(name: str) -> None:
        nonlocal started
        now = time.monotonic()
        timings[name] = now - started
        started = now

    python, note = _interpreter(_runtime_version())
    print(f"binder test interpreter: {note}")

    # 1. a fresh venv of runtime.txt's Python, without system site-packages
    venv = tmp_path / "venv"
    made = subprocess.run(
        [python, "-m", "venv", str(venv)], env=_base_env(), capture_output=True, text=True,
        timeout=300, stdin=subprocess.DEVNULL,
    )
    bin_dir = venv / "bin"
    if made.returncode != 0 or not (bin_dir / "pip").exists():
        pytest.skip(f"`{python} -m venv` is unusable here ({note}): "
                    f"{_tail(made.stdout + made.stderr, 10)}")
    lap("venv")

    marker = uuid.uuid4().hex
    jupyter_home = tmp_path / "jupyter"
    env = _base_env()
    env.update({
        "PATH": os.pathsep.join([str(bin_dir), *_outer_path_entries()]),
        "PYTHONNOUSERSITE": "1",
        "JUPYTER_CONFIG_DIR": str(jupyter_home / "config"),
        "JUPYTER_DATA_DIR": str(jupyter_home / "data"),
        "JUPYTER_RUNTIME_DIR": str(jupyter_home / "runtime"),
        "IPYTHONDIR": str(jupyter_home / "ipython"),
        MARKER: marker,
    })
    vpython = str(bin_dir / "python")
    outside = tmp_path / "elsewhere"  # a cwd without the checkout on sys.path
    outside.mkdir()

    bare = _run(
        [vpython, "-c", "import importlib.util as u, sys; print(sys.prefix != sys.base_prefix, "
         "[m for m in ('jupyterlab', 'ipykernel', 'taskapp_notebook') if u.find_spec(m)])"],
        env=env, cwd=outside, timeout=60, what="probing the fresh venv",
    )
    assert bare.split() == ["True", "[]"], f"the venv is not bare: {bare}"

    try:
        # 2. repo2docker's steps, from the repository root, files verbatim
        _run([str(bin_dir / "pip"), "install", "-r", "binder/requirements.txt"],
             env=env, cwd=REPO, timeout=600, what="pip install -r binder/requirements.txt")
        lap("pip install -r binder/requirements.txt")
        post_build = BINDER / "postBuild"
        assert os.access(post_build, os.X_OK), "binder/postBuild must be executable"
        _run(["./binder/postBuild"], env=env, cwd=REPO, timeout=600, what="binder/postBuild")
        lap("binder/postBuild")

        # 3. what the venv now holds
        _check_package(vpython, env, outside)
        _check_jupyter(venv, env, outside)
        lap("checks")

        # 4. the quickstart, on the venv's own nbconvert and kernel
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        shutil.copy2(QUICKSTART, run_dir / QUICKSTART.name)
        # jupyter_client writes the kernel's connection file with tempfile.mkstemp
        run_tmp = tmp_path / "tmp"
        run_tmp.mkdir()
        ports, kernel_cmd, connection_files = _execute(run_dir, {**env, "TMPDIR": str(run_tmp)},
                                                       marker)
        lap("nbconvert --execute quickstart.ipynb")

        executed = json.loads((run_dir / "executed.ipynb").read_text())
        texts = _check_outputs(executed)
        assert kernel_cmd, "no kernel process was seen during the run"
        assert Path(kernel_cmd[0]).parent == bin_dir, f"the kernel ran {kernel_cmd[0]}"

        # no process left, no port left, no connection file left
        deadline = time.monotonic() + 20
        while (left := _marked(marker)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"processes left after nbconvert exited:\n{_describe(left)}"
        ports |= {int(p) for text in texts for p in LOOPBACK_PORT.findall(text)}
        assert ports, "no listening port was seen during the run"
        busy = sorted(p for p in ports if not port_is_free(p))
        assert not busy, f"ports still taken after the run: {busy} (of {sorted(ports)})"
        assert connection_files, f"no kernel connection file was seen in {run_tmp}"
        leftovers = [name for name in connection_files if (run_tmp / name).exists()]
        assert not leftovers, f"kernel connection files left in {run_tmp}: {leftovers}"
    finally:
        for proc in _marked(marker):
            try:
                proc.kill()
            except psutil.Error:
                pass
        print("binder test timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


def _check_package(vpython: str, env: dict[str, str], cwd: Path) -> None:
    probe = _run(
        [vpython, "-c", "import importlib.metadata as m, json, pathlib, taskapp_notebook as t; "
         "print(json.dumps([t.__version__, m.version('taskapp-notebook'), "
         "str(pathlib.Path(t.__file__).resolve().parent)]))"],
        env=env, cwd=cwd, timeout=120, what="import taskapp_notebook in the venv",
    )
    version, dist_version, location = json.loads(probe.strip().splitlines()[-1])
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert version == dist_version == expected, (version, dist_version, expected)
    installed = Path(location)
    assert installed.is_relative_to(Path(vpython).parent.parent), installed
    assert _file_digests(installed) == _file_digests(PACKAGE), (
        f"{installed} is not this checkout's taskapp_notebook"
    )


def _check_jupyter(venv: Path, env: dict[str, str], cwd: Path) -> None:
    jupyter = shutil.which("jupyter", path=env["PATH"])
    assert jupyter and Path(jupyter).parent == venv / "bin", f"jupyter resolves to {jupyter}"
    share = str(venv / "share" / "jupyter")

    paths = json.loads(_run([jupyter, "--paths", "--json"], env=env, cwd=cwd, timeout=120,
                            what="jupyter --paths"))
    # in a venv jupyter_core puts the env's share/jupyter first, then JUPYTER_DATA_DIR
    assert env["JUPYTER_DATA_DIR"] in paths["data"], paths["data"]
    assert share in paths["data"], f"the venv's {share} is not on the data path: {paths['data']}"
    outer = [p for p in paths["data"] + paths["config"] if p.startswith(sys.prefix)]
    assert not outer, f"the outer venv's Jupyter paths leak in: {outer}"

    listing = ANSI.sub("", _run([jupyter, "labextension", "list"], env=env, cwd=cwd,
                                timeout=120, what="jupyter labextension list"))
    assert f"{share}/labextensions" in listing, listing
    manager = [line.split() for line in listing.splitlines() if LAB_MANAGER in line]
    assert manager and "enabled" in manager[0] and "OK" in manager[0], listing

    specs = json.loads(_run([jupyter, "kernelspec", "list", "--json"], env=env, cwd=cwd,
                            timeout=120, what="jupyter kernelspec list"))["kernelspecs"]
    assert "python3" in specs, specs
    resource_dir = Path(specs["python3"]["resource_dir"])
    assert resource_dir.is_relative_to(venv), f"python3 kernelspec outside the venv: {resource_dir}"


def _execute(
    run_dir: Path, env: dict[str, str], marker: str
) -> tuple[set[int], list[str], set[str]]:
    """Run the venv's ``jupyter nbconvert --execute`` on the copy in ``run_dir``, watching the
    processes it starts. Returns the ports they listened on, the kernel's command line and the
    names of the connection files seen in ``$TMPDIR``."""
    cmd = [
        "jupyter", "nbconvert", "--to", "notebook", "--execute", QUICKSTART.name,
        "--output", "executed", "--ExecutePreprocessor.timeout=120",
    ]
    log_path = run_dir / "nbconvert.log"
    ports: set[int] = set()
    kernel_cmd: list[str] = []
    connection_files: set[str] = set()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=run_dir, env=env, text=True, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + 420
    while proc.poll() is None:
        if time.monotonic() > deadline:
            _kill_group(proc)
            pytest.fail(f"nbconvert --execute timed out:\n{_tail(log_path.read_text())}")
        connection_files |= {p.name for p in Path(env["TMPDIR"]).glob("*.json")}
        for child in _marked(marker):
            ports |= _listening_ports(child)
            try:
                cmdline = child.cmdline()
            except psutil.Error:
                continue
            if "ipykernel_launcher" in cmdline:
                kernel_cmd = cmdline
        time.sleep(0.2)
    if proc.returncode != 0:
        pytest.fail(f"nbconvert --execute quickstart.ipynb failed (exit {proc.returncode}):\n"
                    f"{_tail(log_path.read_text())}")
    return ports, kernel_cmd, connection_files


def _check_outputs(nb: dict[str, Any]) -> list[str]:
    """No error output, every code cell ran, every ``%%taskapp`` cell shows the widget.
    Returns every text output (for the URLs and ports in it)."""
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert cells
    texts: list[str] = []
    magic_cells = 0
    for cell in cells:
        source = "".join(cell["source"])
        outputs = cell.get("outputs", [])
        assert cell.get("execution_count") is not None, f"cell did not run:\n{source}"
        errors = [o for o in outputs if o["output_type"] == "error"]
        assert not errors, f"{errors[0]['ename']}: {errors[0]['evalue']} in\n{source}"
        for out in outputs:
            if out["output_type"] == "stream":
                text = "".join(out["text"])
                assert "Traceback" not in text, f"a traceback on {out['name']} in\n{source}"
                texts.append(text)
            for value in out.get("data", {}).values():
                texts.append(value if isinstance(value, str) else json.dumps(value))
        if source.startswith("%%taskapp"):
            magic_cells += 1
            assert any(WIDGET_VIEW in o.get("data", {}) for o in outputs), (
                f"no {WIDGET_VIEW} output from\n{source}\noutputs: {json.dumps(outputs)[:2000]}"
            )
    assert magic_cells >= 1, "quickstart.ipynb has no %%taskapp cell"
    return texts
