"The package works however it is installed: a wheel in a fresh virtualenv, run from an empty directory."
import pytest
import os, shutil, subprocess, sys, sysconfig
from pathlib import Path
from conftest import ROOT, BIN

def run(cmd, **kw):
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r

@pytest.mark.slow  # builds a wheel, a venv, and a smoke run
def test_wheel_in_a_fresh_venv_from_an_empty_directory(tmp_path):
    src = tmp_path / "src"                      # build from a copy of the tracked files: nothing lands in the checkout
    for f in run(["git", "ls-files"], cwd=ROOT).stdout.split():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    run([BIN / "python", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", src],
        timeout=600)
    wheel = next((tmp_path / "dist").glob("knowtuning-*.whl"))
    venv = tmp_path / "venv"
    run([BIN / "python", "-m", "venv", venv])
    py = venv / "bin" / "python"
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # reuse the installed dependencies (torch, trl, ...) without the checkout's own editable knowtuning
    (site / "_reuse_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], timeout=600)
    run([py, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"])   # papermill's kernel: this venv
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("KNOWTUNING_RUNS", "PYTHONPATH")}
    where = run([py, "-c", "import knowtuning.config as c; print(c.__file__); print(c.project_root())"], cwd=empty, env=env)
    pkg, root = where.stdout.split()
    assert pkg.startswith(str(venv)) and root == str(venv / "share" / "knowtuning"), where.stdout
    knowtuning = venv / "bin" / "knowtuning"
    assert "name: tiny" in run([knowtuning, "config", "--preset", "tiny"], cwd=empty, env=env).stdout
    # the smoke preset, trimmed to one system: every step notebook runs from the installed copy
    run([knowtuning, "reproduce", "--preset", "smoke", "--set", "systems=[sft]"], cwd=empty, env=env, timeout=1500)
    assert (empty / "runs" / "smoke" / "report" / "report.md").exists()                 # runs land in ./runs
    assert not (venv / "share" / "knowtuning" / "runs").exists()                         # never inside the environment


def test_papermill_imports_without_building_the_iri_grammar():
    "tools/install.sh removes rfc3987-syntax: jsonschema built its parser in every process that imports papermill."
    r = run([BIN / "python", "-c", "import sys, papermill, jsonschema; print('rfc3987_syntax' in sys.modules)"])
    assert r.stdout.strip() == "False", "rfc3987-syntax is installed again (tools/install.sh removes it)"
