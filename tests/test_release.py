"The paper presets against the KnowTuning release: its token stream, its scripts' flags, its data files."
import hashlib, json, shlex, shutil, tempfile, threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
import pytest
from conftest import kt
from knowtuning.config import load_config
from knowtuning.data import (RELEASE_FILES, DataError, blob_id, encode_example, encode_prompt, fetch_release, load_dataset,
                             prompt, question)

# -- the token stream -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_tok():
    from transformers import AutoTokenizer
    from knowtuning.assets import smollm2_dir
    return AutoTokenizer.from_pretrained(smollm2_dir())

def test_llmtuner_053_fixture_ids(shared, smollm2_tok):
    "Our `alpaca` encoder gives, id for id, what llmtuner 0.5.3's own Template.encode_oneturn gave."
    fx = json.loads((shared / "fixtures" / "lf053_alpaca_smollm2.json").read_text())
    assert len(fx) == 4 and any(r["input"] for r in fx)
    for r in fx:
        p, a = encode_example(smollm2_tok, prompt(r), r["output"], "alpaca", cutoff=1024)
        assert p == r["prompt_ids"], (r["instruction"], smollm2_tok.decode(p), r["prompt_text"])
        assert a == r["response_ids"], r["instruction"]
    # the template LLaMA-Factory 0.9 renders, and the tokenizer's own handling of one string with special tokens,
    # are not the release's stream
    r = fx[0]
    assert encode_example(smollm2_tok, prompt(r, "alpaca_lf09"), r["output"], "alpaca_lf09")[0] != r["prompt_ids"]

@pytest.fixture(scope="module")
def sentencepiece_tok(tmp_path_factory):
    "A small SentencePiece BPE model (Llama-2's kind: word-boundary marker, byte fallback) trained offline."
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    d = tmp_path_factory.mktemp("sp")
    recs = load_dataset("demo_train").records + load_dataset("demo_test").records
    (d / "corpus.txt").write_text("\n".join(r["instruction"] + "\n" + r["output"] for r in recs) + "\n### Instruction:\n"
                                  "### Response:\nBelow is an instruction that describes a task.")
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=600,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, byte_fallback=True, minloglevel=2)
    return LlamaTokenizer.from_pretrained(str(d))

def test_ka_scores_the_training_tokens_on_both_tokenizer_kinds(smollm2_tok, sentencepiece_tok):
    "An atom that is the whole answer is scored on exactly the ids the student is trained on (minus EOS)."
    from knowtuning.ka import encode
    q, ans = "What is photosynthesis?", "Photosynthesis is how plants make sugar from light."
    for tok in (smollm2_tok, sentencepiece_tok):
        p, (atom,) = encode(tok, q, [ans])
        tp, ta = encode_example(tok, prompt(q), ans)
        assert (p, atom + [tok.eos_token_id]) == (tp, ta), type(tok).__name__
        assert tok.bos_token_id not in p
    # why it matters: on byte-level BPE a leading space changes the first token ...
    assert smollm2_tok.encode(" " + ans, add_special_tokens=False) != encode(smollm2_tok, q, [ans])[1][0]
    # ... and on SentencePiece a separately encoded piece starts with the word-boundary marker, which the same text
    # inside one string after a newline does not: the pieces must be encoded separately, as llmtuner did
    sp, text = sentencepiece_tok, prompt(q) + ans
    assert sp.convert_ids_to_tokens(encode_example(sp, prompt(q), ans)[1])[0].startswith("\u2581")
    assert sp.encode(text, add_special_tokens=False) != sum(encode_example(sp, prompt(q), ans), [])[:-1]

# -- the release scripts vs the paper presets -------------------------------------------------------------------------

def flags(sh: Path) -> dict:
    "The `--flag value` pairs of one `python src/train_bash.py ...` command line (bare flags -> True)."
    words = shlex.split(sh.read_text().split(">")[0])
    words = words[words.index("src/train_bash.py") + 1:]
    out, i = {}, 0
    while i < len(words):
        k = words[i][2:]
        if i + 1 < len(words) and not words[i + 1].startswith("--"): out[k], i = words[i + 1], i + 2
        else: out[k], i = True, i + 1
    return out

# flags that name files and folders, or only change logging, caching and plots: no effect on the trained weights
NO_EFFECT = {"do_train", "do_predict", "overwrite_cache", "overwrite_output_dir", "plot_loss", "output_dir",
             "predict_with_generate", "finetuning_type", "stage", "checkpoint_dir", "resume_lora_training"}

