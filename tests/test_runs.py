"""What no kill and no bad step may break, through the real training CLI (subprocesses on a micro
config): a SIGKILL at each instant of a checkpoint save, a NaN loss, a bad config value."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = ["--res=32", "--patch=8", "--dim=32", "--depth=2", "--heads=2", "--text_depth=1", "--max_instances=4",
         "--cache_scenes=64", "--val_scenes=0", "--warmup_steps=1", "--log_interval=1", "--batch_size=4",
         "--max_steps=6", "--lr_decay_steps=6"]

# Runs train_pretrain.py in this process after patching runtime, so that the process dies (os._exit:
# no cleanup, as a SIGKILL) at one instant of the checkpoint save of step KILL_STEP, or so that the
# loss is NaN at the steps NAN_STEPS. The instants are save_checkpoint's own steps (its docstring).
HARNESS = r"""
import os, runpy, shutil, sys
sys.path.insert(0, os.getcwd())
import objectives, runtime

instant, kill_step = os.environ.get("KILL_AT"), int(os.environ.get("KILL_STEP", -1))
nan_steps = [int(s) for s in os.environ.get("NAN_STEPS", "").split(",") if s]
save_checkpoint, save_file, replace, rmtree = runtime.save_checkpoint, runtime.save_file, os.replace, shutil.rmtree
state = {"step": None}

def killing_save(path, model, ema, optimizer, tokenizer, train_config, step, extra=None):
    state["step"] = step
    save_checkpoint(path, model, ema, optimizer, tokenizer, train_config, step, extra)

def killing_save_file(tensors, filename):
    if state["step"] == kill_step and instant == "writing" and filename.endswith("ema.safetensors"):
        save_file(tensors, filename)
        with open(filename, "r+b") as f:  # half a file on disk, as the kill found it
            f.truncate(os.path.getsize(filename) // 2)
        os._exit(137)
    save_file(tensors, filename)

def killing_replace(src, dst):
    if state["step"] == kill_step and src.endswith("ckpt") and dst.endswith("ckpt.old"):
        if instant == "before_swap":
            os._exit(137)
        replace(src, dst)
        if instant == "between_renames":
            os._exit(137)
        return
    replace(src, dst)

def killing_rmtree(path, *args, **kwargs):
    if state["step"] == kill_step and instant == "deleting_old" and path.endswith("ckpt.old"):
        os.remove(os.path.join(path, sorted(os.listdir(path))[0]))  # one file gone, the rest left
        os._exit(137)
    rmtree(path, *args, **kwargs)

pmtp_loss, calls = objectives.pmtp_loss, {"n": 0}

def nan_loss(*args, **kwargs):
    loss, parts = pmtp_loss(*args, **kwargs)
    calls["n"] += 1
    return (loss * float("nan"), parts) if calls["n"] - 1 in nan_steps else (loss, parts)

runtime.save_checkpoint, runtime.save_file, os.replace, shutil.rmtree = killing_save, killing_save_file, killing_replace, killing_rmtree
objectives.pmtp_loss = nan_loss
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def train(tmp_path, name, *extra, env=None):
    out = tmp_path / name
    command = [sys.executable, "-c", HARNESS, "train_pretrain.py", *MICRO, f"--data_dir={tmp_path / 'data'}",
               f"--out_dir={out}", *extra]
    result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
                            capture_output=True, text=True, timeout=600)
    return result, out


