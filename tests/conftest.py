import os, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long tests (run with KNOWTUNING_SLOW=1 / make test-slow)")

def kt(*args, env=None, cwd=None, timeout=900, check=False):
    "Run the `knowtuning` console command in a subprocess."
    e = {**os.environ, **(env or {})}
    r = subprocess.run([str(BIN / "knowtuning"), *map(str, args)], capture_output=True, text=True, env=e, cwd=cwd or ROOT, timeout=timeout)
    if check and r.returncode != 0: raise AssertionError(f"knowtuning {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r

@pytest.fixture
def release():
    from knowtuning.data import release_dir
    d = release_dir()
    if d is None: pytest.skip("../shared/data/knowtuning-release is absent")
    return d
