import json, math, shutil
from pathlib import Path
import pytest, torch
import torch.nn.functional as F
from transformers import TrainerCallback
from knowtuning.config import load_config
from knowtuning.assets import load_model
from knowtuning.trainer import KCTrainer, GradGuard, trl_config, train_sft, train_dpo
from knowtuning.train import train_stage

TINY = ["student.model=tiny-random", "train.per_device_batch=4", "train.batch_size=4", "train.kc_batch_size=4",
        "train.save_steps=100", "train.lr=3e-3", "train.kc_lr=1e-3", "train.eval_holdout=0", "train.precompute_ref=false"]

def rows(n=8):
    return [{"prompt": f"Question {i}: name the colour of object {i}.\nAnswer:", "completion": f" The object {i} is {['red', 'green', 'blue'][i % 3]}." + " Indeed it is." * (i % 3)} for i in range(n)]

def prefs(n=8):
    return [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": " I am not sure, maybe it is a colour" + " really" * (i % 4) + "."}
            for i, r in enumerate(rows(n))]

@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory):
    cfg = load_config("smoke", overrides=TINY + ["train.max_steps=20", "train.lr=5e-3", "train.scheduler=constant",
                                                "train.per_device_batch=8", "train.batch_size=8",
                                                "train.lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"])
    out = tmp_path_factory.mktemp("sft")
    train_sft(cfg, rows(), out)
    return cfg, out

def test_sft_loss_falls_over_20_steps(sft_adapter):
    cfg, out = sft_adapter
    losses = [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert len(losses) == 20
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # a random 2-layer model starts at ~ln(vocab) = 10.8; the full batch every step makes the curve smooth
    assert last < first - 0.5, losses
    assert all(b <= a + 0.02 for a, b in zip(losses, losses[1:])), losses
    assert (out / "loss.png").stat().st_size > 3000

def test_merged_adapter_generates_the_same_greedy_answers(sft_adapter):
    "Generation merges the LoRA adapter into the weights first: the greedy answers of a trained adapter do not change."
    from knowtuning.generate import generate, merged
    from knowtuning.config import GenerateCfg
    cfg, out = sft_adapter
    model, tok = load_model(cfg.student, adapter=out / "adapter")
    g = GenerateCfg(max_new_tokens=16, batch_size=4)
    prompts = [r["prompt"] for r in rows()]
    unmerged = generate(model.eval(), tok, prompts, g, progress=False)
    assert any(unmerged) and len(set(unmerged)) > 1          # a trained adapter that says different things
    assert generate(merged(model).eval(), tok, prompts, g, progress=False) == unmerged

def kc_trainer(cfg, adapter, reference, tmp_path, padding_free=True):
    from datasets import Dataset
    model, tok = load_model(cfg.student, adapter=adapter / "adapter", trainable=True)
    args = trl_config(cfg, "dpo", tmp_path / f"ck-{reference}-{cfg.train.precompute_ref}")
    return KCTrainer(model=model, args=args, train_dataset=Dataset.from_list(prefs()), processing_class=tok, reference=reference, ftx=0.2,
                     padding_free=padding_free)

def hand_logps(model, batch):
    ids, cm = batch["input_ids"], batch["completion_mask"]
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    lp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0] * cm[:, 1:]
    return lp, cm[:, 1:]

@pytest.mark.parametrize("padding_free", [True, False])
def test_kc_loss_equals_hand_computation(sft_adapter, tmp_path, padding_free):
    cfg, adapter = sft_adapter
    tr = kc_trainer(cfg, adapter, "base", tmp_path, padding_free)
    batch = next(iter(tr.get_train_dataloader()))
    model = tr.model
    model.eval()
    with torch.no_grad():
        loss = tr.compute_loss(model, batch).item()
        lp, m = hand_logps(model, batch)
        with model.disable_adapter(): ref_lp, _ = hand_logps(model, batch)
    n = lp.size(0) // 2
    pol, ref = lp.sum(1), ref_lp.sum(1)
    z = 0.1 * ((pol[:n] - ref[:n]) - (pol[n:] - ref[n:]))
    dpo = sum(math.log1p(math.exp(-x)) for x in z.tolist()) / n          # -log sigmoid(x)
    per_seq_nll = [(-(lp[i] * m[i]).sum() / m[i].sum()).item() for i in range(n)]
    release = dpo + 0.2 * sum(per_seq_nll) / n
    assert abs(loss - release) < 1e-5, (loss, release)
    # trl's built-in "sft" term (mean over all chosen tokens of the batch) is a different number when lengths differ
    trl_term = dpo + 0.2 * (-(lp[:n] * m[:n]).sum() / m[:n].sum()).item()
    assert len(set(m[:n].sum(1).tolist())) > 1 and abs(trl_term - release) > 1e-4

