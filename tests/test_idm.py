"""IDM and the disentangle constraint (model.IDM, split_instance_features, cas, disentangle_loss): CAS, the
per-instance branch against its definition, gradients of L_dis, the plain model unchanged with idm off,
the switch through checkpoints and the training scripts, and evaluate.py's attribute-leakage probe."""

import dataclasses
import hashlib
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import layouts
import runtime
import shapescenes
import evaluate
import objectives
from model import EchoGen, IDM, ModelConfig, cas, disentangle_loss, patch_box_coverage, split_instance_features
from objectives import djo_loss, pmtp_loss
from test_model import perturb_zero_inits
from test_rl import MICRO_PRETRAIN, MICRO_RL, ROOT, run

PLAIN = ModelConfig(res=16, patch=2, dim=32, depth=2, heads=2, text_depth=1, vocab_size=20,
                    max_caption_len=10, max_phrase_len=4, max_instances=3)
WITH_IDM = dataclasses.replace(PLAIN, idm=True)


# --- the plain model is what it was before IDM existed
# BEGIN fingerprint (the reference values below were computed by this code on the plain model, before IDM)

def fixed_batch(B=2, config=PLAIN, seed=0):
    g = torch.Generator().manual_seed(seed)
    caption_ids = torch.randint(1, config.vocab_size, (B, config.max_caption_len), generator=g)
    caption_ids[:, 6:] = 0
    phrase_ids = torch.randint(1, config.vocab_size, (B, config.max_instances, config.max_phrase_len), generator=g)
    phrase_ids[:, :, 2:] = 0
    xy = torch.rand(B, config.max_instances, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + 0.3 + 0.1 * torch.rand(B, config.max_instances, 2, generator=g)], dim=-1)
    instance_mask = torch.tensor([[True, True, False]] * B)
    phrase_ids[~instance_mask] = 0
    return dict(caption_ids=caption_ids, phrase_ids=phrase_ids, boxes=boxes, instance_mask=instance_mask)


def plain_fingerprint(model_class, config):
    torch.manual_seed(0)
    model = model_class(config)
    state = model.state_dict()
    layout = ";".join(f"{k}:{tuple(v.shape)}" for k, v in state.items())
    figures = {"keys": len(state), "layout": hashlib.sha256(layout.encode()).hexdigest()[:16],
               "init_abs_sum": sum(v.double().abs().sum().item() for v in state.values())}
    model = perturb_zero_inits(model).eval()
    batch = fixed_batch()
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([0.6, 0.1])
    with torch.no_grad():
        v = model(x, t, **batch).v
        v_packed, grounding, _ = model(x, t, **batch, task=torch.tensor([0, 1]))
        grounded = model.ground(x, batch["caption_ids"], batch["phrase_ids"], batch["instance_mask"])
    figures.update(v_sum=v.double().sum().item(), v_abs=v.double().abs().sum().item(), v_first=v[0, 0, 0, :4].tolist(),
                   packed_abs=v_packed.double().abs().sum().item(), boxes=grounding["boxes"].double().sum().item(),
                   logits=grounding["logits"].double().sum().item(), ground=grounded["boxes"].double().sum().item())
    return figures

# END fingerprint


BEFORE_IDM = {  # plain_fingerprint(EchoGen, PLAIN), CPU, torch 2.14, computed on the plain model's code with
    # IDM's code absent; recomputed only when the plain model changes on purpose (never by a change to IDM)
    "keys": 150, "layout": "e34abd7668ff94d6", "init_abs_sum": 13319.215758284368,
    "v_sum": 21.11415776051581, "v_abs": 371.9939559577033,
    "v_first": [0.4069760739803314, -0.406693696975708, 0.2713170349597931, 0.2543589174747467],
    "packed_abs": 372.5804769163951, "boxes": 19.223431335762143, "logits": 13.76207609474659,
    "ground": 19.31549577973783,
}


def test_with_idm_off_the_model_is_the_one_before_idm():
    figures = plain_fingerprint(EchoGen, PLAIN)
    for key, expected in BEFORE_IDM.items():
        if isinstance(expected, str) or isinstance(expected, int):
            assert figures[key] == expected, key  # the same parameters: names, shapes, count
        else:  # the same initial values and outputs, up to the float rounding of another CPU
            np.testing.assert_allclose(figures[key], expected, rtol=1e-4, atol=1e-6, err_msg=key)