def check_train(f: dict, cfg, kind: str) -> dict:
    "Each training flag -> (release value, ours); returns the mismatches."
    from knowtuning.config import SYSTEMS
    from knowtuning.trainer import trl_config
    t = cfg.train
    dpo = kind == "dpo"
    args = trl_config(load_config(cfg.name, overrides=["student.device=cpu"]), kind, tempfile.mkdtemp(),
                      has_eval=(t.kc_eval_holdout if dpo else t.eval_holdout) > 0)
    ours = {
        "model_name_or_path": "llama_7b_base" if cfg.student.model == "meta-llama/Llama-2-7b-hf" else cfg.student.model,
        "template": cfg.student.template, "lora_target": ",".join(t.lora.targets),
        "per_device_train_batch_size": t.kc_batch_size if dpo else t.batch_size,   # x accumulation 1 in the release
        "gradient_accumulation_steps": 1, "lr_scheduler_type": t.scheduler,
        "learning_rate": t.kc_lr if dpo else t.lr, "num_train_epochs": t.kc_epochs if dpo else t.epochs,
        "bf16": cfg.student.dtype == "bfloat16",
    }
    rel = {k: f[k] for k in ours}
    rel["model_name_or_path"] = Path(rel["model_name_or_path"]).name
    rel["per_device_train_batch_size"] = int(f["per_device_train_batch_size"]) * int(f["gradient_accumulation_steps"])
    rel["gradient_accumulation_steps"] = int(f["gradient_accumulation_steps"])
    for k in ("learning_rate", "num_train_epochs"): rel[k] = float(rel[k])
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == ours["per_device_train_batch_size"]
    if dpo:
        ours.update(dpo_ftx=t.ftx, logging_steps=t.logging_steps, val_size=t.kc_eval_holdout)
        rel.update(dpo_ftx=float(f["dpo_ftx"]), logging_steps=int(f["logging_steps"]), val_size=int(f.get("val_size", 0)))
        # named deviation: the release saves every 1000 steps (never, in one epoch); we save every 10% to resume
        assert int(f.pop("save_steps")) == 1000 and t.save_steps == 0.1
        assert not args.load_best_model_at_end and SYSTEMS["knowtuning"].init == "ka"   # final weights, from KA
        assert f["checkpoint_dir"].endswith("/ka") and f["resume_lora_training"] == "1"
    else:
        ours.update(val_size=t.eval_holdout, eval_steps=t.save_steps, save_steps=t.save_steps,
                    evaluation_strategy=args.eval_strategy, load_best_model_at_end=args.load_best_model_at_end)
        rel.update(val_size=int(f["val_size"]), eval_steps=float(f["eval_steps"]), save_steps=float(f["save_steps"]),
                   evaluation_strategy=f["evaluation_strategy"], load_best_model_at_end=f["load_best_model_at_end"])
        assert (args.eval_steps, args.save_steps) == (t.save_steps, t.save_steps)
    unknown = set(f) - set(rel) - NO_EFFECT - {"dataset"}
    assert not unknown, f"release flags this test does not map: {unknown}"
    return {k: (rel[k], ours[k]) for k in rel if rel[k] != ours[k]}

@pytest.mark.parametrize("domain,train_set", [("dolly", "dolly_train"), ("medquad", "medquad_train")])
def test_release_scripts_match_paper_presets(release, domain, train_set):
    cfg = load_config(f"paper-{domain}")
    sd = release / "scripts" / domain
    for script, kind in ((f"sft_{domain}.sh", "sft"), (f"ka_{domain}.sh", "sft"), (f"kc_{domain}.sh", "dpo")):
        f = flags(sd / script)
        assert f["stage"] == kind, script
        assert check_train(f, cfg, kind) == {}, script
    assert flags(sd / f"sft_{domain}.sh")["dataset"] == train_set == cfg.data.train
    assert flags(sd / f"ka_{domain}.sh")["dataset"] == f"{domain}_KA"
    assert flags(sd / f"kc_{domain}.sh")["dataset"] == f"{domain}_KC"
    # prediction: the domain's test set, 200 questions, LLaMA-Factory 0.5.3's sampling defaults
    f = flags(sd / f"test_{domain}.sh")
    assert f["dataset"] in cfg.data.test and int(f["max_samples"]) == cfg.data.n_test
    assert int(f["per_device_eval_batch_size"]) == cfg.generate.batch_size and f["template"] == cfg.student.template
    assert set(f) - NO_EFFECT == {"model_name_or_path", "dataset", "template", "max_samples", "per_device_eval_batch_size"}
    g = cfg.generate
    assert (g.do_sample, g.temperature, g.top_p, g.top_k, g.max_new_tokens) == (True, 0.95, 0.7, 50, 512)

