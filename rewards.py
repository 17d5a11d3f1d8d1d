"""
Rewards and advantages of Cycle RL (docs/design.md, "The three stages", 3).

- layout reward: an image generated for a layout is grounded (by any grounder: the model's own
  head through a frozen copy, or the standalone detector, both as detector.Grounder) and scored
      r = mean over instances of IoU(predicted box, asked box) + mean over instances of confidence,
  in [0, 2], 2 for perfect boxes found with confidence 1. Slots that share a phrase are
  interchangeable (the grounder cannot know which "red circle" of the layout it found), so their
  predictions are first matched one-to-one to the asked boxes by maximum total IoU (Hungarian);
  every other slot keeps its own box. The confidence half does not depend on the matching.
- brightness_reward: an analytic stand-in (mean brightness inside the boxes) to test the RL loop.
- group_advantages: GRPO's group-relative advantages (per layout group of G samples: mean and std
  of its rewards, a small epsilon, clipping); instance_advantages: the same per asked instance, and
  instance_weight_map: those spread over each instance's box, the credit of Cycle RL's awm with
  credit = "instance".
- critic_advantages: PPO's r - phi(s_t) with a learned value (I-DRUID), and ValueCritic, the small MLP.
- agreement: how an update's rewards relate to the rule-based checker's verdict on the same images.
- clipped_policy_loss: the clipped ratio objective of one step and its statistics (clip fraction,
  approx-KL), shared by GRPO and PPO.
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from boxes import box_iou
from matcher import assign_within_groups, phrase_groups

# -----------------------------------------------------------------------------
# the layout reward


def answering_slots(iou, groups):
    """Which prediction slot answers each asked instance: iou (B, N, N) pred x asked, groups (B, N) from
    matcher.phrase_groups -> (B, N) long. A slot answers its own instance, except that slots sharing a
    phrase are interchangeable (the grounder cannot know which "red circle" of the layout it found) and
    are assigned one-to-one by maximum total IoU (Hungarian)."""
    iou_np, groups = iou.cpu().numpy(), groups.cpu().numpy()
    answer = np.tile(np.arange(groups.shape[1]), (groups.shape[0], 1))  # (B, N); empty slots keep their own
    for b in range(groups.shape[0]):
        slots = np.flatnonzero(groups[b] >= 0)
        answer[b, assign_within_groups(iou_np[b], groups[b], maximize=True)[slots]] = slots
    return torch.from_numpy(answer).to(iou.device)


@torch.no_grad()
def match_predictions(pred_boxes, target_boxes, phrase_ids, instance_mask):
    """The prediction slot that answers each asked instance (answering_slots) and its IoU with the asked box:
    pred_boxes, target_boxes (B, N, 4) xyxy, phrase_ids (B, N, Lp), instance_mask (B, N) -> (answer (B, N) long,
    iou (B, N), 0 on empty slots)."""
    # (B, N, N): pred slot x asked slot; empty slots hold zero boxes, whose 0 / 0 IoU is NaN
    iou = box_iou(pred_boxes.float(), target_boxes.float())[0].nan_to_num(0.0)
    answer = answering_slots(iou, phrase_groups(phrase_ids, instance_mask))  # (B, N)
    return answer, iou.gather(1, answer[:, None, :]).squeeze(1) * instance_mask  # iou[b, answer[b, j], j]


def matched_ious(pred_boxes, target_boxes, phrase_ids, instance_mask):
    """IoU of each asked instance with the prediction matched to it (match_predictions) -> (B, N)."""
    return match_predictions(pred_boxes, target_boxes, phrase_ids, instance_mask)[1]


@torch.no_grad()
def score_layouts(pred_boxes, pred_scores, target_boxes, phrase_ids, instance_mask):
    """The layout reward from a grounder's output: pred_boxes (B, N, 4) xyxy, pred_scores (B, N) in
    [0, 1], target_boxes (B, N, 4) xyxy, phrase_ids (B, N, Lp), instance_mask (B, N)
    -> {"reward": (B,), "per_instance": (B, N) each asked instance's matched IoU + score (0 on empty slots),
    "iou": (B,) mean matched IoU, "confidence": (B,) mean score}."""
    mask = instance_mask.float()
    iou = matched_ious(pred_boxes, target_boxes, phrase_ids, instance_mask)  # (B, N), 0 on empty slots
    confidence = pred_scores.float() * mask
    return {"reward": instance_mean(iou + confidence, instance_mask), "per_instance": iou + confidence,
            "iou": instance_mean(iou, instance_mask), "confidence": instance_mean(confidence, instance_mask)}


def instance_mean(per_instance, instance_mask):
    """(B, N) values of the asked instances -> (B,) their mean over each layout's instances."""
    mask = instance_mask.float()
    return (per_instance * mask).sum(1) / mask.sum(1).clamp(min=1)


