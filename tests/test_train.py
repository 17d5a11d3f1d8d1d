"""train_pretrain.py and sampler.py as a user runs them: subprocesses on a micro config."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

import layouts
import shapescenes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = ["--res=32", "--patch=8", "--dim=32", "--depth=2", "--heads=2", "--text_depth=1", "--max_instances=4",
         "--cache_scenes=64", "--val_scenes=0", "--warmup_steps=1", "--log_interval=1", "--ckpt_interval=0"]


def run(args, tmp_path, nproc=1, check=True):
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def train(tmp_path, name, *extra, nproc=1, check=True):
    out = tmp_path / name
    args = ["train_pretrain.py", *MICRO, f"--data_dir={tmp_path / 'data'}", f"--out_dir={out}", *extra]
    return run(args, tmp_path, nproc, check), out


def losses(out, key="loss"):
    with open(out / "log.jsonl") as f:
        return [r[key] for r in map(json.loads, f) if key in r]


def weights(out):
    return load_file(str(out / "ckpt" / "model.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A micro model trained on a handful of scenes until it has learned something."""
    tmp_path = tmp_path_factory.mktemp("trained")
    _, out = train(tmp_path, "run", "--cache_scenes=8", "--batch_size=8", "--max_steps=150", "--lr=3e-3",
                   "--schedule=constant")
    return tmp_path, out


def test_both_pmtp_losses_fall(trained):
    for key, factor in (("flow", 0.85), ("ground", 0.7)):
        curve = losses(trained[1], key)
        assert len(curve) == 150
        assert np.mean(curve[-10:]) < factor * np.mean(curve[:5]), (key, curve)


def test_generation_only_mode_trains_the_model_without_grounding_head(tmp_path):
    _, out = train(tmp_path, "gen", "--ground_every=0", "--max_steps=2", "--batch_size=4")
    assert losses(out) == losses(out, "flow") and len(losses(out)) == 2
    assert not any(k.startswith("grounding_head") for k in weights(out))
    saved = json.loads((out / "ckpt" / "config.json").read_text())
    assert saved["model"]["grounding"] is False
    assert saved["train"]["ground_negatives"] == 0  # the default -1 means none without grounding samples


def test_batch_that_cannot_hold_both_tasks_is_refused(tmp_path):
    result, _ = train(tmp_path, "bad", "--batch_size=6", "--ground_every=4", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: batch_size 6 must be a multiple of ground_every 4, "
                                     "so that every micro-batch holds both tasks")


def test_checkpoint_folder_is_complete(trained):
    ckpt = trained[1] / "ckpt"
    assert sorted(os.listdir(ckpt)) == ["config.json", "ema.safetensors", "model.safetensors",
                                        "tokenizer.json", "train_state.pt"]
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["step"] == 150 and saved["model"]["patch"] == 8 and saved["train"]["lr"] == 3e-3
    assert saved["train"]["ground_negatives"] == 2  # the default -1, resolved and saved for Cycle RL
    assert not os.path.exists(str(ckpt) + ".tmp")


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    schedule = ["--max_steps=6", "--lr_decay_steps=6", "--batch_size=4", "--grad_accum=2"]
    _, whole = train(tmp_path, "whole", *schedule)
    _, parts = train(tmp_path, "parts", *schedule[1:], "--max_steps=3")
    train(tmp_path, "parts", *schedule, "--init_from=resume")
    assert losses(parts) == losses(whole)
    for key, value in weights(whole).items():
        assert np.array_equal(value, weights(parts)[key]), key


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    _, one = train(tmp_path, "one", "--max_steps=3", "--batch_size=8")
    _, two = train(tmp_path, "two", "--max_steps=3", "--batch_size=4", nproc=2)
    for part in ("loss", "flow", "ground"):  # each loss as logged: the mean over ranks must be the global one
        np.testing.assert_allclose(losses(two, part), losses(one, part), rtol=1e-5, err_msg=part)
    # Adam moves each weight by ~lr = 1e-3 a step. The key bias of an attention has an exact gradient of
    # 0 (softmax ignores a logit shift shared by all keys), so Adam moves it by normalized float noise,
    # up to lr a step in either run: it is left out. Everything else agrees to 1e-4.
    for key, value in weights(one).items():
        mine = weights(two)[key]
        if key.endswith("in_proj_bias"):  # nn.MultiheadAttention's [q | k | v] biases: drop k
            dim = len(value) // 3
            value, mine = np.delete(value, slice(dim, 2 * dim)), np.delete(mine, slice(dim, 2 * dim))
        np.testing.assert_allclose(mine, value, atol=1e-4, err_msg=key)


