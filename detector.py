"""
The compact DETR-style grounding detector of EchoGen (docs/design.md, "The objectives" and
"Honest measurement"): image + phrases -> one box and one confidence per phrase instance.

Two uses, one decoder:
  * GroundingHead: phrase-conditioned queries (one per instance) read image features through
    cross-attention; a box head and a confidence head after every layer. The unified model
    (model.py) calls it on the MM-DiT's image tokens and the outputs of its layout tokens.
  * StandaloneDetector: the independent judge (the role Grounding-DINO plays in I-DRUID): a timm
    CNN trained from scratch, its own phrase encoder and the same head, trained here on true
    renders only, so that it never sees a generated image and cannot share a generator's errors.

What it implements, after DETR (Carion et al. 2020): box utilities as pure functions; the
Hungarian matcher, restricted here to instances that share a phrase (queries of two "red circle"s
are interchangeable, every other query is tied to its own instance); the set loss L1 x 5 +
GIoU x 2 + confidence x 1, normalized by the number of target boxes over all ranks, with
auxiliary losses on every decoder layer; and the grounding metrics of docs/world.md (Acc@0.5 and
mean IoU after a one-to-one match among repeated phrases) plus COCO-style AP over the scores.

Confidence: IoU-aware (as in IoU-aware RetinaNet / VarifocalNet). There are no classes to score,
since every query already names its phrase, so the logit is trained with BCE against the detached
IoU of its matched box with the truth: sigmoid(logit) estimates how well the box fits. Cycle RL
uses it as the "confidence" half of its reward. A slot flagged negative (its phrase is absent from
the image) gets target 0 and no box loss.

Train the standalone judge on true renders (R = 64, 3000 steps; each rank draws its own data):
    python detector.py train
    torchrun --standalone --nproc_per_node=8 detector.py train --batch_size=32 --compile=True
On real data, the judge of layout-to-image (eval.py --judge): trained on the real training images only,
with the same data-set spec (hence the same cached tokenizer) as the generator:
    python detector.py train --dataset=coco:INSTANCES.json:IMAGE_DIR[:CAPTIONS.json] --out_dir=out/coco_judge
A short CPU run (the default model at R = 64; with OMP_NUM_THREADS=1 on a 2-core machine it took 5 min
and reached val Acc@0.5 0.92, mIoU 0.78, AP 0.66 on the 64 validation scenes):
    python detector.py train --max_steps=600 --lr_decay_steps=600 --warmup_steps=100 --cache_scenes=5000 \
        --eval_interval=200 --out_dir=out/detector_cpu
Any key of TRAIN_CONFIG can be overridden: --key=value, or a config file of assignments.

Ground the phrases of a layout file in its images {id}.png (writes the layout format with the
predicted boxes and a score in [0, 1] per instance; bad input: one line on stderr, exit 2, nothing
written). Works for a StandaloneDetector checkpoint and for a unified EchoGen one:
    python detector.py --ckpt out/detector/ckpt --layouts val.json --images renders --out grounded.json [--device cpu]
"""

import copy
import os
import sys
import time
from dataclasses import dataclass, replace
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import model as mmdit  # a module import: model.py imports this file for GroundingHead, so names resolve at call time
import runtime

# -----------------------------------------------------------------------------
# box utilities (DETR's util/box_ops.py): boxes are (..., 4), normalized; pairwise ops broadcast
# over leading batch dimensions: (..., N, 4) x (..., M, 4) -> (..., N, M)


def box_cxcywh_to_xyxy(boxes):
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def box_xyxy_to_cxcywh(boxes):
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes):
    """xyxy (..., 4) -> (...)"""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1, boxes2):
    """Pairwise IoU of xyxy boxes: (..., N, 4), (..., M, 4) -> iou (..., N, M), union (..., N, M)."""
    top_left = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])  # (..., N, M, 2)
    bottom_right = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(boxes1)[..., :, None] + box_area(boxes2)[..., None, :] - inter
    return inter / union, union


