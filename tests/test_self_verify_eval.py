"""evaluate.py --self_verify, self-verified sampling at equal compute: the rank AUROC against a pairwise count,
the three choosers on a hand-made table, the efficiency arithmetic, the NFE count against the model's own
calls, the refusals, and a micro checkpoint end to end (its N = 1 images are evaluate()'s, its files written)."""

import json
import os

import numpy as np
import pytest
import torch

import detector
import evaluate
import layouts
import runtime
import sampler
import shapescenes
from model import EchoGen, ModelConfig
from test_bootstrap import run_main
from test_model import random_batch
from test_rl import MICRO_PRETRAIN, run, tiny_model

# -----------------------------------------------------------------------------
# AUROC


def pairwise_auroc(scores, labels):
    """The definition: over every (positive, negative) pair, 1 when the positive scores higher, 1/2 on a tie."""
    positive, negative = scores[labels][:, None], scores[~labels][None]
    return ((positive > negative).sum() + 0.5 * (positive == negative).sum()) / positive.size / negative.size


@pytest.mark.parametrize("n, levels", [(2, 2), (9, 3), (60, 5), (400, 0)])  # levels: the distinct scores (0: no ties)
def test_auroc_is_the_pairwise_count_with_ties_counted_half(n, levels):
    rng = np.random.default_rng(n)
    scores = rng.integers(0, levels, n) / levels if levels else rng.random(n)
    labels = rng.random(n) < 0.4
    labels[:2] = [True, False]  # both kinds
    assert evaluate.auroc(scores, labels) == pytest.approx(pairwise_auroc(scores, labels), abs=1e-12)


def test_auroc_of_perfect_reversed_tied_and_one_sided_scores():
    assert evaluate.auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert evaluate.auroc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert evaluate.auroc([0.5, 0.5, 0.5], [True, False, True]) == 0.5
    assert evaluate.auroc([0.3, 0.4], [True, True]) is None and evaluate.auroc([], []) is None

# -----------------------------------------------------------------------------
# the choosers, on a hand-made table of 3 candidates of 3 scenes (2, 2 and 1 instances)


def hand_table():
    worst = np.array([[0.2, 0.6, 0.1],
                      [0.5, 0.6, 0.3],
                      [0.4, 0.1, 0.9]])  # (K, S)
    passes = np.array([[2, 0, 0],
                       [1, 1, 0],
                       [2, 2, 1]])  # (K, S): the checker's passed instances
    success = np.arange(2) < passes[..., None]  # (K, S, 2), the passed instances first (scene 2's slot 1 is empty)
    score = np.stack([worst, np.ones_like(worst)], -1)  # the worst instance, and a perfect one
    return evaluate.Candidates(score, worst, success), np.array([2, 2, 1])


def test_the_verifier_keeps_the_best_worst_and_the_checker_the_most_passed_first_of_ties():
    candidates, _ = hand_table()
    for n, verifier, checker in [(1, [0, 0, 0], [0, 0, 0]),
                                 (2, [1, 0, 1], [0, 1, 0]),  # scene 1: worst 0.6 twice; scene 2: no passes at all
                                 (3, [1, 0, 2], [0, 2, 2])]:  # scene 0: 2 passed by candidates 0 and 2
        chosen = evaluate.choices(candidates, n)
        assert chosen["verifier"].tolist() == verifier and chosen["checker"].tolist() == checker
        assert chosen["random"].tolist() == evaluate.choices(candidates, n)["random"].tolist()  # seeded
        assert ((0 <= chosen["random"]) & (chosen["random"] < n)).all()
    # per scene its own count: sampler.best_of over that many candidates
    assert evaluate.best_among_first(candidates.worst, np.array([1, 3, 3])).tolist() == [0, 0, 2]


def test_the_random_choice_is_uniform_over_the_first_n_and_seeded():
    worst = np.zeros((4, 20000))
    table = evaluate.Candidates(worst[..., None], worst, worst[..., None] > 0)
    draws = evaluate.choices(table, 4)["random"]
    assert np.allclose(np.bincount(draws, minlength=4) / len(draws), 0.25, atol=0.015)
    assert not np.array_equal(draws, evaluate.choices(table, 4, seed=1)["random"])


