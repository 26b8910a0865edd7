import filecmp, json
from pathlib import Path
from collections import Counter
import pytest
from knowtuning.config import KCCfg, load_config
from knowtuning.data import load_dataset, question
from knowtuning.ka import ka_stage
from knowtuning.kc import build_pairs, kc_stage
from knowtuning.runs import Run, read_json, read_jsonl
from knowtuning.teacher import HeuristicTeacher

def test_constructions_on_200_dolly_answers(release):
    ds = load_dataset("dolly_train", n=200)
    t = HeuristicTeacher()
    atoms = t.decompose([r["output"] for r in ds])
    items = [{"index": i, "question": question(r), "answer": r["output"], "atoms": a} for i, (r, a) in enumerate(zip(ds, atoms)) if a]
    revs = t.revise([it["atoms"] for it in items])
    rows, stats = build_pairs(items, t.rephrase([i["answer"] for i in items], [i["atoms"] for i in items]), revs, KCCfg(beta=0.5, revise=0.5), seed=0)
    by = Counter(r["aspect"] for r in rows)
    assert by["completeness"] >= 150 and by["factuality"] >= 150 and by["logicality"] >= 150
    for r in rows:
        A, R = r["atoms"], r["rejected_atoms"]
        assert r["rejected"] == " ".join(R) and r["rejected"] != r["chosen"]
        if r["aspect"] == "completeness":      # strict, order-preserving subset
            assert 0 < len(R) < len(A)
            assert [a for i, a in enumerate(A) if i not in r["deleted"]] == R
        elif r["aspect"] == "logicality":      # same multiset, another order
            assert Counter(R) == Counter(A) and R != A and sorted(r["permutation"]) == list(range(len(A)))
        else:                                   # exactly the tagged atoms changed
            changed = [i for i, (a, b) in enumerate(zip(A, R)) if a != b]
            assert len(R) == len(A) and changed == r["revised"] and len(r["ops"]) == len(changed)
            assert set(r["ops"]) <= {"number", "entity", "antonym", "negation"}
    for aspect in ("completeness", "factuality", "logicality"):
        assert stats[aspect]["pairs"] + stats[aspect]["dropped"] == len(items)
    assert stats["logicality"]["reasons"].get("fewer than 2 atoms", 0) == sum(len(i["atoms"]) < 2 for i in items)

def make_run(tmp_path, name):
    cfg = load_config("smoke", overrides=["data.n_train=8"])
    run = Run(cfg, tmp_path, name)
    ka_stage(cfg, run)
    return run, kc_stage(cfg, run)