def test_paper_test_sets_per_domain():
    assert load_config("paper-dolly").data.test == ["dolly_test", "nq_test", "eli5_test"]
    assert load_config("paper-medquad").data.test == ["medquad_test"]
    assert {"sft", "rlaif", "facttune", "knowtuning", "wo_ka", "wo_completeness", "wo_factuality",
            "wo_logicality"} <= set(load_config("paper-medquad").systems)
    r = kt("config", "--preset", "paper-medquad", check=True)
    assert "train: medquad_train" in r.stdout and "save_steps: 0.1" in r.stdout and "do_sample: true" in r.stdout


def test_config_explain_prints_each_keys_value_type_default_and_help():
    from knowtuning.config import explain
    r = kt("config", "--preset", "tiny", "--explain", "train.lr", check=True)
    assert r.stdout.startswith("train.lr = 0.0005   [float]   (default 0.0001)\n") and "learning rate" in r.stdout
    bad = kt("config", "--explain", "train.lrr")
    assert bad.returncode == 2 and "config key 'train.lrr' does not exist" in bad.stderr
    every = kt("config", "--explain", check=True).stdout.splitlines()
    heads = [l.split(" ")[0] for l in every if not l.startswith(" ")]
    assert heads == [r["key"] for r in explain()] and all(l.strip() for l in every)   # every key, each with help

# -- fetching the release files ---------------------------------------------------------------------------------------

@pytest.fixture
def release_server(release, tmp_path):
    "A loopback HTTP server laid out like raw.githubusercontent.com/<owner>/<repo>: <commit>/<path in the repository>."
    root = tmp_path / "www"
    for name, (commit, path, *_) in RELEASE_FILES.items():
        if (release / f"{name}.json").exists() and name != "medquad_train_146391d":
            (root / commit / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(release / f"{name}.json", root / commit / path)
    bad_commit, bad_path = RELEASE_FILES["dolly_valid"][:2]   # one corrupted file: a record changed
    recs = json.loads((root / bad_commit / bad_path).read_text())
    recs[3]["output"] += " (edited)"
    (root / bad_commit / bad_path).write_text(json.dumps(recs))
    srv = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(root)))
    srv.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()

def test_fetch_release_over_http_refuses_a_corrupted_file(release_server, tmp_path):
    dest = tmp_path / "home" / "release"
    r = kt("data", "fetch-release", "--url", release_server, env={"KNOWTUNING_HOME": str(tmp_path / "home")})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "dolly_valid: blob id" in r.stderr and "REFUSED" in r.stdout
    for name in ("nq_test", "eli5_test", "medquad_train_146391d", "dolly_train_KA", "dolly_train_KC",
                 "medquad_train_KA", "medquad_train_KC"):      # not in ../shared: the server answers 404
        assert f"{name}: could not download" in r.stderr
    got = sorted(p.name for p in dest.iterdir())
    assert got == ["dolly_test.json", "dolly_train.json", "lima_test.json", "medquad_test.json", "medquad_train.json",
                   "medquad_valid.json"], got                     # nothing half-written, nothing corrupted
    for p in dest.iterdir():
        assert hashlib.sha256(p.read_bytes()).hexdigest() == RELEASE_FILES[p.stem].sha256
        assert blob_id(p.read_bytes()) == RELEASE_FILES[p.stem].blob
    # the registry now resolves the names from there, with no other source configured
    env = {"KNOWTUNING_HOME": str(tmp_path / "home"), "KNOWTUNING_RELEASE_DATA": ""}
    r = kt("data", "medquad_train", env=env, check=True)
    assert "1000 records" in r.stdout and str(dest) in r.stdout
    # a second fetch keeps what is verified and does not download it again
    r = kt("data", "fetch-release", "--url", release_server, "--only", "dolly_test, lima_test", env=env, check=True)
    assert r.stdout.count("already installed") == 2                 # "a, b": spaces stripped
    # an installed file edited afterwards: `doctor` names it, and loading it is an error
    (dest / "lima_test.json").write_text((dest / "lima_test.json").read_text().replace("a", "e", 1))
    r = kt("doctor", env=env)
    assert r.returncode == 1 and "EDITED  release lima_test" in r.stdout and "ok      release dolly_test" in r.stdout
    assert "fetch-release --only lima_test" in r.stdout
    r = kt("data", "lima_test", env=env)
    assert r.returncode == 2 and "edited since it was fetched" in r.stderr