def test_a_fresh_idm_computes_what_the_plain_model_does():
    """IDM's output projection starts at zero and alpha at 1/2: a plain model's weights in an IDM model give
    the same outputs, so IDM can be switched on from a plain checkpoint's weights."""
    torch.manual_seed(0)
    plain = perturb_zero_inits(EchoGen(PLAIN)).eval()
    idm = EchoGen(WITH_IDM).eval()
    missing, unexpected = idm.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".idm." in k for k in missing)
    batch, x, t = fixed_batch(), torch.randn(2, 3, 16, 16), torch.tensor([0.6, 0.1])
    with torch.no_grad():
        torch.testing.assert_close(idm(x, t, **batch).v, plain(x, t, **batch).v, atol=1e-5, rtol=1e-5)
        v, grounding, l_dis = idm(x, t, **batch, task=torch.tensor([0, 1]))
        v_plain, grounding_plain, _ = plain(x, t, **batch, task=torch.tensor([0, 1]))
    torch.testing.assert_close(v, v_plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grounding["boxes"], grounding_plain["boxes"], atol=1e-5, rtol=1e-5)
    # with alpha = 1/2 everywhere R+ = R-, so CAS(R+) = CAS(R-) and L_dis = softplus(0)
    assert l_dis.item() == pytest.approx(math.log(2), abs=1e-6)


# --- CAS and L_dis


def test_patch_box_coverage():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], [0.125, 0.3, 0.2, 0.4]]])
    coverage = patch_box_coverage(boxes, 4)  # (1, 3, 16), patches row-major
    top_left = torch.zeros(4, 4)
    top_left[:2, :2] = 1
    assert torch.equal(coverage[0, 0], top_left.flatten()) and torch.equal(coverage[0, 1], torch.ones(16))
    # a box narrower than a patch still owns a share of the patches it touches; the shares sum to its area
    assert coverage[0, 2].max() > 0 and coverage[0, 2].sum().item() == pytest.approx(0.075 * 0.1 * 16, rel=1e-5)


def test_cas_is_zero_inside_the_box_and_grows_as_mass_moves_out():
    box_mask = patch_box_coverage(torch.tensor([[[0.0, 0.0, 0.5, 0.5]]]), 4)  # (1, 1, 16): 4 patches inside
    inside, outside = box_mask[0, 0] > 0, box_mask[0, 0] == 0
    scores = []
    for moved in np.linspace(0, 1, 6):  # the share of the mass moved outside the box
        mass = torch.zeros(1, 1, 16)
        mass[0, 0, inside] = (1 - moved) / inside.sum()
        mass[0, 0, outside] = moved / outside.sum()
        scores.append(cas(mass * 7.0, box_mask).item())  # the scale of the map does not matter
    assert scores[0] == 0.0
    assert all(b > a for a, b in zip(scores, scores[1:])), scores
    np.testing.assert_allclose(scores, np.linspace(0, 1, 6), atol=1e-5)
    # L_dis = softplus(CAS(R+) - CAS(R-)) over the active instances only
    plus, minus = torch.zeros(1, 2, 16), torch.zeros(1, 2, 16)
    plus[..., inside], minus[..., outside] = 1.0, 1.0
    masks = box_mask.expand(1, 2, 16)
    assert disentangle_loss(plus, minus, masks, torch.tensor([[True, False]])).item() == pytest.approx(
        F.softplus(torch.tensor(-1.0)).item(), abs=1e-5)
    assert disentangle_loss(minus, plus, masks, torch.tensor([[True, True]])).item() == pytest.approx(
        F.softplus(torch.tensor(1.0)).item(), abs=1e-5)
    assert disentangle_loss(plus, minus, masks, torch.tensor([[False, False]])).item() == 0.0


