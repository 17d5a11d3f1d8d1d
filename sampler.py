"""
Sampling from an EchoGen model: the rectified-flow Euler ODE sampler with SD3's timestep shift
and classifier-free guidance (docs/design.md, "The objectives").

The flow runs from noise at t = 1 to data at t = 0: x_{t'} = x_t + (t' - t) v(x_t, t).

For Cycle RL (docs/design.md, "SDE for flow models") the same flow is sampled through an SDE with the
same marginals, whose every step is a Gaussian with an exact log-probability:
sde_step_with_logprob (the step, float32), policy_step (velocity + step, shared by sampling and
scoring), sample_sde (trajectories, optionally stochastic in a window of steps only) and
gaussian_step_kl (the closed-form KL between two such steps).

Self-verified sampling: the model grounds its own images with its grounding head (verify: per asked
instance, confidence x IoU of the box found for its phrase with the box asked; an image scores its
worst instance), keeps the best of N candidates (best_of), and redraws the instances that failed
inside their boxes (repair: the failing boxes re-noised to t0 and sampled again with the whole layout,
the rest of the image blended back after every step), keeping a redrawn image only if its worst
instance improves. generate_verified runs both over a list of scenes.

    python sampler.py --ckpt out/pretrain/ckpt --layouts L.json --out DIR [--steps 25] [--cfg 3.0] [--seed 0]
    python sampler.py --ckpt out/pretrain/ckpt --layouts L.json --out DIR --best_of 4 --repair 2 \
        [--pass_score 0.2] [--t0 0.6]

writes {id}.png for every scene of the layout file at the checkpoint's resolution, with the EMA
weights; scene i is drawn from the noise of seed + i. --best_of N draws candidate k of scene i from
seed + 1000 k + i (candidate 0 is the image drawn without the flag) and keeps the one whose worst
instance scores best. --repair K runs up to K rounds on the image kept: an instance whose score is below --pass_score
is redrawn from noise level --t0. With either flag {id}.json is written beside each image: the
candidate kept, every candidate's worst score, the repair rounds kept, and per instance its phrase,
asked box, found box, confidence, IoU, score and pass. A bad layout file, flag or checkpoint (one
without a grounding head, with either flag) stops with a one-line error before anything is written.
"""

import argparse
import json
import math
import os
from typing import NamedTuple, Optional

import torch

import detector
import layouts
import rewards
import runtime
import shapescenes
import model as mmdit