def generalized_box_iou(boxes1, boxes2):
    """Pairwise GIoU (Rezatofighi et al. 2019): IoU - (hull - union) / hull, in [-1, 1]. (..., N, M)"""
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.max(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull


def matched_box_iou(boxes1, boxes2):
    """IoU of corresponding xyxy boxes: (K, 4), (K, 4) -> (K,)."""
    return box_iou(boxes1[:, None], boxes2[:, None])[0][:, 0, 0]


def matched_generalized_box_iou(boxes1, boxes2):
    return generalized_box_iou(boxes1[:, None], boxes2[:, None])[:, 0, 0]


# -----------------------------------------------------------------------------
# the matcher


def phrase_groups(phrase_ids, slot_mask):
    """Which query slots are interchangeable: (B, N, Lp) ids, (B, N) bool -> (B, N) long, the index
    of the first slot of the same image with the same phrase, -1 where slot_mask is False."""
    same = (phrase_ids[:, :, None, :] == phrase_ids[:, None, :, :]).all(-1)  # (B, N, N)
    same &= slot_mask[:, :, None] & slot_mask[:, None, :]
    first = same.int().argmax(dim=-1)  # argmax returns the first maximum
    return torch.where(slot_mask, first, torch.full_like(first, -1))


class HungarianMatcher(nn.Module):
    """DETR's matcher, with the assignment restricted to slots of one phrase: within an image the
    predictions of a phrase group's slots are matched one-to-one to that group's target boxes,
    minimizing cost = 5 L1 + 2 (-GIoU) - 1 sigmoid(logit) on (cx, cy, w, h). A slot may hold K
    candidate boxes (GroundingHead's `candidates`): its cost for a target is that of its cheapest
    candidate, and that candidate is the one matched, so the confidence term decides between a
    slot's candidates as the head's argmax does at inference. Slots without a group (padding,
    negatives) are not matched."""

    def __init__(self, cost_l1=5.0, cost_giou=2.0, cost_conf=1.0):
        super().__init__()
        self.cost_l1, self.cost_giou, self.cost_conf = cost_l1, cost_giou, cost_conf

    @torch.no_grad()
    def forward(self, pred_boxes, pred_logits, target_boxes, groups):
        """pred_boxes (B, N, K, 4) cxcywh, pred_logits (B, N, K), target_boxes (B, N, 4) cxcywh, groups
        (B, N) from phrase_groups -> a list of B (pred_slots, candidates, target_slots) int64 triples,
        ordered by pred slot."""
        B, N, K, _ = pred_boxes.shape
        pred_boxes, target_boxes = pred_boxes.float().flatten(1, 2), target_boxes.float()  # (B, N*K, 4)
        cost = (self.cost_l1 * torch.cdist(pred_boxes, target_boxes, p=1)  # (B, N*K, N)
                - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(target_boxes))
                - self.cost_conf * pred_logits.float().flatten(1).sigmoid()[:, :, None])
        cost, best = cost.view(B, N, K, N).min(dim=2)  # (B, N, N) per slot: its cheapest candidate's cost, and which
        cost, best, groups = cost.cpu().numpy(), best.cpu().numpy(), groups.cpu().numpy()
        indices = []
        for b in range(B):
            slots = np.flatnonzero(groups[b] >= 0)
            target_slots = slots.copy()
            for group in np.unique(groups[b][slots]):
                members = np.flatnonzero(groups[b] == group)
                if len(members) > 1:  # a repeated phrase: these slots may trade their targets
                    rows, cols = linear_sum_assignment(cost[b][np.ix_(members, members)])
                    target_slots[np.searchsorted(slots, members[rows])] = members[cols]
            candidates = best[b][slots, target_slots]
            indices.append(tuple(torch.from_numpy(a).long() for a in (slots, candidates, target_slots)))
        return indices


# -----------------------------------------------------------------------------
# the set criterion


class GroundingCriterion(nn.Module):
    """DETR's SetCriterion for grounding: one method per loss, a dispatch table, the same matcher run
    on every decoder layer (auxiliary losses). Each loss is a sum over boxes divided by the number
    of target boxes, averaged over ranks (DETR), so N ranks equal one rank with their global batch.

    Confidence: BCE-with-logits against the detached IoU of the slot's matched box with its target
    (IoU-aware). Its minimum is the binary entropy of that IoU, 0 only where the IoU is 0 or 1:
    on perfect boxes every term reaches 0 as the logits grow. Negative slots (phrase absent from the
    image, flagged in `negative`) train the confidence towards 0 and carry no box loss."""

    def __init__(self, matcher=None, weights=None):
        super().__init__()
        self.matcher = matcher or HungarianMatcher()
        self.weights = weights or {"l1": 5.0, "giou": 2.0, "conf": 1.0}
        self.losses = {"l1": self.loss_l1, "giou": self.loss_giou, "conf": self.loss_conf}

    # each loss: pred_boxes (B, N, K, 4) cxcywh, pred_logits (B, N, K), target_boxes (B, N, 4) cxcywh,
    # matched = (batch index, pred slot, candidate, target slot) of every matched box, scored (B, N)
    # bool: the slots whose every candidate's confidence is trained (real instances and negatives)

    def loss_l1(self, pred_boxes, pred_logits, target_boxes, matched, scored, num_boxes):
        b, pred_slot, candidate, target_slot = matched
        return F.l1_loss(pred_boxes[b, pred_slot, candidate], target_boxes[b, target_slot], reduction="sum") / num_boxes

    def loss_giou(self, pred_boxes, pred_logits, target_boxes, matched, scored, num_boxes):
        b, pred_slot, candidate, target_slot = matched
        giou = matched_generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes[b, pred_slot, candidate]),
                                           box_cxcywh_to_xyxy(target_boxes[b, target_slot]))
        return (1 - giou).sum() / num_boxes

    def loss_conf(self, pred_boxes, pred_logits, target_boxes, matched, scored, num_boxes):
        b, pred_slot, candidate, target_slot = matched
        iou = matched_box_iou(box_cxcywh_to_xyxy(pred_boxes[b, pred_slot, candidate]),
                              box_cxcywh_to_xyxy(target_boxes[b, target_slot])).detach()
        # the matched candidate learns its IoU; a slot's other candidates and a negative's learn 0, as
        # DETR's unmatched queries learn "no object", so that the argmax at inference picks the match
        target = torch.zeros_like(pred_logits)
        target[b, pred_slot, candidate] = iou
        loss = F.binary_cross_entropy_with_logits(pred_logits, target, reduction="none")
        return (loss * scored[:, :, None]).sum() / num_boxes

    @staticmethod
    def flatten(indices, device):
        """The matcher's per-image triples as (batch index, pred slot, candidate, target slot) over the
        whole batch, for indexing (B, N, K, ...) tensors (DETR's _get_src_permutation_idx)."""
        batch_index = torch.cat([torch.full_like(pred_slots, b) for b, (pred_slots, _, _) in enumerate(indices)])
        return (batch_index.to(device), *(torch.cat(column).to(device) for column in zip(*indices)))

    def forward(self, outputs, target_boxes, phrase_ids, instance_mask, negative=None):
        """outputs: {"candidate_boxes": (L, B, N, K, 4) cxcywh, "candidate_logits": (L, B, N, K)} from GroundingHead;
        target_boxes (B, N, 4) xyxy as data.collate gives them; phrase_ids (B, N, Lp); instance_mask
        (B, N); negative (B, N) bool or None. -> {"loss": weighted total over every layer,
        "l1", "giou", "conf": the last layer's terms, "l1_0", ...: the intermediate layers' terms}."""
        negative = (torch.zeros_like(instance_mask) if negative is None else negative) & instance_mask
        groups = phrase_groups(phrase_ids, instance_mask & ~negative)
        target_boxes = box_xyxy_to_cxcywh(target_boxes.float())
        num_boxes = (groups >= 0).sum().float()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_boxes)
            num_boxes = num_boxes / dist.get_world_size()
        num_boxes = num_boxes.clamp(min=1)
        scored = instance_mask.clone()
        n_layers = outputs["candidate_boxes"].shape[0]
        terms, total = {}, 0.0
        for layer in range(n_layers):
            pred_boxes = outputs["candidate_boxes"][layer].float()
            pred_logits = outputs["candidate_logits"][layer].float()
            matched = self.flatten(self.matcher(pred_boxes, pred_logits, target_boxes, groups), pred_boxes.device)
            suffix = "" if layer == n_layers - 1 else f"_{layer}"
            for name, loss_fn in self.losses.items():
                value = loss_fn(pred_boxes, pred_logits, target_boxes, matched, scored, num_boxes)
                terms[name + suffix] = value
                total = total + self.weights[name] * value
        return {"loss": total, **terms}


