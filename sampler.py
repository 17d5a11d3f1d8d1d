"""
Sampling from an EchoGen model: the rectified-flow Euler ODE sampler with SD3's timestep shift
and classifier-free guidance (DESIGN.md, "Generation objective").

The flow runs from noise at t = 1 to data at t = 0: x_{t'} = x_t + (t' - t) v(x_t, t).

    python sampler.py --ckpt out/pretrain/ckpt --layouts L.json --out DIR [--steps 25] [--cfg 3.0] [--seed 0]

writes {id}.png for every scene of the layout file at the checkpoint's resolution, with the EMA
weights. A bad layout file stops with a one-line error before anything is written.
"""

import argparse
import os

import numpy as np
import torch

import data
import runtime


def timestep_schedule(steps, shift):
    """steps + 1 times from 1 to 0. shift > 1 spends more steps at high noise (SD3, eq. 23):
    t' = shift * t / (1 + (shift - 1) * t)."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def conditions_with_null(model, batch, cfg):
    """The batch's encoded conditions; with guidance, followed by the null conditions of the same
    samples (caption and layout dropped), encoded together so both halves share one padded length."""
    if cfg == 1.0:
        return model.encode_conditions(batch["caption_ids"], batch["phrase_ids"], batch["boxes"], batch["instance_mask"])
    B = batch["caption_ids"].shape[0]
    drop = torch.arange(2 * B, device=batch["boxes"].device) >= B  # (2B,): the second half is dropped
    caption_ids, instance_mask = model.drop_conditions(batch["caption_ids"].repeat(2, 1),
                                                       batch["instance_mask"].repeat(2, 1), drop)
    return model.encode_conditions(caption_ids, batch["phrase_ids"].repeat(2, 1, 1), batch["boxes"].repeat(2, 1, 1),
                                   instance_mask)


def guided_velocity(model, x, t, cond, cfg):
    """v_uncond + cfg * (v_cond - v_uncond), both halves in one forward pass."""
    if cfg == 1.0:
        return model.velocity(x, t, cond)
    v_cond, v_uncond = model.velocity(torch.cat([x, x]), torch.cat([t, t]), cond).chunk(2)
    return v_uncond + cfg * (v_cond - v_uncond)


@torch.no_grad()
def sample(model, batch, noise, steps=25, cfg=3.0, shift=1.0):
    """batch: collated conditions on the model's device; noise (B, C, R, R) -> x0 (B, C, R, R) in ~[-1, 1]."""
    cond = conditions_with_null(model, batch, cfg)
    times = timestep_schedule(steps, shift).tolist()
    x = noise
    for t, t_next in zip(times[:-1], times[1:]):
        t_batch = torch.full((x.shape[0],), t, device=x.device)
        with runtime.autocast(x.device):
            v = guided_velocity(model, x, t_batch, cond, cfg)
        x = x + (t_next - t) * v.float()
    return x


def initial_noise(n, shape, seed, first_index=0):
    """Noise of scene i drawn from seed + i alone, so a scene's image does not depend on the batch size."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + first_index + i))
                        for i in range(n)])


def to_uint8(x):
    """(B, C, R, R) in [-1, 1] -> list of uint8 (R, R, C) arrays."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(x.permute(0, 2, 3, 1).cpu().numpy())


def generate(model, scenes, tokenizer, steps=25, cfg=3.0, shift=1.0, seed=0, batch_size=64):
    """Images for a list of scenes, as uint8 arrays, deterministic given the seed."""
    device = next(model.parameters()).device
    C, R = model.config.channels, model.config.res
    images = []
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start:start + batch_size]
        batch = data.collate(chunk, None, tokenizer, model.config.max_instances)
        batch = {k: v.to(device) for k, v in batch.items()}
        noise = initial_noise(len(chunk), (C, R, R), seed, start).to(device)
        images += to_uint8(sample(model, batch, noise, steps, cfg, shift))
    return images


def generate_and_check(model, scenes, tokenizer, steps, cfg, shift, seed=0, grid_path=None, grid_rows=8):
    """Generate every scene, score the images with the rule-based checker, and optionally save a
    grid: generated image with the asked boxes drawn over it | the true render. Returns the metrics."""
    images = generate(model, scenes, tokenizer, steps, cfg, shift, seed)
    metrics = data.check_images(scenes, images)
    if grid_path:
        rows = [[data.draw_boxes(image, scene), data.draw_boxes(data.render_scene(scene, model.config.res), scene)]
                for scene, image in zip(scenes[:grid_rows], images)]
        data.save_grid(grid_path, rows)
    return metrics


def main():
    parser = argparse.ArgumentParser(description="Sample images for a layout file from an EchoGen checkpoint.")
    parser.add_argument("--ckpt", required=True, help="checkpoint folder (uses its EMA weights and tokenizer)")
    parser.add_argument("--layouts", required=True, help="layout JSON (WORLD.md format)")
    parser.add_argument("--out", required=True, help="output folder for {id}.png")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--shift", type=float, default=1.0, help="timestep shift (SD3); > 1 = more steps at high noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = parser.parse_args()
    if args.steps < 1:
        runtime.fail(f"--steps must be >= 1, got {args.steps}")

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    model, tokenizer, _ = runtime.load_model(args.ckpt, "ema", device)
    try:
        scenes = data.read_layouts(args.layouts, tokenizer, model.config.max_instances)
    except data.LayoutError as e:
        runtime.fail(str(e))
    images = generate(model, scenes, tokenizer, args.steps, args.cfg, args.shift, args.seed, args.batch_size)
    os.makedirs(args.out, exist_ok=True)
    for scene, image in zip(scenes, images):
        data.save_png(os.path.join(args.out, f"{scene['id']}.png"), image)
    print(f"wrote {len(images)} images of {model.config.res}x{model.config.res} to {args.out}")


if __name__ == "__main__":
    main()