def timestep_schedule(steps, shift):
    """steps + 1 times from 1 to 0. shift > 1 spends more steps at high noise (SD3, eq. 23):
    t' = shift * t / (1 + (shift - 1) * t)."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def with_null_conditions(batch):
    """The conditions of classifier-free guidance's doubled batch: the batch's own (B rows) followed by
    the same rows with caption and layout dropped (B rows) -> caption_ids, phrase_ids, boxes,
    instance_mask, each (2B, ...)."""
    B = batch["caption_ids"].shape[0]
    drop = torch.arange(2 * B, device=batch["boxes"].device) >= B  # (2B,): the second half is dropped
    caption_ids, instance_mask = mmdit.EchoGen.drop_conditions(batch["caption_ids"].repeat(2, 1),
                                                               batch["instance_mask"].repeat(2, 1), drop)
    return caption_ids, batch["phrase_ids"].repeat(2, 1, 1), batch["boxes"].repeat(2, 1, 1), instance_mask


def guide(v, cfg_scale):
    """The velocity (2B, ...) of the doubled batch -> v_uncond + cfg_scale * (v_cond - v_uncond), (B, ...)."""
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


def conditions_with_null(model, batch, cfg_scale):
    """The batch's encoded conditions; with guidance, those of the doubled batch (with_null_conditions),
    encoded together so both halves share one padded length."""
    if cfg_scale == 1.0:
        return model.encode_conditions(batch["caption_ids"], batch["phrase_ids"], batch["boxes"], batch["instance_mask"])
    return model.encode_conditions(*with_null_conditions(batch))


def guided_velocity(model, x, t, cond, cfg_scale):
    """The guided velocity of x at t (B,), both halves in one forward pass; cond from conditions_with_null."""
    if cfg_scale == 1.0:
        return model.velocity(x, t, cond)
    return guide(model.velocity(torch.cat([x, x]), torch.cat([t, t]), cond), cfg_scale)


def euler(model, x, times, cond, cfg_scale, after_step=None):
    """Euler steps of the ODE from x at times[0] through times (floats, decreasing); cond from
    conditions_with_null. after_step(x, t_next), when given, replaces x after every step (repair's blend)."""
    for t, t_next in zip(times[:-1], times[1:]):
        t_batch = torch.full((x.shape[0],), t, device=x.device)
        with runtime.autocast(x.device):
            v = guided_velocity(model, x, t_batch, cond, cfg_scale)
        x = x + (t_next - t) * v.float()
        if after_step is not None:
            x = after_step(x, t_next)
    return x


@torch.no_grad()
def sample(model, batch, noise, steps=25, cfg_scale=3.0, shift=1.0):
    """batch: collated conditions on the model's device; noise (B, C, R, R) -> x0 (B, C, R, R) in ~[-1, 1]."""
    return euler(model, noise, timestep_schedule(steps, shift).tolist(), conditions_with_null(model, batch, cfg_scale),
                 cfg_scale)


# -----------------------------------------------------------------------------
# the SDE sampler with per-step Gaussian log-probabilities: the policy of Cycle RL
# (docs/design.md, "SDE for flow models"; Flow-GRPO's sde_step_with_logprob)


class SDEStep(NamedTuple):
    sample: torch.Tensor  # x_{t+dt} (B, ...)
    mean: torch.Tensor  # the step's Gaussian mean (B, ...)
    std: torch.Tensor  # its std, one per sample, broadcastable: (B, 1, ...)
    log_prob: Optional[torch.Tensor]  # (B,): the mean over dimensions of log N(sample; mean, std^2); None when std = 0
    idm_loss: Optional[torch.Tensor] = None  # L_dis of the velocity pass (policy_step's steps carry it)


def sde_sigma(t, dt, noise_level):
    """sigma_t = a sqrt(t / (1 - t)) (a = noise_level), with t capped at 1 - |dt| (the SDE of docs/design.md
    is singular at t = 1).
    The cap equals Flow-GRPO's rule (sigma at t = 1 is the sigma of the schedule's next time) and,
    unlike a fixed cap 1 - 1e-k, keeps the first step sane for any step count: there the drift
    correction sigma^2 / (2t) x |dt| becomes a^2 (1 - |dt|) / 2 x, the noise variance a^2 (1 - |dt|). Any sigma(t)
    gives the same marginals (the score term is exact for every diffusion coefficient), so the cap
    changes the noise schedule, not the distribution sampled."""
    t_sigma = torch.minimum(t, 1 + dt)  # dt < 0: 1 + dt = 1 - |dt|
    return noise_level * torch.sqrt(t_sigma / (1 - t_sigma))


def sde_step_with_logprob(v, x, t, t_next, noise_level, prev_sample=None, generator=None):
    """One step of the SDE from t to t_next < t, all of its mathematics in float32 whatever the
    autocast, shared by sampling and training so that the ratio to the sampling policy is exactly 1
    before an update:
        mean = x + [v + sigma_t^2 / (2t) (x + (1 - t) v)] dt,   std = sigma_t sqrt(|dt|),   dt = t_next - t
    x + (1 - t) v = E[eps | x_t] = -t * score, so the bracket is the reverse-time drift v - sigma^2/2 score.
    v, x: (B, ...); t, t_next: floats or (B,) tensors; noise_level >= 0: a of the SDE (0 is the Euler
    step, exactly). prev_sample: a stored x_{t+dt} to score instead of drawing one. generator: one
    torch.Generator, or a list of one per row (a row's noise then does not depend on the batch it is
    in: N ranks draw what one rank draws).
    Log-probability: the MEAN over the non-batch dimensions of log N (Flow-GRPO's reduction): ratios
    and the KL (gaussian_step_kl, same reduction) then do not scale with the resolution, so the clip
    range and the KL weight carry over from R = 32 to R = 64."""
    with torch.autocast(x.device.type, enabled=False):
        v, x = v.float(), x.float()
        shape = (-1,) + (1,) * (x.ndim - 1)
        # the times in float64 until dt is taken, so dt rounds once, as sample()'s Python-float dt does
        t, t_next = (torch.as_tensor(u, dtype=torch.float64, device=x.device).expand(x.shape[0]).reshape(shape)
                     for u in (t, t_next))
        dt, t = (t_next - t).float(), t.float()  # (B, 1, ...); dt < 0
        if noise_level == 0:
            mean = x + v * dt  # the Euler step, bit for bit as sample() takes it
            return SDEStep(mean if prev_sample is None else prev_sample.float(), mean, torch.zeros_like(t), None)
        sigma = sde_sigma(t, dt, noise_level)
        mean = x + (v + sigma ** 2 / (2 * t) * (x + (1 - t) * v)) * dt
        std = sigma * torch.sqrt(-dt)
        if prev_sample is None:
            if isinstance(generator, (list, tuple)):
                noise = torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=torch.float32)
                                     for g in generator])
            else:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            prev_sample = mean + std * noise
        prev_sample = prev_sample.float()
        log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * std ** 2) - torch.log(std)
                    - 0.5 * math.log(2 * math.pi))
        return SDEStep(prev_sample, mean, std, log_prob.flatten(1).mean(1))