# -----------------------------------------------------------------------------
# the phrase-conditioned decoder


class Attention(nn.Module):
    """Multi-head attention of queries over a context (the queries themselves for self-attention),
    RMS qk-norm as in the MM-DiT, one F.scaled_dot_product_attention call."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = mmdit.RMSNorm(dim // heads)
        self.k_norm = mmdit.RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context, attn_mask=None):
        B, N, D = x.shape
        q = self.q(x).view(B, N, self.heads, D // self.heads).transpose(1, 2)  # (B, H, N, Dh)
        kv = self.kv(context).view(B, context.shape[1], 2, self.heads, D // self.heads)
        k, v = kv.permute(2, 0, 3, 1, 4)  # 2 x (B, H, P, Dh)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).flatten(2))  # (B, N, D)


class DecoderLayer(nn.Module):
    """Pre-norm DETR decoder layer: self-attention among the queries (how two queries of one phrase
    agree on who takes which object), cross-attention to the image, MLP."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads)
        self.mlp = mmdit.MLP(dim, int(dim * mlp_ratio))

    def forward(self, queries, image_features, self_mask):
        h = self.norm1(queries)
        queries = queries + self.self_attn(h, h, self_mask)
        queries = queries + self.cross_attn(self.norm2(queries), image_features)
        return queries + self.mlp(self.norm3(queries))


INITIAL_BOX = (0.5, 0.5, 0.3, 0.3)  # cxcywh of a fresh head's boxes: centred, the world's typical size