@torch.no_grad()
def layout_reward(grounder, images, batch):
    """Ground generated images (B, C, R, R) in [-1, 1] against the layouts of a collated batch (without
    images) and score them. grounder: a callable on a batch with "images" -> (boxes_xyxy, scores), as
    detector.Grounder is (wrap a frozen copy of the model: detector.Grounder("EchoGen", copy, ...))."""
    boxes, scores = grounder({**batch, "images": images.float().clamp(-1, 1)})
    return score_layouts(boxes, scores, batch["boxes"], batch["phrase_ids"], batch["instance_mask"])


def box_masks(boxes, res):
    """Which pixels of a res x res image each box covers (pixel centres inside): boxes (B, N, 4) xyxy in
    [0, 1] -> (B, N, res, res) float 0 / 1."""
    centres = (torch.arange(res, device=boxes.device, dtype=torch.float32) + 0.5) / res
    inside_x = (centres >= boxes[..., 0:1]) & (centres < boxes[..., 2:3])  # (B, N, R)
    inside_y = (centres >= boxes[..., 1:2]) & (centres < boxes[..., 3:4])
    return (inside_y[..., :, None] & inside_x[..., None, :]).float()


@torch.no_grad()
def brightness_reward(images, boxes):
    """An analytic reward for sanity checks of the RL loop (no grounder): the mean brightness inside
    each asked box, in [0, 1]. images (B, C, R, R) in [-1, 1], boxes (B, N, 4) xyxy -> (B, N) per instance
    (instance_mean makes the image's reward)."""
    masks = box_masks(boxes, images.shape[-1])  # (B, N, R, R)
    brightness = (images.float().clamp(-1, 1).mean(1) + 1) / 2  # (B, R, R)
    return (masks * brightness[:, None]).sum((2, 3)) / masks.sum((2, 3)).clamp(min=1)


# -----------------------------------------------------------------------------
# advantages


def group_advantages(rewards, group_size, eps=1e-4, clip=5.0):
    """GRPO: rewards (B * G,) with each group's G samples contiguous -> (B * G,) advantages
    (r - mean_group) / (std_group + eps), clipped to [-clip, clip] (0 = no clipping). std is the
    population std; a group whose samples all scored the same gets advantages of exactly 0."""
    grouped = rewards.float().view(-1, group_size)  # (B, G)
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, unbiased=False, keepdim=True)
    advantages = (grouped - mean) / (std + eps)
    if clip > 0:
        advantages = advantages.clamp(-clip, clip)
    return advantages.flatten()


def instance_advantages(per_instance, instance_mask, group_size, eps=1e-4, clip=5.0):
    """GRPO's advantages per asked instance: per_instance (B * G, N), each group's G samples of one layout
    contiguous, so instance slot k is the same asked object in all G -> (B * G, N), normalized over the
    group per slot (group_advantages on each slot); 0 on empty slots and on slots whose G values tie."""
    N = per_instance.shape[1]
    by_slot = per_instance.float().view(-1, group_size, N).transpose(1, 2).flatten()  # (B * N * G,): slot-major groups
    advantages = group_advantages(by_slot, group_size, eps, clip).view(-1, N, group_size).transpose(1, 2).flatten(0, 1)
    return advantages * instance_mask


