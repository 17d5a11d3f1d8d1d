"""
Training of the standalone grounding detector, the independent judge (detector.StandaloneDetector,
docs/grounding.md): true renders only, so that it never sees a generated image and cannot share a
generator's errors. DETR-style set loss (objectives.GroundingCriterion), AdamW, EMA, DDP, checkpoints
in the format of the other training scripts.

One process (R = 64, 3000 steps):
    python train_detector.py
A short CPU run (with OMP_NUM_THREADS=1 on a 2-core machine it took 5 min and reached val Acc@0.5
0.92, mIoU 0.78, AP 0.66 on the 64 validation scenes):
    python train_detector.py --max_steps=600 --lr_decay_steps=600 --warmup_steps=100 --cache_scenes=5000 \
        --eval_interval=200 --out_dir=out/detector_cpu
8 GPUs of one node:
    torchrun --standalone --nproc_per_node=8 train_detector.py --batch_size=32 --compile=True
On real data, the judge of layout-to-image (evaluate.py --judge): trained on the real training images
only, with the same data-set spec (hence the same cached tokenizer) as the generator:
    python train_detector.py --dataset=coco:INSTANCES.json:IMAGE_DIR[:CAPTIONS.json] --out_dir=out/coco_judge
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
import detector
import layouts
import objectives
import runtime
import shapescenes

# -----------------------------------------------------------------------------
# config
# I/O
out_dir = "out/detector"
init_from = "scratch"  # "scratch" or "resume" (from out_dir/ckpt)
log_interval = 10  # steps between JSONL log lines
eval_interval = 500  # steps between validation figures (0 = only at the end)
ckpt_interval = 500  # steps between checkpoints (always one at the end)
# data: the pre-rendered ShapeScenes cache (true renders only) and a fixed validation set, or a real
# data set's training images and its held-out ones (the judge of layout-to-image on real data)
dataset = "shapescenes"  # or coco:INSTANCES.json:IMAGE_DIR[:CAPTIONS.json][:key=value ...] (coco.DATASET_HELP)
data_dir = "data"
res = 64
cache_scenes = 20000
data_seed = 0
val_scenes = 64  # "val" split, seed 0 (never in the cache: its scenes come from another seed stream)
# model (detector.DetectorConfig)
backbone = "resnet18"
feature_level = 2
dim = 128
depth = 3
heads = 4
text_depth = 1
max_instances = 8
negatives = 0  # hard negative phrases per training scene (shapescenes.add_hard_negatives; ShapeScenes only): a
#                confidence that sees shapes and colors, not only boxes (the Cycle RL reward's judge); 0 = none
# optimizer
batch_size = 64  # per rank and micro-step; global batch = batch_size * grad_accum * world size
grad_accum = 1
lr = 1e-3
min_lr = 1e-4
weight_decay = 1e-4
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0
# lr schedule
schedule = "cosine"  # "cosine" or "constant" (both after a linear warmup)
warmup_steps = 200
max_steps = 3000
lr_decay_steps = 3000
ema_decay = 0.999  # 0 disables EMA (ema.safetensors then holds the raw weights)
# system
device = "auto"  # "auto", "cpu" or "cuda"
compile = False  # torch.compile the backbone and the head (CUDA)
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
if negatives and dataset != "shapescenes":
    runtime.fail(f"negatives: hard negative phrases swap ShapeScenes' shape and color words; "
                 f"set negatives=0 for dataset {dataset!r}")
global_batch = batch_size * grad_accum * dist_ctx.world
ckpt_path = os.path.join(out_dir, "ckpt")
torch.manual_seed(seed)  # same initial weights on every rank

# data: rank 0 renders the cache (on real data: reads the images, trains the tokenizer) once; the others wait and read it
cache, tokenizer, val_set = data.load_dataset_on_ranks(dist_ctx, dataset, res, max_instances, data_dir,
                                                       cache_scenes, data_seed, val_scenes)
val_images = data.scene_images(val_set, res)

# model, EMA, criterion, optimizer
model_config = detector.DetectorConfig(res=res, backbone=backbone, feature_level=feature_level, dim=dim, depth=depth,
                                       heads=heads, text_depth=text_depth, vocab_size=tokenizer.get_vocab_size(),
                                       max_phrase_len=layouts.MAX_PHRASE_LEN, max_instances=max_instances)
model = detector.StandaloneDetector(model_config).to(dev)
ema = copy.deepcopy(model).eval().requires_grad_(False) if ema_decay > 0 else model
criterion = objectives.GroundingCriterion()
optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(beta1, beta2), weight_decay=weight_decay,
                              fused=dev.type == "cuda")
step = 0
if init_from == "resume":
    source = runtime.checkpoint_folder(ckpt_path)  # the newest complete one, wherever a kill inside a save left it
    saved = runtime.read_checkpoint_config(source)
    if saved["kind"] != "StandaloneDetector":
        runtime.fail(f"checkpoint '{source}': holds a {saved['kind']}, not a StandaloneDetector")
    runtime.check_same_model_config(source, saved["model"], model_config)
    step = runtime.load_train_state(source, model, ema, optimizer)
if dist_ctx.master:
    print(f"StandaloneDetector: {model.num_params() / 1e6:.2f}M parameters, res {res}, "
          f"{model.grid}x{model.grid} feature tokens, global batch {global_batch} on {dist_ctx.world} x {dev.type}, "
          f"from step {step}")
if compile:
    model.backbone.compile()  # in place, before the DDP wrap: state_dict keys stay unprefixed
    model.head.compile()
device_ids = [dist_ctx.local_rank] if dev.type == "cuda" else None
train_model = DDP(model, device_ids=device_ids) if dist_ctx.ddp else model
log = runtime.JsonlLog(os.path.join(out_dir, "log.jsonl"), dist_ctx.master, from_step=step)
guard = runtime.UpdateGuard(log)


def train_step(step):
    """One optimizer step -> the mean losses and whether the weights were updated (runtime.UpdateGuard)."""
    indices = runtime.global_batch_indices(step, global_batch, len(cache), data_seed)
    indices = indices[runtime.rank_slice(global_batch, dist_ctx)]
    total = {}
    for micro in range(grad_accum):
        batch = cache.batch(indices[micro * batch_size:(micro + 1) * batch_size])
        if negatives:  # seeded by the step and each scene's place in the global batch (resume, DDP)
            first = runtime.rank_slice(global_batch, dist_ctx).start + micro * batch_size
            batch = shapescenes.add_hard_negatives(batch, tokenizer, negatives,
                                                   [[seed, step, first + j] for j in range(batch_size)])
        batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
        if dist_ctx.ddp:  # gradients are all-reduced only on the last micro-step (nanoGPT)
            train_model.require_backward_grad_sync = micro == grad_accum - 1
        with runtime.autocast(dev):
            outputs = train_model(batch["images"], batch["phrase_ids"], batch["instance_mask"])
        losses = criterion(outputs, batch["boxes"], batch["phrase_ids"], batch["instance_mask"], batch.get("negative"))
        (losses["loss"] / grad_accum).backward()
        for name in ("loss", "l1", "giou", "conf"):
            total[name] = total.get(name, 0.0) + losses[name].item() / grad_accum
    return total, guard.step(model, optimizer, grad_clip, step)


def validate(step):
    """The EMA weights' grounding of the validation renders (and, on ShapeScenes, what their confidence sees)."""
    ema.eval()
    ground = lambda batch: detector.decode_predictions(ema(batch["images"], batch["phrase_ids"], batch["instance_mask"]))
    with runtime.autocast(dev):
        boxes, scores = detector.ground_scenes(ground, val_set, val_images, tokenizer, max_instances, dev)
        presence = (detector.presence_confidence(ground, val_set, val_images, tokenizer, max_instances, dev)
                    if dataset == "shapescenes" else {})
    model.train()
    metrics = {k: round(v, 4) for k, v in detector.grounding_metrics(boxes, scores, val_set).items()} | presence
    log.write({"step": step, "eval": metrics})
    line = " ".join(f"{k} {v:.3f}" for k, v in presence.items())
    tqdm.write(f"step {step}: val Acc@0.5 {metrics['acc50']:.3f} mIoU {metrics['miou']:.3f} "
               f"AP {metrics['ap']:.3f} AP50 {metrics['ap50']:.3f} {line}")


