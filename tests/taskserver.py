"""A scripted OpenAI-compatible server that answers every knowtuning teacher / judge / verifier prompt in the requested
format. A share of first answers is malformed (to exercise the repair round) and a smaller share stays malformed
after the repair (to exercise failure accounting); which ones is a function of the prompt, so reruns are identical.
Token usage is counted with SmolLM2's tokenizer (the embedded model's): an independent count, not the plan's
characters / 4, so the plan-vs-ledger test checks the plan's estimate against real token counts."""
import hashlib, json, re
from collections import Counter
from fakeserver import FakeServer

def _h(s: str) -> int: return int(hashlib.sha256(s.encode()).hexdigest()[:8], 16)
def _sentences(t: str) -> list[str]: return [s.strip() for s in re.split(r"(?<=[.!?])\s+", t.strip()) if s.strip()]
def _after(text: str, marker: str) -> str: return text.rsplit(marker, 1)[1].strip()
def _numbered(text: str) -> list[str]: return [re.sub(r"^\d+\.\s*", "", l).strip() for l in text.splitlines() if l.strip()]
def _words(s: str) -> set: return set(re.findall(r"[a-z]+", s.lower()))

def classify(prompt: str) -> str:
    for kind, marker in (("decompose", "Break the answer below into atomic facts"), ("rewrite", "Write a new, more specific"),
                         ("rephrase", "Rephrase the following answer"), ("revise", "Revise each statement below"),
                         ("judge", "You are comparing two answers"), ("verify", "Is the statement supported"),
                         ("abstain", "Does the answer decline")):
        if marker in prompt: return kind
    return "other"

def well_formed(kind: str, p: str) -> str:
    if kind == "decompose": return "\n".join(_sentences(_after(p, "Answer:")))
    if kind == "rewrite":
        q, atoms = _after(p.split("Knowledge:")[0], "Question:"), _numbered(p.split("Knowledge:\n")[1].split("\n\nWrite")[0])
        return json.dumps({"question": f"In detail: {q}", "answer": " ".join(atoms)})
    if kind == "rephrase": return "To put it another way: " + _after(p, "Answer:")
    if kind == "revise":
        return json.dumps([re.sub(r"\d+", lambda m: str(int(m.group()) + 7), a, count=1) if re.search(r"\d", a)
                           else "It is not true that " + a[0].lower() + a[1:] for a in _numbered(_after(p, "Statements:"))])
    if kind == "judge":
        a, b = _after(p.split("Answer B:")[0], "Answer A:"), _after(p.split("Judge each aspect:")[0], "Answer B:")
        ref = _words(_after(p.split("Answer A:")[0], "Reference answer:"))
        ca, cb = len(_words(a) & ref), len(_words(b) & ref)
        # no overlap either way (a random model's samples): the answer with the larger hash, the same in both orders
        v = "A" if ca > cb else "B" if cb > ca else "tie" if a == b else "A" if _h(a) > _h(b) else "B"
        return json.dumps({"completeness": v, "factuality": v, "logicality": "tie", "overall": v})
    if kind == "verify":
        st = _after(p.split("Is the statement")[0], "Statement:")
        fact, ref = _words(st), _words(_after(p.split("Statement:")[0], "Reference answer:"))
        # supported when most of its words are in the reference; one unrelated statement in three too (by hash), so
        # that a random model's samples still get different scores
        return "True" if fact and (len(fact & ref) / len(fact) >= 0.6 or _h(st) % 3 == 0) else "False"
    if kind == "abstain":
        return "Yes" if re.search(r"(?i)\bdo(?: not|n't) know\b", _after(p.split("Does the answer")[0], "Answer:")) else "No"
    return "ok"

MALFORMED = {"decompose": "Here are the facts:", "rewrite": "Sure, here it is.", "rephrase": " ", "revise": "[]",
             "judge": "Answer A is better.", "verify": "Maybe.", "abstain": "Perhaps."}

class TaskServer(FakeServer):
    def __init__(self, malformed_every: int = 5, broken_every: int = 29, upgrade_on: str = "", **kw):
        "`upgrade_on`: from the first request of this kind on, answers report a new model and fingerprint."
        self.kinds, self.repairs, self.upgrade_on, self.upgraded = Counter(), 0, upgrade_on, False
        self.malformed_every, self.broken_every = malformed_every, broken_every
        from transformers import AutoTokenizer
        from knowtuning.assets import resolve_model
        tok = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
        count = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])
        prompt = lambda body: sum(count(m["content"]) + 4 for m in body.get("messages", [])) or count(body.get("prompt", ""))
        super().__init__(default=self.respond, usage=lambda body, text: (prompt(body), max(1, count(text))), **kw)
        self.served = lambda body: (body.get("model", "fake") + ("-v2" if self.upgraded else ""),
                                    "fp_2" if self.upgraded else "fp_1")
    def respond(self, body) -> str:
        msgs = body.get("messages") or [{"content": body.get("prompt", "")}]
        p, repair = msgs[0]["content"], len(msgs) > 1
        kind = classify(p)
        self.kinds[kind] += 1
        self.upgraded |= kind == self.upgrade_on
        self.repairs += repair
        h = _h(p)
        if kind in MALFORMED and h % self.broken_every == 0: return MALFORMED[kind]          # stays broken
        if kind in MALFORMED and not repair and h % self.malformed_every == 1: return MALFORMED[kind]   # repaired
        return well_formed(kind, p)
