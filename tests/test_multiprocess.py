"""Training with several real processes (torchrun, gloo on CPU): one writer, same batch, steps and first losses as one
process, a killed rank resumes, the shipped accelerate/DeepSpeed configs resolve to our batch."""
import json, os, shutil, signal, subprocess, time
from pathlib import Path
import pytest, yaml
from conftest import ROOT, BIN, SMOKE_OVR, kt
from knowtuning.config import load_config
from knowtuning.runs import Run

# the smoke preset on the 2-layer random model: the process machinery is what is tested, not the model
OVR = SMOKE_OVR
SYSTEMS = ["sft", "ka", "knowtuning", "wo_factuality"]   # the smoke preset's own systems, dependencies first
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    "A smoke run (tiny-random) with its KA and KC stages built, to copy: training is what the tests run."
    from knowtuning.ka import ka_stage
    from knowtuning.kc import kc_stage
    cfg = load_config("smoke", overrides=OVR)
    run = Run(cfg, tmp_path_factory.mktemp("base"), "smoke")
    ka_stage(cfg, run)
    kc_stage(cfg, run)
    return run.dir


def copy_run(base, dest) -> Path:
    shutil.copytree(base, dest / "smoke")
    return dest / "smoke"


def history(run_dir, system):
    return [h for h in json.loads((run_dir / f"train_{system}" / "log_history.json").read_text()) if "loss" in h]


def test_two_processes_train_like_one(smoke_run, tmp_path):
    "The shared smoke run trained every system in two processes; the same systems from its KA/KC data in one process."
    two, one = smoke_run.dir, tmp_path / "smoke"
    shutil.copytree(two, one, ignore=lambda d, names: [n for n in names if Path(d) == two and "train_" in n])
    r1 = kt("train-run", one, *SYSTEMS, env={**smoke_run.env, **ENV}, timeout=900)
    assert r1.returncode == 0, r1.stdout[-3000:] + r1.stderr[-3000:]
    m2, m1 = (json.loads((d / "manifest.json").read_text())["stages"] for d in (two, one))
    assert not list(two.glob(".*.partial")), "a stage was left uncommitted"
    for s in SYSTEMS:
        assert (two / f"train_{s}" / "adapter" / "adapter_model.safetensors").exists()
        assert m2[f"train_{s}"]["builds"] == 1                            # committed once, by one writer
        assert (m2[f"train_{s}"]["processes"], m1[f"train_{s}"]["processes"]) == (2, 1)
        assert (m2[f"train_{s}"]["accumulation"], m1[f"train_{s}"]["accumulation"]) == (1, 2)
        for k in ("effective_batch", "steps", "examples"):
            assert m2[f"train_{s}"][k] == m1[f"train_{s}"][k], (s, k)
        h2, h1 = history(two, s), history(one, s)
        assert [h["step"] for h in h2] == [h["step"] for h in h1]
        # the first optimizer step sees the same examples (batch k goes to process k mod 2) and the same reference
        # log-probs (gathered in dataset order): measured equal to ~1e-7; tolerance 1e-4 relative
        assert abs(h2[0]["loss"] - h1[0]["loss"]) <= 1e-4 * abs(h1[0]["loss"]), (s, h2[0], h1[0])
        if "loss/dpo" in h1[0]:                                          # KC's parts, gathered over both processes
            assert abs(h2[0]["loss/dpo"] - h1[0]["loss/dpo"]) <= 1e-4 * h1[0]["loss/dpo"], (s, h2[0], h1[0])
    # the stage notebook ran as the record, and relayed the launcher's output
    nb = (two / "notebooks" / "13_train.ipynb").read_text()
    assert "train-run" in nb and "torchrun" in nb


def rank_pid(parent: int, rank: int) -> int | None:
    "The pid of the torchrun worker with RANK=`rank` under `parent`."
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(p.name)
    return None


