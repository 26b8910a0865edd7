import json, math
import pytest
from fakeserver import FakeServer
from knowtuning.config import load_config
from knowtuning.metrics import meteor, rouge_l, bertscore, tokenize
from knowtuning.judge import ProxyJudge, judge_both_orders, JUDGE_ASPECTS
from knowtuning.facts import verify, fact_scores, aggregate_facts
from knowtuning.teacher import HeuristicTeacher
from knowtuning.runs import Run, read_jsonl

P = ["It is a guide to action which ensures that the military always obeys the commands of the party",
     "The cat sat on the mat.", "Vaccines train the immune system."]
R = ["It is a guide to action that ensures that the military will forever heed Party commands",
     "A cat was sitting on the mat.", "Vaccines teach the body's immune system to fight germs."]

def test_metrics_equal_direct_library_calls():
    assert round(meteor(P[:1], R[:1])[0], 4) == 0.6944
    from nltk.translate.meteor_score import meteor_score   # nltk's own WordNet reader (ours skips its OMW map)
    assert meteor(P, R) == [meteor_score([tokenize(r)], tokenize(p)) for p, r in zip(P, R)]
    from nltk.corpus import wordnet as nltk_wordnet                       # our reader reads the index files itself:
    from knowtuning.atoms import wordnet                                  # the same lemma index as nltk's reader
    assert wordnet()._lemma_pos_offset_map == nltk_wordnet._lemma_pos_offset_map
    from rouge_score import rouge_scorer
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert rouge_l(P, R) == [sc.score(r, p)["rougeL"].fmeasure for p, r in zip(P, R)]
    import bert_score
    from knowtuning.assets import minilm_dir
    _, _, f = bert_score.score(P, R, model_type=str(minilm_dir()), num_layers=6)
    assert bertscore(P, R) == pytest.approx(f.tolist(), abs=1e-6)
    # the model is loaded once per process and reused: a second call scores as a fresh one does
    assert bertscore(P[::-1], R[::-1]) == pytest.approx(f.tolist()[::-1], abs=1e-6)

def test_judge_self_ties_and_position_bias_cancels(release):
    from knowtuning.data import load_dataset, question
    ds = load_dataset("dolly_test", n=20)
    items = [{"question": question(r), "reference": r["output"], "x": r["output"], "y": r["output"]} for r in ds]
    assert all({a: v[a] for a in JUDGE_ASPECTS} == {a: "tie" for a in JUDGE_ASPECTS} and not any(v[f"flip_{a}"] for a in JUDGE_ASPECTS)
               for v in judge_both_orders(ProxyJudge().compare, items))
    first = lambda its: [{a: "A" for a in JUDGE_ASPECTS} for _ in its]
    other = [{**i, "y": "Something else entirely."} for i in items]
    assert all({a: v[a] for a in JUDGE_ASPECTS} == {a: "tie" for a in JUDGE_ASPECTS} and all(v[f"flip_{a}"] for a in JUDGE_ASPECTS)
               for v in judge_both_orders(first, other))

def test_facts_error_rate_rises_with_changed_numbers_and_entities(release):
    from knowtuning.data import load_dataset
    from knowtuning.teacher import perturb_atom
    import random
    ds = load_dataset("dolly_train", n=60)
    t = HeuristicTeacher()
    refs = [r["output"] for r in ds]
    facts = t.decompose(refs)
    same = aggregate_facts(fact_scores(facts, verify(facts, refs)[0]))
    assert same["error_rate"] == 0.0
    pool = ["Germany", "Tokyo", "Napoleon", "Microsoft"]
    changed = [[(p[0] if (p := perturb_atom(f, random.Random(0), pool)) and p[1] in ("number", "entity") else f) for f in fs] for fs in facts]
    worse = aggregate_facts(fact_scores(changed, verify(changed, refs)[0]))
    n_changed = sum(a != b for fs, cs in zip(facts, changed) for a, b in zip(fs, cs))
    assert n_changed > 20 and worse["error_rate"] > 0.1 and worse["facts_per_answer"] == same["facts_per_answer"]