def gaussian_step_kl(mean, ref_mean, std):
    """KL(N(mean, std^2) || N(ref_mean, std^2)) of one step, both policies sharing the std:
    ||mean - ref_mean||^2 / (2 std^2), reduced like the log-probability (a mean over dimensions). -> (B,)"""
    with torch.autocast(mean.device.type, enabled=False):
        return ((mean.float() - ref_mean.float()) ** 2 / (2 * std.float() ** 2)).flatten(1).mean(1)


def policy_velocity(model, batch, x, t, cfg_scale):
    """The guided velocity as the policy computes it: through the model's forward (so that a DDP
    wrapper sees the call), the conditions encoded anew, both halves of guidance in one pass.
    t: a float, the time of the whole batch. -> (v, L_dis of the pass; the dropped half has no
    instances, so with guidance it is the conditional half's)."""
    t_batch = torch.full((x.shape[0],), t, device=x.device)
    if cfg_scale == 1.0:
        out = model(x, t_batch, batch["caption_ids"], batch["phrase_ids"], batch["boxes"], batch["instance_mask"])
        return out.v, out.idm_loss
    out = model(torch.cat([x, x]), torch.cat([t_batch, t_batch]), *with_null_conditions(batch))
    return guide(out.v, cfg_scale), out.idm_loss


def policy_step(model, batch, x, t, t_next, cfg_scale, noise_level, prev_sample=None, generator=None):
    """The policy's step: the guided velocity (under autocast) followed by sde_step_with_logprob, the
    step carrying L_dis of its velocity pass. sample_sde calls it to draw, the trainer with
    prev_sample to score a stored transition: one code path, hence a ratio of exactly 1 with unchanged
    parameters, provided the module is in the same mode for both (the trainer keeps it in train mode:
    in eval mode under no_grad, nn.TransformerEncoder takes a fused fast path that rounds
    differently). batch: the collated conditions of the B rows of x; t, t_next: floats."""
    with runtime.autocast(x.device):
        v, idm_loss = policy_velocity(model, batch, x, t, cfg_scale)
    return sde_step_with_logprob(v, x, t, t_next, noise_level, prev_sample, generator)._replace(idm_loss=idm_loss)


def stochastic_steps(steps, sde_window):
    """The indices of the steps taken stochastically: all (None), or those of range(*sde_window)
    (Flow-GRPO-Fast / MixGRPO: only a window is SDE, the rest ODE, so fewer steps need scoring)."""
    if sde_window is None:
        return list(range(steps))
    start, end = sde_window
    if not 0 <= start < end <= steps:
        raise ValueError(f"sde_window {sde_window} must satisfy 0 <= start < end <= steps = {steps}")
    return list(range(start, end))


