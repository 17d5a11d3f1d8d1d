"""The MM-DiT: shapes, adaLN-Zero identity at init, condition dropout, the flow loss, the ODE sampler."""

import dataclasses
import math

import pytest
import torch

import layouts
import shapescenes
import sampler
import objectives
from model import (X0_T_MIN, ConvStem, EchoGen, LayoutMap, ModelConfig, box_attention_bias, fourier_box_embedding,
                   patch_box_coverage, position_in_boxes)
from objectives import flow_loss, interpolate, pmtp_loss

TINY = ModelConfig(res=16, patch=2, dim=32, depth=2, heads=2, text_depth=1, vocab_size=20,
                   max_caption_len=10, max_phrase_len=4, max_instances=3)
# the levers of learning shapes fast, all on: the per-pixel layout map, the pixel head, x0-prediction, the conv stem
LEVERS = dataclasses.replace(TINY, layout_map=8, pixel_head=8, prediction="x0", conv_stem=8)
both_models = pytest.mark.parametrize("config", [TINY, LEVERS], ids=["plain", "levers"])


def random_batch(B=2, config=TINY, seed=0):
    g = torch.Generator().manual_seed(seed)
    caption_ids = torch.randint(1, config.vocab_size, (B, config.max_caption_len), generator=g)
    caption_ids[:, 6:] = 0
    phrase_ids = torch.randint(1, config.vocab_size, (B, config.max_instances, config.max_phrase_len), generator=g)
    phrase_ids[:, :, 2:] = 0
    xy = torch.rand(B, config.max_instances, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + 0.3], dim=-1)
    instance_mask = torch.tensor([[True, True, False]] * B)
    phrase_ids[~instance_mask] = 0
    return dict(caption_ids=caption_ids, phrase_ids=phrase_ids, boxes=boxes, instance_mask=instance_mask)