class GroundingHead(nn.Module):
    """image_features (B, P, D) (position-embedded by the caller), queries (B, N, D) (one per phrase
    instance), query_mask (B, N) bool -> {"candidate_boxes": (L, B, N, K, 4) cxcywh in [0, 1],
    "candidate_logits": (L, B, N, K), "boxes": (L, B, N, 4), "logits": (L, B, N)}, one entry per
    decoder layer; the last is the prediction, the others feed the auxiliary losses.

    Each query proposes K = `candidates` boxes, each with its confidence, and its answer ("boxes",
    "logits") is its most confident candidate. With one box per query, a query unsure which of two
    objects is its own is pulled by the L1 and GIoU losses to a box between them (the regression
    mean); with several, one candidate can sit on each and the confidence chooses, as DETR's many
    queries per image do. K = 1 is DETR's one query per instance."""

    def __init__(self, dim, depth=3, heads=4, max_instances=8, candidates=1):
        super().__init__()
        self.candidates = candidates
        # a learned embedding per slot: two queries of the same phrase would otherwise be identical
        # and could only ever predict the same box (symmetry breaking); the same for a slot's candidates
        self.slot_embed = nn.Parameter(torch.randn(max_instances, dim) * 0.02)
        if candidates > 1:
            self.candidate_embed = nn.Parameter(torch.randn(candidates, dim) * 0.02)
        self.image_norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(DecoderLayer(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)  # shared by every layer's output, as DETR's decoder norm
        self.box_head = mmdit.MLP(dim, dim, 4)
        self.conf_head = nn.Linear(dim, 1)
        # a fresh head predicts INITIAL_BOX everywhere (sane boxes, finite GIoU gradients from step 0)
        nn.init.zeros_(self.box_head.fc2.weight)
        with torch.no_grad():
            self.box_head.fc2.bias.copy_(torch.logit(torch.tensor(INITIAL_BOX)))

    def forward(self, image_features, queries, query_mask):
        (B, N, D), K = queries.shape, self.candidates
        queries = queries + self.slot_embed[:N].to(queries.dtype)
        if K > 1:
            queries = (queries[:, :, None] + self.candidate_embed.to(queries.dtype)).flatten(1, 2)  # (B, N*K, D)
        image_features = self.image_norm(image_features)
        # a query reads the valid queries and itself, so a padding slot never feeds a real one and
        # no row of the softmax is empty
        valid = query_mask.repeat_interleave(K, dim=1)  # (B, N*K)
        itself = torch.eye(N * K, dtype=torch.bool, device=queries.device)
        self_mask = (valid[:, None, :] | itself)[:, None]  # (B, 1, N*K, N*K)
        boxes, logits = [], []
        for layer in self.layers:
            queries = layer(queries, image_features, self_mask)
            # the output heads in float32 even under bf16 autocast: bf16 would round a coordinate
            # near 0.5 to steps of 0.002, a pixel's fraction at R = 128, which the L1 loss would feel
            with torch.autocast(queries.device.type, enabled=False):
                h = self.norm(queries.float())
                boxes.append(self.box_head(h).sigmoid().view(B, N, K, 4))
                logits.append(self.conf_head(h).view(B, N, K))
        boxes, logits = torch.stack(boxes), torch.stack(logits)  # (L, B, N, K, 4), (L, B, N, K)
        best = logits.argmax(dim=-1, keepdim=True)  # (L, B, N, 1)
        return {"candidate_boxes": boxes, "candidate_logits": logits,
                "boxes": boxes.gather(3, best[..., None].expand(-1, -1, -1, -1, 4)).squeeze(3),
                "logits": logits.gather(3, best).squeeze(3)}


def decode_predictions(outputs):
    """The last layer's boxes as clipped xyxy (B, N, 4) and scores sigmoid(logit) (B, N)."""
    boxes = box_cxcywh_to_xyxy(outputs["boxes"][-1].float()).clamp(0, 1)
    return boxes, outputs["logits"][-1].float().sigmoid()


# -----------------------------------------------------------------------------
# the standalone detector (the independent judge)


@dataclass
class DetectorConfig:
    res: int = 64
    # ResNet-18, cut after its second stage (timm feature index 2, stride 8): 8 x 8 feature tokens at
    # R = 64 (4 x 4 at 32) whose receptive field (~99 px) already spans the image. The full network
    # (stride 32) would leave 2 x 2 tokens, too coarse to place a box; the cut keeps 0.7M parameters
    # and ~0.1 GFLOP per 64 px image, cheap enough to train from scratch on a CPU.
    backbone: str = "resnet18"
    feature_level: int = 2
    dim: int = 128
    depth: int = 3  # decoder layers
    heads: int = 4
    text_depth: int = 1
    vocab_size: int = 64  # set from the tokenizer
    max_phrase_len: int = 12
    max_instances: int = 8


def backbone_norm(channels, **factory_kwargs):
    # GroupNorm, not BatchNorm: no running statistics, so train and eval agree, EMA (which averages
    # parameters only) is complete, and a DDP rank's output does not depend on its batch
    return nn.GroupNorm(8, channels, **factory_kwargs)


class StandaloneDetector(nn.Module):
    """The judge: timm CNN -> 1x1 projection to D + 2-D sin-cos positions (image tokens); the phrase
    encoder's pooled output (queries); GroundingHead. vocab_size, when given, overrides the config's."""

    def __init__(self, config: DetectorConfig, vocab_size=None):
        super().__init__()
        if vocab_size is not None:
            config = replace(config, vocab_size=vocab_size)
        # imported here, not at the top: every script imports model.py, hence this file, and timm
        # (with torchvision) would add ~1.5 s to each start
        import timm
        self.config = config
        D = config.dim
        self.backbone = timm.create_model(config.backbone, pretrained=False, features_only=True,
                                          out_indices=(config.feature_level,), norm_layer=backbone_norm)
        channels, stride = self.backbone.feature_info.channels()[-1], self.backbone.feature_info.reduction()[-1]
        assert config.res % stride == 0, f"res {config.res} is not a multiple of the backbone stride {stride}"
        self.grid = config.res // stride
        self.input_proj = nn.Conv2d(channels, D, 1)
        self.register_buffer("pos_embed", mmdit.sincos_pos_embed_2d(self.grid, D)[None], persistent=False)
        self.text = mmdit.TextEncoder(config.vocab_size, config.max_phrase_len, D, config.text_depth, config.heads)
        self.head = GroundingHead(D, config.depth, config.heads, config.max_instances)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def forward(self, images, phrase_ids, instance_mask):
        """images (B, 3, R, R) in [-1, 1], phrase_ids (B, N, Lp), instance_mask (B, N) -> GroundingHead's dict."""
        B, N, _ = phrase_ids.shape
        features = self.input_proj(self.backbone(images)[-1])  # (B, D, g, g)
        image_tokens = features.flatten(2).transpose(1, 2) + self.pos_embed.to(features.dtype)  # (B, g*g, D)
        # only real instances go through the phrase encoder; empty slots stay zero (the head masks them)
        queries = image_tokens.new_zeros(B, N, self.config.dim)
        if instance_mask.any():
            _, _, pooled = self.text(mmdit.trim_padding(phrase_ids[instance_mask]))  # (n_instances, D)
            queries[instance_mask] = pooled.to(queries.dtype)
        return self.head(image_tokens, queries, instance_mask)


# -----------------------------------------------------------------------------
# grounding metrics (docs/world.md, "Metrics"), and COCO-style AP


IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def _iou_matrix(boxes1, boxes2):
    """Numpy pairwise IoU of xyxy boxes (N, 4), (M, 4) -> (N, M)."""
    as_tensor = lambda boxes: torch.from_numpy(np.asarray(boxes, np.float64).reshape(-1, 4))
    return box_iou(as_tensor(boxes1), as_tensor(boxes2))[0].numpy()


def coco_precision(ground_truth, detections, max_dets=100):
    """COCOeval's bbox precision table, area "all", for one maxDets: ground_truth [(image, category,
    xyxy)], detections [(image, category, xyxy, score)] -> (T, R, K) array over the 10 IoU thresholds,
    101 recall points and the sorted categories, -1 for a category without ground truth. Follows
    pycocotools step by step (evaluateImg's greedy matching in score order, accumulate's
    interpolation), including its stable sorts, so ties resolve the same way."""
    categories = sorted({c for _, c, _ in ground_truth} | {c for _, c, _, _ in detections})
    images = sorted({i for i, _, _ in ground_truth} | {i for i, _, _, _ in detections})
    precision = -np.ones((len(IOU_THRESHOLDS), len(RECALL_POINTS), len(categories)))
    for k, category in enumerate(categories):
        scores, matches, n_truths = [], [], 0
        for image in images:
            truths = [box for i, c, box in ground_truth if i == image and c == category]
            found = [(box, score) for i, c, box, score in detections if i == image and c == category]
            order = np.argsort([-score for _, score in found], kind="mergesort")[:max_dets]
            found = [found[j] for j in order]
            n_truths += len(truths)
            if not found:
                continue
            ious = _iou_matrix([box for box, _ in found], truths) if truths else np.zeros((len(found), 0))
            matched = np.zeros((len(IOU_THRESHOLDS), len(found)), bool)
            for t, threshold in enumerate(IOU_THRESHOLDS):
                taken = np.zeros(len(truths), bool)
                for d in range(len(found)):
                    best, best_iou = -1, min(threshold, 1 - 1e-10)
                    for g in range(len(truths)):  # the unmatched truth of highest IoU >= the threshold
                        if taken[g] or ious[d, g] < best_iou:
                            continue
                        best, best_iou = g, ious[d, g]
                    if best >= 0:
                        taken[best], matched[t, d] = True, True
            scores += [score for _, score in found]
            matches.append(matched)
        if n_truths == 0:
            continue
        if not scores:
            precision[:, :, k] = 0
            continue
        order = np.argsort(-np.array(scores), kind="mergesort")
        tp = np.cumsum(np.concatenate(matches, axis=1)[:, order], axis=1).astype(float)  # (T, D)
        fp = np.cumsum(~np.concatenate(matches, axis=1)[:, order], axis=1).astype(float)
        for t in range(len(IOU_THRESHOLDS)):
            recall = tp[t] / n_truths
            prec = tp[t] / (tp[t] + fp[t] + np.spacing(1))
            prec = np.maximum.accumulate(prec[::-1])[::-1]  # the precision envelope
            where = np.searchsorted(recall, RECALL_POINTS, side="left")
            precision[t, :, k] = np.where(where < len(prec), prec[np.minimum(where, len(prec) - 1)], 0.0)
    return precision


def grounding_metrics(pred_boxes_xyxy, pred_scores, scenes):
    """pred_boxes_xyxy: per scene, one xyxy box per instance in slot order ((B, N, 4) tensor or
    array, or a list of (n_i, 4)); pred_scores likewise (B, N) -> {"acc50", "miou", "ap", "ap50"}.
    Acc@0.5 and mIoU: where instances share a phrase, predictions and truths are first matched
    one-to-one (Hungarian, maximum total IoU). AP: COCO's AP@[.50:.05:.95] and AP50 with the phrases
    as categories, over all predictions with their scores."""
    ious, ground_truth, detections = [], [], []
    for i, scene in enumerate(scenes):
        n = len(scene["instances"])
        boxes = np.asarray(torch.as_tensor(pred_boxes_xyxy[i]).detach().cpu().double())[:n]
        scores = np.asarray(torch.as_tensor(pred_scores[i]).detach().cpu().double())[:n]
        truths = np.array([inst["box"] for inst in scene["instances"]], np.float64)
        phrases = [inst["phrase"] for inst in scene["instances"]]
        iou = _iou_matrix(boxes, truths)  # (n, n): prediction of slot j vs truth of instance j'
        per_instance = np.diag(iou).copy()
        for phrase in set(phrases):
            members = np.array([j for j, p in enumerate(phrases) if p == phrase])
            if len(members) > 1:
                rows, cols = linear_sum_assignment(iou[np.ix_(members, members)], maximize=True)
                per_instance[members[cols]] = iou[members[rows], members[cols]]
        ious += per_instance.tolist()
        ground_truth += [(i, phrase, truths[j]) for j, phrase in enumerate(phrases)]
        detections += [(i, phrase, boxes[j], float(scores[j])) for j, phrase in enumerate(phrases)]
    precision = coco_precision(ground_truth, detections)
    mean_valid = lambda p: float(p[p > -1].mean()) if (p > -1).any() else 0.0
    ious = np.array(ious)
    if len(ious) == 0:
        return {"acc50": 0.0, "miou": 0.0, "ap": 0.0, "ap50": 0.0}
    return {"acc50": float((ious >= 0.5).mean()), "miou": float(ious.mean()),
            "ap": mean_valid(precision), "ap50": mean_valid(precision[0])}


@torch.no_grad()
def ground_scenes(ground, scenes, images, tokenizer, max_instances, device, batch_size=64):
    """Run a grounder (a callable on collated batches) over scenes and their uint8 images
    -> boxes_xyxy (S, N, 4), scores (S, N) on the CPU."""
    boxes, scores = [], []
    for start in range(0, len(scenes), batch_size):
        part = slice(start, start + batch_size)
        batch = data.collate(scenes[part], images[part], tokenizer, max_instances)
        b, s = ground({k: v.to(device) for k, v in batch.items()})
        boxes.append(b.cpu())
        scores.append(s.cpu())
    return torch.cat(boxes), torch.cat(scores)


def presence_confidence(ground, scenes, images, tokenizer, max_instances, device, per_scene=2, seed=0, batch_size=64):
    """Does a grounder's confidence see what a phrase names, or only where its box is? Its mean
    confidence on the scenes' own phrases and on hard negatives in the free slots (data.add_hard_negatives:
    one of the scene's objects with its shape swapped, or its color; seeded)
    -> {"conf_true", "conf_wrong_shape", "conf_wrong_color"}. A wrong shape scored like the true
    phrase: the confidence, half of Cycle RL's reward, cannot tell a wrong shape from a right one."""
    found = {"conf_true": [], "conf_wrong_shape": [], "conf_wrong_color": []}
    for start in range(0, len(scenes), batch_size):
        part = slice(start, start + batch_size)
        plain = data.collate(scenes[part], images[part], tokenizer, max_instances)
        seeds = [[seed, i] for i in range(start, start + batch_size)]
        for swap in ("shape", "color"):
            batch = data.add_hard_negatives(plain, tokenizer, per_scene, seeds, swap=swap)
            _, scores = ground({k: v.to(device) for k, v in batch.items()})
            scores, is_negative = scores.float().cpu(), batch["negative"]
            found[f"conf_wrong_{swap}"].append(scores[is_negative])
            if swap == "shape":
                found["conf_true"].append(scores[batch["instance_mask"] & ~is_negative])
    return {k: round(torch.cat(v).mean().item(), 4) for k, v in found.items()}


# -----------------------------------------------------------------------------
# training the standalone detector on true renders: python detector.py train [config file] [--key=value ...]

TRAIN_CONFIG = dict(
    # I/O
    out_dir="out/detector",
    init_from="scratch",  # "scratch" or "resume" (from out_dir/ckpt)
    log_interval=10,  # steps between JSONL log lines
    eval_interval=500,  # steps between validation figures (0 = only at the end)
    ckpt_interval=500,  # steps between checkpoints (always one at the end)
    # data: the pre-rendered ShapeScenes cache (true renders only) and a fixed validation set, or a real
    # data set's training images and its held-out ones (the judge of layout-to-image on real data)
    dataset="shapescenes",  # or coco:INSTANCES.json:IMAGE_DIR[:CAPTIONS.json][:key=value ...] (data.DATASET_HELP)
    data_dir="data",
    res=64,
    cache_scenes=20000,
    data_seed=0,
    val_scenes=64,  # "val" split, seed 0 (never in the cache: its scenes come from another seed stream)
    # model (DetectorConfig)
    backbone="resnet18",
    feature_level=2,
    dim=128,
    depth=3,
    heads=4,
    text_depth=1,
    max_instances=8,
    negatives=0,  # hard negative phrases per training scene (data.add_hard_negatives; ShapeScenes only): a
    #               confidence that sees shapes and colors, not only boxes (the Cycle RL reward's judge); 0 = none
    # optimizer
    batch_size=64,  # per rank and micro-step; global batch = batch_size * grad_accum * world size
    grad_accum=1,
    lr=1e-3,
    min_lr=1e-4,
    weight_decay=1e-4,
    beta1=0.9,
    beta2=0.999,
    grad_clip=1.0,
    # lr schedule
    schedule="cosine",  # "cosine" or "constant" (both after a linear warmup)
    warmup_steps=200,
    max_steps=3000,
    lr_decay_steps=3000,
    ema_decay=0.999,  # 0 disables EMA (ema.safetensors then holds the raw weights)
    # system
    device="auto",  # "auto", "cpu" or "cuda"
    compile=False,  # torch.compile the backbone and the head (CUDA)
    seed=1337,
)


def train(argv):
    config = runtime.configure(TRAIN_CONFIG, argv)
    cfg = SimpleNamespace(**config)
    dist_ctx = runtime.Dist(cfg.device)
    dev = dist_ctx.device
    if cfg.init_from not in ("scratch", "resume"):
        runtime.fail(f"init_from must be 'scratch' or 'resume', got {cfg.init_from!r}")
    if cfg.negatives and cfg.dataset != "shapescenes":
        runtime.fail(f"negatives: hard negative phrases swap ShapeScenes' shape and color words; "
                     f"set negatives=0 for dataset {cfg.dataset!r}")
    global_batch = cfg.batch_size * cfg.grad_accum * dist_ctx.world
    ckpt_path = os.path.join(cfg.out_dir, "ckpt")
    torch.manual_seed(cfg.seed)  # same initial weights on every rank

    # data: rank 0 renders the cache (on real data: reads the images, trains the tokenizer) once; the others wait and read it
    cache, tokenizer, val_set = data.load_dataset_on_ranks(dist_ctx, cfg.dataset, cfg.res, cfg.max_instances, cfg.data_dir,
                                                           cfg.cache_scenes, cfg.data_seed, cfg.val_scenes)
    val_images = data.scene_images(val_set, cfg.res)

    # model, EMA, criterion, optimizer
    model_config = DetectorConfig(res=cfg.res, backbone=cfg.backbone, feature_level=cfg.feature_level, dim=cfg.dim,
                                  depth=cfg.depth, heads=cfg.heads, text_depth=cfg.text_depth,
                                  vocab_size=tokenizer.get_vocab_size(), max_phrase_len=data.MAX_PHRASE_LEN,
                                  max_instances=cfg.max_instances)
    model = StandaloneDetector(model_config).to(dev)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if cfg.ema_decay > 0 else model
    criterion = GroundingCriterion()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay, fused=dev.type == "cuda")
    step = 0
    if cfg.init_from == "resume":
        source = runtime.checkpoint_folder(ckpt_path)  # the newest complete one, wherever a kill inside a save left it
        saved = runtime.read_checkpoint_config(source)
        if saved["kind"] != "StandaloneDetector":
            runtime.fail(f"checkpoint '{source}': holds a {saved['kind']}, not a StandaloneDetector")
        runtime.check_same_model_config(source, saved["model"], model_config)
        step = runtime.load_train_state(source, model, ema, optimizer)
    if dist_ctx.master:
        print(f"StandaloneDetector: {model.num_params() / 1e6:.2f}M parameters, res {cfg.res}, "
              f"{model.grid}x{model.grid} feature tokens, global batch {global_batch} on {dist_ctx.world} x {dev.type}, "
              f"from step {step}")
    if cfg.compile:
        model.backbone.compile()  # in place, before the DDP wrap: state_dict keys stay unprefixed
        model.head.compile()
    device_ids = [dist_ctx.local_rank] if dev.type == "cuda" else None
    train_model = DDP(model, device_ids=device_ids) if dist_ctx.ddp else model
    log = runtime.JsonlLog(os.path.join(cfg.out_dir, "log.jsonl"), dist_ctx.master, from_step=step)
    guard = runtime.UpdateGuard(log)

    def train_step(step):
        """One optimizer step -> the mean losses and whether the weights were updated (runtime.UpdateGuard)."""
        indices = runtime.global_batch_indices(step, global_batch, len(cache), cfg.data_seed)
        indices = indices[runtime.rank_slice(global_batch, dist_ctx)]
        total = {}
        for micro in range(cfg.grad_accum):
            batch = cache.batch(indices[micro * cfg.batch_size:(micro + 1) * cfg.batch_size])
            if cfg.negatives:  # seeded by the step and each scene's place in the global batch (resume, DDP)
                first = runtime.rank_slice(global_batch, dist_ctx).start + micro * cfg.batch_size
                seeds = [[cfg.seed, step, first + j] for j in range(cfg.batch_size)]
                batch = data.add_hard_negatives(batch, tokenizer, cfg.negatives, seeds)
            batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
            if dist_ctx.ddp:  # gradients are all-reduced only on the last micro-step (nanoGPT)
                train_model.require_backward_grad_sync = micro == cfg.grad_accum - 1
            with runtime.autocast(dev):
                outputs = train_model(batch["images"], batch["phrase_ids"], batch["instance_mask"])
            losses = criterion(outputs, batch["boxes"], batch["phrase_ids"], batch["instance_mask"],
                               batch.get("negative"))
            (losses["loss"] / cfg.grad_accum).backward()
            for name in ("loss", "l1", "giou", "conf"):
                total[name] = total.get(name, 0.0) + losses[name].item() / cfg.grad_accum
        return total, guard.step(model, optimizer, cfg.grad_clip, step)

    def evaluate(step):
        ema.eval()
        ground = lambda batch: decode_predictions(ema(batch["images"], batch["phrase_ids"], batch["instance_mask"]))
        with runtime.autocast(dev):
            boxes, scores = ground_scenes(ground, val_set, val_images, tokenizer, cfg.max_instances, dev)
            presence = (presence_confidence(ground, val_set, val_images, tokenizer, cfg.max_instances, dev)
                        if cfg.dataset == "shapescenes" else {})
        model.train()
        metrics = {k: round(v, 4) for k, v in grounding_metrics(boxes, scores, val_set).items()} | presence
        log.write({"step": step, "eval": metrics})
        line = " ".join(f"{k} {v:.3f}" for k, v in presence.items())
        tqdm.write(f"step {step}: val Acc@0.5 {metrics['acc50']:.3f} mIoU {metrics['miou']:.3f} "
                   f"AP {metrics['ap']:.3f} AP50 {metrics['ap50']:.3f} {line}")

    model.train()
    progress = tqdm(total=cfg.max_steps, initial=step, disable=not dist_ctx.master, desc="detector")
    window_start, window_steps = time.perf_counter(), 0
    while step < cfg.max_steps:
        step_lr = runtime.learning_rate(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.lr_decay_steps, cfg.schedule)
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        losses, updated = train_step(step)
        if updated and ema is not model:
            runtime.update_ema(ema, model, cfg.ema_decay, step)
        step += 1
        losses = {k: dist_ctx.all_reduce_mean(v) for k, v in losses.items()}
        window_steps += 1
        progress.update(1)
        progress.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{step_lr:.2e}")
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            elapsed = time.perf_counter() - window_start
            log.write({"step": step, **losses, "lr": step_lr, "steps_per_s": window_steps / elapsed,
                       "images_per_s": window_steps * global_batch / elapsed})
            window_start, window_steps = time.perf_counter(), 0
        if dist_ctx.master and cfg.val_scenes and ((cfg.eval_interval and step % cfg.eval_interval == 0)
                                                   or step == cfg.max_steps):
            evaluate(step)
        if dist_ctx.master and ((cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or step == cfg.max_steps):
            runtime.save_checkpoint(ckpt_path, model, ema, optimizer, tokenizer, config, step)
    progress.close()
    if dist_ctx.master:
        print(f"done: checkpoint {ckpt_path}, log {log.path}")
    dist_ctx.close()


# -----------------------------------------------------------------------------
# loading a grounder, and the predict CLI


class Grounder:
    """What load_grounder returns: ground(batch) -> (boxes_xyxy (B, N, 4) in [0, 1], scores (B, N) in
    [0, 1]) for a data.collate batch on the device, plus what a caller needs to build that batch."""

    def __init__(self, kind, model, tokenizer, res, max_instances, device):
        self.kind, self.model, self.tokenizer = kind, model, tokenizer
        self.res, self.max_instances, self.device = res, max_instances, device

    @torch.no_grad()
    def __call__(self, batch):
        if self.kind == "EchoGen":
            outputs = self.model.ground(batch["images"], batch["caption_ids"], batch["phrase_ids"],
                                        batch["instance_mask"])
        else:
            outputs = self.model(batch["images"], batch["phrase_ids"], batch["instance_mask"])
        return decode_predictions(outputs)


def load_grounder(ckpt_path, device="cpu", which="ema"):
    """A Grounder from a checkpoint folder of either kind (config.json's "kind"; EchoGen when absent),
    checked as runtime.load_model checks every checkpoint. A generation-only EchoGen (ground_every = 0)
    has no grounding head: refused."""
    device = torch.device(device)
    saved = runtime.read_checkpoint_config(ckpt_path)
    if saved["kind"] == "EchoGen" and not saved["model"].get("grounding", True):
        runtime.fail(f"checkpoint '{ckpt_path}': a generation-only EchoGen (config grounding = false), it has no "
                     f"grounding head to ground phrases with")
    model, tokenizer, _ = runtime.load_model(ckpt_path, which, device, kind=saved["kind"])
    return Grounder(saved["kind"], model, tokenizer, model.config.res, model.config.max_instances, device)


def read_image(path, res, scene_id):
    """An RGB uint8 (res, res, 3) image; another size is resized (boxes are normalized, so they hold)."""
    if not os.path.isfile(path):
        raise data.LayoutError(f"scene {scene_id}: image: missing file ({path})")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's ways to refuse a file
        raise data.LayoutError(f"scene {scene_id}: image: cannot read {path} ({runtime.one_line(e)})") from None
    if image.size != (res, res):
        image = image.resize((res, res), Image.BILINEAR)
    return np.asarray(image)


def layout_box(box):
    """A predicted xyxy box as the layout format wants it: 4 decimals, inside [0, 1], x0 < x1, y0 < y1."""
    x0, y0, x1, y1 = (round(float(v), 4) for v in box)
    x0, y0 = min(x0, 0.9999), min(y0, 0.9999)
    return [x0, y0, max(x1, round(x0 + 1e-4, 4)), max(y1, round(y0 + 1e-4, 4))]


def predict(argv):
    parser = runtime.ArgumentParser(description="Ground the phrases of a layout file in its images {id}.png.")
    parser.add_argument("--ckpt", required=True, help="checkpoint folder (StandaloneDetector or EchoGen)")
    parser.add_argument("--layouts", required=True, help="layout file (docs/world.md format)")
    parser.add_argument("--images", required=True, help="folder with {id}.png for every scene")
    parser.add_argument("--out", required=True, help="output layout file with predicted boxes and scores")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch_size", type=runtime.positive_int, default=64)
    args = parser.parse_args(argv)
    if os.path.isdir(args.out):
        runtime.fail(f"--out '{args.out}': is a folder; the output is a layout file")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        runtime.fail(f"--out '{args.out}': its folder does not exist")
    ground = load_grounder(args.ckpt, runtime.resolve_device(args.device))
    try:  # everything is read and checked before anything is computed or written
        scenes = data.read_layouts(args.layouts, ground.tokenizer, ground.max_instances)
        images = [read_image(os.path.join(args.images, f"{scene['id']}.png"), ground.res, scene["id"])
                  for scene in scenes]
    except (ValueError, OSError) as e:  # LayoutError is a ValueError
        runtime.fail(e)
    boxes, scores = ground_scenes(ground, scenes, images, ground.tokenizer, ground.max_instances, ground.device,
                                  args.batch_size)
    grounded = [{**scene, "instances": [{"phrase": inst["phrase"], "box": layout_box(boxes[i, j]),
                                         "score": round(float(scores[i, j]), 4)}
                                        for j, inst in enumerate(scene["instances"])]}
                for i, scene in enumerate(scenes)]
    try:
        data.write_layouts(args.out, grounded)
    except OSError as e:
        runtime.fail(f"{args.out}: cannot write ({e.strerror})")


def main(argv):
    if argv[:1] == ["train"]:
        train(argv[1:])
    else:
        predict(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
