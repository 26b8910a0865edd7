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

def _absent(what):
    "Skip a test whose ../shared input is absent; in CI (KNOWTUNING_REQUIRE_SHARED=1, set by .ci/run), fail it."
    if os.environ.get("KNOWTUNING_REQUIRE_SHARED") == "1":
        pytest.fail(f"{what} is absent, and CI always has it (KNOWTUNING_REQUIRE_SHARED=1)")
    pytest.skip(f"{what} is absent")

@pytest.fixture
def release():
    if not RELEASE_DATA.is_dir(): _absent("../shared/data/knowtuning-release")
    return RELEASE_DATA

# ../shared (beside the checkout) holds the release's data, scripts and a token-id fixture for the tests only: the
# product never looks there. Tests that need it skip cleanly when it is absent.
SHARED = ROOT.parent / "shared"
RELEASE_DATA = SHARED / "data" / "knowtuning-release"
if RELEASE_DATA.is_dir(): os.environ.setdefault("KNOWTUNING_RELEASE_DATA", str(RELEASE_DATA))

@pytest.fixture
def shared():
    if not SHARED.is_dir(): _absent("../shared")
    return SHARED

# --- one smoke run, shared by every test that only reads it -------------------------------------------------------
# The smoke preset on the 2-layer random student (the machinery is under test, not the model), every LLM role on a
# scripted loopback server, training in two real processes (torchrun, gloo), killed once training has written its
# first checkpoint and then resumed. Tests of the pipeline, the LLM path, the launcher and the report read it.
SECRET = "sk-test-" + "c0ffee11deadbeef" * 2
SMOKE_OVR = ["student.model=tiny-random", "train.per_device_batch=1"]
TORCHRUN = "torchrun --nproc_per_node 2"

def llm_sets(url, cache) -> list:
    out = []
    for role, model in (("teacher", "teacher-m"), ("judge", "judge-m")):
        out += ["--set", f"{role}.backend=llm", "--set", f"{role}.base_url={url}", "--set", f"{role}.model={model}",
                "--set", f"{role}.api_key_env=KT_TEST_KEY", "--set", f"{role}.cache={cache}",
                "--set", f"{role}.prices={{{model}: [2.0, 8.0]}}", "--set", f"{role}.backoff=0.01"]
    return out

def builds(run_dir: Path) -> dict:
    import json
    m = json.loads((run_dir / "manifest.json").read_text())["stages"]
    return {k: (v.get("builds"), v.get("built")) for k, v in m.items() if "builds" in v}

def outside_files(root: Path, run_dir: Path) -> set:
    "Every file a run could wrongly write to: the checkout (minus its environment), the asset cache, `root`."
    from knowtuning.assets import home
    skip = {".venv", ".git", "_docs", "runs", "__pycache__", ".pytest_cache", ".ipynb_checkpoints"}
    files = {p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)}
    files |= {p for p in home().rglob("*") if p.is_file()}
    return files | {p for p in root.rglob("*") if p.is_file() and run_dir not in p.parents}

def tree(pid: int) -> list[int]:
    "pid and its descendants, across sessions (the kernel runs in its own)."
    kids = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo += kids.get(out[-1], [])
    return out

def signal_all(pids, sig) -> None:
    for q in pids:
        try:
            os.kill(q, sig)
        except ProcessLookupError:
            pass

def freeze(pid: int) -> list[int]:
    "SIGSTOP pid's process tree, children forked meanwhile included; returns the tree."
    import signal
    seen = []
    while new := [q for q in tree(pid) if q not in seen]:
        signal_all(new, signal.SIGSTOP)
        seen += new
    return seen

def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""

def alive(pids) -> list[str]:
    out = []
    for q in pids:
        try:
            st = Path(f"/proc/{q}/stat").read_text()
        except OSError:
            continue
        if st.rsplit(")", 1)[1].split()[0] != "Z":  # a zombie has exited; only its parent has not reaped it
            out.append(cmdline(q)[:200])
    return out