def test_best_of_rows_count_isr_differences_nfe_and_efficiency():
    candidates, instances = hand_table()
    costs = {"sample": 10, "redraw": 6, "ground": 1}
    rows = {(row["n"], row["chooser"]): row for row in evaluate.best_of_rows(candidates, [1, 3], instances, costs)}
    for chooser in evaluate.CHOOSERS:  # one candidate: every chooser keeps candidate 0
        assert rows[1, chooser]["isr"] == 0.4 and rows[1, chooser]["difference"] == 0.0
    assert rows[3, "verifier"]["isr"] == 0.4 and rows[3, "checker"]["isr"] == 1.0  # passes [1, 0, 1], [2, 2, 1]
    assert rows[3, "checker"]["difference"] == 0.6
    random_passes = candidates.success.sum(-1)[evaluate.choices(candidates, 3)["random"], np.arange(3)].sum()
    assert rows[3, "random"]["isr"] == round(random_passes / 5, 4)
    assert rows[3, "verifier"]["efficiency"] == evaluate.efficiency(2, random_passes, 5)
    assert "efficiency" not in rows[3, "random"] and rows[1, "verifier"]["efficiency"] is None  # nothing to gain
    assert [rows[3, c]["nfe"] for c in ("verifier", "random", "checker")] == [33, 30, 30]


def test_efficiency_is_the_share_of_the_checkers_gain_over_random():
    assert evaluate.efficiency(0.8, 0.6, 0.9) == pytest.approx(2 / 3, abs=1e-4)
    assert evaluate.efficiency(3, 1, 5) == 0.5  # pass counts: the instances cancel
    assert evaluate.efficiency(0.9, 0.6, 0.9) == 1.0 and evaluate.efficiency(0.6, 0.6, 0.9) == 0.0
    assert evaluate.efficiency(0.5, 0.6, 0.9) == pytest.approx(-1 / 3, abs=1e-4)  # worse than a coin
    assert evaluate.efficiency(0.7, 0.6, 0.6) is None


def test_discrimination_counts_only_asked_instances():
    candidates, instances = hand_table()
    d = evaluate.discrimination(candidates, instances, pass_score=0.35)
    assert d["instances"] == 15
    score = np.concatenate([candidates.score[:, :2].reshape(-1), candidates.score[:, 2, 0]])
    success = np.concatenate([candidates.success[:, :2].reshape(-1), candidates.success[:, 2, 0]])
    assert d["auroc"] == round(pairwise_auroc(score, success), 4)
    assert d["disagreement"] == round(np.mean((score >= 0.35) != success), 4)
    assert d["false_pass"] + d["false_alarm"] == pytest.approx(d["disagreement"], abs=1e-4)

# -----------------------------------------------------------------------------
# the NFE count is the code's: every row through the network counted


class CountingModel(torch.nn.Module):
    """tiny_model whose velocity and grounding passes count the images (rows) they take."""

    def __init__(self):
        super().__init__()
        self.inner, self.rows = tiny_model(), {"velocity": 0, "ground": 0}
        self.config = self.inner.config

    def encode_conditions(self, *args, **kwargs):
        return self.inner.encode_conditions(*args, **kwargs)

    def velocity(self, x, t, cond):
        self.rows["velocity"] += len(x)
        return self.inner.velocity(x, t, cond)

    def ground(self, images, *args):
        self.rows["ground"] += len(images)
        return self.inner.ground(images, *args)


@pytest.mark.parametrize("cfg_scale, shift", [(1.0, 1.0), (2.5, 3.0)])
def test_nfe_per_image_is_the_rows_the_sampler_sends_through_the_network(cfg_scale, shift):
    model, batch, steps = CountingModel(), random_batch(), 6
    costs = evaluate.evaluation_costs(steps, cfg_scale, shift, t0=0.6)
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    images = sampler.sample(model, batch, noise, steps, cfg_scale, shift)
    assert model.rows["velocity"] == 2 * costs["sample"]
    sampler.redraw(model, batch, images, torch.ones(2, 1, 16, 16), noise, 0.6, steps, cfg_scale, shift)
    assert model.rows["velocity"] == 2 * (costs["sample"] + costs["redraw"])
    grounder = detector.Grounder("EchoGen", model, None, 16, 3, "cpu")
    sampler.verify(grounder, images, batch)
    assert model.rows["ground"] == 2 * costs["ground"]
    assert evaluate.evaluation_costs(25, 3.0, 1.0, t0=0.6) == {"sample": 50, "redraw": 30, "ground": 1}