def test_generation_through_openai_compatible_server(tmp_path):
    from knowtuning.generate import generate_stage
    with FakeServer() as s:
        cfg = load_config("smoke", overrides=["generate.backend=api", f"generate.api.base_url={s.base_url}", f"generate.api.cache={tmp_path}/c.sqlite"])
        run = Run(cfg, tmp_path)
        out = generate_stage(cfg, run, "base")
        rows = read_jsonl(out / "demo_test.jsonl")
        assert len(rows) == 3 and all(r["prediction"].startswith("echo: Below is an instruction") for r in rows)
        assert {b["model"] for b in s.requests} == {"base"} and all("prompt" in b for b in s.requests)

def test_api_generation_is_never_stale_after_retraining(tmp_path):
    "Two adapters served under the same name through one server and one cache: each gets its own answers."
    import itertools, shutil
    from knowtuning.generate import generate_stage
    from knowtuning.train import train_stage
    n = itertools.count()
    with FakeServer(default=lambda body: f"answer number {next(n)}") as s:
        base = ["student.model=tiny-random", "generate.backend=api", f"generate.api.base_url={s.base_url}",
                f"generate.api.cache={tmp_path}/cache.sqlite", "train.max_steps=1", "systems=[sft]"]
        preds = {}
        for lr in ("1e-4", "1e-2"):      # "retrain": the same system with another learning rate, a new adapter
            cfg = load_config("smoke", overrides=base + [f"train.lr={lr}"])
            run = Run(cfg, tmp_path / "runs", f"lr{lr}")
            train_stage(cfg, run, "sft")
            preds[lr] = [r["prediction"] for r in read_jsonl(generate_stage(cfg, run, "sft") / "demo_test.jsonl")]
        assert len(s.requests) == 6 and {b["model"] for b in s.requests} == {"sft"}
        assert set(preds["1e-4"]).isdisjoint(preds["1e-2"]), preds      # the second adapter was asked, not the cache
        assert run.manifest["stages"]["gen_sft"]["llm"]["generator"]["calls"] == 3
        # the same adapter again (the generation stage deleted and rerun): answered from the cache, no request
        shutil.rmtree(run.path("gen_sft"))
        m = run.manifest
        m["stages"].pop("gen_sft")
        run._save(m)
        again = [r["prediction"] for r in read_jsonl(generate_stage(cfg, run, "sft") / "demo_test.jsonl")]
        assert again == preds["1e-2"] and len(s.requests) == 6

def test_one_empty_reference_drops_its_question_not_the_set(tmp_path):
    "A set with references keeps its metrics, facts and diffs when one question's reference is empty: that question is counted and left out."
    from knowtuning.config import load_config
    from knowtuning.runs import Run, write_jsonl
    from knowtuning.evaluate import evaluate_set
    from knowtuning.teacher import HeuristicTeacher
    from knowtuning.judge import ProxyJudge
    from knowtuning.data import dataset_key
    cfg = load_config("smoke", overrides=["systems=[sft,knowtuning]", "eval.bootstrap=50"])
    run = Run(cfg, tmp_path, "r")
    refs = ["Paris is the capital of France. It lies on the Seine.", "", "Water boils at 100 degrees Celsius at sea level."]
    for s, ans in (("sft", ["Paris is the capital of France.", "No idea.", "Water boils at 90 degrees."]),
                   ("knowtuning", ["Paris is the capital of France. It lies on the Seine.", "Hm.", "Water boils at 100 degrees."])):
        write_jsonl(run.path(f"gen_{s}") / f"{dataset_key(str(tmp_path / 'mine.jsonl'))}.jsonl", [{"index": i, "question": f"q{i}?", "reference": r, "prediction": a}
                                                         for i, (r, a) in enumerate(zip(refs, ans))])
    ds, rows, verdicts, refs_out = evaluate_set(run, str(tmp_path / "mine.jsonl"), cfg, "knowtuning", teacher=HeuristicTeacher(),
                                                judge=ProxyJudge(), verifier=None)
    assert ds.has_references and (ds.n, ds.no_reference) == (2, 1)
    assert ds.systems["sft"].meteor and ds.diffs["sft"]["meteor"][3] == 2       # diffs over the 2 kept questions
    assert {r["index"] for r in rows} == {0, 2} and len(verdicts) == 2 and refs_out is not None

