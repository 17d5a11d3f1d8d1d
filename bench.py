"""
Throughput of EchoGen at a given config: the PMTP training step of train_pretrain.py (images/s,
the share of step time spent waiting for data, model FLOP utilization) and the sampler (images/s). MFU is measured
against the device's peak as measured here with a large matrix product (float32 on the CPU,
bf16 on CUDA), not against a datasheet, so the figure is honest on any machine.

    python bench.py                       # the tiny CPU config of train_pretrain.py
    python bench.py config/gpu.py         # the R = 64 GPU config (bf16, torch.compile)
    python bench.py --batch_size=64 --steps=20
    python bench.py --verify_ckpt=out/pipeline/cycle_rl/ckpt   # self-verified sampling of a checkpoint instead

Prints one JSON line of figures. With verify_ckpt: the seconds per image of sampler.generate_verified
with that checkpoint's own head (EMA weights) for each (best_of, repair) of verify_arms, on the first
sample_batch scenes of verify_set, each timed after an untimed warm-up on 2 scenes, and the
checker's ISR of each arm's images on those scenes (a context, not an evaluation: evaluate.py
--self_verify is that).
"""

import json
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import detector
import layouts
import runtime
import shapescenes
import sampler
import objectives
from model import EchoGen, ModelConfig
from objectives import pmtp_loss, sample_pmtp_draws

# -----------------------------------------------------------------------------
# config: the model and data keys of train_pretrain.py with its defaults; its config files work here
# too (keys that do not matter for a benchmark, such as max_steps, are skipped)
data_dir = "data"
res = 32
cache_scenes = 20000
patch = 4
dim = 128
depth = 4
heads = 4
text_depth = 2
max_instances = 8
ground_every = 2  # PMTP as in train_pretrain.py; 0 = the generation-only step
ground_depth = 2
ground_candidates = 1
idm = False  # IDM in every block, L_dis in the loss (model.IDM)
box_attn_bias = 2.0  # the spatial prior of layout conditioning (model.box_attention_bias)
layout_map = 32  # channels of the per-pixel layout map (model.LayoutMap); 0 = none
pixel_head = 32  # hidden channels of the output path at pixel resolution (model.PixelHead); 0 = linear unpatchify
conv_stem = 64  # hidden channels of the convolutional patch embedding (model.ConvStem); 0 = one linear map per patch
prediction = "x0"  # "x0" (JiT) or "v": what the network outputs; the loss is on v either way
batch_size = 32
lr = 1e-3
device = "auto"
compile = False
steps = 30  # timed training steps (after warmup_bench untimed ones)
warmup_bench = 5
sample_steps = 25  # sampler: Euler steps per image
cfg_scale = 3.0
sample_batch = 64
verify_ckpt = ""  # a checkpoint with a grounding head: time self-verified sampling (and nothing else)
verify_set = "heldout"
verify_arms = "1:0,4:0,4:2"  # best_of:repair pairs
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
globals().update(runtime.configure({k: globals()[k] for k in config_keys}, sys.argv[1:], skip_unknown_file_keys=True))
# -----------------------------------------------------------------------------


