import os, subprocess
from pathlib import Path
import pytest
from fakeserver import FakeServer
from conftest import ROOT
from knowtuning.config import LLMCfg
from knowtuning.llm import LLMClient, LLMError, Request, user, complete_parsed, parse_json, serve_local

def client(tmp_path, base_url, **kw):
    cfg = LLMCfg(backend="llm", base_url=base_url, model=kw.pop("model", "fake"), cache=str(tmp_path / "cache.sqlite"),
                 **{"timeout": 1.0, "backoff": 0.01, "max_retries": 4, **kw})
    return LLMClient(cfg, stage="test", progress=False)

@pytest.mark.slow  # a real transformers server
def test_real_transformers_serve_in_order_and_warm_cache(tmp_path):
    with serve_local("smollm2", log=tmp_path / "serve.log") as srv:
        prompts = [user(f"Complete the sentence: My favourite number is {i} because", name=f"q{i}", max_tokens=12) for i in range(8)]
        # reference: one request at a time, own cache
        ref = client(tmp_path / "ref", srv.base_url, model=srv.model, concurrency=1, timeout=120)
        expected = [ref.complete(p) for p in prompts]
        c = client(tmp_path, srv.base_url, model=srv.model, concurrency=8, timeout=120)
        got = c.complete_many(prompts)
        assert len(got) == 8 and got == expected            # 8 answers, each in its request's place
        served, http = srv.requests_served(), c.http_requests
        assert served == 16 and http == 8 and c.ledger.calls == 8 and c.ledger.completion_tokens > 0
        again = c.complete_many(prompts)                     # warm cache: no HTTP at all
        assert again == got and c.http_requests == http and srv.requests_served() == served
        assert c.ledger.cache_hits == 8

def test_retries_429_500_timeout_then_success(tmp_path):
    with FakeServer([429, 500, "stall", "finally"], stall=3.0) as s:
        c = client(tmp_path, s.base_url, timeout=0.5)
        assert c.complete(user("hello", name="greet")) == "finally"
        assert [r["error"] for r in c.retry_log] == ["RateLimitError", "InternalServerError", "APITimeoutError"]
        assert c.ledger.retries == 3 and c.ledger.calls == 1 and len(s.requests) == 4

def test_always_failing_server_names_request_and_keeps_cache(tmp_path):
    with FakeServer(["echo: first"], default=503) as s:    # answers once, then fails for good
        c = client(tmp_path, s.base_url, max_retries=2)
        assert c.complete(user("first", name="keep-me")) == "echo: first"
        with pytest.raises(LLMError, match=r"request doomed failed after 3 tries.*InternalServerError"):
            c.complete_many([user("first", name="keep-me"), user("second", name="doomed")])
        assert len(s.requests) == 1 + 3                      # only 'doomed' went out, three times
        assert c.complete(user("first", name="keep-me")) == "echo: first"   # still cached
    first = user("first", name="keep-me")
    assert len(c.cache) == 1 and c.cache.get(c._key(first, c.params(first)))["text"] == "echo: first"

def test_non_retryable_error_is_not_retried(tmp_path):
    with FakeServer([400]) as s:
        c = client(tmp_path, s.base_url)
        with pytest.raises(LLMError, match="bad-one failed after 1 tries"): c.complete(user("x", name="bad-one"))
        assert len(s.requests) == 1

def test_busy_server_lowers_and_restores_concurrency(tmp_path):
    """A server that answers one request at a time in 0.25 s: at 8 in flight and a 1 s timeout, every request past the
    fourth times out and its abandoned copy still occupies the server. AIMD halves the concurrency until answers come,
    then raises it again; every request is answered and the ledger says what happened."""
    with FakeServer(delay=0.25, serial=True) as s:
        c = client(tmp_path, s.base_url, concurrency=8, timeout=1.0, max_retries=2, backoff=0.05)
        out = c.complete_many([f"q{i}" for i in range(24)])
        assert out == [f"echo: q{i}" for i in range(24)]
        led = c.ledger.as_dict()
        lows = [l for _, l in c.concurrency_history]
        assert led["throttled"] >= 1 and led["min_concurrency"] < 8, (led, c.concurrency_history)
        lowest = lows.index(min(lows))
        assert max(lows[lowest:]) > min(lows), c.concurrency_history        # restored after the trough
        assert led["calls"] == 24 and led["retries"] > 0

def test_retry_after_is_honoured(tmp_path):
    import time
    with FakeServer([(429, 1.2)]) as s:                        # "busy, come back in 1.2 s"
        c = client(tmp_path, s.base_url, backoff=0.0)             # our own backoff would not wait at all
        t0 = time.time()
        assert c.complete(user("x")) == "echo: x"
        assert 1.2 <= time.time() - t0 < 5 and len(s.requests) == 2

