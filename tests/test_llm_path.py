"""The LLM path end to end, on the shared smoke run (tests/conftest.py): every stage through an OpenAI-compatible
server on loopback, every call accounted, the served model's change reported, the plan close to the ledgers."""
import json
from conftest import BIN, SECRET, kt, llm_sets
from taskserver import TaskServer

EXPECT = {"ka": ["teacher"], "kc": ["teacher"], "prefs_rlaif": ["judge"], "prefs_facttune": ["teacher", "verifier"],
          "eval": ["teacher", "judge", "verifier"]}

def stages(run):
    return json.loads((run.dir / "manifest.json").read_text())["stages"]

def test_every_call_is_in_the_ledgers(smoke_run):
    m, s = stages(smoke_run), smoke_run.server
    total = 0
    for stage, roles in EXPECT.items():                 # every stage's calls, per role, with tokens and cost
        for role in roles:
            led = m[stage]["llm"][role]
            assert led["calls"] > 0 and led["prompt_tokens"] > 0 and led["cost_usd"] > 0, (stage, role, led)
            total += led["calls"]
    assert total == smoke_run.requests, (total, smoke_run.requests)   # nothing reached the server that they missed
    assert set(s.kinds) >= {"decompose", "rewrite", "rephrase", "revise", "judge", "verify", "abstain"}, s.kinds

def test_a_model_change_mid_run_is_in_the_ledgers_and_the_report(smoke_run):
    m, run = stages(smoke_run), smoke_run.dir
    judge = m["prefs_rlaif"]["llm"]["judge"]
    assert judge["served"] == {"judge-m": judge["calls"]} and judge["fingerprints"] == {"fp_1": judge["calls"]}
    assert "judge-m-v2" in m["eval"]["llm"]["judge"]["served"], m["eval"]["llm"]["judge"]
    report = (run / "report" / "report.md").read_text()
    assert "Warning: the judge changed within this run" in report and "judge-m-v2" in report
    assert "judge served by judge-m, judge-m-v2 (fp_1, fp_2)" in (run / "report" / "table_facts.md").read_text()

def test_malformed_answers_are_repaired_or_recorded_and_counted(smoke_run):
    run = smoke_run.dir
    assert smoke_run.server.repairs > 0
    fails = [json.loads(l) for l in (run / "eval" / "failures.jsonl").read_text().splitlines()]
    assert fails and all(f["error"] and f["name"] for f in fails)
    summary = json.loads((run / "eval" / "summary.json").read_text())
    judged_failed = sum(c["failed"] for x in summary["datasets"].values() for c in x["judge_calls"].values())
    verify_failed = sum(v["facts"]["verify_failed"] for x in summary["datasets"].values() for v in x["systems"].values())
    assert judged_failed + verify_failed + sum(f["role"] == "teacher" for f in fails) == len(fails) > 0
    table = (run / "report" / "table_judge.md").read_text()
    assert "judged / failed" in table and "llm:judge-m" in table
    for row in table.splitlines()[4:]:
        assert row.rstrip(" |").split("|")[-1].strip().count("/") == 1
    assert any(f["name"].startswith("judge demo_test: knowtuning vs ") for f in fails)   # which comparison failed
    ka_fail = [json.loads(l) for l in (run / "ka" / "failures.jsonl").read_text().splitlines()]
    assert ka_fail and all(f["error"] for f in ka_fail)     # there are failure rows, and every one says why

def test_the_plan_is_within_2x_of_the_ledgers_and_calls_nothing(smoke_run):
    "The plan made before the run is within 2x of what the ledgers recorded (calls incl. cache hits, and tokens)."
    from knowtuning.config import load_config
    from knowtuning.pipeline import plan, merge_plan
    m, n = stages(smoke_run), len(smoke_run.server.requests)
    cfg = load_config("smoke", overrides=[v for v in smoke_run.sets if v != "--set"])
    est = merge_plan(plan(cfg))
    assert {(r["stage"], r["role"]) for r in est} == {(st, ro) for st, roles in EXPECT.items() for ro in roles}
    for r in est:
        led = m[r["stage"]]["llm"][r["role"]]
        assert 0.5 <= (led["calls"] + led["cache_hits"]) / r["calls"] <= 2, (r, led)
    tot = lambda rows, k: sum(x[k] for x in rows)
    led_all = [x for st in EXPECT for x in m[st]["llm"].values()]
    assert 0.5 <= tot(led_all, "prompt_tokens") / tot(est, "prompt_tokens") <= 2
    assert 0.5 <= tot(led_all, "cost_usd") / tot(est, "cost_usd") <= 2
    out = kt("plan", "--preset", "smoke", *smoke_run.sets, env=smoke_run.env, cwd=smoke_run.root, check=True).stdout
    assert "prefs_rlaif" in out and "total" in out and len(smoke_run.server.requests) == n     # planning calls nothing

