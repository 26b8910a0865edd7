import os, shutil, subprocess, sys
from pathlib import Path
import pytest
from conftest import kt, BIN
from knowtuning.assets import home

def test_doctor_ok_lists_sizes():
    r = kt("doctor")
    assert r.returncode == 0, r.stdout
    for asset in ("wordnet (nltk)", "smollm2 hf", "smollm2 gguf", "minilm"): assert asset in r.stdout
    assert "MiB" in r.stdout

def test_doctor_fails_without_wordnet_and_names_fix(tmp_path):
    # a KNOWTUNING_HOME with the models but no WordNet folder
    (tmp_path / "models").symlink_to(home() / "models")
    r = kt("doctor", env={"KNOWTUNING_HOME": str(tmp_path)})
    assert r.returncode == 1
    assert "MISSING wordnet (nltk)" in r.stdout and "fix: knowtuning setup" in r.stdout
    kt("setup", "--quiet", env={"KNOWTUNING_HOME": str(tmp_path)}, check=True)   # the fix works
    assert kt("doctor", env={"KNOWTUNING_HOME": str(tmp_path)}).returncode == 0

SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from knowtuning.assets import smollm2_dir, load_gguf_smollm2
d = smollm2_dir()
tok = AutoTokenizer.from_pretrained(d)
m = AutoModelForCausalLM.from_pretrained(d)
ids = tok("The three primary colours are", return_tensors="pt")
a = m.generate(**ids, max_new_tokens=12, do_sample=False)[0].tolist()
if sys.argv[1] == "gguf":
    g, _ = load_gguf_smollm2()
    b = g.generate(**ids, max_new_tokens=12, do_sample=False)[0].tolist()
    assert a == b, (a, b)
print(a)
"""

@pytest.mark.slow  # 40 s; `make install` converts once and the demo-path test (tests/test_demo.py) runs the result
def test_converted_smollm2_matches_gguf_in_fresh_process():
    r = subprocess.run([sys.executable, "-c", SCRIPT, "gguf"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(eval(r.stdout.strip().splitlines()[-1])) > 12