@torch.no_grad()
def sample_sde(model, batch, noise, steps, cfg_scale, shift, noise_level, generator=None, sde_window=None):
    """Sample through the SDE, recording every stochastic step for RL. noise (B, C, R, R); generator
    (one, or a list of one per row) draws the steps' noise. Steps outside sde_window are Euler (ODE) steps. -> dict with
    "x0" (B, C, R, R); per stochastic step s (S of them): "x_t", "x_next" (S, B, C, R, R),
    "log_prob" (S, B), "t", "t_next" (S,) float64, "step" (S,) indices into the schedule.
    The model is called through its forward (policy_step), so pass the module in the mode it will be
    scored in (train mode: see policy_step)."""
    times = timestep_schedule(steps, shift).tolist()
    stochastic = set(stochastic_steps(steps, sde_window))
    x = noise.float()
    record = {"x_t": [], "x_next": [], "log_prob": [], "t": [], "t_next": [], "step": []}
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        out = policy_step(model, batch, x, t, t_next, cfg_scale, noise_level if i in stochastic else 0.0, generator=generator)
        if i in stochastic and noise_level > 0:
            for key, value in (("x_t", x), ("x_next", out.sample), ("log_prob", out.log_prob), ("t", t),
                               ("t_next", t_next), ("step", i)):
                record[key].append(value)
        x = out.sample
    trajectory = {"x0": x}
    for key, values in record.items():
        # the times in float64: the exact Python floats of the schedule, so that scoring a step with
        # float(trajectory["t"][s]) repeats its sampling bit for bit
        trajectory[key] = (torch.stack(values) if values and torch.is_tensor(values[0])
                           else torch.tensor(values, dtype=torch.long if key == "step" else torch.float64))
    return trajectory


def initial_noise(n, shape, seed, first_index=0):
    """Noise of scene i drawn from seed + i alone, so a scene's image does not depend on the batch size."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + first_index + i))
                        for i in range(n)])


def pixel_levels(x):
    """(B, C, R, R) in [-1, 1] -> the levels 0..255 a PNG stores, as floats (B, C, R, R)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round()


def to_uint8(x):
    """(B, C, R, R) in [-1, 1] -> list of uint8 (R, R, C) arrays."""
    return list(pixel_levels(x).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())


def scene_batches(model, scenes, tokenizer, batch_size):
    """(index of its first scene, a batch of collated conditions on the model's device), batch_size scenes
    at a time."""
    device = next(model.parameters()).device
    for start in range(0, len(scenes), batch_size):
        batch = layouts.collate(scenes[start:start + batch_size], None, tokenizer, model.config.max_instances)
        yield start, {k: v.to(device) for k, v in batch.items()}


def generate(model, scenes, tokenizer, steps=25, cfg_scale=3.0, shift=1.0, seed=0, batch_size=64):
    """Images for a list of scenes, as uint8 arrays, deterministic given the seed."""
    C, R = model.config.channels, model.config.res
    images = []
    for start, batch in scene_batches(model, scenes, tokenizer, batch_size):
        noise = initial_noise(len(batch["boxes"]), (C, R, R), seed, start).to(batch["boxes"].device)
        images += to_uint8(sample(model, batch, noise, steps, cfg_scale, shift))
    return images


def generate_and_check(model, scenes, tokenizer, steps, cfg_scale, shift, seed=0, grid_path=None, grid_rows=8,
                       return_images=False):
    """Generate every scene, score the images with the rule-based checker, and optionally save a
    grid: generated image with the asked boxes drawn over it | the true render. Returns the metrics
    (and the images, with return_images)."""
    images = generate(model, scenes, tokenizer, steps, cfg_scale, shift, seed)
    metrics = shapescenes.check_images(scenes, images)
    if grid_path:
        truth = lambda scene: shapescenes.render_scene(scene, model.config.res)
        rows = [[layouts.draw_boxes(image, scene), layouts.draw_boxes(truth(scene), scene)]
                for scene, image in zip(scenes[:grid_rows], images)]
        layouts.save_grid(grid_path, rows)
    return (metrics, images) if return_images else metrics


# -----------------------------------------------------------------------------
# self-verified sampling: the model grounds its own images with its grounding head, keeps the best of
# N candidates, and redraws the instances that failed inside their boxes