@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    "The shared smoke run (see above): a namespace with its folder, the server, the command and what each part saw."
    import signal, time
    from types import SimpleNamespace
    sys.path.insert(0, str(ROOT / "tests"))
    from taskserver import TaskServer
    root = tmp_path_factory.mktemp("smoke_run")
    env = {**os.environ, "KNOWTUNING_RUNS": str(root / "runs"), "KT_TEST_KEY": SECRET}
    run_dir = root / "runs" / "smoke"
    # from the first abstention question on (evaluation), the server reports a new model and fingerprint: a provider
    # upgrading the model behind an alias mid-run
    with TaskServer(malformed_every=5, broken_every=11, upgrade_on="abstain") as s:
        sets = llm_sets(s.base_url, root / "llm-cache" / "cache.sqlite") + [a for o in SMOKE_OVR for a in ("--set", o)]
        cmd = [str(BIN / "knowtuning"), "reproduce", "--preset", "smoke", *sets, "--launcher", TORCHRUN]
        outside = outside_files(root, run_dir)
        # 1. start, and kill the run in the middle of a training, once it has written a checkpoint. The run's
        # process tree is frozen first (SIGSTOP): a 2-step training on the random student finishes within the
        # poll's interval, so the state is checked, frozen, before anything is killed. Then every process but the
        # kernel is killed (as a machine-wide kill would); the kernel, its parent gone, must exit by itself.
        p = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
        t0, procs = time.time(), []
        # a complete checkpoint (its trainer_state.json is written last): the rerun must resume from it on both ranks
        mid_training = lambda: list(run_dir.glob(".train_*.partial/checkpoints/checkpoint-*/trainer_state.json"))
        while not procs and time.time() - t0 < 600 and p.poll() is None:
            time.sleep(0.2)
            if mid_training():
                frozen = freeze(p.pid)
                if mid_training():   # still mid-training once frozen; else it finished meanwhile: wait for the next
                    procs = frozen
                else:
                    signal_all(frozen, signal.SIGCONT)
        if not procs:                   # nothing left behind by a failed start
            signal_all(tree(p.pid), signal.SIGKILL)
            raise AssertionError(f"no training was caught mid-way:\n{p.communicate()[0].decode()[-3000:]}")
        caught = sorted({f.parent.name for f in mid_training()}, key=lambda n: int(n.split("-")[-1]))
        kernels = [q for q in procs if "ipykernel" in cmdline(q)]
        signal_all([q for q in procs if q not in kernels], signal.SIGKILL)
        signal_all(kernels, signal.SIGCONT)
        p.wait()
        t0 = time.time()
        while alive(procs) and time.time() - t0 < 60:
            time.sleep(1)
        killed = SimpleNamespace(trainers=alive(procs), builds=builds(run_dir),
                                 partial=[p.name for p in run_dir.glob(".train_*.partial")],
                                 report=(run_dir / "report").exists(), checkpoint=caught[-1])
        # 2. restart: completes without redoing finished stages
        t0 = time.time()
        r = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=1500)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        yield SimpleNamespace(dir=run_dir, root=root, server=s, cmd=cmd, sets=sets, env=env, killed=killed,
                              resumed=r, resume_s=time.time() - t0, requests=len(s.requests),
                              new_outside={f for f in outside_files(root, run_dir) - outside
                                           if root / "llm-cache" not in f.parents})   # the cache's folder is chosen

# --- headless Chromium on a loopback static server -----------------------------------------------------------------
def chromium_or_skip():
    import shutil
    c = shutil.which("chromium") or shutil.which("chromium-browser")
    if not c: pytest.skip("chromium is not installed (tools/install.sh installs Debian's chromium)")
    return c

class StaticSite:
    "A folder served on loopback by http.server; `failed()` lists the requests that were not answered 200/304."
    def __init__(self, folder, tmp):
        import socket
        self.folder, self.tmp, self.log = Path(folder), Path(tmp), Path(tmp) / "http.log"
        with socket.socket() as so:
            so.bind(("127.0.0.1", 0)); self.port = so.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
                                      "--directory", str(folder)], stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        import time; time.sleep(0.8)
    def url(self, page): return f"http://127.0.0.1:{self.port}/{page}"
    def failed(self):
        return [l for l in self.log.read_text().splitlines() if '"GET ' in l and not any(f'" {c} ' in l for c in (200, 304))
                and "favicon.ico" not in l]
    def close(self): self.proc.terminate(); self.proc.wait()

def chromium(url, tmp, *extra, budget=10000):
    "The DOM of `url` after `budget` ms of virtual time in headless Chromium (`extra`: e.g. --screenshot=...)."
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={Path(tmp) / 'chromium-profile'}", f"--virtual-time-budget={budget}"]
    return subprocess.run([chromium_or_skip(), *flags, *(extra or ("--dump-dom",)), url], capture_output=True,
                          text=True, timeout=180).stdout
