"""
The training objectives of EchoGen (docs/design.md, "The objectives" and "The three stages"):
the grounding set loss (GroundingCriterion, DETR's SetCriterion), the rectified-flow loss, stage 1
PMTP (both tasks in every batch) and stage 2 DJO (the cycle through the model's own grounding).
The training scripts and bench.py call these; model.py holds only the network.
"""

from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, matched_box_iou, matched_generalized_box_iou
from matcher import HungarianMatcher, phrase_groups
from model import EchoGen

# -----------------------------------------------------------------------------
# the grounding set criterion


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
        target_boxes (B, N, 4) xyxy as layouts.collate gives them; phrase_ids (B, N, Lp); instance_mask
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
# the generation objective


def sample_timesteps(n, generator):
    """Logit-normal t (SD3): t = sigmoid(u), u ~ N(0, 1); puts most samples at mid noise."""
    return torch.sigmoid(torch.randn(n, generator=generator))


def interpolate(x0, noise, t):
    """x_t = (1 - t) x0 + t eps: the straight path of rectified flow."""
    t_ = t.view(-1, 1, 1, 1)
    return (1 - t_) * x0 + t_ * noise


def flow_loss(v, x0, noise, row_weight=None):
    """MSE to the velocity target eps - x0 (docs/design.md), each row weighted by row_weight (B,) if given,
    or each pixel by a weight map (B, 1, R, R). The mean runs over all B rows, not over the weights' sum,
    so that a batch split across ranks averages to the same loss as the whole batch on one rank."""
    error = (v.float() - (noise - x0).float()).pow(2)  # (B, C, R, R)
    if row_weight is not None and row_weight.dim() == 4:
        return (error * row_weight).mean()
    per_row = error.flatten(1).mean(1)  # (B,)
    return per_row.mean() if row_weight is None else (per_row * row_weight).mean()


# -----------------------------------------------------------------------------
# stage 1, PMTP: both tasks in every batch (used by train_pretrain.py, and kept on in train_joint.py)


def sample_pmtp_draws(n, ground_every, ground_clean, ground_t_max, cond_drop, generator):
    """The random draws of n samples: task (n,) 0 / 1, t (n,), CFG drop (n,) bool.
    Every ground_every-th sample grounds (by position, so any split of the batch keeps the roles);
    a share ground_clean of those read the clean image (t = 0), the rest t ~ U[0, ground_t_max],
    since grounding from x_t only makes sense at low noise. Generation samples: logit-normal t."""
    task = torch.zeros(n, dtype=torch.long)
    if ground_every:
        task[ground_every - 1::ground_every] = 1
    t_generation = sample_timesteps(n, generator)
    clean = torch.rand(n, generator=generator) < ground_clean
    t_grounding = torch.where(clean, 0.0, torch.rand(n, generator=generator) * ground_t_max)
    drop = torch.rand(n, generator=generator) < cond_drop
    return task, torch.where(task == 1, t_grounding, t_generation), drop


def pmtp_inputs(batch, task, t, noise, drop):
    """x_t and the conditions of a stage-1 batch. A dropped generation sample loses caption and layout
    together (CFG); a grounding sample only its caption (its layout tokens are hidden anyway)."""
    caption_ids, _ = EchoGen.drop_conditions(batch["caption_ids"], batch["instance_mask"], drop)
    instance_mask = batch["instance_mask"] & ~(drop & (task == 0))[:, None]
    return interpolate(batch["images"], noise, t), caption_ids, instance_mask


def pmtp_terms(criterion, v, grounding, batch, task, t, noise, instance_mask, ground_weight):
    """The stage-1 loss from the model's outputs, and its parts for the log. Clean grounding samples
    (t = 0) carry no flow loss; hard negative slots (batch["negative"], shapescenes.add_hard_negatives, on
    grounding rows only) train the confidence towards 0."""
    generation = flow_loss(v, batch["images"], noise, row_weight=((task == 0) | (t > 0)).float())
    ground = criterion(grounding, batch["boxes"], batch["phrase_ids"], instance_mask & (task == 1)[:, None],
                       batch.get("negative"))
    parts = {"flow": generation.item(), "ground": ground["loss"].item(),
             **{f"ground_{k}": ground[k].item() for k in ("l1", "giou", "conf")}}
    return generation + ground_weight * ground["loss"], parts


def add_idm_term(loss, parts, idm_loss, idm_weight):
    """loss + idm_weight * L_dis, with L_dis in the log's parts as "idm"; unchanged without IDM (None)."""
    if idm_weight is None:
        return loss, parts
    return loss + idm_weight * idm_loss, {**parts, "idm": idm_loss.item()}


def pmtp_loss(model, criterion, batch, task, t, noise, drop, ground_weight, idm_weight=None):
    """The summed stage-1 loss of a batch and its parts for the log. criterion None: generation only.
    idm_weight: None for a model without IDM; else the weight of L_dis (docs/design.md, "The model") in the sum."""
    x_t, caption_ids, instance_mask = pmtp_inputs(batch, task, t, noise, drop)
    inputs = (x_t, t, caption_ids, batch["phrase_ids"], batch["boxes"], instance_mask)
    if criterion is None:
        out = model(*inputs)
        generation = flow_loss(out.v, batch["images"], noise)
        return add_idm_term(generation, {"flow": generation.item()}, out.idm_loss, idm_weight)
    out = model(*inputs, task)
    loss, parts = pmtp_terms(criterion, out.v, out.grounding, batch, task, t, noise, instance_mask, ground_weight)
    return add_idm_term(loss, parts, out.idm_loss, idm_weight)


