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
    if not RELEASE_DATA.is_dir(): pytest.skip("../shared/data/knowtuning-release is absent")
    return RELEASE_DATA

# ../shared (beside the checkout) holds the release's data, scripts and a token-id fixture for the tests only: the
# product never looks there. Tests that need it skip cleanly when it is absent.
SHARED = ROOT.parent / "shared"
RELEASE_DATA = SHARED / "data" / "knowtuning-release"
if RELEASE_DATA.is_dir(): os.environ.setdefault("KNOWTUNING_RELEASE_DATA", str(RELEASE_DATA))

@pytest.fixture
def shared():
    if not SHARED.is_dir(): pytest.skip("../shared is absent")
    return SHARED
