"""Self-verified sampling (sampler.py): the own head's verdict on an image, best-of-N by the worst
instance, the repair of failing boxes (its region, its blend, its keep-if-better rule), and
sampler.py --best_of / --repair as a user runs it, refusals included."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import layouts
import rewards
import runtime
import sampler
import shapescenes
from model import EchoGen, ModelConfig
from test_model import random_batch
from test_rl import MICRO_PRETRAIN, ROOT, run, tiny_model

# -----------------------------------------------------------------------------
# a grounder that answers from a table, so that a test decides what the head says


class TableGrounder:
    """Perfect boxes (the asked ones) with the confidences of the next entry of answers, (B, N) each;
    records the batches it was given."""

    def __init__(self, *answers):
        self.answers, self.batches = list(answers), []

    def __call__(self, batch):
        self.batches.append(batch)
        confidence = self.answers.pop(0)
        assert confidence.shape == batch["instance_mask"].shape
        return batch["boxes"].clone(), confidence


def confidences(*rows):
    """(B, 3) confidences for random_batch's layouts (two instances, one empty slot scored 0)."""
    return torch.tensor([[a, b, 0.0] for a, b in rows])

# -----------------------------------------------------------------------------
# verify


def test_verify_matches_same_phrase_slots_and_scores_confidence_times_iou():
    # slots 0 and 1 ask for the same phrase; the head answered them in the swapped order
    batch = {"phrase_ids": torch.tensor([[[3, 4], [3, 4], [5, 0]]]),
             "boxes": torch.tensor([[[0.0, 0.0, 0.4, 0.4], [0.5, 0.5, 1.0, 1.0], [0.0, 0.5, 0.5, 1.0]]]),
             "instance_mask": torch.tensor([[True, True, True]])}
    pred_boxes = torch.tensor([[[0.5, 0.5, 1.0, 0.9], [0.0, 0.0, 0.4, 0.2], [0.0, 0.5, 0.25, 1.0]]])
    pred_conf = torch.tensor([[0.8, 0.6, 0.9]])
    seen = []
    verdict = sampler.verify(lambda b: seen.append(b["images"]) or (pred_boxes, pred_conf), torch.zeros(1, 3, 4, 4),
                             batch)
    assert torch.equal(verdict.found, pred_boxes[:, [1, 0, 2]])  # each asked box gets the prediction that fits it
    torch.testing.assert_close(verdict.confidence, torch.tensor([[0.6, 0.8, 0.9]]))
    torch.testing.assert_close(verdict.iou, torch.tensor([[0.5, 0.8, 0.5]]))
    torch.testing.assert_close(verdict.iou, rewards.matched_ious(pred_boxes, batch["boxes"], batch["phrase_ids"],
                                                                 batch["instance_mask"]))
    torch.testing.assert_close(verdict.score, torch.tensor([[0.3, 0.64, 0.45]]))
    torch.testing.assert_close(verdict.worst, torch.tensor([0.3]))
    # the head sees the image as its PNG holds it: 0 in [-1, 1] is level 128 of 255
    assert torch.equal(seen[0], torch.full((1, 3, 4, 4), 128.0) / 127.5 - 1)


def test_verify_ignores_empty_slots():
    batch = random_batch()
    verdict = sampler.verify(TableGrounder(confidences((0.9, 0.4), (0.2, 0.7))), torch.zeros(2, 3, 16, 16), batch)
    torch.testing.assert_close(verdict.worst, torch.tensor([0.4, 0.2]))
    assert torch.equal(verdict.score[:, 2], torch.zeros(2)) and torch.equal(verdict.found[:, 2], torch.zeros(2, 4))

# -----------------------------------------------------------------------------
# best of N


