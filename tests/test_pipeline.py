"""evaluate.py and pipeline.py, the main job, as a user runs them: the checker's columns on stand-in
generators (the world's true renders score near 1, noise near 0), evaluate.py's determinism and its
judge check, and the whole three-stage pipeline on the micro preset: every row of the table, and a
second run that skips what is finished."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import layouts
import runtime
import shapescenes
import detector
import evaluate
import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETS = ["val", "heldout", "crowded", "leakage"]


def run(args, check=True):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """python pipeline.py --preset=micro, once: (its out_dir, the finished process)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    out = tmp / "out"
    return out, run(["pipeline.py", "--preset=micro", f"--out_dir={out}", f"--data_dir={tmp / 'data'}"])


def test_true_renders_score_near_one_and_noise_near_zero(tmp_path):
    rng = np.random.default_rng(0)
    true_renders = lambda scenes: data.scene_images(scenes, 64)
    noise = lambda scenes: [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in scenes]
    for kind in SETS:
        scenes = shapescenes.make_scene_set(kind, 24, seed=0)
        truth = evaluate.evaluate(None, scenes, None, generator=true_renders, grid_path=str(tmp_path / f"{kind}.png"))
        for key in ("isr", "color_acc", "shape_acc"):
            assert truth[key] >= 0.95, (kind, truth)
        assert truth["miou"] >= 0.85 and truth["image_success"] >= 0.75, (kind, truth)
        garbage = evaluate.evaluate(None, scenes, None, generator=noise)
        for key in ("isr", "miou", "color_acc", "shape_acc", "image_success"):
            assert garbage[key] <= 0.02, (kind, garbage)
        if kind == "leakage":
            assert truth["color_leak"] == 0.0
    # without a model there is no grounding column: generated (here true) image | true render
    assert Image.open(tmp_path / "val.png").size == (2 + 2 * (4 * 64 + 2), 2 + 8 * (4 * 64 + 2))


def test_eval_is_deterministic_and_writes_its_table_json_and_grids(main_job, tmp_path):
    out, _ = main_job
    ckpt, judge = str(out / "pmtp" / "ckpt"), str(out / "judge" / "ckpt")
    args = ["evaluate.py", f"--ckpt={ckpt}", f"--judge={judge}", "--sets=val,heldout,crowded,leakage", "--n=3",
            "--steps=2", "--device=cpu"]
    first, second = (run(args + [f"--out={tmp_path / name}"]) for name in ("a", "b"))
    results = (tmp_path / "a" / "results.json").read_text()
    assert results == (tmp_path / "b" / "results.json").read_text()
    assert first.stdout.replace(str(tmp_path / "a"), "") == second.stdout.replace(str(tmp_path / "b"), "")
    # the same figures as the pipeline's own evaluation of that checkpoint (same settings, another process)
    assert json.loads(results)["sets"] == json.loads((out / "eval" / "pmtp" / "results.json").read_text())["sets"]
    figures = json.loads(results)["sets"]
    assert list(figures) == SETS
    for kind in SETS:
        assert {"isr", "miou", "color_acc", "shape_acc", "image_success", "judge", "grounding",
                "self_grounding"} <= set(figures[kind])
        # a row: generated image with the asked boxes | true render | the model's own grounding of its image
        assert Image.open(tmp_path / "a" / "grids" / f"{kind}.png").size == (2 + 3 * (4 * 32 + 2), 2 + 3 * (4 * 32 + 2))
    assert "color_leak" in figures["leakage"]
    table = (tmp_path / "a" / "table.md").read_text()
    assert table in first.stdout
    assert all(f"| {kind} (" in table for kind in SETS) and "| judge ISR |" in table and "| grounding AP |" in table
    assert [json.loads(line)["set"] for line in first.stdout.splitlines() if line.startswith("{")] == SETS


def test_a_judge_of_another_resolution_is_refused(main_job, tmp_path):
    out, _ = main_job
    tokenizer = shapescenes.build_tokenizer()
    judge = detector.StandaloneDetector(detector.DetectorConfig(
        res=64, dim=32, depth=1, heads=2, text_depth=1, vocab_size=tokenizer.get_vocab_size(),
        max_phrase_len=layouts.MAX_PHRASE_LEN, max_instances=8))
    runtime.save_checkpoint(str(tmp_path / "judge64"), judge, judge, torch.optim.AdamW(judge.parameters()), tokenizer,
                            {}, 0)
    result = run(["evaluate.py", f"--ckpt={out / 'pmtp' / 'ckpt'}", f"--judge={tmp_path / 'judge64'}", "--n=1",
                  "--steps=1", f"--out={tmp_path / 'eval'}"], check=False)
    assert result.returncode == 2 and result.stderr == (
        f"error: --judge '{tmp_path / 'judge64'}': a judge of resolution 64, the model makes 32 "
        "(train one with train_detector.py --res=32)\n")
    assert not (tmp_path / "eval").exists()