def log_records(out):
    with open(out / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def figures(out):
    """The log without its timings."""
    timings = ("steps_per_s", "images_per_s", "data_wait", "train_seconds")
    return [{k: v for k, v in record.items() if k not in timings} for record in log_records(out)]


def checkpoint(folder):
    """Every tensor of a checkpoint: weights, EMA and the optimizer's state."""
    tensors = {f"model.{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}
    tensors.update({f"ema.{k}": v for k, v in load_file(str(folder / "ema.safetensors")).items()})
    state = torch.load(folder / "train_state.pt", weights_only=True)
    for index, per_param in state["optimizer"]["state"].items():
        tensors.update({f"adam.{index}.{k}": np.asarray(v) for k, v in per_param.items()})
    return tensors, state["step"]


def assert_same_checkpoint(a, b):
    (tensors_a, step_a), (tensors_b, step_b) = checkpoint(a), checkpoint(b)
    assert step_a == step_b and tensors_a.keys() == tensors_b.keys()
    for key, value in tensors_a.items():
        assert np.array_equal(value, tensors_b[key]), key


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The uninterrupted run: 6 steps, a checkpoint every 2."""
    tmp_path = tmp_path_factory.mktemp("runs")
    result, out = train(tmp_path, "whole", "--ckpt_interval=2")
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp_path, out


@pytest.mark.parametrize("instant, resumes_from", [
    ("writing", 2),          # ckpt.tmp half written: ckpt (step 2) untouched
    ("before_swap", 2),      # ckpt.tmp complete, ckpt (step 2) still in place
    ("between_renames", 4),  # no ckpt at all: ckpt.old (step 2) and ckpt.tmp (step 4), the newer is taken
    ("deleting_old", 4),     # ckpt (step 4) in place, ckpt.old half deleted: the next save must clear it
])
def test_a_kill_inside_a_checkpoint_save_resumes_bit_exactly(whole, instant, resumes_from):
    tmp_path, uninterrupted = whole
    killed, out = train(tmp_path, instant, "--ckpt_interval=2", env={"KILL_AT": instant, "KILL_STEP": "4"})
    assert killed.returncode == 137
    resumed, _ = train(tmp_path, instant, "--ckpt_interval=2", "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"from step {resumes_from}" in resumed.stdout
    assert sorted(os.listdir(out)) == ["ckpt", "log.jsonl"]  # the leftovers of the kill are gone
    assert_same_checkpoint(out / "ckpt", uninterrupted / "ckpt")
    # every step logged once (the kill came after step 4's log line), with the uninterrupted run's figures
    assert figures(out) == figures(uninterrupted)


def test_a_nan_loss_skips_its_step_and_leaves_the_weights_as_without_it(tmp_path):
    without, before = train(tmp_path, "two_steps", "--max_steps=2")
    assert without.returncode == 0, without.stderr[-2000:]
    skipped, out = train(tmp_path, "nan_at_3", "--max_steps=3", env={"NAN_STEPS": "2"})
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    records = log_records(out)
    assert {"step": 3, "skipped": "update"} in records
    assert np.isfinite([r["loss"] for r in records if "loss" in r and r["step"] < 3]).all()
    # step 3 changed nothing: weights, EMA, Adam's moments and its step count are those after step 2
    tensors, step = checkpoint(out / "ckpt")
    reference, _ = checkpoint(before / "ckpt")
    assert step == 3 and tensors.keys() == reference.keys()
    for key, value in reference.items():
        assert np.array_equal(value, tensors[key]), key


def test_nan_losses_in_a_row_stop_the_run_in_one_line(tmp_path):
    result, out = train(tmp_path, "nan", "--max_steps=6", env={"NAN_STEPS": "1,2,3"})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: 3 optimizer steps in a row had non-finite gradients")
    assert [r["step"] for r in log_records(out) if "skipped" in r] == [2, 3, 4]


@pytest.mark.parametrize("argument, message", [
    ("--max_steps=0", "config max_steps = 0: must be >= 1"),
    ("--max_steps=-3", "config max_steps = -3: must be >= 1"),
    ("--grad_accum=0", "config grad_accum = 0: must be >= 1"),
    ("--batch_size=0", "config batch_size = 0: must be >= 1"),
    ("--cache_scenes=0", "config cache_scenes = 0: must be >= 1"),
    ("--lr=-1", "config lr = -1.0: must be >= 0"),
    ("--lr=1e999", "config lr = inf: must be a finite number"),
    ("--cond_drop=1.5", "config cond_drop = 1.5: must be in [0, 1]"),
    ("--schedule=linear", "config schedule = 'linear': must be one of 'cosine', 'constant'"),
    ("--device=tpu", "config device = 'tpu': must be one of 'auto', 'cpu', 'cuda'"),
    ("--heads=3", "config heads = 3: must be a divisor of dim = 32"),
    ("--dim=30", "config dim = 30: must be a multiple of 4 (the 2-D sin-cos position embedding)"),
    ("--patch=5", "config patch = 5: must be a divisor of res = 32"),
])
def test_a_bad_config_value_is_refused_in_one_line_before_anything_is_created(tmp_path, argument, message):
    result, out = train(tmp_path, "bad", argument)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {message}"]
    assert not out.exists() and not (tmp_path / "data").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_without_cuda_is_refused_in_one_line(tmp_path):
    result, out = train(tmp_path, "bad", "--device=cuda")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: config device = 'cuda': must be 'auto' or 'cpu' on this machine, which has no CUDA device"]
    assert not out.exists()