# -- judge results a reviewer cannot wave away: loopback judges built to move each measure in a known way ----------------
def _judge_server(prefer):
    "A loopback LLM judge: `prefer(a, b, question)` -> 'A' | 'B' | 'tie' for every aspect."
    import re
    def respond(body):
        p = body["messages"][-1]["content"]
        a, b = re.search(r"Answer A: (.*?)\n\nAnswer B: (.*?)\n\nJudge", p, re.S).groups()
        v = prefer(a, b, re.search(r"Question: (.*?)\n", p).group(1))
        return json.dumps({k: v for k in ("completeness", "factuality", "logicality", "overall")})
    return FakeServer(default=respond)

def _pairs(n=60, seed=0):
    "Main and baseline answers: lengths vary either way (main longer on ~2/3); a marker fact in main on ~70%, apart from length."
    import random
    rng, main, base = random.Random(seed), [], []
    for i in range(n):
        lm, lb = rng.randint(5, 40), rng.randint(5, 30)
        mark = rng.random() < 0.7
        main.append({"index": i, "question": f"q{i}", "reference": "r", "prediction": ("MARKER " if mark else "") + "w " * lm})
        base.append({"index": i, "question": f"q{i}", "reference": "r", "prediction": "w " * lb})
    return main, base

def test_length_controlled_win_rate_and_judge_agreement(tmp_path):
    from knowtuning.evaluate import judge_against, agreement
    from knowtuning.judge import LLMJudge
    from knowtuning.config import LLMCfg
    cfg = load_config("smoke", overrides=["eval.bootstrap=100"])
    main, base = _pairs()
    def judge(srv, name):
        return LLMJudge(LLMCfg(backend="llm", base_url=srv.base_url, model=name, cache=str(tmp_path / f"{name}.sqlite"),
                               backoff=0.01, timeout=5), "t")
    size = lambda t: len(t.split())                                     # the length the report controls for
    longer = lambda a, b, q: "A" if size(a) > size(b) else "B" if size(b) > size(a) else "tie"
    marker = lambda a, b, q: "A" if "MARKER" in a and "MARKER" not in b else "B" if "MARKER" in b and "MARKER" not in a else "tie"
    # agrees with `marker` except on every 5th question, where it says tie
    fifth = lambda a, b, q: "tie" if int(q[1:]) % 5 == 0 else marker(a, b, q)
    with _judge_server(longer) as s1, _judge_server(marker) as s2, _judge_server(fifth) as s3:
        _, jl = judge_against(main, base, judge(s1, "longer"), cfg, label="t")
        vm, jm = judge_against(main, base, judge(s2, "marker"), cfg, label="t")
        vf, _ = judge_against(main, base, judge(s3, "fifth"), cfg, label="t")
    raw, lc = jl["lc"]["overall"]["raw"][0], jl["lc"]["overall"]["lc"][0]
    assert raw > 60 and 40 < lc < 60 and jl["lc"]["overall"]["len_diff"] > 0, jl["lc"]["overall"]  # bought by length
    raw, lc = jm["lc"]["overall"]["raw"][0], jm["lc"]["overall"]["lc"][0]
    assert raw > 60 and abs(lc - raw) < 8, jm["lc"]["overall"]                                      # not length
    ag = agreement(vm, vf)["overall"]
    m = ag["confusion"]
    fifth_q = [i for i in range(60) if i % 5 == 0]
    moved = sum(vm[i]["overall"] != "tie" for i in fifth_q)                 # decisive verdicts that became ties
    assert m[1][0] + m[1][2] == 0 and m[0][1] + m[2][1] == moved and sum(map(sum, m)) == 60
    assert sum(m[k][k] for k in range(3)) == 60 - moved and 0 < ag["kappa"] < 1
