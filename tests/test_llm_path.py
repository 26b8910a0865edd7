"The LLM path end to end: every stage through an OpenAI-compatible server on loopback, every call accounted."
import json, os, subprocess
from pathlib import Path
from conftest import BIN, kt
from taskserver import TaskServer

SECRET = "sk-test-" + "c0ffee11deadbeef" * 2

def llm_sets(url, cache):
    out = []
    for role, model in (("teacher", "teacher-m"), ("judge", "judge-m")):
        out += ["--set", f"{role}.backend=llm", "--set", f"{role}.base_url={url}", "--set", f"{role}.model={model}",
                "--set", f"{role}.api_key_env=KT_TEST_KEY", "--set", f"{role}.cache={cache}",
                "--set", f"{role}.prices={{{model}: [2.0, 8.0]}}", "--set", f"{role}.backoff=0.01"]
    return out

def test_llm_path_end_to_end(tmp_path):
    env = {"KNOWTUNING_RUNS": str(tmp_path / "runs"), "KT_TEST_KEY": SECRET}
    # from the first abstention question on (evaluation), the server reports a new model and fingerprint: a provider
    # upgrading the model behind an alias mid-run
    with TaskServer(malformed_every=5, broken_every=11, upgrade_on="abstain") as s:
        sets = llm_sets(s.base_url, tmp_path / "cache.sqlite")
        r = kt("reproduce", "--preset", "smoke", *sets, env=env, cwd=tmp_path, timeout=1500)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        n_first = len(s.requests)
        run = tmp_path / "runs" / "smoke"
        m = json.loads((run / "manifest.json").read_text())["stages"]
        # every stage's calls are in the manifest, per role, with tokens and cost
        expect = {"ka": ["teacher"], "kc": ["teacher"], "prefs_rlaif": ["judge"], "prefs_facttune": ["teacher", "verifier"],
                  "eval": ["teacher", "judge", "verifier"]}
        total = 0
        for stage, roles in expect.items():
            for role in roles:
                led = m[stage]["llm"][role]
                assert led["calls"] > 0 and led["prompt_tokens"] > 0 and led["cost_usd"] > 0, (stage, role, led)
                total += led["calls"]
        assert total == n_first, (total, n_first)           # nothing went to the server that the ledgers missed
        assert set(s.kinds) >= {"decompose", "rewrite", "rephrase", "revise", "judge", "verify", "abstain"}, s.kinds
        # the served model and fingerprint are in the ledgers; the change mid-run is a warning in the report
        assert m["prefs_rlaif"]["llm"]["judge"]["served"] == {"judge-m": m["prefs_rlaif"]["llm"]["judge"]["calls"]}
        assert m["prefs_rlaif"]["llm"]["judge"]["fingerprints"] == {"fp_1": m["prefs_rlaif"]["llm"]["judge"]["calls"]}
        assert "judge-m-v2" in m["eval"]["llm"]["judge"]["served"], m["eval"]["llm"]["judge"]
        report = (run / "report" / "report.md").read_text()
        assert "Warning: the judge changed within this run" in report and "judge-m-v2" in report
        assert "judge served by judge-m, judge-m-v2 (fp_1, fp_2)" in (run / "report" / "table_facts.md").read_text()
        # malformed answers were repaired; those that stayed malformed are recorded and counted in the tables
        assert s.repairs > 0
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
        # the plan made before the run is within 2x of what the ledgers recorded (calls incl. cache hits, and tokens)
        from knowtuning.config import load_config
        from knowtuning.pipeline import plan, merge_plan
        cfg = load_config("smoke", overrides=[v for v in sets if v != "--set"])
        est = merge_plan(plan(cfg))
        assert {(r["stage"], r["role"]) for r in est} == {(st, ro) for st, roles in expect.items() for ro in roles}
        for r in est:
            led = m[r["stage"]]["llm"][r["role"]]
            assert 0.5 <= (led["calls"] + led["cache_hits"]) / r["calls"] <= 2, (r, led)
        tot = lambda rows, k: sum(x[k] for x in rows)
        led_all = [x for st in expect for x in m[st]["llm"].values()]
        assert 0.5 <= tot(led_all, "prompt_tokens") / tot(est, "prompt_tokens") <= 2
        assert 0.5 <= tot(led_all, "cost_usd") / tot(est, "cost_usd") <= 2
        out = kt("plan", "--preset", "smoke", *sets, env=env, cwd=tmp_path, check=True).stdout
        assert "prefs_rlaif" in out and "total" in out and len(s.requests) == n_first      # planning calls nothing
        ka_fail = [json.loads(l) for l in (run / "ka" / "failures.jsonl").read_text().splitlines()]
        assert all(f["error"] for f in ka_fail)                 # every failure row says why
        # a second identical reproduce makes no HTTP request; a new run of the same config is answered by the cache
        r = kt("reproduce", "--preset", "smoke", *sets, env=env, cwd=tmp_path, timeout=900)
        assert r.returncode == 0 and len(s.requests) == n_first
        r = kt("ka", "--preset", "smoke", "--run", "again", *sets, env=env, cwd=tmp_path, timeout=900)
        assert r.returncode == 0 and len(s.requests) == n_first
        again = json.loads((tmp_path / "runs" / "again" / "manifest.json").read_text())["stages"]["ka"]["llm"]["teacher"]
        assert again["calls"] == 0 and again["cache_hits"] > 0
        assert all(a == f"Bearer {SECRET}" for a in s.auth)      # the key was really sent ...
    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []                                          # ... and never written anywhere

def test_a_teacher_that_fails_stops_the_run_where_it_fails(tmp_path):
    "Every answer malformed, even after the repair: KA stops with the counts, the reasons and the files to read."
    env = {"KNOWTUNING_RUNS": str(tmp_path / "runs"), "KT_TEST_KEY": SECRET}
    with TaskServer(broken_every=1) as s:
        r = kt("reproduce", "--preset", "smoke", *llm_sets(s.base_url, tmp_path / "cache.sqlite"), env=env, cwd=tmp_path)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    err = r.stderr
    assert "step ka failed: YieldError: ka wrote 0 rewritten pairs from 6 inputs (below min_yield=0.2)" in err, err
    assert "6 answers without atoms (decomposition failed)" in err and "failures.jsonl" in err
    assert "the teacher may be too weak" in err and "Traceback" not in err
    partial = tmp_path / "runs" / "smoke" / ".ka.partial"
    rows = [json.loads(l) for l in (partial / "failures.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(f["task"] == "decompose" and f["error"] and f["raw"] for f in rows)
    assert not list((tmp_path / "runs" / "smoke").glob("train_*"))      # stopped before any training
