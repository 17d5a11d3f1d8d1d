"""DJO: where each chained loss sends its gradient, that the chains learn, and exact resume."""


import numpy as np
import pytest
import torch

import layouts
import runtime
import objectives
from model import EchoGen
from objectives import djo_loss
from test_model import TINY, perturb_zero_inits, random_batch
from test_train import losses, run, train, weights


def djo_terms(model, detach_boxes=True, negatives=False, recon_min_conf=0.0):
    """djo_loss's terms on a fixed batch of 2 generation and 2 grounding rows; negatives: the third
    slot of each grounding row holds a hard negative phrase (a copy of the first with another word)."""
    torch.manual_seed(0)
    batch = random_batch(B=4)
    batch["images"] = torch.rand(4, 3, 16, 16) * 2 - 1
    if negatives:
        negative = torch.zeros_like(batch["instance_mask"])
        negative[[1, 3], 2] = True
        batch["phrase_ids"][negative] = batch["phrase_ids"][[1, 3], 0] % 19 + 1
        batch["instance_mask"] = batch["instance_mask"] | negative
        batch["negative"] = negative
    task = torch.tensor([0, 1, 0, 1])
    t, t_cycle, t_recon = torch.tensor([0.7, 0.0, 0.4, 0.2]), torch.full((4,), 0.3), torch.full((4,), 0.5)
    noise, drop = torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.bool)
    _, terms = djo_loss(model, model, objectives.GroundingCriterion(),
                        objectives.GroundingCriterion(weights={"l1": 5.0, "giou": 2.0, "conf": 0.0}),
                        batch, task, t, noise, drop, t_cycle, t_recon, 0.1, 0.1, 1.0, detach_boxes,
                        recon_min_conf=recon_min_conf)
    return terms


def gradient_norms(model, loss):
    """Gradient norm of loss per group of parameters: the grounding head, the box-unknown query
    vector, and the generator (the velocity path: patch embedding, blocks, final layer)."""
    groups = {"head": list(model.grounding_head.parameters()), "queries": [model.layout.box_unknown],
              "generator": [model.patch_embed.weight, model.final.linear.weight, model.blocks[0].image_stream.qkv.weight]}
    params = [p for ps in groups.values() for p in ps]
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    norms, i = {}, 0
    for name, ps in groups.items():
        norms[name] = sum(float(g.norm()) if g is not None else 0.0 for g in grads[i:i + len(ps)])
        i += len(ps)
    return norms


def test_layout_image_layout_reaches_the_generator_through_x0_hat_only():
    model = perturb_zero_inits(EchoGen(TINY))
    norms = gradient_norms(model, djo_terms(model)["cycle"])
    assert norms["generator"] > 0
    assert norms["head"] == 0 and norms["queries"] == 0, norms
    assert all(p.requires_grad for p in model.parameters()), "frozen_parameters must restore requires_grad"


def test_hard_negatives_reach_stage_1_grounding_only():
    """A negative's box would ask the reconstruction rows to draw an absent object: both chains must
    be computed as if the negative slots were not there, while stage 1's confidence loss sees them."""
    model = perturb_zero_inits(EchoGen(TINY))
    plain, with_negatives = djo_terms(model), djo_terms(model, negatives=True)
    for chain in ("cycle", "recon"):
        assert torch.equal(plain[chain], with_negatives[chain]), chain
    assert with_negatives["ground_conf"] != plain["ground_conf"]


def test_reconstruction_keeps_only_images_whose_boxes_the_head_trusts():
    """recon_min_conf between the two grounding images' lowest box confidences keeps one of them."""
    model = perturb_zero_inits(EchoGen(TINY))
    torch.manual_seed(0)
    batch = random_batch(B=4)
    images = torch.rand(4, 3, 16, 16) * 2 - 1  # djo_terms' images: the same seed, the same draws
    with torch.no_grad():
        logits = model.ground(images[[1, 3]], batch["caption_ids"][[1, 3]], batch["phrase_ids"][[1, 3]],
                              batch["instance_mask"][[1, 3]])["logits"][-1]
    lowest = logits.sigmoid().masked_fill(~batch["instance_mask"][[1, 3]], 1.0).min(1).values  # (2,)
    everything, one, nothing = (djo_terms(model, recon_min_conf=c) for c in (0.0, float(lowest.mean()), 1.01))
    assert (everything["recon_trusted"], one["recon_trusted"], nothing["recon_trusted"]) == (1.0, 0.5, 0.0)
    assert 0 < one["recon"] < everything["recon"] and nothing["recon"] == 0