def instance_weight_map(advantages, boxes, instance_mask, res):
    """Each pixel's share of the instance advantages: advantages, instance_mask (B, N), boxes (B, N, 4)
    -> (B, 1, R, R), the mean advantage of the asked boxes that cover the pixel, 0 outside every box."""
    masks = box_masks(boxes, res) * instance_mask[..., None, None]  # (B, N, R, R)
    covered = masks.sum(1, keepdim=True)
    return (masks * advantages[..., None, None]).sum(1, keepdim=True) / covered.clamp(min=1)


def critic_advantages(rewards, values, normalize=True, eps=1e-4):
    """PPO with a learned critic (I-DRUID): A = r - phi(s_t) per sample and step. rewards (B,),
    values (S, B) the critic's estimate at each trained step -> (S, B), detached; normalize: to zero
    mean and unit std over the batch (PPO's advantage normalization, which also keeps a young critic's
    bias from pushing every sample the same way). Under DDP pass normalize=False and normalize over
    the gathered batch."""
    advantages = rewards.float()[None] - values.detach().float()
    if normalize:
        advantages = (advantages - advantages.mean()) / (advantages.std(unbiased=False) + eps)
    return advantages


class ValueCritic(nn.Module):
    """phi(s_t): a small MLP on cheap features of the state, x_t average-pooled to pool x pool, the
    time, and the layout (boxes and the mask, flattened). -> (B,) the expected reward."""

    def __init__(self, channels, max_instances, pool=4, hidden=128):
        super().__init__()
        self.pool = pool
        features = channels * pool * pool + 1 + 5 * max_instances
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, x_t, t, boxes, instance_mask):
        """x_t (B, C, R, R), t (B,), boxes (B, N, 4), instance_mask (B, N) -> (B,)"""
        pooled = F.adaptive_avg_pool2d(x_t.float(), self.pool).flatten(1)  # (B, C * pool * pool)
        layout = torch.cat([boxes.float() * instance_mask[..., None], instance_mask[..., None].float()], -1)
        return self.mlp(torch.cat([pooled, t.float()[:, None], layout.flatten(1)], dim=1)).squeeze(1)


# -----------------------------------------------------------------------------
# does the reward agree with the checker?


def correlation(a, b):
    """Pearson correlation of two (n,) tensors; None when either is constant (no agreement to measure)."""
    a, b = a - a.mean(), b - b.mean()
    scale = (a.norm() * b.norm()).item()
    return (a @ b).item() / scale if scale > 0 else None


def agreement(reward, checker, group_size):
    """How a Cycle RL update's rewards relate to the rule-based checker on the same images: reward and
    checker (B * G,) per image (the checker's share of passed instances), each group's G contiguous ->
    {"tie_groups": the share of groups whose rewards all tie (GRPO learns nothing from them),
     "sample_isr": the checker's mean, "reward_checker_corr": their correlation over all images,
     "reward_checker_corr_in_group": the same with both centred on their group's mean (the differences
     GRPO's advantages are made of)}; a correlation is None where either side is constant."""
    grouped_reward, grouped_checker = reward.view(-1, group_size), checker.view(-1, group_size)
    ties = grouped_reward.max(1).values == grouped_reward.min(1).values
    return {"tie_groups": ties.float().mean().item(),
            "sample_isr": checker.mean().item(),
            "reward_checker_corr": correlation(reward, checker),
            "reward_checker_corr_in_group": correlation(
                (grouped_reward - grouped_reward.mean(1, keepdim=True)).flatten(),
                (grouped_checker - grouped_checker.mean(1, keepdim=True)).flatten())}


# -----------------------------------------------------------------------------
# the clipped objective


def clipped_policy_loss(log_prob, old_log_prob, advantages, clip_range):
    """PPO's clipped surrogate of one step, per sample: -min(ratio A, clip(ratio, 1 -+ clip_range) A)
    with ratio = exp(log_prob - old_log_prob). All (B,) -> loss (B,), and for the log
    {"clip_frac": share of samples whose ratio left the range, "approx_kl": E[(log ratio)^2] / 2}."""
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    loss = -torch.minimum(ratio * advantages, ratio.clamp(1 - clip_range, 1 + clip_range) * advantages)
    with torch.no_grad():
        stats = {"clip_frac": ((ratio - 1).abs() > clip_range).float().mean().item(),
                 "approx_kl": (0.5 * log_ratio ** 2).mean().item()}
    return loss, stats
