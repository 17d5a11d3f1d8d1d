"""
Which predictions answer which asked instances (DETR's models/matcher.py), for grounding, where each
query names its phrase: a query is tied to its own instance, except that queries of a repeated
phrase (two "red circle"s) are interchangeable and are assigned one-to-one among themselves.
phrase_groups finds those groups, assign_within_groups solves one image's assignment (used by the
training matcher below, the grounding metrics and the Cycle RL reward), HungarianMatcher is the
set loss's matcher.
"""

import numpy as np
import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

from boxes import box_cxcywh_to_xyxy, generalized_box_iou


def phrase_groups(phrase_ids, slot_mask):
    """Which query slots are interchangeable: (B, N, Lp) ids, (B, N) bool -> (B, N) long, the index
    of the first slot of the same image with the same phrase, -1 where slot_mask is False."""
    same = (phrase_ids[:, :, None, :] == phrase_ids[:, None, :, :]).all(-1)  # (B, N, N)
    same &= slot_mask[:, :, None] & slot_mask[:, None, :]
    first = same.int().argmax(dim=-1)  # argmax returns the first maximum
    return torch.where(slot_mask, first, torch.full_like(first, -1))


def assign_within_groups(score, groups, maximize=False):
    """The one-to-one assignment among slots that share a phrase, for one image: score (N, N) numpy
    (pred slot x target slot), groups (N,) from phrase_groups -> (N,) int, the target slot each slot
    takes (its own where its phrase is unique, -1 where it has no group). Each group of repeated
    phrases is solved by the Hungarian algorithm on its own block of the score."""
    target = np.where(groups >= 0, np.arange(len(groups)), -1)
    for group in np.unique(groups[groups >= 0]):
        members = np.flatnonzero(groups == group)
        if len(members) > 1:  # a repeated phrase: these slots may trade their targets
            rows, cols = linear_sum_assignment(score[np.ix_(members, members)], maximize=maximize)
            target[members[rows]] = members[cols]
    return target


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
            target_slots = assign_within_groups(cost[b], groups[b])[slots]
            candidates = best[b][slots, target_slots]
            indices.append(tuple(torch.from_numpy(a).long() for a in (slots, candidates, target_slots)))
        return indices
