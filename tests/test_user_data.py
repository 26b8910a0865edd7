"A user's own test sets, passed by absolute path: outputs stay in the run folder and every system keeps its own."
import json
from pathlib import Path
from knowtuning.config import load_config
from knowtuning.data import dataset_key, load_dataset
from knowtuning.evaluate import evaluate_stage
from knowtuning.generate import generate_stage
from knowtuning.runs import Run, read_json, read_jsonl
from knowtuning.train import train_stage

def files_under(root: Path, skip=()) -> set:
    return {p for p in root.rglob("*") if p.is_file() and not any(s in p.parents or p == s for s in skip)}

def test_user_test_sets_by_absolute_path(tmp_path):
    # two files with the same name in two folders of the user's: the names alone would collide
    user = tmp_path / "user"
    recs = {"x": load_dataset("demo_test").records[:2], "y": load_dataset("demo_medical_test").records[:2]}
    paths = []
    for d, r in recs.items():
        (user / d).mkdir(parents=True)
        (user / d / "test.json").write_text(json.dumps(r))
        paths.append(str((user / d / "test.json").resolve()))
    before = files_under(tmp_path)
    cfg = load_config("smoke", overrides=[f"data.test=[{paths[0]}, {paths[1]}]", "systems=[base, sft]",
                                          "train.lr=5e-3", "train.max_steps=4", "generate.max_new_tokens=16"])
    run = Run(cfg, tmp_path / "runs")
    train_stage(cfg, run, "sft")
    for s in ("base", "sft"): generate_stage(cfg, run, s)
    summary = read_json(evaluate_stage(cfg, run, main="sft") / "summary.json")
    keys = [dataset_key(p) for p in paths]
    assert keys[0] != keys[1] and sorted(summary["datasets"]) == sorted(keys)
    for p, k in zip(paths, keys):
        assert summary["datasets"][k]["source"] == p
        preds = {s: read_jsonl(run.path(f"gen_{s}") / f"{k}.jsonl") for s in ("base", "sft")}
        assert [r["question"] for r in preds["sft"]] == [r["instruction"] for r in json.loads(Path(p).read_text())]
        assert [r["prediction"] for r in preds["base"]] != [r["prediction"] for r in preds["sft"]], k
        sc = summary["datasets"][k]["systems"]
        assert sc["base"]["meteor"] != sc["sft"]["meteor"], k
        probe = summary["datasets"][k]["probe"]                  # the probes scored this set's own references
        assert probe and probe["questions"] == 2, (k, probe)
    # the two test sets got their own predictions
    assert read_jsonl(run.path("gen_sft") / f"{keys[0]}.jsonl") != read_jsonl(run.path("gen_sft") / f"{keys[1]}.jsonl")
    # nothing was written outside the run folder (the user's folder is untouched)
    assert files_under(tmp_path, skip=[tmp_path / "runs"]) == before
