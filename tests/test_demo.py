"""The path `make demo` takes, end to end inside `make test`: the offline defaults (embedded SmolLM2 student, heuristic
teacher, proxy judge and verifier, one process, no key, no network), through the tutorial notebook run with papermill
as a user runs it: its `#| pipeline` cells and every stage notebook's, at a size that fits the test budget."""
import json, subprocess
from conftest import ROOT, BIN

SMALL = ["data.n_train=2", "data.n_test=2", "data.test=[demo_test]", "generate.max_new_tokens=12",
         "systems=[sft, knowtuning]", "train.epochs=1", "eval.bootstrap=100"]


def test_the_demo_path_end_to_end_through_the_tutorial(tmp_path):
    out = tmp_path / "tutorial.ipynb"
    env_runs = tmp_path / "runs"
    r = subprocess.run([str(BIN / "papermill"), str(ROOT / "nbs" / "tutorial.ipynb"), str(out), "-p", "preset", "tiny",
                        "-p", "run_name", "demo", "-y", "overrides: [" + ", ".join(f"'{o}'" for o in SMALL) + "]",
                        "--cwd", str(tmp_path)], capture_output=True, text=True, timeout=900,
                       env={**__import__("os").environ, "KNOWTUNING_RUNS": str(env_runs), "OPENAI_API_KEY": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    run = env_runs / "demo"
    man = json.loads((run / "manifest.json").read_text())
    assert man["stages"]["pipeline"]["steps"] == ["ka", "kc", "train", "generate", "evaluate", "report"]  # no baselines
    nbs = {p.name for p in (run / "notebooks").glob("*.ipynb")}
    assert {"11_ka.ipynb", "12_kc.ipynb", "13_train.ipynb", "16_evaluate.ipynb", "17_report.ipynb"} <= nbs
    assert not [n for n in nbs if n.endswith(".failed.ipynb")]
    ka_nb = json.loads((run / "notebooks" / "11_ka.ipynb").read_text())       # its pipeline cells ran, assert included
    pipe = [c for c in ka_nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).startswith("#| pipeline")]
    assert len(pipe) == 2 and all(c.get("outputs") is not None and c.get("execution_count") for c in pipe)
    assert "KEEP" in json.dumps(pipe[1]["outputs"])
    for s in ("sft", "ka", "knowtuning"):                                       # one process, the embedded student
        assert man["stages"][f"train_{s}"]["processes"] == 1
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["teacher"] == "heuristic" and summary["judge"].startswith("proxy")
    assert {"teacher", "judge", "verifier"} <= set(summary["offline"])
    assert all(x["probe"] for x in summary["datasets"].values())             # the probes
    assert (run / "report" / "answers.html").stat().st_size > 2000
    tut = out.read_text()                                                       # the tutorial's own cells
    assert "Knowledge-comparison probe" in tut and "KEEP" in tut and '"ename"' not in tut
