"""
Stage 2 of EchoGen, DJO (dual joint optimization, docs/design.md "The three stages"): from a PMTP
checkpoint, the two tasks are chained through each other so that each supervises the other
(objectives.djo_loss), while the stage-1 losses stay on so that neither skill is forgotten:
- layout -> image -> layout: the one-step estimate x0_hat = x_t - t * v_hat of a generation sample
  is grounded by the model's own head and compared with the asked layout (L1 + GIoU after
  matching). The grounding pass runs with frozen parameters, so this loss trains the generator,
  through x0_hat, to make images whose objects are where the layout says, and cannot teach the
  head to accept bad images. Only the lower-noise half is used, t ~ U[0, cycle_t_max]: at higher
  noise x0_hat is a blur whose boxes mean nothing.
- image -> layout -> image: a real image is grounded, and the predicted boxes condition the flow
  loss on that same image. The boxes are detached by default (detach_boxes): otherwise the head
  would be rewarded for boxes that make denoising easy rather than boxes that are right, and the
  head already has its own supervised loss.

    python train_joint.py                                   # from out/pretrain/ckpt, tiny config, CPU is fine
    torchrun --standalone --nproc_per_node=8 train_joint.py --init_from=out/pretrain_gpu/ckpt --out_dir=out/joint_gpu
    python train_joint.py --init_from=resume                # continue out_dir/ckpt exactly
Any config value below can be overridden: --key=value, or a config file of assignments. The
model's architecture comes from the checkpoint; from a checkpoint with IDM (train_pretrain.py
--idm=True), idm_weight * L_dis joins the loss and is logged as "idm".
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
import shapescenes
import detector
import evaluate
import objectives
from model import EchoGen
from objectives import djo_loss, sample_pmtp_draws, sample_timesteps

# -----------------------------------------------------------------------------
# config
# I/O
out_dir = "out/joint"
init_from = "out/pretrain/ckpt"  # a PMTP checkpoint folder, or "resume" (from out_dir/ckpt)
log_interval = 10
eval_interval = 250  # 0 = only at the end
ckpt_interval = 250
# data
dataset = ""  # "" = the checkpoint's own; else shapescenes or coco:INSTANCES.json:IMAGE_DIR[:CAPTIONS.json][:key=value ...]
judge = ""  # real data: a StandaloneDetector checkpoint that scores the validation images (ISR, mIoU)
data_dir = "data"
cache_scenes = 20000
data_seed = 1  # another order than stage 1's
val_scenes = 64
# optimizer
batch_size = 32  # per rank and micro-step
grad_accum = 1
lr = 3e-4
min_lr = 3e-5
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
schedule = "cosine"
warmup_steps = 50
max_steps = 1000
lr_decay_steps = 1000
ema_decay = 0.999
# stage-1 losses, kept on (as in train_pretrain.py)
cond_drop = 0.1
ground_every = 2
ground_weight = 0.1
ground_clean = 0.5
ground_t_max = 0.5
ground_negatives = -1  # hard negative phrases per grounding sample, as in train_pretrain.py (-1 = 2 on ShapeScenes):
#                        without them DJO unlearns what PMTP's head learned about absent shapes
# the DJO chains
cycle_weight = 0.1  # layout -> image -> layout (DETR L1 + GIoU, the scale of ground_weight's terms)
cycle_t_max = 0.5  # x0_hat is grounded only for t ~ U[0, cycle_t_max]
recon_weight = 1.0  # image -> layout -> image (a flow loss, the scale of stage 1's)
detach_boxes = True  # the predicted boxes of image -> layout -> image carry no gradient
recon_min_conf = 0.5  # image -> layout -> image trains on an image only if the head's confidence in each box (its
#                      IoU estimate) reaches this; at 0 the head's wrong boxes cost 0.07-0.10 ISR (docs/djo.md)
# IDM's disentangle constraint, for a model with IDM (the checkpoint's ModelConfig.idm; ignored without)
idm_weight = 0.1
# sampling for the validation figures
sample_steps = 25
cfg_scale = 3.0
shift = 1.0
# system
device = "auto"
compile = False
seed = 2024
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
globals().update(runtime.configure({k: globals()[k] for k in config_keys}, sys.argv[1:]))
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------

dist_ctx = runtime.Dist(device)
dev = dist_ctx.device
if not ground_every or batch_size % ground_every:
    runtime.fail(f"batch_size {batch_size} must be a multiple of ground_every {ground_every} (>= 1): "
                 "both chains need generation and grounding samples in every micro-batch")
global_batch = batch_size * grad_accum * dist_ctx.world
ckpt_path = os.path.join(out_dir, "ckpt")
# resume reads the newest complete checkpoint, wherever a kill inside a save left it (runtime.save_checkpoint)
source = runtime.checkpoint_folder(ckpt_path) if init_from == "resume" else init_from

# the model as stage 1 left it: its architecture, weights, EMA and tokenizer
saved = runtime.read_checkpoint_config(source)
if saved["kind"] != "EchoGen" or not saved["model"].get("grounding"):
    runtime.fail(f"checkpoint '{source}': DJO needs an EchoGen model with a grounding head (a PMTP checkpoint)")
model, tokenizer, _ = runtime.load_model(source, EchoGen, "model", dev)
model_config = model.config
res, max_instances = model_config.res, model_config.max_instances
ema = copy.deepcopy(model).eval().requires_grad_(False)
ema.load_state_dict(runtime.load_weights(source, "ema", EchoGen))
optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(beta1, beta2), weight_decay=weight_decay,
                              fused=dev.type == "cuda")
step = runtime.load_train_state(source, model, ema, optimizer) if init_from == "resume" else 0
criterion = objectives.GroundingCriterion()
cycle_criterion = objectives.GroundingCriterion(weights={"l1": 5.0, "giou": 2.0, "conf": 0.0})

# data, tokenized with the checkpoint's tokenizer: rank 0 prepares the cache once; the others wait and read it
config["dataset"] = dataset = dataset or saved["train"].get("dataset", "shapescenes")
config["ground_negatives"] = ground_negatives = shapescenes.resolve_ground_negatives(ground_negatives, dataset, ground_every)
cache, _, val_set = data.load_dataset_on_ranks(dist_ctx, dataset, res, max_instances, data_dir, cache_scenes, data_seed,
                                               val_scenes, tokenizer=tokenizer)
judge_grounder = detector.load_grounder(judge, dev) if judge else None
if dist_ctx.master:
    print(f"DJO from {source}: {model.num_params() / 1e6:.2f}M parameters, res {res}, "
          f"global batch {global_batch} on {dist_ctx.world} x {dev.type}, from step {step}")

model.train()
if compile:
    model.compile_blocks()  # before the DDP wrap (nanoGPT)
train_model = DDP(model, device_ids=[dist_ctx.local_rank] if dev.type == "cuda" else None) if dist_ctx.ddp else model
log = runtime.JsonlLog(os.path.join(out_dir, "log.jsonl"), dist_ctx.master, from_step=step)
guard = runtime.UpdateGuard(log)


def draw_step_randomness(step):
    """Stage 1's draws plus the chains' times, for the whole global batch, from (seed, step) alone."""
    g = runtime.step_generator(seed, step, "cpu")
    task, t, drop = sample_pmtp_draws(global_batch, ground_every, ground_clean, ground_t_max, cond_drop, g)
    t_cycle = torch.rand(global_batch, generator=g) * cycle_t_max
    t_recon = sample_timesteps(global_batch, g)
    noise = torch.randn((global_batch, 3, res, res), generator=runtime.step_generator(seed, step, dev), device=dev)
    return [x.to(dev) for x in (task, t, noise, drop, t_cycle, t_recon)]


def train_step(step):
    """One optimizer step over this rank's share of the global batch -> mean loss, its parts, and
    whether the weights were updated (runtime.UpdateGuard)."""
    indices = runtime.global_batch_indices(step, global_batch, len(cache), data_seed)
    mine = runtime.rank_slice(global_batch, dist_ctx)
    indices, *draws = (x[mine] for x in (indices, *draw_step_randomness(step)))
    total_loss, parts = 0.0, {}
    for micro in range(grad_accum):
        part = slice(micro * batch_size, (micro + 1) * batch_size)
        batch = cache.batch(indices[part])
        if ground_negatives:
            batch = shapescenes.step_negatives(batch, tokenizer, ground_negatives, seed, step, mine.start + part.start,
                                        rows=draws[0][part] == 1)
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        if dist_ctx.ddp:  # gradients are all-reduced only on the last micro-step (nanoGPT)
            train_model.require_backward_grad_sync = micro == grad_accum - 1
        with runtime.autocast(dev):
            loss, terms = djo_loss(train_model, model, criterion, cycle_criterion, batch, *(x[part] for x in draws),
                                   ground_weight, cycle_weight, recon_weight, detach_boxes,
                                   idm_weight if model_config.idm else None, recon_min_conf)
        (loss / grad_accum).backward()
        total_loss += loss.item() / grad_accum
        for k, v in terms.items():
            parts[k] = parts.get(k, 0.0) + (v.item() if torch.is_tensor(v) else v) / grad_accum
    return total_loss, parts, guard.step(model, optimizer, grad_clip, step)


def validate(step):
    """The EMA model on the fixed validation set (rank 0): checker figures, grounding, a sample grid."""
    grid = os.path.join(out_dir, "samples", f"step{step:06d}.png")
    os.makedirs(os.path.dirname(grid), exist_ok=True)
    metrics = evaluate.evaluate(ema, val_set, tokenizer, sample_steps, cfg_scale, shift, grid_path=grid,
                                  judge=judge_grounder)
    log.write({"step": step, "eval": metrics})
    tqdm.write(f"step {step}: val {evaluate.summary(metrics)} -> {grid}")


progress = tqdm(total=max_steps, initial=step, disable=not dist_ctx.master, desc="djo")
window_start, window_steps = time.perf_counter(), 0
while step < max_steps:
    step_lr = runtime.learning_rate(step, lr, min_lr, warmup_steps, lr_decay_steps, schedule)
    for group in optimizer.param_groups:
        group["lr"] = step_lr
    loss, parts, updated = train_step(step)
    if updated:
        runtime.update_ema(ema, model, ema_decay, step)
    step += 1
    loss = dist_ctx.all_reduce_mean(loss)
    parts = {k: dist_ctx.all_reduce_mean(v) for k, v in parts.items()}
    window_steps += 1
    progress.update(1)
    progress.set_postfix(loss=f"{loss:.4f}", cycle=f"{parts['cycle']:.3f}", recon=f"{parts['recon']:.3f}")
    if step % log_interval == 0 or step == max_steps:
        elapsed = time.perf_counter() - window_start
        log.write({"step": step, "loss": loss, **parts, "lr": step_lr, "steps_per_s": window_steps / elapsed})
        window_start, window_steps = time.perf_counter(), 0
    if dist_ctx.master and val_scenes and ((eval_interval and step % eval_interval == 0) or step == max_steps):
        validate(step)
    if dist_ctx.master and ((ckpt_interval and step % ckpt_interval == 0) or step == max_steps):
        runtime.save_checkpoint(ckpt_path, model, ema, optimizer, tokenizer, config, step)
progress.close()
if dist_ctx.master:
    print(f"done: checkpoint {ckpt_path}, log {log.path}")
dist_ctx.close()