CANDIDATE_SEED_STRIDE = 1000  # candidate k of scene i is drawn from seed + 1000 k + i: k = 0 is generate()'s noise
REPAIR_SEED_OFFSET = 10 ** 6  # repair round r of scene i draws from seed + 10^6 (r + 1) + i, apart from every
# candidate's noise while candidates x 1000 + scenes < 10^6
# An instance passes its own grounding when confidence x IoU >= PASS_SCORE. The head's confidence is
# not its IoU: on generated images it gave the instances the checker passes IoU 0.63 and confidence
# 0.44 on average (a product of ~0.28), those it fails 0.42 and 0.24 (~0.10) (docs/cycle_rl.md, "Why:
# failures are rare"). 0.2 sits between the two, near the checker's IoU 0.5 at that confidence (0.22);
# 0.5 would fail almost every instance, and then a repair chases the head's jitter.
PASS_SCORE = 0.2
# The noise level a repair restarts from: at 0.6 noise outweighs the image (x_t = 0.4 x + 0.6 eps), so
# a wrong shape or color can change, while the image's coarse structure survives; not yet tuned.
REPAIR_T0 = 0.6


def candidate_seed(seed, k):
    """The seed of candidate k: its scene i is drawn from candidate_seed + i (k = 0: generate()'s noise)."""
    return seed + k * CANDIDATE_SEED_STRIDE


def repair_seed(seed, r):
    """The seed of repair round r (from 0): its scene i draws from repair_seed + i."""
    return seed + (r + 1) * REPAIR_SEED_OFFSET


class Verdict(NamedTuple):
    """A grounder's view of B images, per asked instance; empty slots hold zeros."""
    found: torch.Tensor  # (B, N, 4) xyxy: the predicted box matched to each asked instance
    confidence: torch.Tensor  # (B, N): that prediction's confidence
    iou: torch.Tensor  # (B, N): IoU of the found and the asked box
    score: torch.Tensor  # (B, N): confidence x IoU, in [0, 1]
    worst: torch.Tensor  # (B,): the lowest score among an image's instances: one failed object fails the scene


@torch.no_grad()
def verify(grounder, images, batch):
    """Ground images (B, C, R, R) in [-1, 1] against the layouts of batch (collated conditions, no
    images) and score each asked instance: confidence x IoU with its asked box -> Verdict. grounder: a
    callable on a batch with "images" -> (boxes xyxy (B, N, 4), confidences (B, N)), as detector.Grounder.
    The images are grounded as their PNG will hold them (rounded to 8 bits), so the verdict is that of the file."""
    as_saved = pixel_levels(images) / 127.5 - 1  # as layouts.collate reads a PNG back
    pred_boxes, pred_scores = grounder({**batch, "images": as_saved})
    mask = batch["instance_mask"]
    answer, matched_iou = rewards.match_predictions(pred_boxes, batch["boxes"], batch["phrase_ids"], mask)  # (B, N)
    found = pred_boxes.float().gather(1, answer[..., None].expand(-1, -1, 4)) * mask[..., None]
    confidence = pred_scores.float().gather(1, answer) * mask
    score = confidence * matched_iou
    worst = score.masked_fill(~mask, math.inf).amin(1)  # a layout holds at least one instance
    return Verdict(found, confidence, matched_iou, score, worst)


@torch.no_grad()
def best_of(model, grounder, batch, noises, steps=25, cfg_scale=3.0, shift=1.0):
    """Draw K candidates for each of the B layouts of batch, all in one batch, and keep per layout the
    one whose worst instance scores best (ties: the first candidate). noises (K, B, C, R, R): candidate
    k's noise -> (images (B, C, R, R), their Verdict, kept (B,) the candidate kept, worst (B, K) every
    candidate's worst score)."""
    K, B = noises.shape[:2]
    repeated = {k: v.repeat(K, *[1] * (v.ndim - 1)) for k, v in batch.items()}  # (K * B, ...), candidate-major
    images = sample(model, repeated, noises.flatten(0, 1), steps, cfg_scale, shift)  # (K * B, C, R, R)
    verdict = verify(grounder, images, repeated)
    worst = verdict.worst.view(K, B)
    kept = worst.argmax(0)  # argmax returns the first of equal maxima
    rows = kept * B + torch.arange(B, device=kept.device)  # candidate kept[i] of layout i, in the (K * B) batch
    return images[rows], Verdict(*(v[rows] for v in verdict)), kept, worst.T