def test_bounded_concurrency_and_order(tmp_path):
    with FakeServer(delay=0.05) as s:
        c = client(tmp_path, s.base_url, concurrency=3)
        out = c.complete_many([f"q{i}" for i in range(12)])
        assert out == [f"echo: q{i}" for i in range(12)]
        assert s.max_in_flight == 3

def test_repair_then_record_failure(tmp_path):
    with FakeServer(["not json", "still not", '{"ok": 1}', "nope"]) as s:
        c = client(tmp_path, s.base_url, concurrency=1)
        out = complete_parsed(c, [user("give json", name="a"), user("give json too", name="b")], parse_json)
        # a: 'not json' then repaired to {"ok": 1}; b: 'still not' then 'nope' -> recorded failure
        assert out[0] == {"ok": 1} and out[1] is None
        assert c.failures == [{"name": "b", "error": "no JSON object or array found", "raw": "nope", "first_raw": "still not"}]

def test_cost_ledger(tmp_path):
    with FakeServer() as s:
        c = client(tmp_path, s.base_url, prices={"fake": [1.0, 2.0]})
        c.complete_many(["a", "b"])
        assert c.ledger.prompt_tokens == 20 and c.ledger.completion_tokens == 10
        assert c.ledger.cost_usd == pytest.approx((20 * 1.0 + 10 * 2.0) / 1e6)

def test_missing_key_for_remote_endpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MY_TEACHER_KEY", raising=False)
    c = client(tmp_path, "https://api.example.invalid/v1", api_key_env="MY_TEACHER_KEY")
    with pytest.raises(LLMError, match="MY_TEACHER_KEY is not set"): c.complete("x")

# -- batch mode ----------------------------------------------------------------------------------------------------------
from batchserver import BatchServer, CALLS

def batch_client(tmp_path, url, **kw):
    return client(tmp_path, url, mode="batch", batch_poll=0.05, **{"batch_min": 1, **kw})

def paid(c, s):
    "(batch answers, interactive answers) as the ledger counts them, checked against what the server served."
    led = c.ledger.as_dict()
    assert led["batch_calls"] == s.billed and led["calls"] - led["batch_calls"] == s.interactive, (led, s.billed)
    return led["batch_calls"], led["calls"] - led["batch_calls"]

@pytest.mark.parametrize("outcome,bad,answered", [("completed", (1, 4), 4), ("failed", (), 0), ("expired", (), 3),
                                                  ("cancelled", (), 3)])
def test_batch_mode_pays_once_for_every_answer_a_batch_gave(tmp_path, outcome, bad, answered):
    "Completed with two request errors, failed, expired and cancelled (these keep and bill half): nothing bought twice."
    qs = [f"q{i}" for i in range(6)]
    with BatchServer(outcome, bad) as s:
        c = batch_client(tmp_path, s.base_url)
        assert c.complete_many(qs) == [f"echo: {q}" for q in qs]
        assert s.created == 1 and len(s.files[s.batches["batch-1"]["input"]].splitlines()) == 6
        assert paid(c, s) == (answered, 6 - answered)                   # the rest interactively, once
        led = c.ledger.as_dict()
        assert (led["batch_failed"], led["cache_hits"]) == (6 - answered, 0)  # batch answers are not cache hits
        assert c.batches == [{"id": "batch-1", "status": outcome, "requests": 6, "answered": answered}]
        again = client(tmp_path, s.base_url)                            # the same cache serves a later client
        assert again.complete_many(qs) == [f"echo: {q}" for q in qs]
        assert (s.created, s.interactive) == (1, 6 - answered)

def test_a_request_set_over_the_batch_limit_is_split(tmp_path):
    qs = [f"q{i}" for i in range(10)]
    with BatchServer(max_requests=4) as s:
        c = batch_client(tmp_path, s.base_url, batch_max_requests=4)
        assert c.complete_many(qs) == [f"echo: {q}" for q in qs]
        assert s.created == 3 and paid(c, s) == (10, 0)                 # 4 + 4 + 2, all at the batch price
        assert sorted(b["requests"] for b in c.batches) == [2, 4, 4]

def test_every_batch_call_survives_a_transient_500(tmp_path):
    with BatchServer(flaky=CALLS) as s:
        c = batch_client(tmp_path, s.base_url)
        assert c.complete_many(["a", "b", "c"]) == ["echo: a", "echo: b", "echo: c"]
        assert s.created == 1 and paid(c, s) == (3, 0)
        assert set(s.failed_calls) == set(CALLS)                        # each failed once, and each was retried

def test_a_create_whose_answer_was_lost_is_found_not_repeated(tmp_path):
    with BatchServer(lost_create=True) as s:
        c = batch_client(tmp_path, s.base_url)
        assert c.complete_many(["a", "b"]) == ["echo: a", "echo: b"]
        assert s.created == 1 and paid(c, s) == (2, 0)