def test_a_new_run_of_the_same_config_is_answered_by_the_cache(smoke_run):
    n = len(smoke_run.server.requests)
    r = kt("ka", "--preset", "smoke", "--run", "again", *smoke_run.sets, env=smoke_run.env, cwd=smoke_run.root,
           timeout=900)
    assert r.returncode == 0 and len(smoke_run.server.requests) == n, r.stderr[-2000:]
    again = json.loads((smoke_run.root / "runs" / "again" / "manifest.json").read_text())["stages"]["ka"]["llm"]
    assert again["teacher"]["calls"] == 0 and again["teacher"]["cache_hits"] > 0

def test_a_teacher_that_fails_stops_the_run_where_it_fails(tmp_path):
    "Every answer malformed, even after the repair: KA stops with the counts, the reasons and the files to read."
    env = {"KNOWTUNING_RUNS": str(tmp_path / "runs"), "KT_TEST_KEY": SECRET}
    with TaskServer(broken_every=1) as s:
        r = kt("reproduce", "--preset", "smoke", *llm_sets(s.base_url, tmp_path / "cache.sqlite"), "--set",
               "student.model=tiny-random", env=env, cwd=tmp_path)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    err = r.stderr
    assert "step ka failed: YieldError: ka wrote 0 rewritten pairs from 6 inputs (below min_yield=0.2)" in err, err
    assert "6 answers without atoms (decomposition failed)" in err and "failures.jsonl" in err
    assert "the teacher may be too weak" in err and "Traceback" not in err
    partial = tmp_path / "runs" / "smoke" / ".ka.partial"
    rows = [json.loads(l) for l in (partial / "failures.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(f["task"] == "decompose" and f["error"] and f["raw"] for f in rows)
    assert not list((tmp_path / "runs" / "smoke").glob("train_*"))      # stopped before any training

def test_a_kill_during_kas_llm_calls_resumes_to_the_uninterrupted_result(smoke_run, tmp_path):
    """SIGKILL the KA stage's process tree at its first rewrite request (decompositions answered, rewrites in flight);
    run it again: the stage equals the shared smoke run's uninterrupted KA, the answered calls come from the cache, and
    only calls in flight at the kill are asked again."""
    import os, signal, subprocess, time
    from conftest import SMOKE_OVR, tree, freeze, signal_all
    from taskserver import classify
    victim = []

    class KillAtFirstRewrite(TaskServer):  # the smoke run's server: the same answers (a function of the prompt)
        def respond(self, body):
            if victim and classify(body["messages"][0]["content"]) == "rewrite":
                signal_all(freeze(victim.pop()), signal.SIGKILL)
            return super().respond(body)

    env = {**os.environ, "KT_TEST_KEY": SECRET}
    with KillAtFirstRewrite(malformed_every=5, broken_every=11, upgrade_on="abstain") as s:
        sets = llm_sets(s.base_url, tmp_path / "cache.sqlite") + [a for o in SMOKE_OVR for a in ("--set", o)]
        cmd = [str(BIN / "knowtuning"), "ka", "--preset", "smoke", *sets, "--runs-dir", str(tmp_path / "runs")]
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        victim.append(p.pid)
        out = p.communicate(timeout=600)[0].decode()
        assert p.returncode == -signal.SIGKILL and not victim, out[-2000:]
        before = len(s.requests)
        t0 = time.time()
        while [q for q in tree(p.pid) if q != p.pid] and time.time() - t0 < 30:   # nothing of it still running
            time.sleep(0.5)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ka, ref = tmp_path / "runs" / "smoke" / "ka", smoke_run.dir / "ka"
    for f in ("atoms.jsonl", "ppl.jsonl", "ka_trl.jsonl", "failures.jsonl"):
        rows = lambda d: sorted((d / f).read_text().splitlines())
        assert rows(ka) == rows(ref), f
    asked = [json.dumps(b["messages"], sort_keys=True) for b in s.requests]
    ledger = json.loads((tmp_path / "runs" / "smoke" / "manifest.json").read_text())["stages"]["ka"]["llm"]["teacher"]
    assert len(set(asked)) == stages(smoke_run)["ka"]["llm"]["teacher"]["calls"]  # every call the smoke run made
    assert ledger["cache_hits"] >= 6 and ledger["calls"] == len(asked) - before    # decompositions from the cache
    twice = {a for a in asked if asked.count(a) > 1}                 # asked again: only rewrites (sent before the kill)
    assert twice and all(classify(json.loads(a)[0]["content"]) == "rewrite" for a in twice), len(twice)
