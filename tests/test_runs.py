"One writer per run folder, with real concurrent processes; a failed step never replaces a finished step's record."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
from conftest import kt

HOLD = """import sys, time
from knowtuning.config import load_config
from knowtuning.runs import Run
run = Run(load_config("smoke"), sys.argv[1], "twin")
with run.stage("ka", "fp") as d:
    print("building", flush=True)
    time.sleep(120)
"""


def _holder(root: Path):
    env = {k: v for k, v in os.environ.items() if k != "KNOWTUNING_RUN_LOCK"}
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "building"
    return p


def test_a_second_writer_is_refused_at_once_and_a_dead_holders_lock_is_taken_over(tmp_path):
    p = _holder(tmp_path)
    try:
        before = (tmp_path / "twin" / "config.yaml").read_text()
        t0 = time.time()
        r = kt("reproduce", "--preset", "tiny", "--run", "twin", "--runs-dir", tmp_path, timeout=120)
        assert r.returncode != 0 and time.time() - t0 < 60, r
        lock = json.loads((tmp_path / "twin" / ".lock").read_text())
        assert f"in use by process {p.pid} on {lock['host']} since {lock['started']}" in r.stderr + r.stdout, r
        assert (tmp_path / "twin" / "config.yaml").read_text() == before  # the tiny config did not replace smoke's
        assert not (tmp_path / "twin" / "notebooks").exists()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    r = subprocess.run([sys.executable, "-c", "from knowtuning.config import load_config; from knowtuning.runs import "
                        f"Run; Run(load_config('smoke'), {str(tmp_path)!r}, 'twin')"], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "KNOWTUNING_RUN_LOCK"})
    assert r.returncode == 0 and f"left by process {p.pid} on " in r.stdout and "no longer running" in r.stdout, r
    assert (tmp_path / "twin" / ".lock").read_text() == ""  # released cleanly: nothing left to take over


def test_a_failed_step_keeps_the_finished_steps_notebook_and_the_failed_one_beside_it(tmp_path):
    from knowtuning.config import load_config
    from knowtuning.pipeline import StepError, run_step
    from knowtuning.runs import Run

    run = Run(load_config("smoke"), tmp_path, "r")
    before = os.environ.get("IN_TEST")
    good = run_step(run, "report", "17_report.ipynb")  # no eval stage yet: the report step has nothing to do
    assert os.environ.get("IN_TEST") == before  # set for the kernel only: nbdev_export here keeps working
    kept = good.read_bytes()
    (run.dir / "config.yaml").write_text("train: {lr: [not, a, number]}\n")  # the next attempt fails
    with pytest.raises(StepError, match="17_report.failed.ipynb"):
        run_step(run, "report", "17_report.ipynb")
    assert good.read_bytes() == kept and (run.dir / "notebooks" / "17_report.failed.ipynb").exists()
    assert not list((run.dir / "notebooks").glob(".*running*"))


def test_the_readmes_papermill_run_of_a_stage_notebook(tmp_path):
    "The README's direct papermill command (one `-p overrides key=value` string) builds the stage in the run folder."
    import shlex
    from conftest import ROOT, BIN

    lines = [l for l in (ROOT / "README.md").read_text().splitlines() if l.startswith("papermill nbs/11_ka.ipynb")]
    assert lines, "the README shows no direct papermill run of 11_ka"
    cmd = shlex.split(lines[0].replace("runs/mine", str(tmp_path / "mine")))
    (tmp_path / "mine" / "notebooks").mkdir(parents=True)
    before = {p: p.stat().st_mtime for p in (ROOT / "knowtuning").glob("*.py")}
    r = subprocess.run([str(BIN / cmd[0]), *cmd[1:], "-p", "runs_dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "alpha: 0.3" in (tmp_path / "mine" / "config.yaml").read_text()
    assert (tmp_path / "mine" / "ka" / "_done.json").exists() and (tmp_path / "mine" / "notebooks" / "11_ka.ipynb").exists()
    assert {p: p.stat().st_mtime for p in (ROOT / "knowtuning").glob("*.py")} == before  # no re-export under papermill


def test_a_kill_between_the_stage_rename_and_the_manifest_update(tmp_path):
    "The stage folder is in place but the manifest never heard of it: the next run skips the stage and records it."
    code = f"""import os, sys
import knowtuning.runs as R
from knowtuning.config import load_config
orig = R.Run.update_stage
R.Run.update_stage = lambda self, st, **kw: os._exit(9) if "builds" in kw else orig(self, st, **kw)
run = R.Run(load_config("smoke"), {str(tmp_path)!r}, "k")
with run.stage("ka", "fp1") as d:
    (d / "out.txt").write_text("built")
"""
    env = {k: v for k, v in os.environ.items() if k != "KNOWTUNING_RUN_LOCK"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 9, r.stderr
    from knowtuning.config import load_config
    from knowtuning.runs import Run
    run = Run(load_config("smoke"), tmp_path, "k")
    assert run.done("ka", "fp1") and "ka" not in run.manifest["stages"]
    with run.stage("ka", "fp1") as d:
        assert d is None                                                    # not rebuilt
    assert run.manifest["stages"]["ka"]["fingerprint"] == "fp1" and (run.path("ka") / "out.txt").read_text() == "built"



GEN = """import os, signal, sys
import knowtuning.generate as G
from knowtuning.config import load_config
from knowtuning.runs import Run
cfg = load_config("smoke", overrides=["student.model=tiny-random", "generate.batch_size=1", "data.n_test=4",
                                      "generate.max_new_tokens=16"])
run = Run(cfg, sys.argv[1], "killed")
if sys.argv[2] == "kill":   # SIGKILL halfway through writing the third answer's row
    real, n = G.append_predictions, [0]
    def append(path, ds, idx, texts):
        n[0] += 1
        if n[0] == 3:
            with open(path, "a") as f:
                f.write('{"index": %d, "question": "' % idx[0])
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, ds, idx, texts)
    G.append_predictions = append
G.generate_stage(cfg, run, "base")                  # resumed (after the kill)
G.generate_stage(cfg, Run(cfg, sys.argv[1], "clean"), "base")   # and never interrupted
"""


def test_a_kill_mid_write_during_generation_resumes_to_the_uninterrupted_answers(tmp_path):
    "Killed while writing an answer: the next run drops the half line, answers only what is left, equals a clean run."
    env = {k: v for k, v in os.environ.items() if k != "KNOWTUNING_RUN_LOCK"}
    gen = lambda mode: subprocess.run([sys.executable, "-c", GEN, str(tmp_path), mode], capture_output=True, text=True,
                                      env=env, timeout=600)
    r = gen("kill")
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    partial = tmp_path / "killed" / ".gen_base.partial" / "demo_test.partial.jsonl"
    assert partial.read_text().count("\n") == 2 and not partial.read_text().endswith("\n")   # 2 rows and a half
    r = gen("-")
    assert r.returncode == 0 and "dropped a partly written last line" in r.stderr, r.stderr[-2000:]
    rows = lambda name: (tmp_path / name / "gen_base" / "demo_test.jsonl").read_text()
    assert rows("killed") == rows("clean") and rows("clean").count("\n") == 4
    man = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert man["stages"]["gen_base"]["generated"] == 2                   # only the two unanswered questions