def test_killed_rank_resumes_on_every_rank(base_run, tmp_path):
    ovr = OVR + ["train.max_steps=20", "train.save_steps=5"]
    run = Run(load_config("smoke", overrides=ovr), copy_run(base_run, tmp_path), "smoke").dir  # config.yaml: ovr
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "knowtuning.cli", "train-run", str(run), "sft"]
    p = subprocess.Popen(cmd, env={**os.environ, **ENV}, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
    ck, t0 = run / ".train_sft.partial" / "checkpoints", time.time()
    while time.time() - t0 < 600 and p.poll() is None and not list(ck.glob("checkpoint-*/trainer_state.json")):
        time.sleep(0.05)
    pid = rank_pid(p.pid, 1)
    assert p.poll() is None and pid, p.stdout.read().decode()[-3000:]
    os.kill(pid, signal.SIGKILL)                                       # one rank dies mid-training
    assert p.wait(timeout=300) != 0                                    # torchrun stops the other and fails
    assert not (run / "train_sft").exists()
    done = sorted(int(d.parent.name.split("-")[1]) for d in ck.glob("checkpoint-*/trainer_state.json"))
    assert done and done[-1] < 20
    r = subprocess.run(cmd, env={**os.environ, **ENV}, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    resumed = {rk: int(n) for rk, n in
               (line.split(": resuming from checkpoint-") for line in out.splitlines() if ": resuming from" in line)}
    # both processes resumed from the same, newest complete checkpoint (at least the one seen before the kill)
    assert set(resumed) == {"rank 0", "rank 1"} and len(set(resumed.values())) == 1, out[-3000:]
    assert resumed["rank 0"] >= done[-1]
    st = json.loads((run / "manifest.json").read_text())["stages"]["train_sft"]
    assert (st["steps"], st["builds"], st["processes"]) == (20, 1, 2)
    steps = [h["step"] for h in history(run, "sft")]
    assert steps == list(range(1, 21)), steps[:5]                  # the log history carries on where it stopped


def test_accelerate_configs_resolve_to_our_batch():
    "The shipped configs load with the installed accelerate; DeepSpeed's `auto` values become our batch arithmetic."
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
    from knowtuning.trainer import trl_config

    cfg = load_config("paper-dolly", overrides=["student.device=cpu"])
    for name, stage in (("multi_gpu", None), ("zero2", 2), ("zero3", 3)):
        f = ROOT / "configs" / "accelerate" / f"{name}.yaml"
        acc = load_config_from_file(str(f))
        assert acc.mixed_precision == "bf16" and acc.num_processes >= 2
        if stage is None:
            assert acc.distributed_type == "MULTI_GPU"
            continue
        assert acc.distributed_type == "DEEPSPEED" and acc.deepspeed_config["zero_stage"] == stage
        for n, kind, batch in ((4, "sft", 32), (8, "sft", 32), (4, "dpo", 16)):
            args = trl_config(cfg, kind, "/tmp/unused", n_proc=n)

            class OnN:  # the arguments as each of n processes sees them (world_size is n there)
                world_size = n

                def __getattr__(self, k):
                    return getattr(args, k)

            ds = HfTrainerDeepSpeedConfig(DeepSpeedPlugin(**yaml.safe_load(f.read_text())["deepspeed_config"])
                                          .deepspeed_config)
            ds.trainer_config_process(OnN())
            c = ds.config
            assert c["train_batch_size"] == batch, (name, n, kind, c)
            assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (
                args.per_device_train_batch_size, args.gradient_accumulation_steps)
            assert c["zero_optimization"]["stage"] == stage and c["gradient_clipping"] == args.max_grad_norm


def test_zero3_with_nf4_is_refused_before_loading(tmp_path):
    r = kt("train-system", "--preset", "smoke", "--set", "student.quantize=nf4", "--system", "sft",
           "--runs-dir", tmp_path, env={"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, timeout=300)
    assert r.returncode == 2 and "zero2.yaml" in r.stderr and "student.quantize" in r.stderr, r.stderr[-2000:]
    assert not list(tmp_path.rglob("train_*")) and not list(tmp_path.rglob(".train_*"))
