"""The probes measure what they claim, and the new fact and judge measures count what they say: a student trained for a
few steps on a handful of references prefers them to their perturbations more often than the base model and finds
their difficult atoms less perplexing; a loopback verifier's "undecidable" and a declining answer reach the facts
table; a judge that always prefers position A has a flip rate of 1 and no wins."""
import json, math
from dataclasses import asdict
import torch
from fakeserver import FakeServer
from knowtuning.assets import load_model
from knowtuning.config import load_config, LLMCfg
from knowtuning.data import load_dataset, question, prompt, encode_prompt, encode_response
from knowtuning.teacher import HeuristicTeacher
from knowtuning.probe import probe_pairs, probe_items, score_probe, kc_measures, difficult_logppl
from knowtuning.judge import LLMJudge, JUDGE_ASPECTS
from knowtuning.llm import LLMClient
from knowtuning.evaluate import score_system, judge_against
from knowtuning.report import facts_table, judge_table
from knowtuning.evaluate import Summary


def _probe(model, tok, items, base_ppls=None, alpha=0.5):
    sc = score_probe(model, tok, items)
    rows = kc_measures(items, sc)
    ppls = [s["atoms"] for s in sc]
    return rows, ppls, difficult_logppl(base_ppls or ppls, ppls, alpha)


def test_a_student_trained_on_references_prefers_them_and_learns_their_hard_atoms():
    cfg = load_config("smoke")
    recs = load_dataset("demo_test").records[:3]
    qs, refs = [question(r) for r in recs], [r["output"] for r in recs]
    t = HeuristicTeacher()
    atoms = t.decompose(refs)
    pairs, _ = probe_pairs(qs, atoms, t.revise(atoms), cfg.kc, seed=cfg.seed)
    items = probe_items(qs, atoms, pairs)
    assert len(pairs) >= 8 and {p["aspect"] for p in pairs} == {"completeness", "factuality", "logicality"}
    model, tok = load_model(cfg.student)
    model.eval()
    base_rows, base_ppls, base_hard = _probe(model, tok, items)
    # a few steps of LoRA SFT on the references, in the release's token stream (loss on the response only)
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    student = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    seqs = []
    for q, a in zip(qs, refs):
        p, y = encode_prompt(tok, prompt(q)), encode_response(tok, a)
        seqs.append((p + y, [-100] * len(p) + y))
    L = max(len(s) for s, _ in seqs)
    ids = torch.tensor([s + [tok.pad_token_id] * (L - len(s)) for s, _ in seqs])
    labels = torch.tensor([l + [-100] * (L - len(l)) for _, l in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s, _ in seqs])
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=2e-3)
    student.train()
    losses = []
    for _ in range(6):  # 6 steps of about 4 s; the loss falls 1.80 -> 0.28 (measured 2026-12-07)
        loss = student(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    student.eval()
    assert losses[-1] < 0.5 * losses[0], losses
    rows, _, hard = _probe(student, tok, items, base_ppls)
    acc = lambda rs: sum(r["margin_mean"] > 0 for r in rs) / len(rs)
    print("accuracy base", acc(base_rows), "student", acc(rows), "hard-atom ppl", base_hard, hard)
    assert acc(rows) > acc(base_rows)
    for a in ("completeness", "factuality", "logicality"):  # per aspect: never worse than the base model
        per = lambda rs: [r for r in rs if r["aspect"] == a]
        assert acc(per(rows)) >= acc(per(base_rows)), a
    # the difficult atoms are less perplexing after training: on most questions, and on average in log space (one
    # question's rise, an atom scored as if it opened the answer, is measured and explained in 15_probe)
    ok = [(b, s) for b, s in zip(base_hard, hard) if not math.isnan(b)]
    assert len(ok) == len(recs) and sum(s < b for b, s in ok) >= len(recs) - 1
    assert sum(s for _, s in ok) < sum(b for b, _ in ok) - 0.3


def _llm(tmp_path, url, model="v") -> LLMCfg:
    return LLMCfg(backend="llm", base_url=url, model=model, cache=str(tmp_path / f"{model}.sqlite"), backoff=0.01)


def test_undecidable_and_abstention_reach_the_facts_table(tmp_path):
    def answer(body):
        p = body["messages"][-1]["content"]
        if "Does the answer decline" in p:
            return "Yes" if "don't know" in p.split("Does the answer")[0] else "No"
        return "Undecidable"

    cfg = load_config("smoke")
    with FakeServer(default=answer) as s:
        cfg.judge = _llm(tmp_path, s.base_url)
        verifier = LLMClient(cfg.judge, "eval", progress=False)
        preds = [{"index": 0, "question": "What is the sun?", "reference": "The sun is a star. It is hot.",
                  "prediction": "The sun is a star. It is very hot."},
                 {"index": 1, "question": "Who built it?", "reference": "Engineers built it. It took a year.",
                  "prediction": "I'm sorry, I don't know who built it."}]
        ref_facts = HeuristicTeacher().decompose([p["reference"] for p in preds])
        rows, _, summ = score_system(preds, ref_facts, HeuristicTeacher(), verifier, cfg=cfg, label="t", k=2)
    assert [r["abstained"] for r in rows] == [False, True]
    assert rows[0]["undecidable"] == rows[0]["facts"] == 2 and rows[0]["unsupported"] == 0
    assert math.isnan(rows[0]["error_rate"]) and math.isnan(rows[1]["precision"]) and rows[1]["f1_k"] == 0.0
    f = summ.facts
    assert f.abstained == 1 and f.undecidable == 1.0 and math.isnan(f.error_rate)
    summary = Summary.from_dict({"verifier": "llm:v", "datasets": {"t": {"n": 2, "systems": {"kt": asdict(summ)}}}})
    h, table, cap = facts_table(summary, "ctx")
    row = dict(zip(h, table[0]))
    assert row["undecidable facts"] == 1.0 and row["abstained"] == 1 and row["K"] == 2
    assert "never counted as an error" in cap


def test_a_judge_that_always_prefers_position_a_flips_every_pair(tmp_path):
    cfg = load_config("smoke")
    with FakeServer(default=json.dumps({a: "A" for a in JUDGE_ASPECTS})) as s:
        cfg.judge = _llm(tmp_path, s.base_url, "biased")
        judge = LLMJudge(cfg.judge, "eval")
        judge.client.progress = False
        main = [{"index": i, "question": f"q{i}", "reference": "r", "prediction": f"x{i}"} for i in range(5)]
        base = [{**m, "prediction": f"y{m['index']}"} for m in main]
        vs, js = judge_against(main, base, judge, cfg, label="t")
    for a in JUDGE_ASPECTS:
        assert js["rates"][a]["win"] == 0.0 and js["rates"][a]["lose"] == 0.0 and js["rates"][a]["flip"] == 100.0
    ds = {"n": 5, "judge": {"base": js["rates"]}, "judge_ci": {"base": js["ci"]}, "judge_calls": {"base": {"judged": js["judged"], "failed": js["failed"]}}}
    h, rows, cap = judge_table(Summary.from_dict({"judge": "llm:biased", "datasets": {"t": ds}}), "ctx", False)
    assert js["rates"]["completeness"]["position"] == 100.0                # every flip a pure position flip
    assert dict(zip(h, rows[0]))["flips (position)"] == "100 (100) / 100 (100) / 100 (100) / 100 (100)"
    assert "pure position flips" in cap