def perturb_zero_inits(model, scale=0.05):
    """Give the zero-initialized layers some weight, as training would, so outputs depend on everything."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def test_output_shape_and_zero_velocity_at_init():
    torch.manual_seed(0)
    model = EchoGen(TINY)
    x = torch.randn(2, 3, 16, 16)
    v = model(x, torch.rand(2), **random_batch()).v
    assert v.shape == x.shape
    assert torch.all(v == 0), "the zero-initialized final layer must predict v = 0"


def test_blocks_start_as_identity_on_both_streams():
    torch.manual_seed(0)
    model = EchoGen(TINY)
    cond = torch.randn(2, 7, 32)
    image = torch.randn(2, 64, 32)
    c = torch.randn(2, 32)
    mask = torch.ones(2, 1, 1, 71, dtype=torch.bool)
    for block in model.blocks:
        cond_out, image_out = block(cond, image, c, mask)
        assert torch.equal(image_out, image) and torch.equal(cond_out, cond)
    # the generation-only model's last block lends keys and values only (SD3's pre-only context)
    generation_only = EchoGen(dataclasses.replace(TINY, grounding=False))
    assert generation_only.blocks[-1](cond, image, c, mask)[0] is None
    # and they stop being the identity once the adaLN gates are non-zero
    perturb_zero_inits(model)
    _, image_out = model.blocks[0](cond, image, c, mask)
    assert not torch.allclose(image_out, image)


@both_models
def test_conditioning_changes_output_and_padding_does_not(config):
    torch.manual_seed(0)
    model = perturb_zero_inits(EchoGen(config)).eval()
    batch = random_batch()
    x, t = torch.randn(2, 3, 16, 16), torch.full((2,), 0.5)
    v = model(x, t, **batch).v
    moved = dict(batch, boxes=batch["boxes"].clone())
    moved["boxes"][:, 0] += 0.1
    assert not torch.allclose(model(x, t, **moved).v, v, atol=1e-6), "boxes must condition the image"
    # the box of an empty slot is never read: its token is the learned null
    junk = dict(batch, boxes=batch["boxes"].clone())
    junk["boxes"][:, 2] = torch.tensor([0.9, 0.9, 0.1, 0.1])
    assert torch.allclose(model(x, t, **junk).v, v, atol=1e-6)


@both_models
def test_dropped_condition_ignores_caption_and_layout(config):
    torch.manual_seed(0)
    model = perturb_zero_inits(EchoGen(config)).eval()
    a, b = random_batch(seed=0), random_batch(seed=1)
    drop = torch.ones(2, dtype=torch.bool)
    x, t = torch.randn(2, 3, 16, 16), torch.full((2,), 0.3)
    outs = []
    for batch in (a, b):
        caption_ids, instance_mask = EchoGen.drop_conditions(batch["caption_ids"], batch["instance_mask"], drop)
        outs.append(model(x, t, caption_ids, batch["phrase_ids"], batch["boxes"], instance_mask).v)
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert torch.isfinite(outs[0]).all()


def test_layout_map_is_the_formula_inside_a_box_and_zero_outside():
    torch.manual_seed(0)
    layout_map = LayoutMap(dim=6, channels=5, n_freqs=2)
    boxes = torch.tensor([[[0.125, 0.0, 0.75, 0.5], [0.8, 0.8, 1.0, 1.0]]])  # (1, 2, 4); slot 1 is not visible
    phrase = torch.randn(1, 2, 6)
    out = layout_map(phrase, boxes, torch.tensor([[True, False]]), res=4)  # (1, 5, 4, 4), pixels 0.25 wide

    def formula(u, v):
        where = layout_map.where_proj(fourier_box_embedding(torch.tensor([u, v]), 2))
        return layout_map.out(where + layout_map.phrase_proj(phrase[0, 0]))

    # pixel (row 1, col 2): centre (0.625, 0.375), inside box 0 at (u, v) = (0.5 / 0.625, 0.375 / 0.5)
    assert torch.allclose(position_in_boxes(boxes, 4)[0, 0, 1, 2], torch.tensor([0.8, 0.75]))
    assert torch.allclose(out[0, :, 1, 2], formula(0.8, 0.75), atol=1e-6)
    # pixel (0, 0) is half inside (the box starts at x = 0.125) and carries half of the formula
    assert torch.allclose(out[0, :, 0, 0], 0.5 * formula(0.0, 0.25), atol=1e-6)
    # outside every visible box (the invisible slot 1 covers pixel (3, 3)) the map is zero
    assert torch.all(out[0, :, 3] == 0) and torch.all(out[0, :, :, 3] == 0)


def test_x0_prediction_gives_the_velocity_of_the_predicted_x0():
    torch.manual_seed(0)
    as_v = perturb_zero_inits(EchoGen(dataclasses.replace(LEVERS, prediction="v"))).eval()
    as_x0 = EchoGen(LEVERS).eval()
    as_x0.load_state_dict(as_v.state_dict())  # the same network; only the reading of its output differs
    batch, x = random_batch(), torch.randn(2, 3, 16, 16)
    t = torch.tensor([0.5, 0.01])  # the second below the floor X0_T_MIN
    out = as_v(x, t, **batch).v  # read as x0 by the other model
    v = as_x0(x, t, **batch).v
    assert torch.allclose(v[0], (x[0] - out[0]) / 0.5, atol=1e-5)
    assert torch.allclose(v[1], (x[1] - out[1]) / X0_T_MIN, atol=1e-4)
    # so one Euler step to t = 0 from t >= X0_T_MIN lands on the predicted x0
    assert torch.allclose(x[0] - 0.5 * v[0], out[0], atol=1e-5)


def test_pixel_head_starts_at_zero_and_its_features_at_their_init():
    torch.manual_seed(0)
    model = EchoGen(dataclasses.replace(LEVERS, prediction="v"))
    v = model(torch.randn(2, 3, 16, 16), torch.rand(2), **random_batch()).v
    assert torch.all(v == 0), "the pixel head's zero-initialized last conv must predict v = 0"
    assert model.final.linear.weight.abs().sum() > 0, "the features feeding the head must not start at zero"


@pytest.mark.parametrize("patch", [2, 4, 8])
def test_conv_stem_makes_the_patch_grid_and_sees_across_patch_borders(patch):
    torch.manual_seed(0)
    R, D = 64, 16
    stem, linear = ConvStem(3, 8, D, patch), torch.nn.Conv2d(3, D, patch, stride=patch)
    x = torch.randn(1, 3, R, R)
    nudged = x.clone()
    nudged[0, :, patch - 1, patch - 1] += 1.0  # the last pixel of patch (0, 0), next to patch (1, 1)
    change = {}
    for name, embed in (("stem", stem), ("linear", linear)):
        tokens, after = embed(x), embed(nudged)
        assert tokens.shape == (1, D, R // patch, R // patch)
        change[name] = (after - tokens).abs()[0].sum(0)  # (g, g): how much each token moved
    assert change["linear"][0, 0] > 0 and change["linear"].sum() == change["linear"][0, 0]
    # the stem's convolutions reach the neighbouring patch; the far corner, beyond their reach, moves
    # only through the GroupNorm statistics of the whole map, far less (7 to 980 times less over seeds)
    assert change["stem"][1, 1] > 3 * change["stem"][-1, -1] > 0
    with pytest.raises(AssertionError, match="power-of-two patch"):
        ConvStem(3, 8, D, 6)


def test_fourier_box_embedding_layout():
    boxes = torch.tensor([[[0.25, 0.5, 0.75, 1.0]]])
    emb = fourier_box_embedding(boxes, 8)
    assert emb.shape == (1, 1, 64)
    # coordinate 0, frequency 0: sin(pi * 0.25)
    assert emb[0, 0, 0].item() == pytest.approx(math.sin(math.pi * 0.25), abs=1e-6)


def test_flow_loss_of_the_exact_velocity_is_zero_and_weights_rows():
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    assert flow_loss(noise - x0, x0, noise).item() == 0.0
    v = torch.zeros_like(x0)
    per_row = (noise - x0).pow(2).flatten(1).mean(1)
    weight = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert flow_loss(v, x0, noise).item() == pytest.approx(per_row.mean().item(), rel=1e-6)
    assert flow_loss(v, x0, noise, weight).item() == pytest.approx((per_row[0] + per_row[2]).item() / 4, rel=1e-6)
    t = torch.tensor([0.0, 1.0, 0.5, 0.25])
    x_t = interpolate(x0, noise, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[1], noise[1])


def test_timestep_schedule_ends_and_shift():
    s = sampler.timestep_schedule(10, 1.0)
    assert s[0] == 1.0 and s[-1] == 0.0 and torch.all(s[1:] < s[:-1])
    shifted = sampler.timestep_schedule(10, 3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and torch.all(shifted[1:-1] > s[1:-1])


def test_euler_sampler_transports_noise_to_a_point_mass():
    """For data x0 = m (a point mass), the exact velocity is v = (x_t - m) / t; Euler integration is
    then exact and lands on m from any noise, for any step count and guidance scale."""
    m = torch.full((1, 3, 4, 4), 0.25)

    class PointMass(torch.nn.Module):
        config = TINY

        def encode_conditions(self, caption_ids, phrase_ids, boxes, instance_mask, task=None):
            return {"pooled": torch.zeros(caption_ids.shape[0], 1)}

        def velocity(self, x, t, cond):
            return (x - m) / t.view(-1, 1, 1, 1)

        drop_conditions = staticmethod(EchoGen.drop_conditions)

    batch = random_batch(B=1)
    for steps, cfg_scale in ((1, 1.0), (7, 3.0)):
        x0 = sampler.sample(PointMass(), batch, torch.randn(1, 3, 4, 4), steps=steps, cfg_scale=cfg_scale, shift=2.0)
        assert torch.allclose(x0, m, atol=1e-5)


# --- the packed two-task sequence (docs/design.md, "The model", shared tokens)

def packed_outputs(model, batch, task, x, t):
    v, grounding, _ = model(x, t, **batch, task=task)
    return v, grounding["boxes"], grounding["logits"]


@both_models
def test_grounding_rows_never_see_the_layout_boxes(config):
    torch.manual_seed(0)
    model = perturb_zero_inits(EchoGen(config)).eval()
    batch = random_batch()
    task = torch.tensor([0, 1])  # row 0 generates, row 1 grounds
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.6, 0.1])
    v, boxes, logits = packed_outputs(model, batch, task, x, t)
    moved = dict(batch, boxes=batch["boxes"].flip(1) * 0.5)
    v2, boxes2, logits2 = packed_outputs(model, moved, task, x, t)
    assert torch.allclose(boxes2[:, 1], boxes[:, 1], atol=1e-6) and torch.allclose(logits2[:, 1], logits[:, 1], atol=1e-6)
    assert torch.allclose(v2[1], v[1], atol=1e-6), "the grounding row's image tokens read no layout token"
    assert not torch.allclose(v2[0], v[0], atol=1e-4), "the generation row does read its layout"


def test_nothing_reads_the_grounding_queries():
    torch.manual_seed(0)
    model = perturb_zero_inits(EchoGen(TINY)).eval()
    batch = random_batch()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.6, 0.1])
    task = torch.tensor([0, 1])
    v, boxes, _ = packed_outputs(model, batch, task, x, t)
    # removing the queries (generation-only sequence) leaves the generation row's image unchanged
    v_without_queries = model(x, t, **batch).v
    assert torch.allclose(v_without_queries[0], v[0], atol=1e-5)
    # changing what the queries hold changes the boxes, and no image output of any row
    with torch.no_grad():
        model.layout.box_unknown.add_(1.0)
    v2, boxes2, _ = packed_outputs(model, batch, task, x, t)
    assert torch.allclose(v2, v, atol=1e-6)
    assert not torch.allclose(boxes2[:, 1], boxes[:, 1], atol=1e-4)


def test_ground_reads_clean_images_and_returns_boxes_per_slot():
    torch.manual_seed(0)
    model = perturb_zero_inits(EchoGen(TINY)).eval()
    batch = random_batch()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    out = model.ground(images, batch["caption_ids"], batch["phrase_ids"], batch["instance_mask"])
    L = TINY.ground_depth
    assert out["boxes"].shape == (L, 2, 3, 4) and out["logits"].shape == (L, 2, 3)
    assert torch.all((out["boxes"] >= 0) & (out["boxes"] <= 1))
    other = model.ground(images.flip(-1), batch["caption_ids"], batch["phrase_ids"], batch["instance_mask"])
    assert not torch.allclose(other["boxes"], out["boxes"], atol=1e-4), "grounding must read the image"


def test_box_prior_adds_to_covered_image_logits_only_and_keeps_hidden_keys_hidden():
    Lc, N, P, grid = 3, 2, 4, 2  # sequence [caption 3 | layout 2 | image 4]
    L = Lc + N + P
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 1.0, 1.0]]])  # the top-left patch; the right 3/4
    coverage = patch_box_coverage(boxes, grid)  # (1, N, P)
    torch.testing.assert_close(coverage, torch.tensor([[[1.0, 0, 0, 0], [0.5, 1, 0.5, 1]]]))
    mask = torch.ones(1, 1, L, L, dtype=torch.bool)
    mask[..., 1] = False  # a hidden key
    bias = box_attention_bias(mask, coverage, torch.tensor([[True, True]]), Lc, strength=2.0)
    assert bias.shape == (1, 1, L, L) and torch.isinf(bias[..., 1]).all() and (bias[..., 1] < 0).all()
    expected = torch.zeros(L, L)
    expected[:, 1] = float("-inf")
    expected[Lc + N:, Lc:Lc + N] = 2.0 * coverage[0].T  # image rows x layout keys, nothing else
    assert torch.equal(bias[0, 0], expected)
    # a dropped instance (CFG) or an empty slot gets no prior
    dropped = box_attention_bias(mask, coverage, torch.tensor([[True, False]]), Lc, strength=2.0)
    assert (dropped[0, 0, Lc + N:, Lc + 1] == 0).all() and torch.equal(dropped[0, 0, Lc + N:, Lc], expected[Lc + N:, Lc])


def test_hard_negatives_on_grounding_rows_change_the_grounding_loss_only():
    """PMTP's hard negatives (train_pretrain --ground_negatives) go to the grounding rows alone: the
    flow loss of every row is unchanged (nothing reads the queries), the confidence term is not."""
    tokenizer = shapescenes.build_tokenizer()
    config = dataclasses.replace(TINY, vocab_size=tokenizer.get_vocab_size(), max_phrase_len=layouts.MAX_PHRASE_LEN,
                                 max_caption_len=layouts.MAX_CAPTION_LEN, max_instances=4)
    torch.manual_seed(0)
    model = perturb_zero_inits(EchoGen(config))
    scenes = shapescenes.make_scene_set("val", 4, seed=0)
    batch = layouts.collate(scenes, [shapescenes.render_scene(s, 16) for s in scenes], tokenizer, 4)
    task = torch.tensor([0, 1, 0, 1])
    t, noise, drop = torch.tensor([0.7, 0.2, 0.4, 0.0]), torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.bool)
    negatives = shapescenes.add_hard_negatives(batch, tokenizer, 2, [[0, i] for i in range(4)], rows=task == 1)
    assert negatives["negative"][task == 1].any() and not negatives["negative"][task == 0].any()
    assert torch.equal(negatives["instance_mask"][task == 0], batch["instance_mask"][task == 0])
    criterion = objectives.GroundingCriterion()
    _, plain = pmtp_loss(model, criterion, batch, task, t, noise, drop, 0.1)
    _, with_negatives = pmtp_loss(model, criterion, negatives, task, t, noise, drop, 0.1)
    assert with_negatives["flow"] == pytest.approx(plain["flow"], abs=1e-6)
    assert abs(with_negatives["ground_conf"] - plain["ground_conf"]) > 1e-3