@pytest.mark.parametrize("detach_boxes", [True, False])
def test_image_layout_image_reaches_the_head_only_when_boxes_are_not_detached(detach_boxes):
    model = perturb_zero_inits(EchoGen(TINY))
    norms = gradient_norms(model, djo_terms(model, detach_boxes)["recon"])
    assert norms["generator"] > 0
    assert (norms["head"] > 0) == (not detach_boxes), norms


@pytest.fixture(scope="module")
def pmtp_checkpoint(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("pmtp")
    _, out = train(tmp_path, "pmtp", "--cache_scenes=8", "--batch_size=8", "--max_steps=60", "--lr=3e-3")
    return tmp_path, out / "ckpt"


def joint(tmp_path, ckpt, name, *extra, check=True):
    out = tmp_path / name
    args = ["train_joint.py", f"--init_from={ckpt}", f"--out_dir={out}", f"--data_dir={tmp_path / 'data'}",
            "--val_scenes=0", "--log_interval=1", "--ckpt_interval=0", "--warmup_steps=1", *extra]
    return run(args, tmp_path, check=check), out


def chained_losses_on_fixed_draws(ckpt, cache_file):
    """The two chained losses of a checkpoint's weights on its 8 training scenes x 4 fixed draws of
    t and noise: the per-step losses of the log are too noisy to show a trend in a short run."""
    model, _, _ = runtime.load_model(str(ckpt), EchoGen, "model")
    batch = layouts.SceneCache(str(cache_file)).batch(np.tile(np.arange(8), 4))
    g = torch.Generator().manual_seed(0)
    task = torch.tensor([0, 1] * 16)
    t, t_cycle, t_recon = torch.rand(32, generator=g), torch.rand(32, generator=g) * 0.5, torch.rand(32, generator=g)
    noise = torch.randn(32, 3, 32, 32, generator=g)
    with torch.no_grad():
        _, terms = djo_loss(model, model, objectives.GroundingCriterion(),
                            objectives.GroundingCriterion(weights={"l1": 5.0, "giou": 2.0, "conf": 0.0}), batch, task,
                            t, noise, torch.zeros(32, dtype=torch.bool), t_cycle, t_recon, 0.1, 1.0, 1.0)
    return float(terms["cycle"]), float(terms["recon"])


def test_djo_steps_lower_the_chained_losses(pmtp_checkpoint, tmp_path):
    _, out = joint(tmp_path, pmtp_checkpoint[1], "djo", "--cache_scenes=8", "--batch_size=8", "--max_steps=100",
                   "--lr=2e-3", "--schedule=constant", "--cycle_weight=1.0", "--ground_every=2")
    cache_file = tmp_path / "data" / "shapescenes_r32_n8_s1_o1-4.npz"
    cycle_before, recon_before = chained_losses_on_fixed_draws(pmtp_checkpoint[1], cache_file)
    cycle_after, recon_after = chained_losses_on_fixed_draws(out / "ckpt", cache_file)
    assert cycle_after < 0.8 * cycle_before, (cycle_before, cycle_after)
    assert recon_after < 0.99 * recon_before, (recon_before, recon_after)  # a flow loss: it falls slowly


def test_resumed_djo_equals_uninterrupted_djo(pmtp_checkpoint, tmp_path):
    ckpt = pmtp_checkpoint[1]
    common = ["--cache_scenes=16", "--batch_size=4", "--lr_decay_steps=4"]
    _, whole = joint(tmp_path, ckpt, "whole", *common, "--max_steps=4")
    _, parts = joint(tmp_path, ckpt, "parts", *common, "--max_steps=2")
    joint(tmp_path, ckpt, "parts", *common, "--max_steps=4", "--init_from=resume")
    assert losses(parts) == losses(whole) and len(losses(whole)) == 4
    for key, value in weights(whole).items():
        assert np.array_equal(value, weights(parts)[key]), key


def test_djo_refuses_a_generation_only_checkpoint(tmp_path):
    _, out = train(tmp_path, "gen", "--ground_every=0", "--max_steps=1", "--batch_size=4")
    result, _ = joint(tmp_path, out / "ckpt", "djo", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().endswith("DJO needs an EchoGen model with a grounding head (a PMTP checkpoint)")