def test_fetch_release_checks_everything_before_it_starts(tmp_path):
    home = {"KNOWTUNING_HOME": str(tmp_path / "home")}
    r = kt("data", "fetch-release", "--from", tmp_path / "nowhere", env=home)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such folder" in r.stderr, r.stderr
    assert r.stdout == "" and not (tmp_path / "home" / "release").exists()     # one line, nothing created
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "dolly_test.json").write_text("[]")
    r = kt("data", "fetch-release", "--from", tmp_path / "src", "--only", "dolly_test,bogus", env=home)
    assert r.returncode == 2 and "'bogus'" in r.stderr and not (tmp_path / "home" / "release").exists()

def test_release_ka_kc_files_verified_by_blob_id_over_http(tmp_path, monkeypatch):
    """The release's KA/KC files (unreadable here) are fetched and verified by blob id: test files in the release's
    layout, whose blob ids the test computes, served by a loopback server laid out like raw.githubusercontent.com."""
    import knowtuning.data as D
    ka = json.dumps([{"instruction": "What is X?", "input": "", "output": "X is a thing."}]).encode()
    kc = json.dumps([{"instruction": "What is X?", "input": "", "output": ["X is a thing.", "X is not."]}]).encode()
    root = tmp_path / "www"
    for name, data in (("dolly_train_KA", ka), ("dolly_train_KC", kc)):
        f = RELEASE_FILES[name]
        (root / f.commit / f.path).parent.mkdir(parents=True, exist_ok=True)
        (root / f.commit / f.path).write_bytes(data)
        monkeypatch.setitem(D.RELEASE_FILES, name, f._replace(blob=blob_id(data)))
    # the real table's ids are refused for these stand-ins: a wrong blob id is never installed
    f = RELEASE_FILES["medquad_train_KA"]
    (root / f.commit / f.path).parent.mkdir(parents=True, exist_ok=True)
    (root / f.commit / f.path).write_bytes(ka)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(root)))
    srv.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url, dest = f"http://127.0.0.1:{srv.server_address[1]}", tmp_path / "rel"
        fetch_release(None, dest, url, ["dolly_train_KA", "dolly_train_KC"], log=lambda s: None)
        assert blob_id((dest / "dolly_train_KC.json").read_bytes()) == D.RELEASE_FILES["dolly_train_KC"].blob
        with pytest.raises(DataError, match="medquad_train_KA: blob id .* is not the release's a?21c26cdb1b93"):
            fetch_release(None, dest, url, ["medquad_train_KA"], log=lambda s: None)
        assert not (dest / "medquad_train_KA.json").exists()
    finally:
        srv.shutdown()

def test_fetch_release_from_a_folder(release, tmp_path):
    dest = fetch_release(release, tmp_path / "rel", names=["medquad_test", "lima_test"], log=lambda s: None)
    assert len(load_dataset(str(dest / "medquad_test.json"))) == 200
    with pytest.raises(DataError, match="no file for 'nq_test'"):
        fetch_release(release, tmp_path / "rel", names=["nq_test"], log=lambda s: None)

# -- training on the release's own KA / KC sets --------------------------------------------------------------------------

def release_sets(release, folder: Path) -> Path:
    "A release folder with dolly_train and KA / KC sets in the release's layout, made here (the real ones: blob ids)."
    folder.mkdir(parents=True)
    train = json.loads((release / "dolly_train.json").read_text())
    shutil.copy(release / "dolly_train.json", folder / "dolly_train.json")
    ka = train[:6] + [{"instruction": f"Which fact about '{r['instruction'][:40]}' matters most?", "input": "",
                       "output": r["output"].split(".")[0] + "."} for r in train[:3]]
    kc = [{"instruction": r["instruction"], "input": r["input"], "output": [r["output"], r["output"].split(".")[0] + "."]}
          for r in train[:6]]
    (folder / "dolly_train_KA.json").write_text(json.dumps(ka))
    (folder / "dolly_train_KC.json").write_text(json.dumps(kc))
    return folder

