"""detector.py: box utilities, the phrase-restricted Hungarian matcher, the set criterion, the head and
the standalone detector, the grounding metrics (AP against pycocotools) and the predict CLI."""

import contextlib
import io
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.ops as tv

import layouts
import runtime
import shapescenes
from boxes import box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou
from detector import (DetectorConfig, StandaloneDetector, coco_precision, decode_predictions, grounding_metrics,
                      load_grounder, presence_confidence)
from matcher import HungarianMatcher, phrase_groups
from model import GroundingHead
from objectives import GroundingCriterion
from model import EchoGen, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = DetectorConfig(res=32, dim=32, depth=2, heads=2, text_depth=1, max_instances=4)


def random_xyxy(n, generator):
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 0.6
    wh = 0.05 + torch.rand(n, 2, generator=generator, dtype=torch.float64) * 0.35
    return torch.cat([xy, xy + wh], dim=-1)


# -----------------------------------------------------------------------------
# box utilities


def test_box_utilities_match_torchvision():
    g = torch.Generator().manual_seed(0)
    a, b = random_xyxy(7, g), random_xyxy(5, g)
    a[1] = b[2]  # an identical pair: IoU 1
    cxcywh = box_xyxy_to_cxcywh(a)
    torch.testing.assert_close(cxcywh, tv.box_convert(a, "xyxy", "cxcywh"))
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), a)
    torch.testing.assert_close(box_area(a), tv.box_area(a))
    iou, union = box_iou(a, b)
    torch.testing.assert_close(iou, tv.box_iou(a, b))
    torch.testing.assert_close(union, box_area(a)[:, None] + box_area(b)[None] - iou * union)
    assert iou[1, 2] == pytest.approx(1.0)
    giou = generalized_box_iou(a, b)
    torch.testing.assert_close(giou, tv.generalized_box_iou(a, b))
    assert (giou <= iou + 1e-12).all() and (giou >= -1).all()


def test_pairwise_box_ops_broadcast_over_a_batch():
    g = torch.Generator().manual_seed(1)
    a, b = random_xyxy(12, g).view(3, 4, 4), random_xyxy(6, g).view(3, 2, 4)
    batched = generalized_box_iou(a, b)  # (3, 4, 2)
    for i in range(3):
        torch.testing.assert_close(batched[i], tv.generalized_box_iou(a[i], b[i]))


# -----------------------------------------------------------------------------
# the matcher


def test_phrase_groups():
    phrase_ids = torch.tensor([[[5, 6], [7, 6], [5, 6], [5, 0]],
                               [[5, 6], [5, 6], [5, 6], [0, 0]]])
    mask = torch.tensor([[True, True, True, True], [True, False, True, False]])
    assert phrase_groups(phrase_ids, mask).tolist() == [[0, 1, 0, 3], [0, -1, 0, -1]]


def brute_force(cost, groups):
    """The cheapest slot -> target permutation that only moves targets within a group."""
    valid = [i for i in range(len(groups)) if groups[i] >= 0]
    best, best_total = None, float("inf")
    for perm in itertools.permutations(valid):
        if any(groups[i] != groups[j] for i, j in zip(valid, perm)):
            continue
        total = sum(cost[i, j] for i, j in zip(valid, perm))
        if total < best_total:
            best, best_total = list(perm), total
    return valid, best, best_total


@pytest.mark.parametrize("seed", range(4))
def test_matcher_equals_brute_force_within_phrase_groups(seed):
    g = torch.Generator().manual_seed(seed)
    B, N = 3, 6
    pred = box_xyxy_to_cxcywh(random_xyxy(B * N, g)).view(B, N, 4).float()
    target = box_xyxy_to_cxcywh(random_xyxy(B * N, g)).view(B, N, 4).float()
    logits = torch.randn(B, N, generator=g)
    groups = torch.tensor([[0, 0, 0, 3, 3, 5],     # a phrase three times, one twice, one once
                           [0, 1, 2, 3, 4, 5],     # all different: identity
                           [0, -1, 0, 0, -1, 5]])  # padding inside
    indices = HungarianMatcher()(pred[:, :, None], logits[:, :, None], target, groups)  # one candidate per slot
    for b in range(B):
        cost = (5 * torch.cdist(pred[b], target[b], p=1)
                - 2 * tv.generalized_box_iou(box_cxcywh_to_xyxy(pred[b]), box_cxcywh_to_xyxy(target[b]))
                - logits[b].sigmoid()[:, None])
        valid, perm, best_total = brute_force(cost, groups[b].tolist())
        pred_slots, candidates, target_slots = indices[b]
        assert pred_slots.dtype == torch.int64 and pred_slots.tolist() == valid and (candidates == 0).all()
        assert target_slots.tolist() == perm
        assert float(cost[pred_slots, target_slots].sum()) == pytest.approx(float(best_total), abs=1e-5)
    assert indices[1][2].tolist() == list(range(N))