def test_kc_stage_formats_manifest_and_determinism(tmp_path):
    import datasets
    run, out = make_run(tmp_path, "a")
    kc = json.loads((out / "kc.json").read_text())
    assert all(isinstance(r["output"], list) and len(r["output"]) == 2 for r in kc)
    assert json.loads((out / "dataset_info.json").read_text())["knowtuning_kc"]["ranking"] is True
    d = datasets.load_dataset("json", data_files=str(out / "kc_trl.jsonl"), split="train")
    assert set(d.column_names) == {"prompt", "chosen", "rejected", "aspect"} and len(d) == len(kc)
    st = run.manifest["stages"]["kc"]["stats"]
    for a in ("completeness", "factuality", "logicality"): assert {"pairs", "dropped", "reasons"} <= set(st[a])
    assert st["pairs"] == len(kc)
    _, out2 = make_run(tmp_path, "b")        # same seed, another run folder: byte-identical outputs
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(p.name for p in out2.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(out, out2, files, shallow=False)
    assert mismatch == [] and errors == []
    for f in ("ka.json", "atoms.jsonl", "ka_trl.jsonl"):
        assert filecmp.cmp(run.path("ka") / f, tmp_path / "b" / "ka" / f, shallow=False)

def test_kc_needs_ka(tmp_path):
    cfg = load_config("smoke")
    with pytest.raises(RuntimeError, match="needs stage ka"): kc_stage(cfg, Run(cfg, tmp_path))

def test_aspect_ablation(tmp_path):
    cfg = load_config("smoke", overrides=["data.n_train=4", "kc.aspects=[completeness, logicality]"])
    run = Run(cfg, tmp_path); ka_stage(cfg, run); out = kc_stage(cfg, run)
    assert {r["aspect"] for r in json.loads((out / "kc.json").read_text())} == {"completeness", "logicality"}

# How the two LLaMA-Factory generations read a ranking entry in alpaca format (their converters, reduced to the
# lines that touch our columns). llmtuner 0.5.3 `convert_alpaca`: the response column holds a list -> one assistant
# message per element, chosen first. llamafactory 0.9.x `AlpacaDatasetConverter`: with `ranking`, the `chosen` and
# `rejected` columns named in the entry (a missing name is `None`, hence the `KeyError: None` seen with old files).
def read_lf05(entry, row):
    cols = entry["columns"]
    prompt = row[cols["prompt"]] + ("\n" + row[cols["query"]] if row.get(cols["query"]) else "")
    resp = row[cols["response"]]
    assert entry.get("ranking") and isinstance(resp, list) and len(resp) == 2
    return prompt, resp[0], resp[1]

def read_lf09(entry, row):
    cols = entry["columns"]
    prompt = row[cols["prompt"]] + ("\n" + row[cols["query"]] if row.get(cols["query"]) else "")
    chosen, rejected = row[cols.get("chosen")], row[cols.get("rejected")]
    assert entry.get("ranking") and isinstance(chosen, str) and isinstance(rejected, str)
    return prompt, chosen, rejected

def test_kc_file_loads_in_both_llama_factory_generations(tmp_path):
    run, out = make_run(tmp_path, "lf")
    entry = json.loads((out / "dataset_info.json").read_text())["knowtuning_kc"]
    rows = json.loads((out / entry["file_name"]).read_text())
    trl = read_jsonl(out / "kc_trl.jsonl")
    assert rows and len(rows) == len(trl)
    for row, t in zip(rows, trl):
        a, b = read_lf05(entry, row), read_lf09(entry, row)
        assert a == b and t["prompt"].endswith(a[0] + "\n\n### Response:\n") and a[1:] == (t["chosen"], t["rejected"])
    old = {**entry, "columns": {k: v for k, v in entry["columns"].items() if k not in ("chosen", "rejected")}}
    with pytest.raises(KeyError):   # the entry this project wrote before: 0.9.x cannot read it
        read_lf09(old, {k: v for k, v in rows[0].items() if k not in ("chosen", "rejected")})

def lf_reader(spec: str, pkg: str, where: Path):
    """LLaMA-Factory's own dataset reader (`data/parser.py` and `data/aligner.py`) from its wheel on PyPI, imported
    without the package's `__init__` (which imports its whole training stack); only `extras.misc` is a stub: the
    model-hub switches, off. The same modules read `dataset_info.json` and the rows when LLaMA-Factory trains."""
    import importlib, subprocess, sys, types, zipfile
    subprocess.run([sys.executable, "-m", "pip", "download", spec, "--no-deps", "-q", "-d", str(where)], check=True)
    zipfile.ZipFile(next(where.glob("*.whl"))).extractall(where)
    for name in [m for m in sys.modules if m == pkg or m.startswith(pkg + ".")]:
        del sys.modules[name]
    for name in (pkg, f"{pkg}.data", f"{pkg}.extras"):
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__path__ = [str(where / name.replace(".", "/"))]
    sys.modules[f"{pkg}.extras.misc"] = types.SimpleNamespace(use_modelscope=lambda: False, use_openmind=lambda: False)
    return importlib.import_module(f"{pkg}.data.parser"), importlib.import_module(f"{pkg}.data.aligner")

@pytest.mark.slow
@pytest.mark.parametrize("spec,pkg", [("llmtuner==0.5.3", "llmtuner"), ("llamafactory==0.9.0", "llamafactory")])
def test_kc_file_read_by_llama_factory_itself(tmp_path, spec, pkg):
    "The KC set as LLaMA-Factory 0.5.3 (the release's) and 0.9.0 read it: the prompt, then chosen before rejected."
    from types import SimpleNamespace
    from datasets import Dataset
    run, out = make_run(tmp_path, "lf")
    parser, aligner = lf_reader(spec, pkg, tmp_path / "lf")
    args = SimpleNamespace(dataset="knowtuning_kc", dataset_dir=str(out), interleave_probs=None, streaming=True)
    old = pkg == "llmtuner"  # 0.9 takes the names and folder, and the training arguments (unused when streaming)
    attr, = parser.get_dataset_list(args) if old else parser.get_dataset_list(["knowtuning_kc"], str(out))
    rows = Dataset.from_list(json.loads((out / attr.dataset_name).read_text()))
    got = list(aligner.align_dataset(rows, attr, args, *([] if old else [None])))
    trl = read_jsonl(out / "kc_trl.jsonl")
    assert attr.ranking and len(got) == len(trl) > 0
    for g, t in zip(got, trl):
        prompt, response = (g["prompt"], g["response"]) if old else (g["_prompt"], g["_response"])
        assert [m["role"] for m in prompt] == ["user"]
        assert t["prompt"].endswith(prompt[0]["content"] + "\n\n### Response:\n")
        assert [m["content"] for m in response] == [t["chosen"], t["rejected"]]

def test_fingerprints_follow_the_declared_fields():
    "Speed and logging keys never rebuild a stage; keys that change its output always do."
    from knowtuning.ka import KA
    from knowtuning.kc import KC
    from knowtuning.train import train_spec
    from knowtuning.generate import gen_spec
    from knowtuning.evaluate import eval_spec
    from knowtuning.baselines import SAMPLES, prefs_spec
    from knowtuning.runs import stage_fingerprint
    specs = [KA, KC, train_spec("knowtuning"), train_spec("sft"), gen_spec("knowtuning"), eval_spec(["sft", "knowtuning"]),
             SAMPLES, prefs_spec("rlaif")]
    fps = lambda *ov: [stage_fingerprint(s, load_config("smoke", overrides=list(ov))) for s in specs]
    base = fps()
    for speed in ("train.logging_steps=3", "teacher.concurrency=64", "judge.timeout=5", "generate.batch_size=1",
                  "train.per_device_batch=1", "train.padding_free=false", "train.gradient_checkpointing=true",
                  "ka.batch_questions=2", "generate.api.concurrency=2", "teacher.cache=/tmp/x.sqlite", "min_yield=0.5"):
        assert fps(speed) == base, speed
    changes = {"ka.alpha=0.3": [KA], "kc.beta=0.3": [KC], "train.lr=3e-4": [train_spec("sft")], "train.kc_lr=3e-5": [train_spec("knowtuning")],
               "generate.max_new_tokens=8": [gen_spec("knowtuning"), SAMPLES], "judge.backend=llm": [eval_spec(["sft", "knowtuning"]), prefs_spec("rlaif")],
               "teacher.model=other": [], "teacher.backend=llm": [KA, KC, eval_spec(["sft", "knowtuning"]), prefs_spec("rlaif")]}
    for key, must in changes.items():
        got = fps(key)
        changed = {s.name for s, a, b in zip(specs, base, got) if a != b}
        assert {s.name for s in must} <= changed, (key, changed)
    # an offline teacher's model name changes nothing (it is not used)
    assert fps("teacher.model=other") == base

def test_training_fingerprints_follow_the_objective():
    "A DPO key retrains the KC-trained systems and what depends on them, never an SFT system; an SFT key reaches all."
    from knowtuning.ka import KA
    from knowtuning.kc import KC
    from knowtuning.train import train_spec
    from knowtuning.generate import gen_spec
    from knowtuning.pipeline import training_order
    from knowtuning.runs import stage_fingerprint
    systems = ["sft", "ka", "knowtuning", "wo_ka", "wo_factuality"]

    def chain(*ov):
        cfg, fps = load_config("smoke", overrides=list(ov)), {}
        for spec in [KA, KC] + [train_spec(s) for s in training_order(systems)] + [gen_spec(s) for s in systems]:
            fps[spec.name] = stage_fingerprint(spec, cfg, {n: fps[n] for n in spec.needs})
        return fps

    base = chain()
    changed = lambda *ov: {k for k, v in chain(*ov).items() if v != base[k]}
    dpo = {f"{p}_{s}" for p in ("train", "gen") for s in ("knowtuning", "wo_ka", "wo_factuality")}
    for key in ("train.kc_lr=3e-5", "train.dpo_beta=0.2", "train.ftx=0.1", "train.reference=ka"):
        assert changed(key) == dpo, key
    assert changed("train.lr=3e-4") == {f"{p}_{s}" for p in ("train", "gen") for s in systems}
    assert changed("train.lora.r=4") == changed("train.lr=3e-4")
