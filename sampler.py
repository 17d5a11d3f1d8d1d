"""
Sampling from an EchoGen model: the rectified-flow Euler ODE sampler with SD3's timestep shift
and classifier-free guidance (docs/design.md, "The objectives").

The flow runs from noise at t = 1 to data at t = 0: x_{t'} = x_t + (t' - t) v(x_t, t).

For Cycle RL (docs/design.md, "SDE for flow models") the same flow is sampled through an SDE with the
same marginals, whose every step is a Gaussian with an exact log-probability:
sde_step_with_logprob (the step, float32), policy_step (velocity + step, shared by sampling and
scoring), sample_sde (trajectories, optionally stochastic in a window of steps only) and
gaussian_step_kl (the closed-form KL between two such steps).

    python sampler.py --ckpt out/pretrain/ckpt --layouts L.json --out DIR [--steps 25] [--cfg 3.0] [--seed 0]

writes {id}.png for every scene of the layout file at the checkpoint's resolution, with the EMA
weights. A bad layout file, flag or checkpoint stops with a one-line error before anything is written.
"""

import math
import os
from typing import NamedTuple, Optional

import torch

import layouts
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


@torch.no_grad()
def sample(model, batch, noise, steps=25, cfg_scale=3.0, shift=1.0):
    """batch: collated conditions on the model's device; noise (B, C, R, R) -> x0 (B, C, R, R) in ~[-1, 1]."""
    cond = conditions_with_null(model, batch, cfg_scale)
    times = timestep_schedule(steps, shift).tolist()
    x = noise
    for t, t_next in zip(times[:-1], times[1:]):
        t_batch = torch.full((x.shape[0],), t, device=x.device)
        with runtime.autocast(x.device):
            v = guided_velocity(model, x, t_batch, cond, cfg_scale)
        x = x + (t_next - t) * v.float()
    return x


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


def to_uint8(x):
    """(B, C, R, R) in [-1, 1] -> list of uint8 (R, R, C) arrays."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(x.permute(0, 2, 3, 1).cpu().numpy())


def generate(model, scenes, tokenizer, steps=25, cfg_scale=3.0, shift=1.0, seed=0, batch_size=64):
    """Images for a list of scenes, as uint8 arrays, deterministic given the seed."""
    device = next(model.parameters()).device
    C, R = model.config.channels, model.config.res
    images = []
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start:start + batch_size]
        batch = layouts.collate(chunk, None, tokenizer, model.config.max_instances)
        batch = {k: v.to(device) for k, v in batch.items()}
        noise = initial_noise(len(chunk), (C, R, R), seed, start).to(device)
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
    parser.add_argument("--batch_size", type=runtime.positive_int, default=64)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args()
    runtime.check_output_folder("--out", args.out)
    device = runtime.resolve_device(args.device)
    model, tokenizer, _ = runtime.load_model(args.ckpt, mmdit.EchoGen, "ema", device)
    try:
        scenes = layouts.read_layouts(args.layouts, tokenizer, model.config.max_instances)
    except runtime.LayoutError as e:
        runtime.fail(str(e))
    images = generate(model, scenes, tokenizer, args.steps, args.cfg, args.shift, args.seed, args.batch_size)
    os.makedirs(args.out, exist_ok=True)
    for scene, image in zip(scenes, images):
        layouts.save_png(os.path.join(args.out, f"{scene['id']}.png"), image)
    print(f"wrote {len(images)} images of {model.config.res}x{model.config.res} to {args.out}")


if __name__ == "__main__":
    main()