def test_smoke_trains_from_the_release_sets_without_a_teacher(release, tmp_path, monkeypatch):
    from knowtuning.ka import ka_stage
    from knowtuning.kc import kc_stage
    from knowtuning.train import train_stage
    from knowtuning.pipeline import plan
    from knowtuning.report import data_sources
    from knowtuning.runs import Run, YieldError, read_jsonl
    monkeypatch.setenv("KNOWTUNING_RELEASE_DATA", str(release_sets(release, tmp_path / "rel")))
    # an LLM teacher on a closed port: a single teacher call would fail the run
    ovr = ["data.train=dolly_train", "ka.source=release", "kc.source=release", "student.model=tiny-random",
           "teacher.backend=llm", "teacher.base_url=http://127.0.0.1:9/v1", "teacher.model=none",
           "systems=[sft,knowtuning,wo_factuality]"]
    cfg = load_config("smoke", overrides=ovr)
    assert not [r for r in plan(cfg) if r["stage"] in ("ka", "kc")]          # construction costs nothing
    run = Run(cfg, tmp_path / "runs")
    ka_stage(cfg, run)
    kc_stage(cfg, run)
    st = run.manifest["stages"]
    assert (st["ka"]["stats"]["source"], st["ka"]["stats"]["original"], st["ka"]["stats"]["rewritten"]) == (
        "dolly_train_KA", 6, 3)
    assert st["kc"]["stats"]["blob"] == blob_id((tmp_path / "rel" / "dolly_train_KC.json").read_bytes())
    assert st["ka"]["llm"] is None and st["kc"]["llm"] is None               # no ledger: no call
    kc = read_jsonl(run.path("kc") / "kc_trl.jsonl")
    assert len(kc) == 6 and {r["aspect"] for r in kc} == {"unknown"}
    for s in ("sft", "ka", "knowtuning"):
        assert (train_stage(cfg, run, s) / "adapter_model.safetensors").exists()
    assert run.manifest["stages"]["train_ka"]["examples"] == 9 and run.manifest["stages"]["train_knowtuning"]["examples"] == 6
    with pytest.raises(YieldError, match="does not label aspects"):
        train_stage(cfg, run, "wo_factuality")
    # the side-by-side table: our copy of the set against the release's file
    r = kt("data", "compare", run.path("kc") / "kc.json", tmp_path / "rel" / "dolly_train_KC.json", check=True)
    lines = {l.split("  ")[0].strip(): l.split()[-2:] for l in r.stdout.splitlines()[1:]}
    assert lines["rows"] == ["6", "6"] and lines["questions also in the other set"] == ["1.000", "1.000"]
    assert lines["completeness (recovered)"] == ["1.000", "1.000"]      # the made-up rejected answers are deletions
    text = data_sources(run.manifest)
    assert "KA `dolly_train_KA`" in text and "KC `dolly_train_KC`" in text and "no teacher calls" in text
    # ka.source: release with our KC: a clear error, not a silent empty set
    cfg2 = load_config("smoke", overrides=ovr[:2] + ["student.model=tiny-random"])
    run2 = Run(cfg2, tmp_path / "runs", "mixed")
    ka_stage(cfg2, run2)
    with pytest.raises(YieldError, match="set kc.source too"):
        kc_stage(cfg2, run2)

# -- honest prices -----------------------------------------------------------------------------------------------------

def test_plan_prices_from_genai_prices_and_unknown_is_never_zero(release, tmp_path):
    env = {"KNOWTUNING_RUNS": str(tmp_path)}
    r = kt("plan", "--preset", "paper-dolly", "--set", "data.test=[dolly_test]", env=env, check=True)
    total = r.stdout.strip().splitlines()[-1].split()
    assert total[0] == "total" and float(total[4]) > 100, r.stdout      # gpt-4o / gpt-4o-mini at OpenAI's prices
    # the same plan in this process (the command's output format is checked above; a subprocess costs ~8 s)
    from knowtuning.pipeline import plan, format_plan
    ovr = ["data.test=[dolly_test]"]
    out = format_plan(plan(load_config("paper-dolly", overrides=ovr + ["ka.source=release", "kc.source=release"])))
    assert not [l for l in out.splitlines() if l.split()[0] in ("ka", "kc")]   # no construction calls
    # a remote endpoint nobody has a price for: "unknown" in the plan, and reproduce asks (here: refuses without --yes)
    remote = ["judge.base_url=https://vllm.example.org/v1", "judge.model=llama-70b"]
    out = format_plan(plan(load_config("paper-dolly", overrides=ovr + remote)))
    assert "unknown" in out and "+ unknown (llama-70b)" in out

def test_an_unknown_price_is_refused_without_yes(tmp_path):
    "Needs no release data: the smoke preset's own test set, a remote judge nobody has a price for."
    env = {"KNOWTUNING_RUNS": str(tmp_path)}
    remote = ["--set", "judge.base_url=https://vllm.example.org/v1", "--set", "judge.model=llama-70b"]
    r = kt("reproduce", "--preset", "smoke", "--set", "judge.backend=llm", *remote, env=env)
    assert r.returncode == 3 and "unknown price for llama-70b" in r.stderr and "--yes" in r.stderr, r.stderr
    assert not (tmp_path / "smoke").exists()