# -----------------------------------------------------------------------------
# stage 2, DJO: the two tasks chained through each other (used by train_joint.py)


@contextmanager
def frozen_parameters(model):
    """Calls inside do not track the parameters: a loss computed there reaches them only through its
    inputs. Autograd records requires_grad when an op runs, so graphs built before are untouched."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def djo_loss(model, raw_model, criterion, cycle_criterion, batch, task, t, noise, drop, t_cycle, t_recon,
             ground_weight, cycle_weight, recon_weight, detach_boxes=True, idm_weight=None, recon_min_conf=0.0):
    """Stage 1's loss plus DJO's two chains, all rows in ONE forward of `model` (DDP allows one
    forward per backward; raw_model is the same module unwrapped, for the calls outside it).
    - layout -> image -> layout: the generation samples again at low noise t_cycle; the one-step
      estimate x0_hat = x_t - t v_hat is grounded by the model's own head with frozen parameters, and
      L1 + GIoU against the asked layout reach the generator through x0_hat alone;
    - image -> layout -> image: the grounding samples' real images are grounded, and the predicted
      boxes (detached unless detach_boxes is False) condition the flow loss on those same images at t_recon.
      Only images whose every box the head trusts (confidence, its estimate of the box's IoU, >=
      recon_min_conf) count: a wrong box would teach the generator to draw objects away from their boxes.
    Hard negative phrases (batch["negative"], shapescenes.add_hard_negatives on the grounding rows) reach stage
    1's grounding loss only. idm_weight: None for a model without IDM; else L_dis of the packed forward
    (over the instances of all its generation rows, the reconstruction rows' predicted boxes included) joins the sum.
    -> total, terms: the loss tensors "stage1", "cycle", "recon" (and "idm"), the share of trusted
    reconstruction images "recon_trusted" and stage 1's parts (floats)."""
    x0, B = batch["images"], task.shape[0]
    gen, grd = task == 0, task == 1
    x_t, caption_ids, instance_mask = pmtp_inputs(batch, task, t, noise, drop)
    cycle_x_t = interpolate(x0[gen], noise[gen], t_cycle[gen])
    # hard negative slots (grounding rows only) train the confidence of stage 1's grounding; the image ->
    # layout -> image chain must not see them: a negative's box would ask the generator for an absent object
    present = batch["instance_mask"] if "negative" not in batch else batch["instance_mask"] & ~batch["negative"]
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_boxes):
        grounded = raw_model.ground(x0[grd], batch["caption_ids"][grd], batch["phrase_ids"][grd], present[grd])
    predicted_boxes = box_cxcywh_to_xyxy(grounded["boxes"][-1]).clamp(0, 1)
    trusted = ((grounded["logits"][-1].detach().sigmoid() >= recon_min_conf) | ~present[grd]).all(1).float()  # (n_grd,)
    recon_x_t = interpolate(x0[grd], noise[grd], t_recon[grd])

    def rows(full, of_gen, of_grd):  # the packed batch: [stage 1 | cycle | reconstruction]
        return torch.cat([full, of_gen, of_grd])

    v, grounding, idm_loss = model(rows(x_t, cycle_x_t, recon_x_t), rows(t, t_cycle[gen], t_recon[grd]),
                                   rows(caption_ids, batch["caption_ids"][gen], batch["caption_ids"][grd]),
                                   rows(batch["phrase_ids"], batch["phrase_ids"][gen], batch["phrase_ids"][grd]),
                                   rows(batch["boxes"], batch["boxes"][gen], predicted_boxes.to(batch["boxes"].dtype)),
                                   rows(instance_mask, batch["instance_mask"][gen], present[grd]),
                                   rows(task, torch.zeros_like(task[gen]), torch.zeros_like(task[grd])))
    n_gen = int(gen.sum())
    stage1, parts = pmtp_terms(criterion, v[:B], {k: g[:, :B] for k, g in grounding.items()}, batch, task, t,
                               noise, instance_mask, ground_weight)
    x0_hat = cycle_x_t - t_cycle[gen].view(-1, 1, 1, 1) * v[B:B + n_gen].float()
    with frozen_parameters(raw_model):
        cycle_grounding = raw_model.ground(x0_hat, batch["caption_ids"][gen], batch["phrase_ids"][gen],
                                           batch["instance_mask"][gen])
    cycle = cycle_criterion(cycle_grounding, batch["boxes"][gen], batch["phrase_ids"][gen],
                            batch["instance_mask"][gen])["loss"]
    recon = flow_loss(v[B + n_gen:], x0[grd], noise[grd], row_weight=trusted)
    terms = {"stage1": stage1, "cycle": cycle, "recon": recon, "recon_trusted": trusted.mean().item(), **parts}
    total = stage1 + cycle_weight * cycle + recon_weight * recon
    if idm_weight is not None:
        terms["idm"] = idm_loss
        total = total + idm_weight * idm_loss
    return total, terms
