"End to end: the smoke preset through papermill, kill and resume, rerun does no work; the API key never lands on disk."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
from conftest import ROOT, BIN, kt

TABLES = ["table_probe", "table_probe_atoms", "table_metrics", "table_diffs", "table_judge", "table_facts", "table_ablation"]

def builds(run_dir: Path) -> dict:
    m = json.loads((run_dir / "manifest.json").read_text())["stages"]
    return {k: (v.get("builds"), v.get("built")) for k, v in m.items() if "builds" in v}

def outside_files(tmp_path, run_dir) -> set:
    "Every file a run could wrongly write to: the checkout (minus its environment), the asset cache, the cwd."
    from knowtuning.assets import home
    skip = {".venv", ".git", "_docs", "runs", "__pycache__", ".pytest_cache", ".ipynb_checkpoints"}
    files = {p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)}
    files |= {p for p in home().rglob("*") if p.is_file()}
    return files | {p for p in tmp_path.rglob("*") if p.is_file() and run_dir not in p.parents}

# the training steps in two real processes (torchrun, gloo): the pipeline a GPU user runs with --launcher; the
# single-process pipeline runs end to end in tests/test_llm_path.py
REPRODUCE = [str(BIN / "knowtuning"), "reproduce", "--preset", "smoke", "--launcher", "torchrun --nproc_per_node 2",
             "--set", "train.per_device_batch=1"]

def trainers() -> str:
    "Training processes still alive (a killed pipeline must not leave any behind)."
    r = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True)
    return "\n".join(l for l in r.stdout.splitlines() if "knowtuning.cli train-run" in l or "torchrun" in l)

