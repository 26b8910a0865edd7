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
    with TaskServer() as s:
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
        assert set(s.kinds) >= {"decompose", "rewrite", "rephrase", "revise", "judge", "verify"}, s.kinds
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