def idm_inputs_by_hand(M_rows=(0, 0, 1), K=4, D=8, grid=4, seed=0):
    """Inputs for one IDM (EchoGen.idm_inputs' format): three instances, two in image 0, one in image 1."""
    g = torch.Generator().manual_seed(seed)
    M = len(M_rows)
    key_mask = torch.ones(M, K, dtype=torch.bool)
    key_mask[0, 2:] = False  # a short phrase: its padding is not a key
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.25, 1.0, 1.0], [0.25, 0.0, 0.75, 0.5]])[:M]
    return {"rows": torch.tensor(M_rows), "keys": torch.randn(M, K, D, generator=g), "key_mask": key_mask,
            "layout_tokens": torch.randn(M, D, generator=g), "box_mask": patch_box_coverage(boxes[None], grid)[0]}


def test_idm_equals_its_definition_instance_by_instance():
    """E_n = softmax over instance n's own keys and a null key (value 0), R+ = alpha E_n, out(sum_n R+_n),
    L_dis = softplus(CAS(R+) - CAS(R-)), written as a loop over instances against the batched module."""
    torch.manual_seed(0)
    H, D, P = 2, 8, 16
    idm = perturb_zero_inits(IDM(D, H))
    with torch.no_grad():
        idm.alpha.fc2.weight.normal_()
        idm.out.weight.normal_()
    image_tokens, inputs = torch.randn(2, P, D), idm_inputs_by_hand(D=D)
    added, l_dis = idm(image_tokens, inputs)

    expected_added, losses = torch.zeros(2, P, D), []
    for m, b in enumerate(inputs["rows"].tolist()):
        heads = lambda x: x.view(x.shape[0], H, D // H).transpose(0, 1)  # (L, D) -> (H, L, Dh)
        q = idm.q_norm(heads(idm.q(F.layer_norm(image_tokens[b], (D,)))))  # (H, P, Dh)
        k, v = idm.kv(inputs["keys"][m]).chunk(2, dim=-1)
        k = torch.cat([idm.k_norm(heads(k)), idm.k_norm(idm.null_key)], dim=1)  # (H, K + 1, Dh)
        v = torch.cat([heads(v), torch.zeros(H, 1, D // H)], dim=1)
        logits = (q @ k.transpose(1, 2) / math.sqrt(D // H)).masked_fill(
            ~torch.cat([inputs["key_mask"][m], torch.tensor([True])]), float("-inf"))
        E = (logits.softmax(-1) @ v).transpose(0, 1).reshape(P, D)  # (P, D)
        box = inputs["box_mask"][m]
        pooled = (box[:, None] * E).sum(0) / box.sum()
        alpha = torch.sigmoid(idm.alpha(torch.cat([F.layer_norm(pooled, (D,)),
                                                   F.layer_norm(inputs["layout_tokens"][m], (D,))])))
        plus, minus = (alpha * E).abs().sum(-1), ((1 - alpha) * E).abs().sum(-1)  # (P,)
        outside = lambda mass: (mass * (1 - box)).sum() / mass.sum()
        losses.append(F.softplus(outside(plus) - outside(minus)))
        expected_added[b] += alpha * E
    torch.testing.assert_close(added, idm.out(expected_added), atol=1e-5, rtol=1e-5)
    assert l_dis.item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)


def test_with_one_head_l_dis_has_a_gradient_and_falls_when_trained():
    """The reason for the per-instance branch: each instance's channels carry different maps, so even
    with one head (where a single key per instance gives L_dis = log 2 for any alpha) L_dis can be
    lowered. A fresh IDM (alpha = 1/2) is at log 2 with a non-zero gradient; 30 Adam steps on L_dis
    alone bring it clearly below."""
    torch.manual_seed(0)
    idm = IDM(8, heads=1)
    nn_init = EchoGen(dataclasses.replace(WITH_IDM, dim=8, heads=1)).blocks[0].idm  # zero inits as the model has them
    idm.load_state_dict(nn_init.state_dict())
    image_tokens, inputs = torch.randn(2, 16, 8), idm_inputs_by_hand(D=8)
    _, l_dis = idm(image_tokens, inputs)
    assert l_dis.item() == pytest.approx(math.log(2), abs=1e-6)
    grad = torch.autograd.grad(l_dis, idm.alpha.fc2.weight)[0]
    assert grad.norm() > 1e-3, grad.norm()
    optimizer = torch.optim.Adam(idm.parameters(), lr=0.05)
    for _ in range(30):
        optimizer.zero_grad()
        idm(image_tokens, inputs)[1].backward()
        optimizer.step()
    assert idm(image_tokens, inputs)[1].item() < math.log(2) - 0.1


def test_the_split_scores_cas_0_inside_1_outside_and_alpha_moves_r_plus_and_r_minus_apart():
    box_mask = patch_box_coverage(torch.tensor([[[0.0, 0.0, 0.5, 0.5]]]), 4)[0]  # (1, 16): 4 patches inside
    inside = box_mask[0] == 1
    E = torch.zeros(1, 16, 4)
    E[0, inside, :2] = torch.rand(int(inside.sum()), 2) + 0.1  # channels 0, 1 inside the box
    E[0, ~inside, 2:] = -torch.rand(int((~inside).sum()), 2) - 0.1  # channels 2, 3 outside it
    mass = lambda R: R.abs().sum(-1)[None]  # (1, 1, P)
    keep_inside = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    relevant, l_dis = split_instance_features(E, keep_inside, box_mask)
    assert cas(mass(relevant), box_mask[None]).item() == pytest.approx(0.0, abs=1e-6)
    assert cas(mass(E - relevant), box_mask[None]).item() == pytest.approx(1.0, abs=1e-6)
    assert l_dis.item() == pytest.approx(F.softplus(torch.tensor(-1.0)).item(), abs=1e-5)
    relevant, l_dis = split_instance_features(E, 1 - keep_inside, box_mask)  # the other way round
    assert cas(mass(relevant), box_mask[None]).item() == pytest.approx(1.0, abs=1e-6)
    assert l_dis.item() == pytest.approx(F.softplus(torch.tensor(1.0)).item(), abs=1e-5)
    # raising alpha on a channel grows R+ and shrinks R- there; L_dis's gradient raises alpha on the
    # channels inside the box and lowers it on those outside
    alpha = torch.full((1, 4), 0.5, requires_grad=True)
    relevant, l_dis = split_instance_features(E, alpha, box_mask)
    d_plus, = torch.autograd.grad(relevant.abs().sum(), alpha, retain_graph=True)
    d_minus, = torch.autograd.grad((E - relevant).abs().sum(), alpha, retain_graph=True)
    assert torch.all(d_plus > 0) and torch.all(d_minus < 0)
    d_loss, = torch.autograd.grad(l_dis, alpha)
    assert torch.all(d_loss[0, :2] < 0) and torch.all(d_loss[0, 2:] > 0), d_loss


def test_l_dis_reaches_the_idm_parameters_and_the_image_stream():
    torch.manual_seed(0)
    model = perturb_zero_inits(EchoGen(WITH_IDM))
    l_dis = model(torch.randn(2, 3, 16, 16), torch.tensor([0.6, 0.3]), **fixed_batch()).idm_loss
    # every IDM parameter but the output projection, which L_dis does not read
    idm_params = [(n, p) for n, p in model.named_parameters() if ".idm." in n and ".idm.out." not in n]
    assert len(idm_params) == 11 * PLAIN.depth  # null key, q, kv, the two norms, the alpha MLP
    upstream = [model.blocks[0].image_stream.qkv.weight, model.patch_embed.weight, model.text.tok_emb.weight]
    grads = torch.autograd.grad(l_dis, [p for _, p in idm_params] + upstream)
    for (name, _), grad in zip(idm_params, grads):
        assert grad.abs().sum() > 0, name
    assert all(g.abs().sum() > 0 for g in grads[len(idm_params):]), "L_dis shapes the image tokens and the phrases"


def test_grounding_rows_and_empty_slots_are_outside_idm():
    torch.manual_seed(0)
    model = perturb_zero_inits(EchoGen(WITH_IDM)).eval()
    batch, x, t = fixed_batch(), torch.randn(2, 3, 16, 16), torch.tensor([0.6, 0.1])
    task = torch.tensor([0, 1])
    with torch.no_grad():
        v, grounding, l_dis = model(x, t, **batch, task=task)
        moved = dict(batch, boxes=batch["boxes"].flip(1) * 0.5)
        v2, grounding2, _ = model(x, t, **moved, task=task)
        junk = dict(batch, boxes=batch["boxes"].clone())
        junk["boxes"][:, 2] = torch.tensor([0.9, 0.9, 1.0, 1.0])  # slot 2 is empty in every row
        v3, _, l_dis3 = model(x, t, **junk, task=task)
        # every instance dropped (CFG): no active instance, L_dis = 0, and a finite output
        dropped = dict(batch, instance_mask=torch.zeros_like(batch["instance_mask"]))
        v4, _, l_dis4 = model(x, t, **dropped)
    torch.testing.assert_close(v2[1], v[1], atol=1e-6, rtol=0)  # the grounding row reads no box
    torch.testing.assert_close(grounding2["boxes"][:, 1], grounding["boxes"][:, 1], atol=1e-6, rtol=0)
    assert not torch.allclose(v2[0], v[0], atol=1e-4)
    torch.testing.assert_close(v3, v, atol=1e-6, rtol=0)
    assert l_dis3.item() == pytest.approx(l_dis.item(), abs=1e-7)
    assert l_dis4.item() == 0.0 and torch.isfinite(v4).all()


# --- the interface: losses, checkpoints, scripts, the probe


def test_stage_losses_add_and_log_l_dis_only_with_a_weight():
    torch.manual_seed(0)
    model = perturb_zero_inits(EchoGen(WITH_IDM))
    batch = dict(fixed_batch(B=4), images=torch.rand(4, 3, 16, 16) * 2 - 1)
    task, t = torch.tensor([0, 1, 0, 1]), torch.tensor([0.7, 0.0, 0.4, 0.2])
    noise, drop = torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.bool)
    criterion = objectives.GroundingCriterion()
    plain_loss, plain_parts = pmtp_loss(model, criterion, batch, task, t, noise, drop, 0.1)
    loss, parts = pmtp_loss(model, criterion, batch, task, t, noise, drop, 0.1, idm_weight=0.5)
    assert "idm" not in plain_parts and "idm" in parts
    assert loss.item() == pytest.approx(plain_loss.item() + 0.5 * parts["idm"], rel=1e-5)
    cycle = objectives.GroundingCriterion(weights={"l1": 5.0, "giou": 2.0, "conf": 0.0})
    args = (batch, task, t, noise, drop, torch.full((4,), 0.3), torch.full((4,), 0.5), 0.1, 0.1, 1.0, True)
    total, terms = djo_loss(model, model, criterion, cycle, *args, idm_weight=0.5)
    plain_total, plain_terms = djo_loss(model, model, criterion, cycle, *args)
    assert "idm" not in plain_terms and total.item() == pytest.approx(plain_total.item() + 0.5 * terms["idm"].item(),
                                                                      rel=1e-5)


def test_the_idm_switch_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = perturb_zero_inits(EchoGen(WITH_IDM))
    optimizer = torch.optim.AdamW(model.parameters())
    runtime.save_checkpoint(str(tmp_path / "ckpt"), model, model, optimizer, shapescenes.build_tokenizer(), {}, 0)
    loaded, _, saved = runtime.load_model(str(tmp_path / "ckpt"), EchoGen, "model")
    assert saved["model"]["idm"] is True and loaded.config == WITH_IDM
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # a checkpoint from before the switch existed resumes as the plain model
    older = {k: v for k, v in dataclasses.asdict(PLAIN).items() if k != "idm"}
    runtime.check_same_model_config("old", older, PLAIN)


def test_training_scripts_switch_idm_on_and_log_l_dis(tmp_path):
    """PMTP with --idm=True, then DJO and Cycle RL from its checkpoint: each logs "idm" (L_dis) with every
    loss, and PMTP's first step is a fresh IDM's, log 2 exactly. In RL the scored velocity passes carry it
    without changing the policy's ratio."""
    out = tmp_path / "pmtp"
    run(["train_pretrain.py", *MICRO_PRETRAIN, "--idm=True", "--log_interval=1", f"--data_dir={tmp_path / 'data'}",
         f"--out_dir={out}"])
    saved = json.loads((out / "ckpt" / "config.json").read_text())
    assert saved["model"]["idm"] is True and saved["train"]["idm_weight"] == 0.1
    logs = {}
    run(["train_joint.py", f"--init_from={out / 'ckpt'}", f"--out_dir={tmp_path / 'djo'}", "--cache_scenes=16",
         "--batch_size=4", "--max_steps=1", "--val_scenes=0", "--ckpt_interval=0", "--warmup_steps=1",
         f"--data_dir={tmp_path / 'data'}"])
    run(["train_cycle_rl.py", f"--init_from={out / 'ckpt'}", f"--out_dir={tmp_path / 'rl'}", *MICRO_RL,
         "--max_steps=1", "--minibatches=1", "--ckpt_interval=0"])
    for name in ("pmtp", "djo", "rl"):
        with open(tmp_path / name / "log.jsonl") as f:
            logs[name] = [json.loads(line) for line in f]
        assert all("idm" in r for r in logs[name] if "loss" in r or "reward" in r), (name, logs[name])
        assert any("idm" in r for r in logs[name]), name
    assert logs["pmtp"][0]["idm"] == pytest.approx(math.log(2), abs=1e-6)
    first_update = next(r for r in logs["rl"] if "reward" in r)  # after the probe's record of step 0
    assert first_update["approx_kl"] == 0.0 and first_update["clip_frac"] == 0.0


def test_idm_switches_on_from_a_plain_checkpoint_and_not_back(tmp_path):
    """train_pretrain.py --init_from=CKPT --idm=True: the plain run's weights, a fresh IDM (the identity), so
    the first loss equals the plain model's on the same batch; an IDM checkpoint into a plain model is refused."""
    common = [*MICRO_PRETRAIN, "--log_interval=1", "--max_steps=1", f"--data_dir={tmp_path / 'data'}"]
    run(["train_pretrain.py", *MICRO_PRETRAIN, f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'plain'}"])
    first_loss = {}
    for name, flag in (("off", "--idm=False"), ("on", "--idm=True")):
        run(["train_pretrain.py", *common, flag, "--idm_weight=0", f"--init_from={tmp_path / 'plain' / 'ckpt'}",
             f"--out_dir={tmp_path / name}"])
        first_loss[name] = json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[0])["flow"]
    assert first_loss["on"] == pytest.approx(first_loss["off"], rel=1e-5)
    result = subprocess.run([sys.executable, "train_pretrain.py", *common, f"--init_from={tmp_path / 'on' / 'ckpt'}",
                             f"--out_dir={tmp_path / 'back'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and last_line.startswith("error: checkpoint") and "do not fit" in last_line
    assert not (tmp_path / "back" / "ckpt").exists()


def test_the_leakage_probe_reports_isr_color_accuracy_and_color_leak():
    scenes = shapescenes.make_scene_set("leakage", 12, seed=0)
    renders = [shapescenes.render_scene(scene, 64) for scene in scenes]
    # each object drawn in the next one's color: every box holds another instance's color, none its own
    swapped = [shapescenes.render_scene(dict(scene, instances=[dict(a, color=b["color"], rgb=b["rgb"]) for a, b in
                                                        zip(scene["instances"], scene["instances"][1:] + scene["instances"][:1])]), 64)
               for scene in scenes]
    assert evaluate.leakage_metrics(scenes, renders) == {"color_leak": 0.0}
    assert evaluate.leakage_metrics(scenes, swapped) == {"color_leak": 1.0}
    assert shapescenes.check_images(scenes, swapped)["color_acc"] == 0.0
    assert evaluate.leakage_metrics(shapescenes.make_scene_set("val", 4, seed=0), renders[:4]) == {}
    # evaluate.evaluate (what evaluate.py --sets ...,leakage prints) on a micro model
    torch.manual_seed(0)
    config = dataclasses.replace(WITH_IDM, res=32, patch=8, vocab_size=shapescenes.build_tokenizer().get_vocab_size(),
                                 max_caption_len=layouts.MAX_CAPTION_LEN, max_phrase_len=layouts.MAX_PHRASE_LEN,
                                 max_instances=4)
    metrics = evaluate.evaluate(EchoGen(config).eval(), scenes[:2], shapescenes.build_tokenizer(), steps=2)
    assert {"isr", "color_acc", "color_leak", "grounding"} <= set(metrics)
    assert "leak" in evaluate.summary(metrics)