def test_matcher_takes_each_slots_cheapest_candidate():
    g = torch.Generator().manual_seed(7)
    B, N, K = 2, 5, 3
    pred = box_xyxy_to_cxcywh(random_xyxy(B * N * K, g)).view(B, N, K, 4).float()
    target = box_xyxy_to_cxcywh(random_xyxy(B * N, g)).view(B, N, 4).float()
    logits = torch.randn(B, N, K, generator=g)
    groups = torch.tensor([[0, 0, 2, 2, 2], [0, 1, -1, 3, 4]])
    indices = HungarianMatcher()(pred, logits, target, groups)
    for b in range(B):
        flat = pred[b].view(N * K, 4)
        cost = (5 * torch.cdist(flat, target[b], p=1)
                - 2 * tv.generalized_box_iou(box_cxcywh_to_xyxy(flat), box_cxcywh_to_xyxy(target[b]))
                - logits[b].view(N * K).sigmoid()[:, None]).view(N, K, N)
        valid, perm, best_total = brute_force(cost.min(dim=1).values, groups[b].tolist())
        pred_slots, candidates, target_slots = indices[b]
        assert pred_slots.tolist() == valid and target_slots.tolist() == perm
        assert candidates.tolist() == cost.argmin(dim=1)[pred_slots, target_slots].tolist()
        assert float(cost[pred_slots, candidates, target_slots].sum()) == pytest.approx(float(best_total), abs=1e-5)


def test_matcher_swaps_repeated_phrases_but_never_across_phrases():
    target = torch.tensor([[[0.2, 0.2, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2], [0.2, 0.7, 0.2, 0.2]]])
    pred = target[:, [1, 0, 2]]  # slots 0 and 1 predicted each other's box
    groups = torch.tensor([[0, 0, 2]])
    _, _, target_slots = HungarianMatcher()(pred[:, :, None], torch.zeros(1, 3, 1), target, groups)[0]
    assert target_slots.tolist() == [1, 0, 2]
    _, _, target_slots = HungarianMatcher()(pred[:, :, None], torch.zeros(1, 3, 1), target, torch.tensor([[0, 1, 2]]))[0]
    assert target_slots.tolist() == [0, 1, 2]  # different phrases: matched by identity, however wrong


# -----------------------------------------------------------------------------
# the criterion


def layered(boxes, logits, n_layers=2):
    """The criterion's input from one candidate per slot: boxes (B, N, 4), logits (B, N)."""
    return {"candidate_boxes": boxes[:, :, None].expand(n_layers, *boxes.shape[:2], 1, 4),
            "candidate_logits": logits[:, :, None].expand(n_layers, *logits.shape, 1)}


def criterion_case():
    phrase_ids = torch.tensor([[[3, 4], [3, 4], [5, 4], [0, 0]],
                               [[6, 4], [0, 0], [0, 0], [0, 0]]])
    mask = phrase_ids[..., 0] != 0
    g = torch.Generator().manual_seed(0)
    boxes_xyxy = random_xyxy(8, g).float().view(2, 4, 4)
    return boxes_xyxy, phrase_ids, mask