# -----------------------------------------------------------------------------
# evaluate.py --self_verify as a user runs it


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A micro PMTP checkpoint (2 steps: its head fails every instance, so repair runs on every image), a
    generation-only EchoGen, and untrained judges at the model's resolution and at another."""
    root = tmp_path_factory.mktemp("self_verify_eval")
    run(["train_pretrain.py", *MICRO_PRETRAIN, f"--data_dir={root / 'data'}", f"--out_dir={root / 'pmtp'}"])
    tokenizer = shapescenes.build_tokenizer()
    torch.manual_seed(0)
    gen_only = EchoGen(ModelConfig(res=32, patch=8, dim=32, depth=1, heads=2, text_depth=1, max_instances=4,
                                   vocab_size=tokenizer.get_vocab_size(), grounding=False))
    judge = lambda res: detector.StandaloneDetector(detector.DetectorConfig(
        res=res, dim=32, depth=1, heads=2, text_depth=1, max_phrase_len=layouts.MAX_PHRASE_LEN),
        vocab_size=tokenizer.get_vocab_size())
    for name, model in [("gen_only", gen_only), ("judge32", judge(32)), ("judge16", judge(16))]:
        runtime.save_checkpoint(str(root / name), model, model, torch.optim.AdamW(model.parameters()), tokenizer, {}, 0)
    return root


def self_verify(world, monkeypatch, capsys, out, *flags, ckpt="pmtp/ckpt"):
    """evaluate.py --ckpt CKPT (the micro one) on 3 scenes of val and heldout, 2 steps, --out out, and flags."""
    return run_main(monkeypatch, capsys, "--ckpt", str(world / ckpt), "--sets", "val,heldout", "--n", "3", "--steps",
                    "2", "--out", str(out), *flags)


def test_self_verify_writes_a_table_json_and_png_per_set_whose_n1_rows_are_evaluates(world, tmp_path, monkeypatch,
                                                                                     capsys):
    status, out, err = self_verify(world, monkeypatch, capsys, tmp_path / "out", "--self_verify", "2,1",
                                   "--repair", "1")
    assert status == 0, err[-3000:]
    model, tokenizer, _ = runtime.load_model(str(world / "pmtp" / "ckpt"), EchoGen)
    for kind in ("val", "heldout"):
        files = {ext: tmp_path / "out" / f"self_verify_{kind}.{ext}" for ext in ("md", "json", "png")}
        assert all(path.is_file() for path in files.values())
        assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        result = json.loads(files["json"].read_text())
        assert files["md"].read_text() == evaluate.self_verify_table(result) and files["md"].read_text() in out
        scenes = shapescenes.make_scene_set(kind, 3, seed=0)
        plain = evaluate.evaluate(model, scenes, tokenizer, steps=2)
        rows = {(row["n"], row["chooser"]): row for row in result["best_of"]}
        assert [n for n, _ in rows] == [1, 1, 1, 2, 2, 2]
        for chooser in evaluate.CHOOSERS:
            assert rows[1, chooser]["isr"] == plain["isr"] and rows[1, chooser]["difference"] == 0.0
        assert result["per_scene"]["passed"][0] == plain["per_scene"]["isr"]
        # the verifier's choice at N = 2, recomputed from the per-scene figures
        worst, passed = np.array(result["per_scene"]["worst"]), np.array(result["per_scene"]["passed"])
        chosen = passed[worst.argmax(0), np.arange(3)]
        assert rows[2, "verifier"]["isr"] == round(chosen.sum() / sum(result["per_scene"]["instances"]), 4)
        # NFE: a sample 2 steps x 2 rows, a redraw the 2 steps below t0 = 0.6 (0.5 and 0) x 2, a grounding 1
        assert result["costs"] == {"sample": 4, "redraw": 4, "ground": 1}
        assert [rows[2, c]["nfe"] for c in ("verifier", "random", "checker")] == [10, 8, 8]
        repair = result["repair"]
        assert repair["repair"]["images_redrawn"] == 1.0  # the micro head passes nothing: one round on every image
        assert repair["before"]["nfe"] == 5 and repair["repair"]["nfe"] == 10 and repair["resample"]["nfe"] == 10
        assert repair["before"]["isr"] == plain["isr"]
        if repair["repair"]["images_kept"]:  # the blend keeps every pixel outside the region exactly
            assert repair["repair"]["mse_outside"] == 0.0 and repair["repair"]["psnr_outside"] is None