def test_smoke_end_to_end_kill_resume_and_rerun(tmp_path):
    env = {**os.environ, "KNOWTUNING_RUNS": str(tmp_path)}
    run_dir = tmp_path / "smoke"
    outside = outside_files(tmp_path, run_dir)
    # 1. start, and kill the whole process group once training has written its first checkpoint
    p = subprocess.Popen(REPRODUCE, env=env, cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while not list(run_dir.glob(".train_*.partial/checkpoints/checkpoint-*")) and time.time() - t0 < 600 and p.poll() is None:
        time.sleep(0.5)
    assert p.poll() is None, p.stdout.read().decode()[-3000:]
    os.killpg(p.pid, signal.SIGKILL); p.wait()
    t0 = time.time()
    while trainers() and time.time() - t0 < 60: time.sleep(1)     # the launcher dies with its kernel, and its workers
    assert not trainers(), trainers()
    before = builds(run_dir)
    assert {"ka", "kc"} <= set(before) and not (run_dir / "report").exists()
    partial = list(run_dir.glob(".train_*.partial"))
    assert partial
    # 2. restart: completes without redoing finished stages
    r = subprocess.run(REPRODUCE, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "IPKernelApp" not in r.stdout + r.stderr                          # kernel chatter goes to the step logs
    assert (run_dir / "notebooks" / "08_train.log").exists()
    after = builds(run_dir)
    for s, b in before.items(): assert after[s] == b, (s, b, after[s])       # not rebuilt
    for t in TABLES:
        for ext in ("md", "csv", "tex"): assert (run_dir / "report" / f"{t}.{ext}").stat().st_size > 50
    assert (run_dir / "report" / "judge.png").exists() and (run_dir / "report" / "judge.svg").exists()
    assert (run_dir / "report" / "probe.png").stat().st_size > 5000               # the probes lead the report
    report = (run_dir / "report" / "report.md").read_text()
    assert report.index("Knowledge-comparison probe") < report.index("Automatic metrics") and "**Probes (demo_test" in report
    import csv
    probe = list(csv.DictReader(open(run_dir / "eval" / "probe.csv")))
    assert {r["model"] for r in probe} == {"base", "sft", "knowtuning", "rlaif", "facttune", "wo_factuality"}
    assert {r["aspect"] for r in probe} == {"completeness", "factuality", "logicality"}
    for nb in ("06_ka", "07_kc", "08_train", "09_baselines", "10_generate", "14_evaluate", "15_report"):
        assert (run_dir / "notebooks" / f"{nb}.ipynb").exists()
    text = (run_dir / "report" / "table_judge.md").read_text()
    assert "PROXY" in text and "preset smoke" in text and "student smollm2" in text
    assert {"train_sft", "train_ka", "train_knowtuning", "train_rlaif", "train_facttune", "train_wo_factuality",
            "samples_sft", "prefs_rlaif", "prefs_facttune", "gen_knowtuning", "eval", "report"} <= set(after)
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    for s in ("sft", "ka", "knowtuning", "wo_factuality", "rlaif", "facttune"):        # train and baselines steps
        assert (stages[f"train_{s}"]["processes"], stages[f"train_{s}"]["effective_batch"]) == (2, 2), s
    new = outside_files(tmp_path, run_dir) - outside
    assert not new, f"files written outside the run folder: {sorted(map(str, new))[:10]}"
    # 3. rerun: every stage skipped
    t1 = time.time()
    r = subprocess.run(REPRODUCE, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0
    assert builds(run_dir) == after
    print(f"rerun of a finished smoke run: {time.time() - t1:.1f} s")

def test_api_key_never_written(tmp_path):
    from fakeserver import FakeServer
    secret = "sk-test-" + "7f3a9c1e5b2d4680" * 2
    env = {**os.environ, "KNOWTUNING_RUNS": str(tmp_path / "runs"), "KT_TEST_KEY": secret}
    with FakeServer() as s:
        sets = ["--set", "teacher.backend=llm", "--set", f"teacher.base_url={s.base_url}", "--set", "teacher.model=fake",
                "--set", "teacher.api_key_env=KT_TEST_KEY", "--set", f"teacher.cache={tmp_path / 'cache.sqlite'}", "--set", "data.n_train=3"]
        logs = ""
        for step in ("ka", "kc"):
            r = subprocess.run([str(BIN / "knowtuning"), step, "--preset", "smoke", *sets], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
            logs += r.stdout + r.stderr
            assert r.returncode == 0, logs[-3000:]
        assert s.auth and all(a == f"Bearer {secret}" for a in s.auth)     # the key was really used
    (tmp_path / "logs.txt").write_text(logs)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ipynb" for p in files) and any(p.name == "manifest.json" for p in files) and any(p.name == "cache.sqlite" for p in files)
    leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert leaks == []
    assert "KT_TEST_KEY" in (tmp_path / "runs" / "smoke" / "config.yaml").read_text()   # only the variable's name

@pytest.mark.slow  # builds the site, executing the tutorial's smoke run
def test_docs_site_in_headless_chromium(tmp_path):
    "The Sphinx site, served on loopback: math typeset offline, search finds a term, no nbdev directives, a real page."
    import shutil, socket
    import matplotlib.image as mpimg
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium: pytest.skip("chromium is not installed (tools/install.sh installs Debian's chromium)")
    r = kt("docs", env={"KNOWTUNING_RUNS": str(tmp_path)}, timeout=1500)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    site = ROOT / "_docs"
    assert not (ROOT / "jupyter_execute").exists()       # nothing of the build lands in the checkout but _docs/
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    srv = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(site)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    def dom(page):
        return subprocess.run([chromium, *flags, "--dump-dom", f"http://127.0.0.1:{port}/{page}"], capture_output=True,
                              text=True, timeout=120).stdout
    try:
        time.sleep(1)
        assert "knowtuning" in dom("index.html").lower()
        tut = dom("tutorial.html")                          # the executed tutorial, with its figures
        assert 'data-images-ok="true"' in tut, tut[-500:]
        assert int(tut.split('data-images="')[1].split('"')[0]) >= 3
        ka = dom("06_ka.html")                              # math typeset by the site's own MathJax
        assert ka.count('class="MathJax"') >= 5 and 'class="MathJax_Display"' in ka
        assert "#| export" not in ka and "default_exp" not in ka
        found = dom("search.html?q=perplexity")             # Sphinx's offline search
        assert "Search finished" in found and 'href="06_ka.html' in found, found[-1500:]
        api = dom("api.html")                               # the API reference from the docstrings
        assert "ppl_packed" in api and "one forward pass per question" in api
        shot = site / "06_ka.png"
        subprocess.run([chromium, *flags, "--window-size=1280,1400", f"--screenshot={shot}",
                        f"http://127.0.0.1:{port}/06_ka.html"], capture_output=True, timeout=120)
        img = mpimg.imread(shot)
        assert img.shape[0] >= 1000 and img[..., :3].std() > 0.1     # a rendered page, not a blank one
    finally:
        srv.terminate()
        srv.wait()
