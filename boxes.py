"""
Box utilities (DETR's util/box_ops.py): boxes are (..., 4) tensors in normalized image coordinates,
xyxy unless a name says cxcywh; pairwise ops broadcast over leading batch dimensions:
(..., N, 4) x (..., M, 4) -> (..., N, M). Imports torch only.
"""

import torch


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
