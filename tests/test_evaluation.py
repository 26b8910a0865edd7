import json, math
import pytest
from fakeserver import FakeServer
from knowtuning.config import load_config
from knowtuning.metrics import meteor, rouge_l, bertscore
from knowtuning.judge import ProxyJudge, judge_both_orders, ASPECTS
from knowtuning.facts import verify, fact_scores, aggregate_facts
from knowtuning.teacher import HeuristicTeacher
from knowtuning.runs import Run, read_jsonl

P = ["It is a guide to action which ensures that the military always obeys the commands of the party",
     "The cat sat on the mat.", "Vaccines train the immune system."]
R = ["It is a guide to action that ensures that the military will forever heed Party commands",
     "A cat was sitting on the mat.", "Vaccines teach the body's immune system to fight germs."]

def test_metrics_equal_direct_library_calls():
    assert round(meteor(P[:1], R[:1])[0], 4) == 0.6944
    from rouge_score import rouge_scorer
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert rouge_l(P, R) == [sc.score(r, p)["rougeL"].fmeasure for p, r in zip(P, R)]
    import bert_score
    from knowtuning.assets import minilm_dir
    _, _, f = bert_score.score(P, R, model_type=str(minilm_dir()), num_layers=6)
    assert bertscore(P, R) == pytest.approx(f.tolist(), abs=1e-6)

def test_judge_self_ties_and_position_bias_cancels(release):
    from knowtuning.data import load_dataset, question
    ds = load_dataset("dolly_test", n=20)
    items = [{"question": question(r), "reference": r["output"], "x": r["output"], "y": r["output"]} for r in ds]
    assert all({a: v[a] for a in ASPECTS} == {a: "tie" for a in ASPECTS} and not any(v[f"flip_{a}"] for a in ASPECTS)
               for v in judge_both_orders(ProxyJudge().compare, items))
    first = lambda its: [{a: "A" for a in ASPECTS} for _ in its]
    other = [{**i, "y": "Something else entirely."} for i in items]
    assert all({a: v[a] for a in ASPECTS} == {a: "tie" for a in ASPECTS} and all(v[f"flip_{a}"] for a in ASPECTS)
               for v in judge_both_orders(first, other))

def test_facts_error_rate_rises_with_changed_numbers_and_entities(release):
    from knowtuning.data import load_dataset
    from knowtuning.teacher import perturb
    import random
    ds = load_dataset("dolly_train", n=60)
    t = HeuristicTeacher()
    refs = [r["output"] for r in ds]
    facts = t.decompose(refs)
    same = aggregate_facts(fact_scores(facts, verify(facts, refs)[0]))
    assert same["error_rate"] == 0.0
    pool = ["Germany", "Tokyo", "Napoleon", "Microsoft"]
    changed = [[(p[0] if (p := perturb(f, random.Random(0), pool)) and p[1] in ("number", "entity") else f) for f in fs] for fs in facts]
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
    ds, rows, verdicts, refs_out = evaluate_set(run, str(tmp_path / "mine.jsonl"), cfg, "knowtuning", HeuristicTeacher(),
                                                ProxyJudge(), None)
    assert ds.has_references and (ds.n, ds.no_reference) == (2, 1)
    assert "meteor" in ds.systems["sft"] and ds.diffs["sft"]["meteor"][3] == 2       # diffs over the 2 kept questions
    assert {r["index"] for r in rows} == {0, 2} and len(verdicts) == 2 and refs_out is not None
