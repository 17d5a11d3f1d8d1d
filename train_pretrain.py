"""
Stage 1 of EchoGen, PMTP (parallel multi-task pre-training, docs/design.md "The three stages"): every
batch holds generation samples and grounding samples, packed into one forward pass over the
shared tokens with a task-aware attention mask (model.task_attention_mask), and the two losses
are summed with a weight.
- generation: rectified flow, x_t = (1 - t) x0 + t eps, the model predicts v = eps - x0, t from a
  logit-normal, caption and layout dropped together with p = cond_drop for CFG;
- grounding: every ground_every-th sample of the global batch; its layout tokens are hidden and
  its queries (phrase + "box unknown") must find the boxes in the image, either clean (t = 0, a
  share ground_clean of them) or at low noise (t ~ U[0, ground_t_max]: grounding from x_t only
  makes sense there); DETR-style loss (objectives.GroundingCriterion). Noisy grounding samples
  still train the flow, conditioned on the caption alone; clean ones (t = 0) do not.
--ground_every=0 trains the generation-only model (no grounding head), the baseline of PMTP.
--idm=True adds I-DRUID's IDM to every block (model.IDM) and idm_weight * L_dis to the loss.

One process (the tiny config: R = 32, CPU is fine):
    python train_pretrain.py
The GPU config (R = 64) on one GPU, or on 8 GPUs of one node:
    python train_pretrain.py config/gpu.py
    torchrun --standalone --nproc_per_node=8 train_pretrain.py config/gpu.py
Two nodes (run on both; add NCCL_IB_DISABLE=1 where there is no InfiniBand):
    torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=IP --master_port=1234 train_pretrain.py config/gpu.py
DDP on the CPU (gloo), as the tests do:
    torchrun --standalone --nproc_per_node=2 train_pretrain.py --batch_size=16
Real data (COCO format; the validation figures need a judge, train_detector.py on the same spec):
    python train_pretrain.py --dataset=coco:coco/annotations/instances_train2017.json:coco/train2017:coco/annotations/captions_train2017.json
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
import layouts
import runtime
import shapescenes
import detector
import evaluate
import objectives
from model import EchoGen, ModelConfig
from objectives import pmtp_loss, sample_pmtp_draws

# -----------------------------------------------------------------------------
# config: the tiny CPU config; config/gpu.py overrides it for R = 64
# I/O
out_dir = "out/pretrain"
init_from = "scratch"  # "scratch", "resume" (from out_dir/ckpt), or a checkpoint folder to warm-start from (see warm_start)
log_interval = 10  # steps between JSONL log lines
eval_interval = 250  # steps between checker figures and a sample grid (0 = only at the end)
ckpt_interval = 250  # steps between checkpoints (always one at the end)
# data
dataset = "shapescenes"  # or real data: coco:INSTANCES.json:IMAGE_DIR[:CAPTIONS.json][:key=value ...] (coco.DATASET_HELP)
judge = ""  # real data: a StandaloneDetector checkpoint that scores the validation images (ISR, mIoU)
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
idm = False  # IDM in every block (model.IDM, docs/design.md "The model"); False = the plain model
box_attn_bias = 2.0  # the spatial prior of layout conditioning (model.box_attention_bias); 0 = none
layout_map = 32  # channels of the per-pixel layout map (model.LayoutMap); 0 = none
pixel_head = 32  # hidden channels of the output path at pixel resolution (model.PixelHead); 0 = linear unpatchify
conv_stem = 64  # hidden channels of the convolutional patch embedding (model.ConvStem); 0 = one linear map per patch
prediction = "x0"  # "x0" (JiT) or "v": what the network outputs; the loss is on v either way
# optimizer
batch_size = 32  # per rank and micro-step; global batch = batch_size * grad_accum * world size
grad_accum = 1
lr = 2e-3  # 1e-3 and 3e-3 learn shapes slower per minute (docs/shapes.md, "Optimizer, EMA and the grounding head")
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
# grounding objective (PMTP)
ground_every = 2  # every 2nd sample of the global batch is a grounding sample; 0 = generation only
ground_weight = 0.1  # total loss = flow + ground_weight * grounding (the DETR terms sum to ~10x the flow MSE)
ground_clean = 0.5  # share of grounding samples on the clean image, t = 0
ground_t_max = 0.5  # the others at t ~ U[0, ground_t_max]
ground_negatives = -1  # hard negative phrases per grounding sample (shapescenes.add_hard_negatives, ShapeScenes): a
#                        confidence that sees shapes and colors, not only boxes (Cycle RL's reward); 0 = none,
#                        -1 = 2 where they apply (ShapeScenes with grounding samples), else none
ground_confusable = 0.5  # share of grounding samples drawn from scenes where two objects share a color
#                         (shapescenes.confusable_scenes): a head that must see shapes, not only colors; 0 = none
ground_depth = 2  # decoder layers of the grounding head
ground_candidates = 1  # boxes each grounding query proposes, its answer the most confident (model.GroundingHead)
# IDM's disentangle constraint (only with idm = True)
idm_weight = 0.1  # total loss += idm_weight * L_dis; L_dis = softplus(CAS(R+) - CAS(R-)) lies in [0.31, 1.31]
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
if init_from not in ("scratch", "resume") and not os.path.isdir(init_from):
    runtime.fail(f"init_from must be 'scratch', 'resume' or a checkpoint folder, got {init_from!r}")
if prediction not in ("v", "x0") or layout_map < 0 or pixel_head < 0:
    runtime.fail(f"prediction must be 'v' or 'x0' (got {prediction!r}), layout_map and pixel_head >= 0 "
                 f"(got {layout_map} and {pixel_head})")
if conv_stem and patch & (patch - 1):
    runtime.fail(f"conv_stem needs a power-of-two patch (it halves the image per conv), got patch {patch}")
if ground_every and batch_size % ground_every:
    runtime.fail(f"batch_size {batch_size} must be a multiple of ground_every {ground_every}, "
                 "so that every micro-batch holds both tasks")
config["ground_negatives"] = ground_negatives = shapescenes.resolve_ground_negatives(ground_negatives, dataset, ground_every)
global_batch = batch_size * grad_accum * dist_ctx.world
ckpt_path = os.path.join(out_dir, "ckpt")
torch.manual_seed(seed)  # same initial weights on every rank

# data: rank 0 renders the cache (on real data: reads the images, trains the tokenizer) once; the others wait and read it
cache, tokenizer, val_set = data.load_dataset_on_ranks(dist_ctx, dataset, res, max_instances, data_dir, cache_scenes,
                                                       data_seed, val_scenes)
judge_grounder = detector.load_grounder(judge, dev) if judge else None
# the confusable scenes are ShapeScenes' two objects of one color; real data's first words are not colors
if dataset != "shapescenes" or not ground_every:
    config["ground_confusable"] = ground_confusable = 0.0
confusable = (shapescenes.confusable_scenes(cache.arrays["phrase_ids"], cache.arrays["instance_mask"])
              if ground_confusable else None)
if confusable is not None and not len(confusable):  # a cache of a handful of scenes may hold none
    print(f"ground_confusable {ground_confusable}: no confusable scene in the cache, none drawn", file=sys.stderr)
    confusable = None

# model, EMA, optimizer
model_config = ModelConfig(res=res, patch=patch, dim=dim, depth=depth, heads=heads, text_depth=text_depth,
                           vocab_size=tokenizer.get_vocab_size(), max_instances=max_instances,
                           max_caption_len=layouts.MAX_CAPTION_LEN, max_phrase_len=layouts.MAX_PHRASE_LEN,
                           grounding=ground_every > 0, ground_depth=ground_depth,
                           ground_candidates=ground_candidates, idm=idm,
                           box_attn_bias=box_attn_bias, layout_map=layout_map,
                           pixel_head=pixel_head, conv_stem=conv_stem, prediction=prediction)
model = EchoGen(model_config).to(dev)
criterion = objectives.GroundingCriterion() if ground_every else None
ema = copy.deepcopy(model).eval().requires_grad_(False)
optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(beta1, beta2), weight_decay=weight_decay,
                              fused=dev.type == "cuda")


def warm_start(path):
    """Model and EMA weights from another run's checkpoint; a fresh optimizer, schedule and step 0.
    The architecture must be the same, except that IDM may be switched on: its weights are then new,
    and a fresh IDM computes what the plain model did (model.IDM), so the run starts where that one ended."""
    saved = runtime.read_checkpoint_config(path)
    runtime.check_same_model_config(path, {**saved["model"], "idm": idm}, model_config)
    for module, which in ((model, "model"), (ema, "ema")):
        missing, unexpected = module.load_state_dict(runtime.load_weights(path, which, EchoGen), strict=False)
        if unexpected or any(".idm." not in key for key in missing):
            runtime.fail(f"checkpoint '{path}': its {which} weights do not fit this model "
                         f"(missing {missing[:2]}, unexpected {unexpected[:2]})")


step = 0
if init_from == "resume":
    source = runtime.checkpoint_folder(ckpt_path)  # the newest complete one, wherever a kill inside a save left it
    saved = runtime.read_checkpoint_config(source)
    runtime.check_same_model_config(source, saved["model"], model_config)
    step = runtime.load_train_state(source, model, ema, optimizer)
elif init_from != "scratch":
    warm_start(init_from)
if dist_ctx.master:
    print(f"EchoGen generator: {model.num_params() / 1e6:.2f}M parameters, res {res}, "
          f"global batch {global_batch} on {dist_ctx.world} x {dev.type}, from step {step}")

if compile:
    model.compile_blocks()  # before the DDP wrap (nanoGPT)
train_model = DDP(model, device_ids=[dist_ctx.local_rank] if dev.type == "cuda" else None) if dist_ctx.ddp else model
log = runtime.JsonlLog(os.path.join(out_dir, "log.jsonl"), dist_ctx.master, from_step=step)
guard = runtime.UpdateGuard(log)


def draw_step_randomness(step):
    """Task, t, CFG drop and noise of every sample of the global batch, from (seed, step) alone."""
    task, t, drop = sample_pmtp_draws(global_batch, ground_every, ground_clean, ground_t_max, cond_drop,
                                      runtime.step_generator(seed, step, "cpu"))
    noise = torch.randn((global_batch, 3, res, res), generator=runtime.step_generator(seed, step, dev), device=dev)
    return task.to(dev), t.to(dev), noise, drop.to(dev)


def train_step(step):
    """One optimizer step over this rank's share of the global batch; returns the mean loss, its
    parts, the seconds spent waiting for data and whether the weights were updated (runtime.UpdateGuard)."""
    draws = draw_step_randomness(step)
    indices = runtime.global_batch_indices(step, global_batch, len(cache), data_seed)
    if confusable is not None:
        indices = shapescenes.draw_confusable(indices, draws[0].cpu().numpy() == 1, confusable, ground_confusable,
                                              data_seed, step)
    mine = runtime.rank_slice(global_batch, dist_ctx)
    indices, *draws = (x[mine] for x in (indices, *draws))
    total_loss, parts, data_seconds = 0.0, {}, 0.0
    for micro in range(grad_accum):
        part = slice(micro * batch_size, (micro + 1) * batch_size)
        tic = time.perf_counter()
        batch = cache.batch(indices[part])
        if ground_negatives:
            batch = shapescenes.step_negatives(batch, tokenizer, ground_negatives, seed, step, mine.start + part.start,
                                        rows=draws[0][part] == 1)
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        data_seconds += time.perf_counter() - tic
        # gradients are all-reduced only on the last micro-step (nanoGPT)
        if dist_ctx.ddp:
            train_model.require_backward_grad_sync = micro == grad_accum - 1
        with runtime.autocast(dev):
            loss, micro_parts = pmtp_loss(train_model, criterion, batch, *(x[part] for x in draws), ground_weight,
                                          idm_weight if idm else None)
        (loss / grad_accum).backward()
        total_loss += loss.item() / grad_accum
        for k, v in micro_parts.items():
            parts[k] = parts.get(k, 0.0) + v / grad_accum
    return total_loss, parts, data_seconds, guard.step(model, optimizer, grad_clip, step)


def validate(step):
    """The EMA model on the fixed validation set (rank 0): the checker's figures of its images, a
    sample grid and, with PMTP, its grounding of the true renders."""
    grid = os.path.join(out_dir, "samples", f"step{step:06d}.png")
    os.makedirs(os.path.dirname(grid), exist_ok=True)
    metrics = evaluate.evaluate(ema, val_set, tokenizer, sample_steps, cfg_scale, shift, grid_path=grid,
                                  judge=judge_grounder)
    log.write({"step": step, "train_seconds": train_seconds, "eval": metrics})
    tqdm.write(f"step {step}: val {evaluate.summary(metrics)} -> {grid}")


model.train()
progress = tqdm(total=max_steps, initial=step, disable=not dist_ctx.master, desc="pretrain")
window_start, window_data, window_steps = time.perf_counter(), 0.0, 0
train_seconds = 0.0  # time in training steps of this process, evaluations and checkpoints excluded (bench.py curve)
while step < max_steps:
    step_start = time.perf_counter()
    step_lr = runtime.learning_rate(step, lr, min_lr, warmup_steps, lr_decay_steps, schedule)
    for group in optimizer.param_groups:
        group["lr"] = step_lr
    loss, parts, data_seconds, updated = train_step(step)
    if updated:
        runtime.update_ema(ema, model, ema_decay, step)
    train_seconds += time.perf_counter() - step_start
    step += 1
    loss = dist_ctx.all_reduce_mean(loss)
    parts = {k: dist_ctx.all_reduce_mean(v) for k, v in parts.items()}
    window_data, window_steps = window_data + data_seconds, window_steps + 1
    progress.update(1)
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{step_lr:.2e}")
    if step % log_interval == 0 or step == max_steps:
        elapsed = time.perf_counter() - window_start
        log.write({"step": step, "loss": loss, **parts, "lr": step_lr, "steps_per_s": window_steps / elapsed,
                   "images_per_s": window_steps * global_batch / elapsed, "data_wait": window_data / elapsed,
                   "train_seconds": train_seconds})
        window_start, window_data, window_steps = time.perf_counter(), 0.0, 0
    if dist_ctx.master and ((eval_interval and step % eval_interval == 0) or step == max_steps) and val_scenes:
        validate(step)
    if dist_ctx.master and ((ckpt_interval and step % ckpt_interval == 0) or step == max_steps):
        runtime.save_checkpoint(ckpt_path, model, ema, optimizer, tokenizer, config, step)
progress.close()
if dist_ctx.master:
    print(f"done: checkpoint {ckpt_path}, log {log.path}")
dist_ctx.close()