model.train()
progress = tqdm(total=max_steps, initial=step, disable=not dist_ctx.master, desc="detector")
window_start, window_steps = time.perf_counter(), 0
while step < max_steps:
    step_lr = runtime.learning_rate(step, lr, min_lr, warmup_steps, lr_decay_steps, schedule)
    for group in optimizer.param_groups:
        group["lr"] = step_lr
    losses, updated = train_step(step)
    if updated and ema is not model:
        runtime.update_ema(ema, model, ema_decay, step)
    step += 1
    losses = {k: dist_ctx.all_reduce_mean(v) for k, v in losses.items()}
    window_steps += 1
    progress.update(1)
    progress.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{step_lr:.2e}")
    if step % log_interval == 0 or step == max_steps:
        elapsed = time.perf_counter() - window_start
        log.write({"step": step, **losses, "lr": step_lr, "steps_per_s": window_steps / elapsed,
                   "images_per_s": window_steps * global_batch / elapsed})
        window_start, window_steps = time.perf_counter(), 0
    if dist_ctx.master and val_scenes and ((eval_interval and step % eval_interval == 0) or step == max_steps):
        validate(step)
    if dist_ctx.master and ((ckpt_interval and step % ckpt_interval == 0) or step == max_steps):
        runtime.save_checkpoint(ckpt_path, model, ema, optimizer, tokenizer, config, step)
progress.close()
if dist_ctx.master:
    print(f"done: checkpoint {ckpt_path}, log {log.path}")
dist_ctx.close()