def test_loss_is_zero_on_perfect_predictions_even_with_repeated_phrases_swapped():
    boxes_xyxy, phrase_ids, mask = criterion_case()
    perfect = box_xyxy_to_cxcywh(boxes_xyxy)
    logits = torch.full((2, 4), 40.0)  # sigmoid(40) = 1 - 4e-18: the confidence term's infimum 0 at IoU 1
    criterion = GroundingCriterion()
    losses = criterion(layered(perfect, logits), boxes_xyxy, phrase_ids, mask)
    assert set(losses) == {"loss", "l1", "giou", "conf", "l1_0", "giou_0", "conf_0"}
    assert losses["l1"] == 0 and losses["giou"].abs() < 1e-6 and losses["conf"] < 1e-12
    assert losses["loss"] < 1e-5
    swapped = perfect.clone()
    swapped[0] = perfect[0, [1, 0, 2, 3]]  # the two "3 4" phrases of image 0 trade boxes: still perfect
    assert criterion(layered(swapped, logits), boxes_xyxy, phrase_ids, mask)["loss"] < 1e-5
    across = perfect.clone()
    across[0] = perfect[0, [2, 1, 0, 3]]  # a box given to another phrase: wrong
    assert criterion(layered(across, logits), boxes_xyxy, phrase_ids, mask)["l1"] > 0.1


def test_confidence_targets_the_detached_iou_and_negatives_target_zero():
    boxes_xyxy, phrase_ids, mask = criterion_case()
    g = torch.Generator().manual_seed(3)
    pred = box_xyxy_to_cxcywh(boxes_xyxy + 0.03 * torch.randn(boxes_xyxy.shape, generator=g)).requires_grad_(True)
    negative = torch.tensor([[False, False, False, False], [True, False, False, False]])
    iou = torch.diag(tv.box_iou(box_cxcywh_to_xyxy(pred.detach()).view(-1, 4), boxes_xyxy.view(-1, 4))).view(2, 4)
    target = torch.where(negative, torch.zeros_like(iou), iou)
    optimal = torch.logit(target.clamp(1e-6, 1 - 1e-6)).requires_grad_(True)
    losses = GroundingCriterion()(layered(pred, optimal, 1), boxes_xyxy, phrase_ids, mask, negative=negative)
    scored = mask  # 3 positives in image 0, one negative in image 1
    entropy = torch.nn.functional.binary_cross_entropy(target.clamp(1e-6, 1 - 1e-6), target, reduction="none")
    num_boxes = 3
    assert losses["conf"].item() == pytest.approx(float(entropy[scored].sum() / num_boxes), rel=1e-4)
    losses["conf"].backward()
    assert optimal.grad.abs().max() < 1e-5  # the minimum: sigmoid(logit) = IoU
    assert pred.grad is None or pred.grad.abs().max() == 0  # the IoU target is detached
    l1 = torch.nn.functional.l1_loss(pred.detach()[0, :3], box_xyxy_to_cxcywh(boxes_xyxy[0, :3]), reduction="sum")
    assert losses["l1"].item() == pytest.approx(float(l1 / num_boxes), rel=1e-5)  # the negative has no box loss


def test_unmatched_candidates_learn_zero_confidence_and_no_box():
    boxes_xyxy, phrase_ids, mask = criterion_case()
    truth = box_xyxy_to_cxcywh(boxes_xyxy)
    far = box_xyxy_to_cxcywh(1 - boxes_xyxy.flip(-1))  # a box elsewhere in the image
    boxes = torch.stack([far, truth, far], dim=2).requires_grad_(True)  # (B, N, 3, 4): candidate 1 is right
    logits = torch.zeros(2, 4, 3, requires_grad=True)
    out = {"candidate_boxes": boxes[None], "candidate_logits": logits[None]}
    losses = GroundingCriterion()(out, boxes_xyxy, phrase_ids, mask)
    assert losses["l1"] == 0 and losses["giou"].abs() < 1e-6  # the right candidate was matched, the others carry no box
    losses["loss"].backward()
    assert (logits.grad[mask][:, 1] < 0).all()  # the match: towards its IoU of 1
    assert (logits.grad[mask][:, [0, 2]] > 0).all()  # the rest of a real slot: towards 0
    assert (logits.grad[~mask] == 0).all()  # padding slots: nothing
    assert boxes.grad[:, :, [0, 2]].abs().max() == 0