def test_the_pipeline_runs_every_stage_and_ends_with_the_table(main_job):
    out, result = main_job
    budgets = pipeline.PRESETS["micro"]["budgets"]
    for i, name in enumerate(pipeline.STAGES):
        assert f"[{i + 1}/{len(pipeline.STAGES)}] {name}\n" in result.stdout
        assert pipeline.checkpoint_step(out / name) == budgets[name]
    for progress in ("detector", "pretrain", "djo", "cycle-rl grpo", "cycle-rl ppo",
                     *(f"eval {name}" for name in pipeline.ROWS)):
        assert f"{progress}: 100%" in result.stderr, progress  # a tqdm line per stage
    # the models start where they should: DJO from PMTP, Cycle RL from DJO, IDM only in its arm
    saved = {name: json.loads((out / name / "ckpt" / "config.json").read_text()) for name in pipeline.STAGES}
    assert saved["djo"]["train"]["init_from"] == str(out / "pmtp" / "ckpt")
    assert saved["pmtp_more"]["train"]["init_from"] == str(out / "pmtp" / "ckpt")
    assert saved["djo_more"]["train"]["init_from"] == str(out / "djo" / "ckpt")
    # a control continues its stage with the next stage's optimizer: DJO's lr for PMTP, Cycle RL's for DJO
    assert saved["pmtp_more"]["train"]["lr"] == saved["djo"]["train"]["lr"]
    assert saved["djo_more"]["train"]["lr"] == saved["cycle_rl"]["train"]["lr"]
    assert saved["cycle_rl"]["train"]["init_from"] == str(out / "djo" / "ckpt")
    assert saved["cycle_rl_ppo"]["train"]["init_from"] == str(out / "djo" / "ckpt")
    assert saved["cycle_rl"]["train"]["algo"] == "grpo" and saved["cycle_rl_ppo"]["train"]["algo"] == "ppo"
    assert [saved[name]["train"]["reward_kind"] for name in ("cycle_rl", "cycle_rl_ppo", "cycle_rl_oracle")] == [
        "grounding", "grounding", "checker"]
    assert saved["cycle_rl_oracle"]["train"]["init_from"] == str(out / "djo" / "ckpt")
    assert [saved[name]["model"]["idm"] for name in pipeline.ROWS] == [name == "pmtp_idm" for name in pipeline.ROWS]
    assert not saved["gen_only"]["model"]["grounding"] and saved["pmtp"]["model"]["grounding"]

    table_file, results_file = pipeline.table_files("micro")
    results = json.loads((out / results_file).read_text())
    labels = [pipeline.TRUE_RENDERS, *pipeline.ROWS.values()]
    assert list(results["rows"]) == labels
    for label, sets in results["rows"].items():
        assert list(sets) == SETS and all("judge" in sets[kind] and "isr" in sets[kind] for kind in SETS), label
        has_head = label not in (pipeline.TRUE_RENDERS, pipeline.ROWS["gen_only"])
        assert all(("grounding" in sets[kind]) == has_head for kind in SETS), label
    assert all(results["rows"][pipeline.TRUE_RENDERS][kind]["color_acc"] == 1.0 for kind in SETS)
    table = (out / table_file).read_text()
    assert table.count("| model |") == len(SETS)
    assert all(table.count(f"| {label} |") == len(SETS) for label in labels)
    for name in pipeline.ROWS:
        assert all((out / "eval" / name / "grids" / f"{kind}.png").exists() for kind in SETS)
    assert result.stdout.rstrip().splitlines()[-2] == f"table: {out / table_file} (figures: {out / results_file})"
    assert result.stdout.rstrip().splitlines()[-1].startswith(f"grids: {out / 'eval'}")


def test_a_second_run_skips_what_is_finished(main_job):
    out, _ = main_job
    files = [out / f for f in pipeline.table_files("micro")]
    before = [f.read_text() for f in files]
    again = run(["pipeline.py", "--preset=micro", f"--out_dir={out}", f"--data_dir={out.parent / 'data'}"])
    for name in pipeline.STAGES:
        assert f"{name}: finished earlier (step {pipeline.PRESETS['micro']['budgets'][name]} of" in again.stdout
    assert all(f"eval {name}: done earlier, skipped" in again.stdout for name in pipeline.ROWS)
    assert "trained: nothing" in again.stdout and "100%" not in again.stderr
    assert [f.read_text() for f in files] == before


def test_the_scarce_preset_shows_every_arm_only_its_pairs_and_starts_every_arm_from_pmtp():
    """Every image any arm of the scarce preset sees comes from the same SCARCE_PAIRS scenes (data seed 0, set
    after each stage's own arguments, so that pmtp_more's data seed does not pick others); every arm starts
    from that seed's PMTP; further seeds train elsewhere with seeds of their own, against the one judge."""
    preset = pipeline.PRESETS["scarce"]

    def effective(argv, key):  # the script's config reads its arguments in order: the last one wins
        return [a.split("=", 1)[1] for a in argv if a.startswith(f"--{key}=")][-1]

    seeds = set()
    for k in (0, 1, 2):
        out = pipeline.seed_dir("out/scarce", k)
        assert out == ("out/scarce" if k == 0 else f"out/scarce/seed{k}")
        for name in preset["budgets"]:
            argv = pipeline.stage_argv(name, preset, out, "data", "cpu", k, "out/scarce")
            if pipeline.STAGES[name][1] in pipeline.IMAGE_READERS:
                assert effective(argv, "cache_scenes") == str(pipeline.SCARCE_PAIRS), (name, argv)
                assert effective(argv, "data_seed") == "0", (name, argv)
            else:  # Cycle RL and self-training read no image
                assert not any(a.startswith("--cache_scenes=") for a in argv), name
            if name not in ("judge", "pmtp", "gen_only"):
                assert effective(argv, "init_from") == f"{out}/pmtp/ckpt", (name, argv)
            if name == "cycle_rl_judge":
                assert effective(argv, "reward_ckpt") == "out/scarce/judge/ckpt"
            if k:
                seeds.add(effective(argv, "seed"))
    assert len(seeds) == 2 * len(preset["budgets"])  # no two stages or seeds share a training seed
    assert preset["control"] == "pmtp_more" and preset["eval"]["n"] >= 200