def test_reference_base_vs_ka_differ(sft_adapter, tmp_path):
    cfg, adapter = sft_adapter
    t_base = kc_trainer(cfg, adapter, "base", tmp_path)
    batch = next(iter(t_base.get_train_dataloader()))
    with torch.no_grad(): base_c, base_r = t_base.compute_ref_log_probs(t_base.model, batch)
    t_ka = kc_trainer(cfg, adapter, "ka", tmp_path)
    assert "ref" in t_ka.model.peft_config and "ref" not in t_base.model.peft_config
    with torch.no_grad():
        ka_c, ka_r = t_ka.compute_ref_log_probs(t_ka.model, batch)
        pol_lp, _ = hand_logps(t_ka.model.eval(), batch)
    assert (base_c - ka_c).abs().max() > 1e-3
    torch.testing.assert_close(ka_c, pol_lp.sum(1)[: ka_c.numel()], atol=1e-4, rtol=1e-4)  # ka reference = the KA adapter itself

@pytest.mark.parametrize("reference", ["base", "ka"])
def test_precomputed_reference_is_the_configured_one(sft_adapter, tmp_path, reference):
    # trl precomputes reference log-probs inside its constructor, while its own "ref" adapter copy (= ka) is active
    cfg, adapter = sft_adapter
    cfg = load_config("smoke", overrides=TINY[:-1] + ["train.precompute_ref=true"])
    tr = kc_trainer(cfg, adapter, reference, tmp_path)
    ds = tr.train_dataset
    batch = tr.data_collator([ds[i] for i in range(len(ds))])
    model = tr.model.eval()
    with torch.no_grad():
        if reference == "base":
            with model.disable_adapter(): lp, _ = hand_logps(model, batch)
        else: lp, _ = hand_logps(model, batch)        # before training the policy is the KA adapter itself
    n = len(ds)
    torch.testing.assert_close(torch.tensor(ds["ref_chosen_logps"]), lp.sum(1)[:n], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(ds["ref_rejected_logps"]), lp.sum(1)[n:], atol=1e-4, rtol=1e-4)

def test_sft_padding_free_same_loss_and_truncation(tmp_path):
    from datasets import Dataset
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    cfg = load_config("smoke", overrides=TINY + ["train.cutoff=24"])
    model, tok = load_model(cfg.student, trainable=True)
    losses = {}
    for free in (True, False):
        coll = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True) if free else None
        tr = SFTTrainer(model=model, args=trl_config(cfg, "sft", tmp_path / str(free)), train_dataset=Dataset.from_list(rows()),
                        processing_class=tok, data_collator=coll)
        assert max(len(x) for x in tr.train_dataset["input_ids"]) == 24      # truncated to the cutoff either way
        batch = next(iter(tr.get_train_dataloader()))
        assert ("attention_mask" not in batch and batch["input_ids"].shape[0] == 1) if free else batch["input_ids"].shape[0] == 4
        with torch.no_grad(): losses[free] = tr.compute_loss(tr.model.eval(), batch).item()
    assert abs(losses[True] - losses[False]) < 1e-5, losses

def test_padding_free_check_catches_attention_that_ignores_positions(monkeypatch):
    import transformers.masking_utils as mu
    from knowtuning.trainer import check_padding_free
    model, tok = load_model(load_config("smoke").student)
    assert check_padding_free(model, tok) < 1e-3                         # SmolLM2 keeps packed sequences apart
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)   # an attention blind to restarts
    with pytest.raises(RuntimeError, match="train.padding_free: false"): check_padding_free(model, tok)

class KillAt(TrainerCallback):
    def __init__(self, step): self.step = step
    def on_save(self, args, state, control, **kw):
        if state.global_step == self.step: raise KeyboardInterrupt(f"killed after checkpoint {self.step}")

class CountSteps(TrainerCallback):
    def __init__(self): self.n = 0
    def on_step_end(self, *a, **k): self.n += 1

def test_killed_run_resumes_from_checkpoint(tmp_path):
    cfg = load_config("smoke", overrides=TINY + ["train.max_steps=6", "train.save_steps=2"])
    with pytest.raises(KeyboardInterrupt): train_sft(cfg, rows(), tmp_path, callbacks=[KillAt(4)])
    assert (tmp_path / "checkpoints" / "checkpoint-4").exists() and not (tmp_path / "adapter").exists()
    c = CountSteps()
    train_sft(cfg, rows(), tmp_path, callbacks=[c])
    assert c.n == 2                                       # steps 5 and 6 only
    assert json.loads((tmp_path / "train_stats.json").read_text())["steps"] == 6

def test_killed_after_the_last_checkpoint_takes_no_extra_step(tmp_path):
    "Killed between the last checkpoint and the commit: the rerun finishes from it (transformers would train a step more)."
    cfg = load_config("smoke", overrides=TINY + ["train.max_steps=2", "train.save_steps=1"])
    train_sft(cfg, rows(), tmp_path / "a")
    b = tmp_path / "b" / "checkpoints"
    shutil.copytree(tmp_path / "a" / "checkpoints" / "checkpoint-2", b / "checkpoint-2")
    c = CountSteps()
    train_sft(cfg, rows(), tmp_path / "b", callbacks=[c])
    assert c.n == 0 and json.loads((tmp_path / "b" / "train_stats.json").read_text())["steps"] == 2
    steps = lambda d: [h["step"] for h in json.loads((d / "log_history.json").read_text()) if "loss" in h]
    assert steps(tmp_path / "b") == steps(tmp_path / "a") == [1, 2]
    f = "adapter/adapter_model.safetensors"
    assert (tmp_path / "b" / f).read_bytes() == (tmp_path / "a" / f).read_bytes()

