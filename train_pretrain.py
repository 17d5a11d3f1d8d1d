"""
Stage 1 of EchoGen: pre-training the layout-to-image generator with rectified flow
(DESIGN.md, "Generation objective"): x_t = (1 - t) x0 + t eps, the model predicts v = eps - x0,
t from a logit-normal, caption and layout dropped together with p = cond_drop for CFG.

One process (the tiny config: R = 32, CPU is fine):
    python train_pretrain.py
The GPU config (R = 64) on one GPU, or on 8 GPUs of one node:
    python train_pretrain.py config/gpu.py
    torchrun --standalone --nproc_per_node=8 train_pretrain.py config/gpu.py
Two nodes (run on both; add NCCL_IB_DISABLE=1 where there is no InfiniBand):
    torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=IP --master_port=1234 train_pretrain.py config/gpu.py
DDP on the CPU (gloo), as the tests do:
    torchrun --standalone --nproc_per_node=2 train_pretrain.py --batch_size=16
Any config value below can be overridden: --key=value, or a config file of assignments.
"""

import copy
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import runtime
import sampler
from model import EchoGen, ModelConfig, rectified_flow_loss, sample_timesteps

# -----------------------------------------------------------------------------
# config: the tiny CPU config; config/gpu.py overrides it for R = 64
# I/O
out_dir = "out/pretrain"
init_from = "scratch"  # "scratch" or "resume" (from out_dir/ckpt)
log_interval = 10  # steps between JSONL log lines
eval_interval = 250  # steps between checker figures and a sample grid (0 = only at the end)
ckpt_interval = 250  # steps between checkpoints (always one at the end)
# data
data_dir = "data"  # where the pre-rendered cache lives
res = 32
cache_scenes = 20000  # pre-rendered training scenes
data_seed = 0
val_scenes = 64  # the fixed validation set ("val" split, seed 0)
# model
patch = 4
dim = 128
depth = 4
heads = 4
text_depth = 2
max_instances = 8
# optimizer
batch_size = 32  # per rank and micro-step; global batch = batch_size * grad_accum * world size
grad_accum = 1
lr = 1e-3
min_lr = 1e-4
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
# lr schedule
schedule = "cosine"  # "cosine" or "constant" (both after a linear warmup)
warmup_steps = 100
max_steps = 2000
lr_decay_steps = 2000  # where cosine reaches min_lr; kept apart from max_steps so a run can stop early and resume
# generation objective
cond_drop = 0.1
ema_decay = 0.999
# sampling for the validation figures
sample_steps = 25
cfg_scale = 3.0
shift = 1.0
# system
device = "auto"  # "auto", "cpu" or "cuda"
compile = False  # torch.compile the model (CUDA)
seed = 1337
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
globals().update(runtime.configure({k: globals()[k] for k in config_keys}, sys.argv[1:]))
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------

dist_ctx = runtime.Dist(device)
dev = dist_ctx.device
if init_from not in ("scratch", "resume"):
    runtime.fail(f"init_from must be 'scratch' or 'resume', got {init_from!r}")
global_batch = batch_size * grad_accum * dist_ctx.world
ckpt_path = os.path.join(out_dir, "ckpt")
torch.manual_seed(seed)  # same initial weights on every rank

# data: rank 0 renders the cache once; the others wait and then read it
tokenizer = data.build_tokenizer()
if dist_ctx.master:
    data.load_or_prepare_cache(res, cache_scenes, data_seed, data_dir=data_dir, max_instances=max_instances)
dist_ctx.barrier()
cache = data.load_or_prepare_cache(res, cache_scenes, data_seed, data_dir=data_dir, max_instances=max_instances)
val_set = data.make_scene_set("val", val_scenes, seed=0)

# model, EMA, optimizer
model_config = ModelConfig(res=res, patch=patch, dim=dim, depth=depth, heads=heads, text_depth=text_depth,
                           vocab_size=tokenizer.get_vocab_size(), max_instances=max_instances,
                           max_caption_len=data.MAX_CAPTION_LEN, max_phrase_len=data.MAX_PHRASE_LEN)
model = EchoGen(model_config).to(dev)
ema = copy.deepcopy(model).eval().requires_grad_(False)
optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(beta1, beta2), weight_decay=weight_decay,
                              fused=dev.type == "cuda")
step = 0
if init_from == "resume":
    saved = runtime.read_checkpoint_config(ckpt_path)
    runtime.check_same_model_config(ckpt_path, saved["model"], model_config)
    step = runtime.load_train_state(ckpt_path, model, ema, optimizer)