def failing_region(boxes, failing, res, grow=2.0, feather=2.0):
    """The soft union of the failing boxes, the region a repair redraws: boxes (B, N, 4) xyxy in [0, 1],
    failing (B, N) bool -> mask (B, 1, R, R) in [0, 1], 1 on each failing box grown by `grow` pixels (room
    for an object drawn slightly off its box, and for its edge), falling linearly to 0 over the next
    `feather` pixels so that the redrawn region blends into the kept image without a seam."""
    centres = torch.arange(res, device=boxes.device, dtype=torch.float32) + 0.5  # pixel centres, in pixels
    edges = boxes.float() * res  # (B, N, 4) in pixels
    # how far inside a box each pixel centre lies along each axis, negative outside -> (B, N, R)
    inside_x = torch.minimum(centres - edges[..., 0:1], edges[..., 2:3] - centres)
    inside_y = torch.minimum(centres - edges[..., 1:2], edges[..., 3:4] - centres)
    inside = torch.minimum(inside_y[..., :, None], inside_x[..., None, :])  # (B, N, R, R): < 0 outside the box
    soft = (1 + (inside + grow) / feather).clamp(0, 1) * failing[..., None, None]
    return soft.amax(1, keepdim=True)  # (B, 1, R, R)


def redraw_times(t0, steps, shift):
    """The times a redraw steps through: t0, then the sampler's own times below it (len - 1 Euler steps)."""
    return [t0] + [t for t in timestep_schedule(steps, shift).tolist() if t < t0]


def noised(x, eps, t):
    """The flow's path from data x to noise eps: x_t = (1 - t) x + t eps."""
    return (1 - t) * x + t * eps


@torch.no_grad()
def redraw(model, batch, images, mask, eps, t0=REPAIR_T0, steps=25, cfg_scale=3.0, shift=1.0):
    """Redraw the region mask (B, 1, R, R) (1 = redraw) of images (B, C, R, R) with the whole layout as
    the condition (SDEdit with the rest held): the images noised to t0 with eps (B, C, R, R), then the
    sampler's own steps below t0, and after every step the kept region set back to the known image
    noised to the step's time with the same eps (the blend of flow inpainting pipelines):
        x = (1 - m) ((1 - t) x_known + t eps) + m x.
    At t = 0 the kept region is the known image exactly; with m = 1 everywhere and t0 = 1 this is sample()."""
    keep_known = lambda x, t: (1 - mask) * noised(images, eps, t) + mask * x
    cond = conditions_with_null(model, batch, cfg_scale)
    return euler(model, noised(images, eps, t0), redraw_times(t0, steps, shift), cond, cfg_scale, keep_known)


def failing_instances(verdict, batch, pass_score=PASS_SCORE):
    """The asked instances whose score is below pass_score -> (B, N) bool: what a repair redraws."""
    return (verdict.score < pass_score) & batch["instance_mask"]


@torch.no_grad()
def repair_rounds(model, grounder, batch, images, verdict, round_noises, targets, t0=REPAIR_T0, steps=25, cfg_scale=3.0,
                  shift=1.0):
    """repair's rounds, one at a time, with the instances to redraw chosen by targets(verdict) -> (B, N) bool
    (repair: failing_instances). In each round the images with a target have the union of their target boxes
    redrawn (failing_region, redraw), are grounded again, and the redrawn image replaces the previous one only
    where its worst instance scores better. Yields after each round (images, their Verdict, targeted (B, N) the
    instances redrawn, kept (B,) bool the images whose redraw was kept); stops when nothing is targeted."""
    for eps in round_noises:
        targeted = targets(verdict)
        rows = targeted.any(1).nonzero().squeeze(1)  # the images to redraw
        if len(rows) == 0:
            return
        part = {k: v[rows] for k, v in batch.items()}
        mask = failing_region(part["boxes"], targeted[rows], images.shape[-1])
        new_images = redraw(model, part, images[rows], mask, eps[rows], t0, steps, cfg_scale, shift)
        new = verify(grounder, new_images, part)
        better = new.worst > verdict.worst[rows]
        rows = rows[better]
        images = images.index_put((rows,), new_images[better])
        verdict = Verdict(*(old.index_put((rows,), now[better]) for old, now in zip(verdict, new)))
        kept = torch.zeros(len(images), dtype=torch.bool, device=images.device).index_fill(0, rows, True)
        yield images, verdict, targeted, kept