def test_grad_guard_catches_zero_lora_grads():
    lin = torch.nn.Linear(2, 2)
    class M(torch.nn.Module):
        def __init__(self): super().__init__(); self.lora_A = torch.nn.Parameter(torch.ones(2))
    m = M(); m.lora_A.grad = torch.zeros(2)
    with pytest.raises(RuntimeError, match="LoRA gradients are all zero"): GradGuard().on_pre_optimizer_step(None, None, None, model=m)
    m.lora_A.grad = torch.ones(2); GradGuard().on_pre_optimizer_step(None, None, None, model=m)

@pytest.mark.slow  # 40 s; the fast tier trains SFT, KA and KC on SmolLM2 and generates in tests/test_demo.py
def test_smollm2_smoke_sft_ka_kc_and_adapters_generate(tmp_path):
    from knowtuning.runs import Run
    from knowtuning.ka import ka_stage
    from knowtuning.kc import kc_stage
    from knowtuning.data import prompt
    cfg = load_config("smoke", overrides=["data.n_train=4"])
    run = Run(cfg, tmp_path)
    ka_stage(cfg, run); kc_stage(cfg, run)
    for system in ("sft", "ka", "knowtuning"):
        adapter = train_stage(cfg, run, system)
        assert (adapter / "adapter_model.safetensors").exists()
    model, tok = load_model(cfg.student, adapter=adapter)
    ids = tok(prompt("What is DNA?"), return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert run.manifest["stages"]["train_knowtuning"]["steps"] == 2

def test_step_matched_controls_train_as_long_as_what_they_match(tmp_path):
    "sft_ka_steps takes ka's optimizer steps, sft_ka_tokens about ka's supervised tokens, sft_kt_steps ka's + KC's."
    from knowtuning.runs import Run
    from knowtuning.ka import ka_stage
    from knowtuning.kc import kc_stage
    cfg = load_config("smoke", overrides=TINY + ["data.n_train=4", "train.max_steps=-1", "train.epochs=2",
                                                 "train.batch_size=2", "train.per_device_batch=2", "train.kc_batch_size=4",
                                                 "train.save_steps=1000"])   # no checkpoints: steps are counted here
    run = Run(cfg, tmp_path)
    ka_stage(cfg, run); kc_stage(cfg, run)
    for system in ("sft", "ka", "sft_ka_steps", "sft_ka_tokens", "knowtuning", "sft_kt_steps"):
        train_stage(cfg, run, system)
    st = {s: json.loads((run.path(f"train_{s}") / "train_stats.json").read_text())
          for s in ("sft", "ka", "sft_ka_steps", "sft_ka_tokens", "knowtuning", "sft_kt_steps")}
    assert st["sft"]["steps"] == 4 and st["ka"]["steps"] == 8            # 4 rows vs 8 (KA adds as many), 2 epochs
    assert st["sft_ka_steps"]["steps"] == 8                              # 4 epochs of the 4 original rows
    assert st["sft_kt_steps"]["steps"] == 8 + st["knowtuning"]["steps"]
    per_step = st["sft_ka_tokens"]["supervised_tokens"] / st["sft_ka_tokens"]["steps"]
    assert abs(st["sft_ka_tokens"]["supervised_tokens"] - st["ka"]["supervised_tokens"]) <= per_step, st
    assert st["sft_ka_tokens"]["supervised_tokens"] != st["sft"]["supervised_tokens"]

RELEASE = {  # the release's hyperparameters (scripts/*/*.sh; flag by flag in tests/test_release.py)
    "train.lora.r": 8, "train.lora.alpha": 16, "train.lora.dropout": 0.0, "train.lora.targets": ["q_proj", "v_proj"],
    "train.scheduler": "cosine", "train.cutoff": 1024, "train.lr": 1e-4, "train.batch_size": 32, "train.epochs": 3.0,
    "train.eval_holdout": 100, "train.kc_eval_holdout": 0, "train.save_steps": 0.1, "train.kc_lr": 1e-5, "train.kc_batch_size": 16, "train.kc_epochs": 1.0,
    "train.dpo_beta": 0.1, "train.ftx": 0.2, "train.reference": "base", "student.model": "meta-llama/Llama-2-7b-hf",
    "student.dtype": "bfloat16", "generate.max_new_tokens": 512, "data.n_test": 200,
}

@pytest.mark.parametrize("preset", ["paper-dolly", "paper-medquad"])
def test_paper_preset_matches_release(preset):
    cfg = load_config(preset)
    def get(key):
        o = cfg
        for k in key.split("."): o = getattr(o, k)
        return o
    diff = {k: (get(k), v) for k, v in RELEASE.items() if get(k) != v}
    assert diff == {}, diff
    assert set(cfg.systems) >= {"sft", "rlaif", "facttune", "knowtuning", "wo_ka", "wo_completeness", "wo_factuality", "wo_logicality"}