def test_best_of_keeps_the_candidate_with_the_best_worst_instance():
    model, batch = tiny_model(), random_batch()
    K, B = 3, 2
    noises = torch.randn(K, B, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    # layout 0: candidate 0 has the best mean (0.55) but the worst instance 0.2; candidate 1's worst is 0.5.
    # layout 1: candidates 0 and 1 tie at worst 0.3: the first is kept
    table = torch.stack([confidences((0.9, 0.2), (0.3, 0.7)),
                         confidences((0.5, 0.5), (0.7, 0.3)),
                         confidences((0.6, 0.45), (0.1, 0.9))])  # (K, B, N)
    grounder = TableGrounder(table.flatten(0, 1))
    images, verdict, kept, worst = sampler.best_of(model, grounder, batch, noises, steps=3, cfg_scale=2.0)
    assert kept.tolist() == [1, 0]
    torch.testing.assert_close(worst, torch.tensor([[0.2, 0.5, 0.45], [0.3, 0.3, 0.1]]))
    torch.testing.assert_close(verdict.worst, torch.tensor([0.5, 0.3]))
    assert len(grounder.batches[0]["boxes"]) == K * B  # every candidate grounded in one pass
    for i, k in enumerate(kept.tolist()):  # the image kept is the candidate's own sample
        alone = sampler.sample(model, batch, noises[k], steps=3, cfg_scale=2.0)
        torch.testing.assert_close(images[i], alone[i], atol=1e-5, rtol=0)

# -----------------------------------------------------------------------------
# repair


def test_failing_region_is_the_grown_box_with_a_feathered_edge():
    boxes = torch.tensor([[[0.25, 0.25, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]]])  # pixels 4..7 of 16; the whole image
    mask = sampler.failing_region(boxes, torch.tensor([[True, False]]), 16, grow=2.0, feather=2.0)[0, 0]
    assert mask.shape == (16, 16)
    assert torch.equal(mask[2:10, 2:10], torch.ones(8, 8))  # the box grown by 2 pixels
    # pixel centres 2.5 and 3.5 pixels outside the box, then nothing
    assert mask[5, 1].item() == mask[5, 10].item() == 0.75 and mask[5, 0].item() == mask[5, 11].item() == 0.25
    assert mask[5, 12:].eq(0).all() and mask[12:].eq(0).all() and mask[0, 0].item() == 0.25
    assert torch.equal(sampler.failing_region(boxes, torch.tensor([[False, False]]), 16), torch.zeros(1, 1, 16, 16))


@pytest.mark.parametrize("cfg_scale, shift", [(1.0, 1.0), (2.5, 3.0)])
def test_redraw_keeps_the_image_under_an_empty_mask_and_samples_afresh_under_a_full_one(cfg_scale, shift):
    model, batch = tiny_model(), random_batch()
    g = torch.Generator().manual_seed(0)
    images, eps = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.randn(2, 3, 16, 16, generator=g)
    empty, full = torch.zeros(2, 1, 16, 16), torch.ones(2, 1, 16, 16)
    kept = sampler.redraw(model, batch, images, empty, eps, t0=0.6, steps=6, cfg_scale=cfg_scale, shift=shift)
    assert torch.equal(kept, images)
    fresh = sampler.redraw(model, batch, images, full, eps, t0=1.0, steps=6, cfg_scale=cfg_scale, shift=shift)
    assert torch.equal(fresh, sampler.sample(model, batch, eps, steps=6, cfg_scale=cfg_scale, shift=shift))
    # a box: outside its soft region the image is kept exactly, inside it is redrawn
    mask = sampler.failing_region(batch["boxes"], torch.tensor([[True, False, False]] * 2), 16)
    partial = sampler.redraw(model, batch, images, mask, eps, t0=0.6, steps=6, cfg_scale=cfg_scale, shift=shift)
    outside = (mask == 0).expand_as(images)
    assert torch.equal(partial[outside], images[outside]) and not torch.equal(partial, images)


def test_repair_redraws_only_failing_images_and_keeps_a_redraw_only_if_it_is_better():
    model, batch = tiny_model(), random_batch()
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    round_noises = [torch.randn(2, 3, 16, 16, generator=g) for _ in range(3)]
    # image 0 passes; image 1's first instance fails (0.1 < 0.5)
    verdict = sampler.verify(TableGrounder(confidences((0.9, 0.8), (0.1, 0.9))), images, batch)
    # its first redraw scores better (still failing), its second worse, its third better and passing
    grounder = TableGrounder(confidences((0.3, 0.9)), confidences((0.2, 0.9)), confidences((0.8, 0.6)))
    redraw_settings = dict(t0=0.6, steps=4, cfg_scale=2.0)
    repaired_images, repaired_verdict, repaired = sampler.repair(model, grounder, batch, images, verdict, round_noises,
                                                                 pass_score=0.5, **redraw_settings)
    assert repaired.tolist() == [0, 2]
    assert all(len(b["boxes"]) == 1 for b in grounder.batches)  # only the failing image went through again
    torch.testing.assert_close(repaired_verdict.worst, torch.tensor([0.8, 0.6]))
    assert torch.equal(repaired_images[0], images[0])
    # the image kept is round 3's redraw of round 1's: round 2's was dropped
    part = {k: v[1:] for k, v in batch.items()}
    mask = sampler.failing_region(part["boxes"], torch.tensor([[True, False, False]]), 16)
    first = sampler.redraw(model, part, images[1:], mask, round_noises[0][1:], **redraw_settings)
    third = sampler.redraw(model, part, first, mask, round_noises[2][1:], **redraw_settings)
    assert torch.equal(repaired_images[1:], third)
    # nothing left failing: no round runs
    _, _, none = sampler.repair(model, TableGrounder(), batch, images, repaired_verdict, round_noises, pass_score=0.5,
                                **redraw_settings)
    assert none.tolist() == [0, 0]

# -----------------------------------------------------------------------------
# sampler.py as a user runs it


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A micro PMTP checkpoint (2 steps: it grounds badly, so every instance fails and repairs run), a
    generation-only checkpoint, and a layout file of three scenes."""
    root = tmp_path_factory.mktemp("self_verify")
    run(["train_pretrain.py", *MICRO_PRETRAIN, f"--data_dir={root / 'data'}", f"--out_dir={root / 'pmtp'}"])
    tokenizer = shapescenes.build_tokenizer()
    gen_only = EchoGen(ModelConfig(res=32, patch=8, dim=32, depth=1, heads=2, text_depth=1, max_instances=4,
                                   vocab_size=tokenizer.get_vocab_size(), grounding=False))
    runtime.save_checkpoint(str(root / "gen_only"), gen_only, gen_only, torch.optim.AdamW(gen_only.parameters()),
                            tokenizer, {}, 0)
    layouts.write_layouts(str(root / "layouts.json"), shapescenes.make_scene_set("val", 3, seed=0))
    return root


def sample_cli(world, out, *flags, ckpt=None):
    return subprocess.run([sys.executable, "sampler.py", "--ckpt", str(ckpt or world / "pmtp" / "ckpt"), "--layouts",
                           str(world / "layouts.json"), "--out", str(out), "--steps", "3", "--batch_size", "2", *flags],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)


def generated(world, **settings):
    """sampler.generate in this process, on the CLI's scenes and settings."""
    model, tokenizer, _ = runtime.load_model(str(world / "pmtp" / "ckpt"), EchoGen)
    scenes = layouts.read_layouts(str(world / "layouts.json"), tokenizer, model.config.max_instances)
    return scenes, sampler.generate(model, scenes, tokenizer, steps=3, batch_size=2, **settings)


def read_png(path):
    return layouts.read_image(str(path), path.stem)


def test_without_the_flags_the_cli_writes_generates_images_and_nothing_else(world, tmp_path):
    result = sample_cli(world, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    scenes, images = generated(world)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(f"{s['id']}.png" for s in scenes)
    for scene, image in zip(scenes, images):
        assert np.array_equal(read_png(tmp_path / "out" / f"{scene['id']}.png"), image)
    # one candidate, verified: the same images, each with its verdict
    result = sample_cli(world, tmp_path / "one", "--best_of", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    for scene, image in zip(scenes, images):
        assert np.array_equal(read_png(tmp_path / "one" / f"{scene['id']}.png"), image)
        assert json.loads((tmp_path / "one" / f"{scene['id']}.json").read_text())["kept"] == 0


def test_best_of_and_repair_write_each_image_with_its_verdict(world, tmp_path):
    result = sample_cli(world, tmp_path / "out", "--best_of", "3", "--repair", "2", "--pass_score", "0.9")
    assert result.returncode == 0, result.stderr[-3000:]
    scenes, _ = generated(world)
    for scene in scenes:
        report = json.loads((tmp_path / "out" / f"{scene['id']}.json").read_text())
        assert report["id"] == scene["id"] and report["candidates"] == 3 and 0 <= report["kept"] < 3
        assert report["candidate_worst"][report["kept"]] == max(report["candidate_worst"])
        assert 0 <= report["repairs_kept"] <= 2 and report["pass_score"] == 0.9
        instances = report["instances"]
        assert [(i["phrase"], i["box"]) for i in instances] == [(i["phrase"], i["box"]) for i in scene["instances"]]
        assert report["worst_score"] == min(i["score"] for i in instances)
        assert all(i["pass"] == (i["score"] >= 0.9) and len(i["found"]) == 4 for i in instances)
        if report["repairs_kept"] == 0:  # then the image is the kept candidate's, drawn from seed + 1000 k
            candidate = generated(world, seed=1000 * report["kept"])[1][scenes.index(scene)]
            assert np.abs(read_png(tmp_path / "out" / f"{scene['id']}.png").astype(int) - candidate).max() <= 1


@pytest.mark.parametrize("flags, ckpt, expected", [
    (["--best_of", "0"], None, ["--best_of", "'0'", ">= 1"]),
    (["--repair", "-1"], None, ["--repair", "'-1'", ">= 0"]),
    (["--t0", "1.5"], None, ["--t0", "at most 1"]),
    (["--best_of", "2"], "gen_only", ["--best_of / --repair", "gen_only", "no grounding head"]),
    (["--repair", "1"], "gen_only", ["--best_of / --repair", "gen_only", "no grounding head"]),
])
def test_bad_flags_and_a_checkpoint_without_a_grounding_head_are_refused(world, tmp_path, flags, ckpt, expected):
    result = sample_cli(world, tmp_path / "out", *flags, ckpt=ckpt and world / ckpt)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert all(part in lines[0] for part in expected), lines[0]
    assert not (tmp_path / "out").exists()


def test_a_generation_only_checkpoint_still_samples_without_the_flags(world, tmp_path):
    result = sample_cli(world, tmp_path / "out", ckpt=world / "gen_only")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(os.listdir(tmp_path / "out")) == 3