def synchronize(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measured_peak_flops(dev):
    """FLOP/s of a large matrix product: float32 on the CPU, bf16 on CUDA (what training uses)."""
    n, dtype = (2048, torch.float32) if dev.type == "cpu" else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(dev)
    reps = 5 if dev.type == "cpu" else 50
    tic = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(dev)
    return 2 * n ** 3 * reps / (time.perf_counter() - tic)


def training_flops_per_step(step_loss):
    """FLOPs of one forward + backward, counted by torch's FlopCounterMode (matmuls and attention)."""
    with FlopCounterMode(display=False) as counter:
        step_loss(0).backward()
    return counter.get_total_flops()


def bench_self_verified(dev):
    """Seconds per image of self-verified sampling with a trained checkpoint, per (best_of, repair)."""
    model, tokenizer, _ = runtime.load_model(verify_ckpt, EchoGen, "ema", dev)
    if not model.config.grounding:
        runtime.fail(f"verify_ckpt '{verify_ckpt}': a generation-only EchoGen has no grounding head to verify with")
    try:
        arms = [tuple(int(x) for x in arm.split(":")) for arm in verify_arms.split(",")]
    except ValueError:
        runtime.fail(f"verify_arms must be best_of:repair pairs such as '1:0,4:2', got {verify_arms!r}")
    grounder = detector.Grounder("EchoGen", model, tokenizer, model.config.res, model.config.max_instances, dev)
    scenes = shapescenes.make_scene_set(verify_set, sample_batch, seed=0)
    model.eval()
    figures = {}
    for best_of, repair in arms:
        run = lambda batch: sampler.generate_verified(model, grounder, batch, tokenizer, sample_steps, cfg_scale,
                                                      candidates=best_of, repair_rounds=repair)
        run(scenes[:2])  # warm up
        synchronize(dev)
        tic = time.perf_counter()
        images, _ = run(scenes)
        synchronize(dev)
        figures[f"best_of_{best_of}_repair_{repair}"] = {
            "seconds_per_image": round((time.perf_counter() - tic) / len(scenes), 4),
            "isr": round(shapescenes.check_images(scenes, images)["isr"], 4)}
    print(json.dumps({"device": device_name(dev), "ckpt": verify_ckpt, "set": verify_set, "scenes": len(scenes),
                      "sample_steps": sample_steps, "cfg": cfg_scale, **figures}))


def device_name(dev):
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x {torch.get_num_threads()} threads"


def main():
    dev = runtime.Dist(device).device
    if verify_ckpt:
        return bench_self_verified(dev)
    torch.manual_seed(0)
    tokenizer = shapescenes.build_tokenizer()
    cache = data.load_or_prepare_cache(res, cache_scenes, 0, data_dir=data_dir, max_instances=max_instances)
    config = ModelConfig(res=res, patch=patch, dim=dim, depth=depth, heads=heads, text_depth=text_depth,
                         vocab_size=tokenizer.get_vocab_size(), max_instances=max_instances,
                         max_caption_len=layouts.MAX_CAPTION_LEN, max_phrase_len=layouts.MAX_PHRASE_LEN,
                         grounding=ground_every > 0, ground_depth=ground_depth,
                         ground_candidates=ground_candidates, idm=idm,
                         box_attn_bias=box_attn_bias, layout_map=layout_map,
                         pixel_head=pixel_head, conv_stem=conv_stem, prediction=prediction)
    model = EchoGen(config).to(dev)
    criterion = objectives.GroundingCriterion() if ground_every else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=dev.type == "cuda")
    g = torch.Generator().manual_seed(0)

    def fetch(step):
        indices = runtime.global_batch_indices(step, batch_size, len(cache), 0)
        return {k: v.to(dev, non_blocking=True) for k, v in cache.batch(indices).items()}

    def step_loss(step, batch=None):
        batch = batch if batch is not None else fetch(step)
        task, t, drop = (x.to(dev) for x in sample_pmtp_draws(batch_size, ground_every, 0.5, 0.5, 0.1, g))
        noise = torch.randn(batch_size, 3, res, res, device=dev)
        with runtime.autocast(dev):
            return pmtp_loss(model, criterion, batch, task, t, noise, drop, 1.0, 1.0 if idm else None)[0]

    flops = training_flops_per_step(step_loss)
    model.zero_grad(set_to_none=True)
    if compile:
        model.compile_blocks()

    data_seconds, step_seconds = 0.0, 0.0
    for step in range(warmup_bench + steps):
        synchronize(dev)
        tic = time.perf_counter()
        batch = fetch(step)
        synchronize(dev)
        fetched = time.perf_counter()
        step_loss(step, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(dev)
        if step >= warmup_bench:
            data_seconds += fetched - tic
            step_seconds += time.perf_counter() - tic

    model.eval()
    scenes = shapescenes.make_scene_set("val", sample_batch, seed=0)
    sampler.generate(model, scenes[:2], tokenizer, steps=2, cfg_scale=cfg_scale)  # warm up (and compile)
    synchronize(dev)
    tic = time.perf_counter()
    sampler.generate(model, scenes, tokenizer, steps=sample_steps, cfg_scale=cfg_scale, batch_size=sample_batch)
    synchronize(dev)
    sample_seconds = time.perf_counter() - tic

    peak = measured_peak_flops(dev)
    achieved = flops * steps / step_seconds
    print(json.dumps({
        "device": device_name(dev),
        "res": res, "params_M": round(model.num_params() / 1e6, 2), "batch_size": batch_size, "compile": compile,
        "ground_every": ground_every, "idm": idm,
        "train_steps_per_s": round(steps / step_seconds, 3),
        "train_images_per_s": round(steps * batch_size / step_seconds, 1),
        "data_wait_share": round(data_seconds / step_seconds, 4),
        "train_gflop_per_step": round(flops / 1e9, 2),
        "achieved_tflops": round(achieved / 1e12, 4), "peak_tflops_measured": round(peak / 1e12, 4),
        "mfu": round(achieved / peak, 4),
        "sample_images_per_s": round(len(scenes) / sample_seconds, 2),
        "sample_steps": sample_steps, "cfg": cfg_scale,
    }))


if __name__ == "__main__":
    main()