def test_candidates_and_repair_are_those_evaluate_and_sampler_draw(world):
    model, tokenizer, _ = runtime.load_model(str(world / "pmtp" / "ckpt"), EchoGen)
    grounder = evaluate.own_grounder(model, tokenizer)
    scenes = shapescenes.make_scene_set("val", 3, seed=0)
    candidates, (images, verdict) = evaluate.draw_candidates(model, grounder, scenes, tokenizer, range(2), 2, 3.0, 1.0,
                                                             batch_size=2)
    assert np.array_equal(np.stack(sampler.to_uint8(images)), np.stack(sampler.generate(model, scenes, tokenizer, 2,
                                                                                        batch_size=2)))
    assert np.allclose(verdict.worst.numpy(), candidates.worst[0])
    later = sampler.generate(model, scenes, tokenizer, 2, seed=sampler.candidate_seed(0, 1), batch_size=2)
    assert np.array_equal(candidates.success[1], evaluate.checker_success(scenes, later, 4))
    # the repair is sampler.py --best_of 1 --repair K's
    repaired = evaluate.run_repair(model, grounder, scenes, tokenizer, (images, verdict), 2, 2, 3.0, 1.0, batch_size=2)
    verified, reports = sampler.generate_verified(model, grounder, scenes, tokenizer, 2, batch_size=2, repair_rounds=2)
    assert np.array_equal(np.stack(repaired.images), np.stack(verified))
    assert repaired.kept.tolist() == [report["repairs_kept"] for report in reports] and (repaired.rounds >= 1).all()


def test_a_judge_verifies_too(world, tmp_path, monkeypatch, capsys):
    status, _, err = self_verify(world, monkeypatch, capsys, tmp_path / "out", "--self_verify", "1,2", "--repair", "1",
                                 "--verifier", f"judge:{world / 'judge32'}")
    assert status == 0, err[-3000:]
    result = json.loads((tmp_path / "out" / "self_verify_val.json").read_text())
    assert result["verifier"] == f"judge:{world / 'judge32'}" and "repair" in result


def refusals(world):
    return [
        (["--self_verify", "0,2"], ["--self_verify", "'0,2'", ">= 1"]),
        (["--self_verify", "1,x"], ["--self_verify", "'1,x'"]),
        (["--self_verify", "1.5"], ["--self_verify", "'1.5'"]),
        (["--self_verify", "2", "--repair", "-1"], ["--repair", "'-1'", ">= 0"]),
        (["--self_verify", "2", "--verifier", "judge:"], ["--verifier", "'judge:'"]),
        (["--self_verify", "2", "--verifier", "mine"], ["--verifier", "'mine'"]),
        (["--self_verify", "2", "--verifier", f"judge:{world / 'missing'}"],
         ["--verifier", "missing", "no such checkpoint folder"]),
        (["--self_verify", "2", "--verifier", f"judge:{world / 'judge16'}"],
         ["--verifier", "judge16", "resolution 16"]),
        (["--self_verify", "2", "--judge", str(world / "judge32")], ["--judge", "not with --self_verify"]),
        (["--repair", "1"], ["--repair", "only with --self_verify"]),
    ]


def test_bad_input_is_refused_with_one_line_and_nothing_written(world, tmp_path, monkeypatch, capsys):
    cases = refusals(world) + [(["--self_verify", "2", "--ckpt", str(world / "gen_only")],
                                ["--verifier own", "gen_only", "no grounding head"])]
    for flags, expected in cases:
        status, out, err = self_verify(world, monkeypatch, capsys, tmp_path / "out", *flags)
        assert status == 2 and out == "", (flags, out, err)
        assert err.startswith("error: ") and err.count("\n") == 1, (flags, err)
        assert all(part in err for part in expected), (flags, err)
        assert not (tmp_path / "out").exists(), flags