def test_a_kill_between_create_and_its_record_does_not_pay_twice(tmp_path):
    import subprocess, sys
    with BatchServer("hold") as s:
        # a kill after batches.create, before its record is written (the record's write_json never happens)
        code = ("import sys, os; sys.path.insert(0, 'tests'); import knowtuning.llm as L; w = L.write_json\n"
                "L.write_json = lambda p, *a, **k: os._exit(9) if str(p).endswith('.batch.json') else w(p, *a, **k)\n"
                "from test_llm import batch_client; from pathlib import Path\n"
                f"batch_client(Path({str(tmp_path)!r}), {s.base_url!r}).complete_many(['a', 'b', 'c'])")
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 9 and s.created == 1, r.stderr[-2000:]
        assert list((tmp_path / "cache.sqlite.batches").glob("*.intent")) and not list(
            (tmp_path / "cache.sqlite.batches").glob("*.batch.json"))
        s.outcome = "completed"
        c = batch_client(tmp_path, s.base_url)
        assert c.complete_many(["a", "b", "c"]) == ["echo: a", "echo: b", "echo: c"]
        assert s.created == 1 and paid(c, s) == (3, 0)                  # found by its tag, not created again

def kill_while_polling(tmp_path, s, qs, polls):
    "A batch client in another process asks for `qs`, and is killed once the server has seen `polls` polls."
    import subprocess, sys, time
    code = ("import sys; sys.path.insert(0, 'tests'); from test_llm import batch_client; from pathlib import Path; "
            f"batch_client(Path({str(tmp_path)!r}), {s.base_url!r}).complete_many({qs!r})")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    t0 = time.time()
    while s.polls < polls and time.time() - t0 < 120: time.sleep(0.05)
    p.kill(); p.wait()

def test_killed_batch_run_reattaches_without_resubmitting(tmp_path):
    with BatchServer("hold") as s:
        kill_while_polling(tmp_path, s, ["a", "b", "c"], 2)
        assert s.created == 1 and s.polls >= 2                          # submitted, then killed while it waited
        s.outcome = "completed"
        c = batch_client(tmp_path, s.base_url)
        assert c.complete_many(["a", "b", "c"]) == ["echo: a", "echo: b", "echo: c"]
        assert s.created == 1 and len(s.files) == 3 and s.interactive == 0  # re-attached: one upload, one batch
        assert c.batches[0]["id"] == "batch-1"

def test_a_rerun_with_a_changed_request_set_imports_the_old_batch_first(tmp_path):
    "Killed while its batch ran; the rerun asks for more: the old batch's answers are used, only the new ones bought."
    with BatchServer("hold") as s:
        kill_while_polling(tmp_path, s, ["a", "b", "c", "d"], 1)
        s.outcome = "expired"                                           # and it expired meanwhile, half done
        c = batch_client(tmp_path, s.base_url, batch_min=4)
        qs = ["a", "b", "c", "d", "e"]
        assert c.complete_many(qs) == [f"echo: {q}" for q in qs]
        assert s.created == 1 and paid(c, s) == (2, 3)                  # a, b from the old batch; c, d, e: too few
        assert c.batches[0] == {"id": "batch-1", "status": "expired", "requests": 4, "answered": 2}

def test_a_few_requests_go_interactively_and_the_plan_says_so(tmp_path):
    "Repairs and stragglers (under batch_min) are not a day's wait each; the plan prices what the config will do."
    from knowtuning.llm import plan_row
    with BatchServer() as s:
        c = batch_client(tmp_path, s.base_url, batch_min=25)
        assert c.complete_many(["fix this", "and this"]) == ["echo: fix this", "echo: and this"]
        assert s.created == 0 and paid(c, s) == (0, 2)
    cfg = LLMCfg(backend="llm", model="gpt-4o-mini", mode="batch", batch_min=25)
    few, many = plan_row("s", "teacher", cfg, 2, pt=10**6, ct=10**5), plan_row("s", "teacher", cfg, 30, pt=10**7, ct=10**6)
    assert (few["batch_calls"], many["batch_calls"]) == (0, 30)
    assert few["spend_usd"] == few["cost_usd"] and many["spend_usd"] == many["batch_usd"] < many["cost_usd"]

# -- a slow or dead endpoint ---------------------------------------------------------------------------------------------
def test_a_server_slower_than_the_timeout_is_waited_for_not_flooded(tmp_path):
    "Service time 1.2 s against a first timeout of 0.4 s: the timeout grows, everything is answered, few re-sends."
    with FakeServer(delay=1.2, serial=True) as s:
        c = client(tmp_path, s.base_url, timeout=0.4, concurrency=2, max_retries=6, max_timeout=30)
        qs = [f"q{i}" for i in range(4)]
        assert c.complete_many(qs) == [f"echo: {q}" for q in qs]
        assert c._timeout >= 1.2 and len(s.requests) <= 4 + 6, len(s.requests)