@torch.no_grad()
def repair(model, grounder, batch, images, verdict, round_noises, pass_score=PASS_SCORE, t0=REPAIR_T0, steps=25,
           cfg_scale=3.0, shift=1.0):
    """Up to len(round_noises) rounds of repair_rounds on the instances scoring below pass_score: images
    whose instances all pass are left alone. images (B, C, R, R) with their Verdict; round_noises: one eps
    (B, C, R, R) per round, fresh so that a rejected round is not repeated as it was
    -> (images, their Verdict, repaired (B,) the number of rounds kept)."""
    repaired = torch.zeros(len(images), dtype=torch.long, device=images.device)
    failing = lambda verdict: failing_instances(verdict, batch, pass_score)
    for images, verdict, _, kept in repair_rounds(model, grounder, batch, images, verdict, round_noises, failing, t0,
                                                  steps, cfg_scale, shift):
        repaired += kept
    return images, verdict, repaired


def scene_report(scene, verdict, i, pass_score, **outcome):
    """What is written beside scene i's image ({id}.json): the outcome (the candidate kept, ...), the
    worst score, and per asked instance the verdict."""
    figure = lambda v: round(float(v), 4)
    instances = [{"phrase": inst["phrase"], "box": inst["box"], "found": detector.layout_box(verdict.found[i, j]),
                  "confidence": figure(verdict.confidence[i, j]), "iou": figure(verdict.iou[i, j]),
                  "score": figure(verdict.score[i, j]), "pass": bool(verdict.score[i, j] >= pass_score)}
                 for j, inst in enumerate(scene["instances"])]
    return {"id": scene["id"], **outcome, "worst_score": figure(verdict.worst[i]), "pass_score": pass_score,
            "instances": instances}


def report_json(report):
    """A scene_report as JSON text, one instance per line (as a layout file holds one scene per line)."""
    head = json.dumps({k: v for k, v in report.items() if k != "instances"})
    return head[:-1] + ', "instances": [\n' + ",\n".join(map(json.dumps, report["instances"])) + "\n]}\n"