def test_head_answers_with_its_most_confident_candidate():
    torch.manual_seed(0)
    head = GroundingHead(32, depth=2, heads=2, max_instances=4, candidates=3)
    for p in [*head.box_head.parameters(), *head.conf_head.parameters()]:
        torch.nn.init.normal_(p, std=0.5)
    mask = torch.tensor([[True, True, False, False]] * 2)
    out = head(torch.randn(2, 16, 32), torch.randn(2, 4, 32), mask)
    assert out["candidate_boxes"].shape == (2, 2, 4, 3, 4) and out["boxes"].shape == (2, 2, 4, 4)
    best = out["candidate_logits"].argmax(-1)
    assert best.unique().numel() > 1  # the case is not trivial
    for index in itertools.product(range(2), range(2), range(4)):
        torch.testing.assert_close(out["boxes"][index], out["candidate_boxes"][index][best[index]])
        assert out["logits"][index] == out["candidate_logits"][index].max()


def test_two_candidates_take_one_likely_place_each_with_its_odds_as_confidence():
    """A phrase whose object is, with equal odds, in one corner or the other, nothing in the image
    to tell which: each candidate settles on one corner, and its confidence on about 1/2."""
    torch.manual_seed(0)
    head = GroundingHead(32, depth=1, heads=2, max_instances=1, candidates=2)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    corners = torch.tensor([[0.05, 0.05, 0.35, 0.35], [0.65, 0.65, 0.95, 0.95]])
    image, query, mask = torch.zeros(16, 16, 32), torch.randn(1, 1, 32).expand(16, 1, 32), torch.ones(16, 1, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        target = corners[torch.randint(0, 2, (16,), generator=g)][:, None]  # (16, 1, 4)
        loss = GroundingCriterion()(head(image, query, mask), target, torch.ones(16, 1, 1, dtype=torch.long), mask)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        out = head(image[:1], query[:1], mask[:1])
    proposed = box_cxcywh_to_xyxy(out["candidate_boxes"][-1, 0, 0])  # (2, 4)
    assert tv.box_iou(corners, proposed).max(dim=1).values.min() > 0.7  # each corner has its candidate
    confidence = out["candidate_logits"][-1, 0, 0].sigmoid()
    assert ((confidence > 0.3) & (confidence < 0.7)).all()


def test_head_breaks_symmetry_and_ignores_padding_slots():
    torch.manual_seed(0)
    head = GroundingHead(32, depth=2, heads=2, max_instances=4)
    for p in head.box_head.parameters():  # as after some training: outputs depend on the queries
        torch.nn.init.normal_(p, std=0.5)
    image = torch.randn(2, 16, 32)
    queries = torch.randn(2, 4, 32)
    queries[:, 1] = queries[:, 0]  # the same phrase twice
    mask = torch.tensor([[True, True, True, False]] * 2)
    out = head(image, queries, mask)
    assert out["boxes"].shape == (2, 2, 4, 4) and out["logits"].shape == (2, 2, 4)
    assert ((out["boxes"] > 0) & (out["boxes"] < 1)).all()
    assert (out["boxes"][-1, :, 0] - out["boxes"][-1, :, 1]).abs().max() > 1e-4
    changed = queries.clone()
    changed[:, 3] = 100 * torch.randn(2, 32)
    torch.testing.assert_close(head(image, changed, mask)["boxes"][:, :, :3], out["boxes"][:, :, :3])


def test_fresh_head_predicts_centred_moderate_boxes():
    head = GroundingHead(32, depth=2, heads=2, max_instances=4)
    out = head(torch.randn(1, 16, 32), torch.randn(1, 4, 32), torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(out["boxes"], torch.tensor([0.5, 0.5, 0.3, 0.3]).expand_as(out["boxes"]))


def test_standalone_detector_loss_falls_on_a_handful_of_scenes():
    torch.manual_seed(0)
    tokenizer = shapescenes.build_tokenizer()
    scenes = shapescenes.make_scene_set("train", 8, seed=0)
    batch = layouts.collate(scenes, [shapescenes.render_scene(s, TINY.res) for s in scenes], tokenizer, TINY.max_instances)
    model = StandaloneDetector(TINY, tokenizer.get_vocab_size())
    criterion = GroundingCriterion()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    curve = []
    for _ in range(40):
        out = model(batch["images"], batch["phrase_ids"], batch["instance_mask"])
        loss = criterion(out, batch["boxes"], batch["phrase_ids"], batch["instance_mask"])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    assert np.mean(curve[-5:]) < 0.6 * curve[0], curve



def test_hard_negatives_teach_the_confidence_what_a_phrase_names():
    """Trained without negatives the confidence only rates a box; with them (shapescenes.add_hard_negatives)
    it falls on phrases that name a shape the image does not hold (the Cycle RL judge)."""
    tokenizer = shapescenes.build_tokenizer()
    scenes = shapescenes.make_scene_set("train", 8, seed=0)
    images = [shapescenes.render_scene(s, TINY.res) for s in scenes]
    gaps = {}
    for negatives in (0, 3):
        torch.manual_seed(0)
        model = StandaloneDetector(TINY, tokenizer.get_vocab_size())
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
        for step in range(80):
            batch = layouts.collate(scenes, images, tokenizer, TINY.max_instances)
            if negatives:
                batch = shapescenes.add_hard_negatives(batch, tokenizer, negatives, [[step, i] for i in range(8)])
            out = model(batch["images"], batch["phrase_ids"], batch["instance_mask"])
            loss = GroundingCriterion()(out, batch["boxes"], batch["phrase_ids"], batch["instance_mask"],
                                        batch.get("negative"))["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        ground = lambda batch: decode_predictions(model(batch["images"], batch["phrase_ids"], batch["instance_mask"]))
        with torch.no_grad():
            conf = presence_confidence(ground, scenes, images, tokenizer, TINY.max_instances, "cpu", per_scene=3, seed=1)
        gaps[negatives] = conf["conf_true"] - conf["conf_wrong_shape"]
    assert gaps[3] > 0.2 and gaps[3] > gaps[0] + 0.2, gaps


# -----------------------------------------------------------------------------
# metrics


def pycocotools_precision(ground_truth, detections, categories, images):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    xywh = lambda box: [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]
    gt = COCO()
    gt.dataset = {"images": [{"id": i} for i in images], "categories": [{"id": k} for k in categories],
                  "annotations": [{"id": n + 1, "image_id": i, "category_id": c, "bbox": xywh(box), "iscrowd": 0,
                                   "area": xywh(box)[2] * xywh(box)[3]} for n, (i, c, box) in enumerate(ground_truth)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes([{"image_id": i, "category_id": c, "bbox": xywh(box), "score": s} for i, c, box, s in detections])
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.eval["precision"][:, :, :, 0, -1], evaluator.stats


def test_coco_precision_equals_pycocotools():
    rng = np.random.default_rng(0)
    images, categories = list(range(8)), [1, 2, 3]
    ground_truth, detections = [], []
    for i in images:
        for _ in range(rng.integers(1, 5)):
            c = int(rng.choice(categories))
            x, y = rng.uniform(0, 60, 2)
            box = np.array([x, y, x + rng.uniform(8, 30), y + rng.uniform(8, 30)])
            ground_truth.append((i, c, box))
            if rng.random() < 0.85:  # found, more or less well
                detections.append((i, c, box + rng.normal(0, 3, 4).clip(-4, 4), round(float(rng.random()), 1)))
            if rng.random() < 0.3:  # a duplicate
                detections.append((i, c, box + rng.normal(0, 2, 4).clip(-3, 3), round(float(rng.random()), 1)))
        if rng.random() < 0.5:  # a false positive
            x, y = rng.uniform(0, 60, 2)
            detections.append((i, int(rng.choice(categories)), np.array([x, y, x + 10, y + 10]),
                               round(float(rng.random()), 1)))  # scores to one decimal: ties are exercised
    ours = coco_precision(ground_truth, detections)
    theirs, stats = pycocotools_precision(ground_truth, detections, categories, images)
    np.testing.assert_allclose(ours, theirs, atol=1e-12)
    assert ours[ours > -1].mean() == pytest.approx(stats[0], abs=1e-12)
    assert ours[0][ours[0] > -1].mean() == pytest.approx(stats[1], abs=1e-12)
    assert 0.2 < stats[0] < 0.9  # a case where AP is neither trivial nor degenerate


def scene(instances):
    return {"id": "s", "caption": "", "instances": [{"phrase": p, "box": b} for p, b in instances]}


def test_acc50_and_miou_match_repeated_phrases_one_to_one():
    truth = [("red circle", [0.0, 0.0, 0.4, 0.4]), ("red circle", [0.5, 0.5, 0.9, 0.9]),
             ("blue square", [0.0, 0.5, 0.4, 0.9])]
    pred = [[0.5, 0.5, 0.9, 0.9],   # slot 0 found the second red circle ...
            [0.0, 0.0, 0.4, 0.4],   # ... slot 1 the first: after the match both are exact
            [0.0, 0.5, 0.4, 0.66]]  # IoU 0.4 with the blue square
    metrics = grounding_metrics([pred], [[0.9, 0.8, 0.3]], [scene(truth)])
    assert metrics["acc50"] == pytest.approx(2 / 3)
    assert metrics["miou"] == pytest.approx((1 + 1 + 0.4) / 3)
    # the same predictions for two different phrases: no match, both wrong
    other = [("green circle", truth[0][1])] + truth[1:]
    assert grounding_metrics([pred], [[0.9, 0.8, 0.3]], [scene(other)])["acc50"] == 0.0
    # both red circles predicted on one object: the match cannot give it to both
    metrics = grounding_metrics([[pred[0], pred[0], truth[2][1]]], [[0.9, 0.8, 0.3]], [scene(truth)])
    assert metrics["acc50"] == pytest.approx(2 / 3) and metrics["miou"] == pytest.approx(2 / 3)


def test_grounding_metrics_ap_agrees_with_pycocotools_and_takes_padded_tensors():
    scenes = shapescenes.make_scene_set("val", 12, seed=0)
    rng = np.random.default_rng(1)
    boxes, scores = torch.zeros(12, 8, 4), torch.zeros(12, 8)
    for i, s in enumerate(scenes):
        for j, inst in enumerate(s["instances"]):
            boxes[i, j] = torch.tensor(inst["box"]) + torch.from_numpy(rng.normal(0, 0.04, 4)).float()
            scores[i, j] = float(rng.random())
    metrics = grounding_metrics(boxes, scores, scenes)
    phrases = sorted({inst["phrase"] for s in scenes for inst in s["instances"]})
    cat = {p: k + 1 for k, p in enumerate(phrases)}
    gt = [(i, cat[inst["phrase"]], np.array(inst["box"])) for i, s in enumerate(scenes) for inst in s["instances"]]
    dt = [(i, cat[inst["phrase"]], boxes[i, j].double().numpy(), float(scores[i, j]))
          for i, s in enumerate(scenes) for j, inst in enumerate(s["instances"])]
    _, stats = pycocotools_precision(gt, dt, list(cat.values()), list(range(12)))
    assert metrics["ap"] == pytest.approx(stats[0], abs=1e-6)
    assert metrics["ap50"] == pytest.approx(stats[1], abs=1e-6)
    perfect = grounding_metrics([[i["box"] for i in s["instances"]] for s in scenes],
                                [[1.0] * len(s["instances"]) for s in scenes], scenes)
    assert perfect == {"acc50": 1.0, "miou": pytest.approx(1.0), "ap": pytest.approx(1.0), "ap50": pytest.approx(1.0)}


# -----------------------------------------------------------------------------
# train_detector.py and the predict CLI, as a user runs them


def run(args, check=True, script="detector.py"):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("detector")
    run(["--res=32", "--dim=32", "--depth=2", "--heads=2", "--text_depth=1", "--max_instances=4",
         "--cache_scenes=16", "--val_scenes=4", "--batch_size=4", "--max_steps=4", "--warmup_steps=1",
         "--log_interval=1", "--eval_interval=0", "--ckpt_interval=0", f"--data_dir={tmp / 'data'}",
         f"--out_dir={tmp / 'run'}"], script="train_detector.py")
    return tmp, tmp / "run" / "ckpt"


def test_training_writes_a_loadable_checkpoint_and_validation_figures(checkpoint):
    tmp, ckpt = checkpoint
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["kind"] == "StandaloneDetector" and saved["step"] == 4 and saved["model"]["res"] == 32
    assert saved["model"]["vocab_size"] == shapescenes.build_tokenizer().get_vocab_size()
    records = [json.loads(line) for line in (tmp / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert set(records[-1]["eval"]) == {"acc50", "miou", "ap", "ap50", "conf_true", "conf_wrong_shape",
                                         "conf_wrong_color"}
    grounder = load_grounder(str(ckpt), "cpu")
    assert grounder.kind == "StandaloneDetector" and grounder.res == 32 and grounder.max_instances == 4
    scenes = shapescenes.make_scene_set("val", 2, seed=0)
    batch = layouts.collate(scenes, [shapescenes.render_scene(s, 32) for s in scenes], grounder.tokenizer, 4)
    boxes, scores = grounder(batch)
    assert boxes.shape == (2, 4, 4) and scores.shape == (2, 4)
    assert ((scores >= 0) & (scores <= 1)).all() and ((boxes >= 0) & (boxes <= 1)).all()


@pytest.mark.parametrize("with_kind", [True, False])
def test_load_grounder_reads_an_echogen_checkpoint_with_or_without_kind(tmp_path, with_kind):
    model = EchoGen(ModelConfig(res=16, patch=4, dim=32, depth=1, heads=2, text_depth=1, max_instances=3,
                                vocab_size=shapescenes.build_tokenizer().get_vocab_size()))
    path = str(tmp_path / "ckpt")
    runtime.save_checkpoint(path, model, model, torch.optim.AdamW(model.parameters()), shapescenes.build_tokenizer(), {}, 0)
    if not with_kind:
        config_file = os.path.join(path, "config.json")
        saved = json.load(open(config_file))
        del saved["kind"]
        json.dump(saved, open(config_file, "w"))
    grounder = load_grounder(path, "cpu")
    assert grounder.kind == "EchoGen" and grounder.res == 16 and grounder.max_instances == 3


def layouts_and_images(tmp_path, n=3, res=64):
    scenes = shapescenes.make_scene_set("val", n, seed=0)
    scenes[0]["instances"].append(dict(scenes[0]["instances"][0], box=[0.8, 0.8, 0.99, 0.99]))  # a repeated phrase
    layout_file = tmp_path / "layouts.json"
    layouts.write_layouts(str(layout_file), scenes)
    images = tmp_path / "images"
    images.mkdir()
    for s in scenes:  # rendered at 64 for a 32 px checkpoint: the CLI resizes
        layouts.save_png(str(images / f"{s['id']}.png"), shapescenes.render_scene(s, res))
    return scenes, layout_file, images


def test_predict_cli_writes_layouts_with_a_score_per_instance(checkpoint, tmp_path):
    scenes, layout_file, images = layouts_and_images(tmp_path)
    out = tmp_path / "grounded.json"
    run(["--ckpt", str(checkpoint[1]), "--layouts", str(layout_file), "--images", str(images), "--out", str(out)])
    grounded = layouts.read_layouts(str(out), shapescenes.build_tokenizer(), shapescenes.MAX_OBJECTS)  # validates every field
    assert [s["id"] for s in grounded] == [s["id"] for s in scenes]
    for before, after in zip(scenes, grounded):
        assert after["caption"] == before["caption"]
        assert [i["phrase"] for i in after["instances"]] == [i["phrase"] for i in before["instances"]]
        assert all(0 <= i["score"] <= 1 for i in after["instances"])
    assert "score" in json.loads(out.read_text())["scenes"][0]["instances"][0]


def test_predict_cli_refuses_a_missing_image_and_writes_nothing(checkpoint, tmp_path):
    scenes, layout_file, images = layouts_and_images(tmp_path)
    missing = images / f"{scenes[2]['id']}.png"
    missing.unlink()
    out = tmp_path / "grounded.json"
    result = run(["--ckpt", str(checkpoint[1]), "--layouts", str(layout_file), "--images", str(images), "--out", str(out)],
                 check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and scenes[2]["id"] in lines[0] and str(missing) in lines[0], lines
    assert not out.exists()


def test_predict_cli_refuses_an_unknown_word_and_writes_nothing(checkpoint, tmp_path):
    _, _, images = layouts_and_images(tmp_path)
    layout_file = tmp_path / "bad.json"
    layout_file.write_text(json.dumps({"scenes": [
        {"id": "val0", "caption": "a red circle", "instances": [{"phrase": "red circle", "box": [0.1, 0.1, 0.4, 0.4]}]},
        {"id": "val1", "caption": "a red zebra", "instances": [{"phrase": "red zebra", "box": [0.1, 0.1, 0.4, 0.4]}]}]}))
    out = tmp_path / "grounded.json"
    result = run(["--ckpt", str(checkpoint[1]), "--layouts", str(layout_file), "--images", str(images), "--out", str(out)],
                 check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "val1" in lines[0] and "zebra" in lines[0], lines
    assert not out.exists()