def test_a_server_that_never_answers_stops_with_a_clear_error_and_keeps_the_cache(tmp_path):
    import time
    with FakeServer(script=["first"], default="stall", stall=60) as s:
        c = client(tmp_path, s.base_url, timeout=0.5, stall_timeout=3, max_retries=20)
        assert c.complete("a") == "first"
        t0 = time.time()
        with pytest.raises(LLMError, match=r"no answer from http://127.0.0.1:\d+/v1 .* [12] calls outstanding"):
            c.complete_many(["b", "c"])
        assert time.time() - t0 < 3 + 5
        assert client(tmp_path, s.base_url).complete("a") == "first"   # cached before the stall: nothing lost

def test_served_model_and_fingerprint_in_ledger_cache_and_old_caches(tmp_path):
    "The model and system_fingerprint the endpoint reports reach the ledger, also for answers the cache gives back."
    import sqlite3
    from knowtuning.llm import Cache
    old = tmp_path / "old.sqlite"  # a cache written before fingerprints were kept
    db = sqlite3.connect(old)
    db.execute("CREATE TABLE responses (key TEXT PRIMARY KEY, model TEXT, text TEXT, prompt_tokens INTEGER, "
               "completion_tokens INTEGER, created REAL)")
    db.execute("INSERT INTO responses VALUES ('k', 'm', 'hello', 1, 2, 0)")
    db.commit()
    db.close()
    c = Cache(old)
    assert c.get("k") == {"text": "hello", "prompt_tokens": 1, "completion_tokens": 2, "model": "m", "fingerprint": None}
    with FakeServer() as s:
        s.served = ("fake-2026-01-01", "fp_abc")
        cl = client(tmp_path, s.base_url)
        cl.complete_many(["a", "b"])
        assert cl.ledger.served == {"fake-2026-01-01": 2} and cl.ledger.fingerprints == {"fp_abc": 2}
        again = client(tmp_path, s.base_url)
        again.complete_many(["a", "b"])
        assert again.ledger.cache_hits == 2 and again.ledger.served == {"fake-2026-01-01": 2}
        from knowtuning.llm import ledgers
        assert ledgers(teacher=again)["teacher"]["fingerprints"] == {"fp_abc": 2}


def test_an_error_that_quotes_the_key_never_shows_it(tmp_path, monkeypatch):
    "A server answering 401 with the key in its message (as some proxies do): no key in the error, its chain, a file."
    from conftest import SECRET, kt, llm_sets
    import tempfile, time
    monkeypatch.setenv("KT_TEST_KEY", SECRET)
    t0 = time.time()
    with FakeServer(echo_auth=401) as s:
        c = client(tmp_path, s.base_url, api_key_env="KT_TEST_KEY")
        with pytest.raises(LLMError) as e:
            c.complete(user("hello", name="greet"))
        r = kt("ka", "--preset", "smoke", "--set", "student.model=tiny-random", *llm_sets(s.base_url, tmp_path / "c2"),
               "--runs-dir", tmp_path / "runs", env={"KT_TEST_KEY": SECRET}, timeout=600)
    assert s.auth and all(a == f"Bearer {SECRET}" for a in s.auth)          # the key was sent, and quoted back
    msg = str(e.value)
    assert "AuthenticationError" in msg and f"***{SECRET[-4:]}" in msg and SECRET not in msg
    chain, x = [], e.value                                                    # no chained exception quotes the server
    while x is not None:
        chain.append(x)
        x = x.__cause__ or (None if x.__suppress_context__ else x.__context__)
    assert all(isinstance(x, LLMError) and SECRET not in str(x) for x in chain), chain
    assert r.returncode != 0 and "AuthenticationError" in r.stderr, r.stderr[-2000:]
    assert SECRET not in r.stdout + r.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]                  # partial stage folder, LLM caches
    assert any(".ka.partial" in str(p) or p.suffix == ".sqlite" for p in files)
    def holds_key(p: Path) -> bool:   # the other pytest process writes and deletes files in the same folder meanwhile
        try:
            st = p.lstat()
            return p.is_file() and st.st_mtime >= t0 and st.st_size < 50_000_000 and SECRET.encode() in p.read_bytes()
        except OSError:
            return False
    new_tmp = [Path(d) / f for d, _, fs in os.walk(tempfile.gettempdir()) for f in fs]   # os.walk skips vanished folders
    leaked = [str(p) for p in files + new_tmp if holds_key(p)]
    assert leaked == [], leaked