if dist_ctx.master:
    print(f"EchoGen generator: {model.num_params() / 1e6:.2f}M parameters, res {res}, "
          f"global batch {global_batch} on {dist_ctx.world} x {dev.type}, from step {step}")

if compile:
    model.compile_blocks()  # before the DDP wrap (nanoGPT)
train_model = DDP(model, device_ids=[dist_ctx.local_rank] if dev.type == "cuda" else None) if dist_ctx.ddp else model
log = runtime.JsonlLog(os.path.join(out_dir, "log.jsonl"), dist_ctx.master)


def draw_step_randomness(step):
    """t, noise and the CFG drop mask of every sample of the global batch, from (seed, step) alone."""
    g = runtime.step_generator(seed, step, "cpu")
    t = sample_timesteps(global_batch, g)
    drop = torch.rand(global_batch, generator=g) < cond_drop
    noise = torch.randn((global_batch, 3, res, res), generator=runtime.step_generator(seed, step, dev), device=dev)
    return t.to(dev), noise, drop.to(dev)


def train_step(step):
    """One optimizer step over this rank's share of the global batch; returns the mean loss and the seconds spent waiting for data."""
    indices = runtime.global_batch_indices(step, global_batch, len(cache), data_seed)
    t, noise, drop = draw_step_randomness(step)
    mine = runtime.rank_slice(global_batch, dist_ctx)
    indices, t, noise, drop = indices[mine], t[mine], noise[mine], drop[mine]
    total_loss, data_seconds = 0.0, 0.0
    for micro in range(grad_accum):
        part = slice(micro * batch_size, (micro + 1) * batch_size)
        tic = time.perf_counter()
        batch = {k: v.to(dev, non_blocking=True) for k, v in cache.batch(indices[part]).items()}
        data_seconds += time.perf_counter() - tic
        caption_ids, instance_mask = EchoGen.drop_conditions(batch["caption_ids"], batch["instance_mask"], drop[part])
        # gradients are all-reduced only on the last micro-step (nanoGPT)
        if dist_ctx.ddp:
            train_model.require_backward_grad_sync = micro == grad_accum - 1
        with runtime.autocast(dev):
            loss = rectified_flow_loss(train_model, batch["images"], t[part], noise[part], caption_ids,
                                       batch["phrase_ids"], batch["boxes"], instance_mask)
        (loss / grad_accum).backward()
        total_loss += loss.item() / grad_accum
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total_loss, data_seconds


def evaluate(step):
    """The EMA model's checker figures on the fixed validation set, and a sample grid (rank 0)."""
    grid = os.path.join(out_dir, "samples", f"step{step:06d}.png")
    os.makedirs(os.path.dirname(grid), exist_ok=True)
    metrics = sampler.generate_and_check(ema, val_set, tokenizer, sample_steps, cfg_scale, shift, grid_path=grid)
    log.write({"step": step, "eval": metrics})
    tqdm.write(f"step {step}: val ISR {metrics['isr']:.3f} mIoU {metrics['miou']:.3f} "
               f"color {metrics['color_acc']:.3f} shape {metrics['shape_acc']:.3f} -> {grid}")


model.train()
progress = tqdm(total=max_steps, initial=step, disable=not dist_ctx.master, desc="pretrain")
window_start, window_data, window_steps = time.perf_counter(), 0.0, 0
while step < max_steps:
    step_lr = runtime.learning_rate(step, lr, min_lr, warmup_steps, lr_decay_steps, schedule)
    for group in optimizer.param_groups:
        group["lr"] = step_lr
    loss, data_seconds = train_step(step)
    runtime.update_ema(ema, model, ema_decay, step)
    step += 1
    loss = dist_ctx.all_reduce_mean(loss)
    window_data, window_steps = window_data + data_seconds, window_steps + 1
    progress.update(1)
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{step_lr:.2e}")
    if step % log_interval == 0 or step == max_steps:
        elapsed = time.perf_counter() - window_start
        log.write({"step": step, "loss": loss, "lr": step_lr, "steps_per_s": window_steps / elapsed,
                   "images_per_s": window_steps * global_batch / elapsed, "data_wait": window_data / elapsed})
        window_start, window_data, window_steps = time.perf_counter(), 0.0, 0
    if dist_ctx.master and ((eval_interval and step % eval_interval == 0) or step == max_steps) and val_scenes:
        evaluate(step)
    if dist_ctx.master and ((ckpt_interval and step % ckpt_interval == 0) or step == max_steps):
        runtime.save_checkpoint(ckpt_path, model, ema, optimizer, tokenizer, config, step)
progress.close()
if dist_ctx.master:
    print(f"done: checkpoint {ckpt_path}, log {log.path}")
dist_ctx.close()