def test_unknown_config_key_is_refused(tmp_path):
    result, out = train(tmp_path, "bad", "--max_step=3", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: argument '--max_step=3': unknown config key 'max_step'"]
    assert not out.exists()


@pytest.mark.parametrize("argument, message", [
    ("--prediction=eps", "prediction must be 'v' or 'x0' (got 'eps'), layout_map and pixel_head >= 0 (got 32 and 32)"),
    ("--ground_negatives=-2", "ground_negatives must be >= 0, or -1 for 2 where they apply, got -2"),
    ("--res=24 --patch=6", "conv_stem needs a power-of-two patch (it halves the image per conv), got patch 6"),
])
def test_bad_config_value_is_refused_in_one_line(tmp_path, argument, message):
    result, out = train(tmp_path, "bad", *argument.split(), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {message}"]
    assert not out.exists()


def test_resume_from_another_model_config_is_refused(trained, tmp_path):
    result, _ = train(trained[0], "run", "--dim=64", "--init_from=resume", "--max_steps=151", check=False)
    assert result.returncode == 2
    assert "model config dim = 32, this run has 64" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def write_layout_file(path, scenes):
    layouts.write_layouts(str(path), scenes)
    return str(path)


def test_sampler_cli_writes_one_png_per_scene_deterministically(trained, tmp_path):
    scenes = shapescenes.make_scene_set("val", 3, seed=0)
    layout_file = write_layout_file(tmp_path / "layouts.json", scenes)
    ckpt = str(trained[1] / "ckpt")
    outputs = []
    for name in ("a", "b"):
        run(["sampler.py", "--ckpt", ckpt, "--layouts", layout_file, "--out", str(tmp_path / name), "--steps", "4"], tmp_path)
        outputs.append({f: np.array(Image.open(tmp_path / name / f)) for f in sorted(os.listdir(tmp_path / name))})
    assert sorted(outputs[0]) == [f"{s['id']}.png" for s in sorted(scenes, key=lambda s: s["id"])]
    for f, image in outputs[0].items():
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert np.array_equal(image, outputs[1][f])


@pytest.mark.parametrize("instance, expected", [
    ({"phrase": "red circle", "box": [0.5, 0.2, 0.3, 0.6]}, "x0 >= x1"),
    ({"phrase": "red zebra", "box": [0.1, 0.1, 0.3, 0.3]}, "zebra"),
    ({"phrase": "red circle", "box": [0.1, 0.1, 1.3, 0.3]}, "1.3"),
])
def test_sampler_cli_refuses_bad_layouts_and_writes_nothing(trained, tmp_path, instance, expected):
    layout_file = tmp_path / "bad.json"
    layout_file.write_text(json.dumps({"scenes": [
        {"id": "ok", "caption": "a red circle", "instances": [{"phrase": "red circle", "box": [0.1, 0.1, 0.4, 0.4]}]},
        {"id": "s7", "caption": "a red circle", "instances": [instance]}]}))
    out = tmp_path / "out"
    result = run(["sampler.py", "--ckpt", str(trained[1] / "ckpt"), "--layouts", str(layout_file), "--out", str(out)],
                 tmp_path, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "s7" in lines[0] and expected in lines[0], lines
    assert not out.exists()


def test_sampler_cli_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    layout_file = write_layout_file(tmp_path / "layouts.json", shapescenes.make_scene_set("val", 1, seed=0))
    result = run(["sampler.py", "--ckpt", str(tmp_path), "--layouts", layout_file, "--out", str(tmp_path / "o")],
                 tmp_path, check=False)
    assert result.returncode == 2 and "not an EchoGen checkpoint" in result.stderr