def generate_verified(model, grounder, scenes, tokenizer, steps=25, cfg_scale=3.0, shift=1.0, seed=0, batch_size=64,
                      candidates=1, repair_rounds=0, pass_score=PASS_SCORE, t0=REPAIR_T0):
    """generate() judged by a grounder (the model's own head: detector.Grounder("EchoGen", model, ...)):
    per scene the best of `candidates` draws (best_of), then up to repair_rounds repairs (repair)
    -> (uint8 images, one scene_report per scene). The candidates of a scene share its pass through
    the model, so batch_size bounds the images of a pass (at least one scene's candidates) as in generate()."""
    C, R = model.config.channels, model.config.res
    images, reports = [], []
    for start, batch in scene_batches(model, scenes, tokenizer, max(1, batch_size // candidates)):
        B = len(batch["boxes"])
        noise = lambda noise_seed: initial_noise(B, (C, R, R), noise_seed, start).to(batch["boxes"].device)
        noises = torch.stack([noise(candidate_seed(seed, k)) for k in range(candidates)])  # (K, B, C, R, R)
        x, verdict, kept, worst = best_of(model, grounder, batch, noises, steps, cfg_scale, shift)
        round_noises = [noise(repair_seed(seed, r)) for r in range(repair_rounds)]
        x, verdict, repaired = repair(model, grounder, batch, x, verdict, round_noises, pass_score, t0, steps,
                                      cfg_scale, shift)
        images += to_uint8(x)
        reports += [scene_report(scene, verdict, i, pass_score, candidates=candidates, kept=int(kept[i]),
                                 candidate_worst=[round(float(w), 4) for w in worst[i]],
                                 repairs_kept=int(repaired[i]))
                    for i, scene in enumerate(scenes[start:start + B])]
    return images, reports


def at_most_one(parse):
    """A flag type: parse's value (a runtime flag type), refused above 1."""
    def parse_at_most_one(text):
        value = parse(text)
        if value > 1:
            raise argparse.ArgumentTypeError(f"must be at most 1, got {text!r}")
        return value
    return parse_at_most_one


def main():
    parser = runtime.ArgumentParser(description="Sample images for a layout file from an EchoGen checkpoint.")
    parser.add_argument("--ckpt", required=True, help="checkpoint folder (uses its EMA weights and tokenizer)")
    parser.add_argument("--layouts", required=True, help="layout JSON (docs/world.md format)")
    parser.add_argument("--out", required=True, help="output folder for {id}.png")
    parser.add_argument("--steps", type=runtime.positive_int, default=25)
    parser.add_argument("--cfg", type=runtime.non_negative_float, default=3.0,
                        help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--shift", type=runtime.positive_float, default=1.0,
                        help="timestep shift (SD3); > 1 = more steps at high noise")
    parser.add_argument("--seed", type=runtime.seed_int, default=0)
    parser.add_argument("--batch_size", type=runtime.positive_int, default=64,
                        help="images per pass through the model (with --best_of N: N per scene)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--best_of", type=runtime.positive_int, default=None,
                        help="draw N candidates per scene, keep the one whose worst instance the model's own "
                             "grounding head scores best; writes {id}.json beside each image")
    parser.add_argument("--repair", type=runtime.non_negative_int, default=0,
                        help="up to K rounds redrawing the instances that fail inside their boxes; writes {id}.json")
    parser.add_argument("--pass_score", type=at_most_one(runtime.non_negative_float), default=PASS_SCORE,
                        help="an instance passes when its confidence x IoU >= this (0.2: between the head's "
                             "typical scores of the instances the checker passes and fails)")
    parser.add_argument("--t0", type=at_most_one(runtime.positive_float), default=REPAIR_T0,
                        help="the noise level a repair starts from (1 = the region drawn afresh)")
    args = parser.parse_args()
    verifying = args.best_of is not None or args.repair > 0
    runtime.check_output_folder("--out", args.out)
    device = runtime.resolve_device(args.device)
    model, tokenizer, _ = runtime.load_model(args.ckpt, mmdit.EchoGen, "ema", device)
    if verifying and not model.config.grounding:
        runtime.fail(f"--best_of / --repair: checkpoint '{args.ckpt}' is a generation-only EchoGen (config "
                     f"grounding = false), it has no grounding head to verify its images with")
    try:
        scenes = layouts.read_layouts(args.layouts, tokenizer, model.config.max_instances)
    except runtime.LayoutError as e:
        runtime.fail(str(e))
    if verifying:
        grounder = detector.Grounder("EchoGen", model, tokenizer, model.config.res, model.config.max_instances, device)
        images, reports = generate_verified(model, grounder, scenes, tokenizer, args.steps, args.cfg, args.shift,
                                            args.seed, args.batch_size, args.best_of or 1, args.repair,
                                            args.pass_score, args.t0)
    else:
        images = generate(model, scenes, tokenizer, args.steps, args.cfg, args.shift, args.seed, args.batch_size)
    os.makedirs(args.out, exist_ok=True)
    for i, (scene, image) in enumerate(zip(scenes, images)):
        layouts.save_png(os.path.join(args.out, f"{scene['id']}.png"), image)
        if verifying:
            text = report_json(reports[i])
            runtime.write_atomically(os.path.join(args.out, f"{scene['id']}.json"), lambda f: f.write(text.encode()))
    print(f"wrote {len(images)} images of {model.config.res}x{model.config.res} to {args.out}")
    if verifying:
        passed = sum(all(inst["pass"] for inst in report["instances"]) for report in reports)
        print(f"{passed} of {len(reports)} scenes pass their own grounding "
              f"(every instance's score >= {args.pass_score})")


if __name__ == "__main__":
    main()
