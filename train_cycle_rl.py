"""
Stage 3 of EchoGen, Cycle RL (docs/design.md "The three stages", 3, and "SDE for flow models"): layouts
only, no images. The policy is the generator sampled through the SDE of sampler.py; the reward is
the model's own grounding of what it generated, against the layout it was asked for.

Per update:
  1. layouts_per_update layouts per rank from the world's scene sampler (shapescenes.sample_scene, no images;
     min_objects..max_objects objects, a heldout_share of them of the held-out pairs no training image shows),
     or, on real data (--dataset=coco:..., by default the checkpoint's own), from its training annotations;
  2. group_size samples of each through the SDE (same_noise: the G samples share their initial
     noise and differ by the SDE's noise alone), every stochastic step's transition and log-prob kept;
  3. rewards (rewards.layout_reward): IoU + confidence from a frozen copy of the model's own head,
     refreshed every reward_refresh updates (or, reward_ckpt, a fixed standalone detector); for
     diagnosis, reward_kind = "checker" puts the rule-based checker's verdict in its place;
  4. advantages: GRPO (algo = "grpo"), per group mean / std, groups whose rewards are all equal
     skipped; PPO (algo = "ppo", I-DRUID), r - phi(x_t, t, layout) from a small MLP critic trained on
     the rewards (rewards.ValueCritic);
  5. the clipped ratio objective over the trained steps (train_steps: "all", "early" = the first
     train_fraction of the stochastic steps, the high-noise ones, or "random" = a random
     train_fraction of them each update), plus kl_weight times the closed-form KL to the frozen
     reference policy (the init checkpoint) per step, gradient clipping, minibatches optimizer steps
     per update (the first sees a ratio of exactly 1, the later ones the clip); for a model with
     IDM (the checkpoint's ModelConfig.idm), plus idm_weight times L_dis of those same velocity
     passes (logged as "idm"), so that RL does not undo the disentangling;
  6. ground_generated (on by default): generated images whose reward reaches ground_threshold
     train the grounding head with their own layouts as targets (the cycle's gift to grounding).
Logs per update: mean reward, std of the reward within groups, KL, clip fraction, approx-KL, and on
ShapeScenes the rule-based checker on the update's own samples (never part of the reward): their ISR
(sample_isr), the share of groups whose rewards all tie (tie_groups, skipped by GRPO) and the
correlation of reward and checker ISR, over all samples and within groups; every
eval_interval updates the rule-based checker's ISR / mIoU of the EMA model on the fixed validation
set (so reward hacking shows as a rising reward with a flat checker), its grounding, a sample grid,
and out_dir/reward.png: the reward against updates above the checker's ISR (curve.plot_cycle_rl).

    python train_cycle_rl.py                                          # from out/pretrain/ckpt, CPU is fine
    python train_cycle_rl.py --algo=ppo --out_dir=out/cycle_rl_ppo
    python train_cycle_rl.py --init_from=resume                       # continue out_dir/ckpt exactly
    torchrun --standalone --nproc_per_node=8 train_cycle_rl.py --init_from=out/pretrain_gpu/ckpt --out_dir=out/cycle_rl_gpu
Any config value below can be overridden: --key=value, or a config file of assignments. The
model's architecture comes from the checkpoint.

Exact resume: the layouts, initial noise, SDE noise and trained-step choice of update u are pure
functions of (seed, u, rank); the reference policy is re-read from the init checkpoint named in the
saved config; the reward copy is refreshed from the current weights at every multiple of
reward_refresh, so ckpt_interval must be a multiple of reward_refresh. The PPO critic and its
optimizer live in ckpt/critic.pt.
"""

import copy
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import curve  # the reward / checker plot
import data
import layouts
import runtime
import shapescenes
import detector
import evaluate
import rewards
import objectives
import sampler
from model import EchoGen

# -----------------------------------------------------------------------------
# config
# I/O
out_dir = "out/cycle_rl"
init_from = "out/pretrain/ckpt"  # a PMTP (or DJO) checkpoint folder, or "resume" (from out_dir/ckpt)
log_interval = 1  # updates between JSONL log lines
eval_interval = 25  # updates between checker figures and a sample grid (0 = only at the end)
ckpt_interval = 25  # a multiple of reward_refresh (exact resume)
val_scenes = 64  # the fixed validation set ("val", seed 0)
eval_steps = 25  # Euler steps of the validation figures: evaluate.py's and the other scripts', so that they agree
# layouts
dataset = ""  # "" = the checkpoint's own; on real data (coco:...) the layouts are its training annotations (no images)
data_dir = "data"  # where a real data set's cache lives
judge = ""  # real data: a StandaloneDetector checkpoint that scores the validation images (ISR, mIoU)
layout_seed = 0
min_objects = 1  # ShapeScenes layouts only: a real data set's layouts hold what their images hold
max_objects = 4
heldout_share = 0.0  # ShapeScenes: the share of layouts made of the held-out (color, shape) pairs, which no training
# image shows; Cycle RL needs no images, so it may train on them (the fixed heldout set's scenes are other seeds)
# sampling the policy
layouts_per_update = 4  # per rank
group_size = 8  # G samples per layout
same_noise = False  # True: the G samples of a layout share their initial noise
sample_steps = 10
cfg_scale = 3.0
shift = 1.0
sde_noise_level = 0.7  # the SDE's noise level a: sigma_t = a sqrt(t / (1 - t))
sde_window_start = 0  # the stochastic steps are [start, end) of the schedule; the rest are ODE steps
sde_window_end = 3  # -1 = sample_steps; the first 3 of 10: the high-noise steps, where the layout is decided (Flow-GRPO-Fast)
train_steps = "all"  # "all", "early" (the first train_fraction of the stochastic steps) or "random"
train_fraction = 0.5
# the objective
algo = "grpo"  # "grpo" or "ppo"
clip_range = 1e-3  # on the ratio of per-dimension-mean log-probs (sampler.sde_step_with_logprob)
adv_clip = 5.0
adv_eps = 1e-4
kl_weight = 1.0  # 0.01 let the policy drift: val ISR 0.95 -> 0.69 in 40 updates (docs/cycle_rl.md, the KL sweep)
idm_weight = 0.01  # L_dis on the policy's velocity passes, for a model with IDM (ignored without); untuned
minibatches = 2  # optimizer steps per update, each over a share of the samples and all trained steps
# reward
reward_kind = "grounding"  # "grounding" (the layout reward); "checker" (ShapeScenes: the checker's verdict itself, an
# oracle that agrees with the verdict by construction: what RL could do with a reward that sees what the checker sees,
# for diagnosis, never the method); "brightness" (analytic, inside the boxes: tests the loop)
reward_ckpt = ""  # "" = the model's own head (a frozen copy); else a grounder checkpoint (StandaloneDetector)
reward_refresh = 5  # updates between refreshes of the frozen own-head copy
# the cycle's gift to grounding
ground_generated = True
ground_threshold = 1.5  # the reward from which an image trains the head (IoU + confidence is in [0, 2]; the
# checker's reward, its share of passed instances, in [0, 1])
ground_weight = 0.1
ground_negatives = -1  # hard negative phrases per such image (shapescenes.add_hard_negatives); -1 = as the checkpoint's PMTP
# the PPO critic
critic_lr = 1e-3
critic_hidden = 128
# optimizer
lr = 1e-4
min_lr = 1e-4
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
schedule = "constant"
warmup_steps = 0
max_steps = 200  # updates
lr_decay_steps = 200
ema_decay = 0.99
# system
device = "auto"
compile = False
seed = 4242
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
globals().update(runtime.configure({k: globals()[k] for k in config_keys}, sys.argv[1:]))
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------

dist_ctx = runtime.Dist(device)
dev = dist_ctx.device
if reward_kind not in ("grounding", "checker", "brightness"):
    runtime.fail(f"reward_kind must be 'grounding', 'checker' or 'brightness', got {reward_kind!r}")
if algo not in ("grpo", "ppo"):
    runtime.fail(f"algo must be 'grpo' or 'ppo', got {algo!r}")
if train_steps not in ("all", "early", "random"):
    runtime.fail(f"train_steps must be 'all', 'early' or 'random', got {train_steps!r}")
if sde_noise_level <= 0:
    runtime.fail(f"sde_noise_level must be > 0 (the policy needs stochastic steps), got {sde_noise_level}")
if ckpt_interval and ckpt_interval % reward_refresh:
    runtime.fail(f"ckpt_interval {ckpt_interval} must be a multiple of reward_refresh {reward_refresh} (exact resume)")
if algo == "grpo" and group_size < 2:
    runtime.fail(f"GRPO needs group_size >= 2, got {group_size}")
samples_per_rank = layouts_per_update * group_size
if samples_per_rank % minibatches:
    runtime.fail(f"layouts_per_update * group_size = {samples_per_rank} must be a multiple of minibatches {minibatches}")
try:
    sde_window = (sde_window_start, sample_steps if sde_window_end == -1 else sde_window_end)
    stochastic = sampler.stochastic_steps(sample_steps, sde_window)
except ValueError as e:
    runtime.fail(str(e))
ckpt_path = os.path.join(out_dir, "ckpt")
# resume reads the newest complete checkpoint, wherever a kill inside a save left it (runtime.save_checkpoint)
source = runtime.checkpoint_folder(ckpt_path) if init_from == "resume" else init_from

# the policy, its EMA and optimizer; the frozen reference policy (the init checkpoint's weights)
saved = runtime.read_checkpoint_config(source)
if saved["kind"] != "EchoGen" or not saved["model"].get("grounding"):
    runtime.fail(f"checkpoint '{source}': Cycle RL needs an EchoGen model with a grounding head (a PMTP checkpoint)")
reference_path = saved["train"].get("rl_reference", source) if init_from == "resume" else source
config["rl_reference"] = reference_path  # saved with every checkpoint, so a resume finds its reference
if ground_negatives == -1:
    config["ground_negatives"] = ground_negatives = saved["train"].get("ground_negatives", 0)
model, tokenizer, _ = runtime.load_model(source, EchoGen, "model", dev)
model_config = model.config
res, max_instances = model_config.res, model_config.max_instances
idm_term = idm_weight if model_config.idm else None  # the weight of L_dis, None for a model without IDM
if not 1 <= min_objects <= max_objects <= min(max_instances, shapescenes.MAX_OBJECTS):
    runtime.fail(f"need 1 <= min_objects <= max_objects <= {min(max_instances, shapescenes.MAX_OBJECTS)} "
                 f"(the model's max_instances), got {min_objects}, {max_objects}")
ema = copy.deepcopy(model).requires_grad_(False)
ema.load_state_dict(runtime.load_weights(source, "ema", EchoGen))
reference = copy.deepcopy(model).requires_grad_(False)
reference.load_state_dict(runtime.load_weights(reference_path, "model", EchoGen))
optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(beta1, beta2), weight_decay=weight_decay,
                              fused=dev.type == "cuda")
step = runtime.load_train_state(source, model, ema, optimizer) if init_from == "resume" else 0
critic = critic_optimizer = None
if algo == "ppo":
    torch.manual_seed(seed)
    critic = rewards.ValueCritic(model_config.channels, max_instances, hidden=critic_hidden).to(dev)
    critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=critic_lr)
    if init_from == "resume":
        def restore_critic(state):
            critic.load_state_dict(state["critic"])
            critic_optimizer.load_state_dict(state["optimizer"])
        runtime.load_state_file(source, "critic.pt", restore_critic, " (a PPO resume needs its critic)")
criterion = objectives.GroundingCriterion()

# the reward's grounder: a frozen copy of the model's own head, or a fixed judge
if reward_ckpt:
    grounder = detector.load_grounder(reward_ckpt, dev)
    if grounder.res != res:
        runtime.fail(f"reward_ckpt '{reward_ckpt}': grounder of resolution {grounder.res}, the model makes {res}")
    reward_model = None
else:
    reward_model = copy.deepcopy(model).eval().requires_grad_(False)
    grounder = detector.Grounder("EchoGen", reward_model, tokenizer, res, max_instances, dev)
config["dataset"] = dataset = dataset or saved["train"].get("dataset", "shapescenes")
if ground_generated and ground_negatives and dataset != "shapescenes":
    runtime.fail(f"ground_negatives {ground_negatives}: hard negatives swap ShapeScenes' shape and color words; "
                 f"set ground_negatives=0 for dataset {dataset!r}")
if dataset == "shapescenes":
    layout_pool, val_set = None, shapescenes.make_scene_set("val", val_scenes, seed=0)
else:  # the training scenes' layouts, their captions picked with the checkpoint's tokenizer; a bad spec stops here
    real, _, val_set = data.load_dataset_on_ranks(dist_ctx, dataset, res, max_instances, data_dir,
                                                  val_scenes=val_scenes, tokenizer=tokenizer)
    layout_pool = real.scenes
    if reward_ckpt and grounder.tokenizer.get_vocab() != tokenizer.get_vocab():
        runtime.fail(f"reward_ckpt '{reward_ckpt}': its tokenizer differs from the model's (train both on the same dataset)")
if reward_kind == "checker" and dataset != "shapescenes":
    runtime.fail(f"reward_kind 'checker': the rule-based checker exists for ShapeScenes only, not for dataset {dataset!r}")
judge_grounder = detector.load_grounder(judge, dev) if judge else None
if dist_ctx.master:
    print(f"Cycle RL ({algo}) from {source}: {model.num_params() / 1e6:.2f}M parameters, res {res}, "
          f"{layouts_per_update} layouts x {group_size} samples on each of {dist_ctx.world} x {dev.type}, "
          f"stochastic steps {stochastic[0]}..{stochastic[-1]} of {sample_steps}, from update {step}")

# train mode throughout, for sampling too: there is no dropout, and it keeps nn.TransformerEncoder off its
# eval-mode fast path, so that sampling and scoring share one numerical path (sampler.policy_step)
model.train()
reference.train()
if compile:
    model.compile_blocks()  # before the DDP wrap (nanoGPT)
# the velocity pass leaves the grounding head unused (and the grounding pass the velocity head)
train_model = DDP(model, device_ids=[dist_ctx.local_rank] if dev.type == "cuda" else None,
                  find_unused_parameters=True) if dist_ctx.ddp else model
log = runtime.JsonlLog(os.path.join(out_dir, "log.jsonl"), dist_ctx.master, from_step=step)
guard = runtime.UpdateGuard(log)


def layout_split(rng):
    # no draw at heldout_share = 0, so that the layouts stay those of a run without the option
    return "heldout" if heldout_share and rng.random() < heldout_share else "train"


def draw_layouts(update):
    """This rank's layouts of an update, each repeated group_size times (groups contiguous): the
    scenes and their collated conditions on the device. Real data: layouts drawn from its annotations."""
    first = dist_ctx.rank * layouts_per_update
    rngs = [np.random.default_rng([layout_seed, update, first + i]) for i in range(layouts_per_update)]
    if layout_pool is None:
        scenes = [shapescenes.sample_scene(rng, (min_objects, max_objects), layout_split(rng)) for rng in rngs]
    else:
        scenes = [layout_pool[int(rng.integers(len(layout_pool)))] for rng in rngs]
    batch = layouts.collate(scenes, None, tokenizer, max_instances)
    return scenes, {k: v.repeat_interleave(group_size, dim=0).to(dev) for k, v in batch.items()}


def draw_noise(update):
    """Initial noise of the global batch from (seed, update); this rank's slice."""
    g = runtime.step_generator(seed, update, dev)
    n_global = dist_ctx.world * layouts_per_update
    shape = (model_config.channels, res, res)
    if same_noise:
        noise = torch.randn((n_global, *shape), generator=g, device=dev).repeat_interleave(group_size, dim=0)
    else:
        noise = torch.randn((n_global * group_size, *shape), generator=g, device=dev)
    return noise[dist_ctx.rank * samples_per_rank:(dist_ctx.rank + 1) * samples_per_rank]


def gather(values):
    """(n,) on every rank -> (world * n,) in rank order."""
    if not dist_ctx.ddp:
        return values
    parts = [torch.empty_like(values) for _ in range(dist_ctx.world)]
    dist.all_gather(parts, values.contiguous())
    return torch.cat(parts)


def trained_steps(update, n_stochastic):
    """Indices into the recorded stochastic steps that the objective covers this update."""
    if train_steps == "all":
        return list(range(n_stochastic))
    k = max(1, math.ceil(train_fraction * n_stochastic))
    if train_steps == "early":  # the first ones: the high-noise steps, where the layout is decided
        return list(range(k))
    g = torch.Generator().manual_seed(seed * 7919 + update)
    return sorted(torch.randperm(n_stochastic, generator=g)[:k].tolist())


def train_critic(trajectory, batch, reward, steps, update):
    """One critic step: MSE of phi(x_t, t, layout) to the reward at the trained steps; -> (S, B) values
    before the step (the baseline of PPO's advantage). Gradients averaged over ranks by hand."""
    x_t = trajectory["x_t"][steps]  # (S, B, C, R, R)
    S, B = x_t.shape[:2]
    t = trajectory["t"][steps].to(dev).float().repeat_interleave(B)
    values = critic(x_t.flatten(0, 1), t, batch["boxes"].repeat(S, 1, 1), batch["instance_mask"].repeat(S, 1))
    loss = (values - reward.repeat(S)).pow(2).mean()
    loss.backward()
    if dist_ctx.ddp:
        for p in critic.parameters():
            dist.all_reduce(p.grad)
            p.grad /= dist_ctx.world
    guard.step(critic, critic_optimizer, 0.0, update, "critic")
    return values.detach().view(S, B), loss.item()


def policy_update(trajectory, batch, advantages, weight, steps, update):
    """The clipped objective + KL over the trained steps, in `minibatches` optimizer steps.
    advantages (S, B) per trained step, weight (B,) 1 for rows that train, 0 for skipped ones.
    -> the log's statistics, averaged, with "updated": how many minibatch steps changed the weights."""
    # ratio_error: max |ratio - 1| of the first minibatch, scored before any optimizer step: the policy
    # must score its own samples exactly as it sampled them, so anything but 0 is a bug
    stats = {"kl": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "policy_loss": 0.0, "ratio_error": 0.0, "updated": 0}
    if idm_term is not None:
        stats["idm"] = 0.0
    per_minibatch = samples_per_rank // minibatches
    n_terms = minibatches * len(steps)
    for m in range(minibatches):
        rows = slice(m * per_minibatch, (m + 1) * per_minibatch)
        sub = {k: v[rows] for k, v in batch.items()}
        w = weight[rows]
        # the rows that train, counted over every rank's minibatch (DETR's num_boxes): DDP's average
        # of the ranks' gradients is then the gradient of one rank holding them all
        denominator = max(dist_ctx.all_reduce_mean(w.sum().item()), 1e-6)  # no row trains: 0 / 1e-6 = 0
        for i, s in enumerate(steps):
            t, t_next = float(trajectory["t"][s]), float(trajectory["t_next"][s])
            x_t, x_next = trajectory["x_t"][s][rows], trajectory["x_next"][s][rows]
            if dist_ctx.ddp:  # gradients are all-reduced with the last step's backward (nanoGPT)
                train_model.require_backward_grad_sync = i == len(steps) - 1
            out = sampler.policy_step(train_model, sub, x_t, t, t_next, cfg_scale, sde_noise_level, prev_sample=x_next)
            with torch.no_grad():
                ref = sampler.policy_step(reference, sub, x_t, t, t_next, cfg_scale, sde_noise_level, prev_sample=x_next)
            kl = sampler.gaussian_step_kl(out.mean, ref.mean, out.std)
            old_log_prob = trajectory["log_prob"][s][rows]
            policy_loss, step_stats = rewards.clipped_policy_loss(out.log_prob, old_log_prob, advantages[i][rows],
                                                                  clip_range)
            if m == 0:
                ratio_error = (out.log_prob.detach() - old_log_prob).exp().sub(1).abs().max().item()
                stats["ratio_error"] = max(stats["ratio_error"], ratio_error)
            loss = ((policy_loss + kl_weight * kl) * w).sum() / denominator / len(steps)
            if idm_term is not None:  # over all rows, skipped groups too: L_dis needs no reward
                loss = loss + idm_term * out.idm_loss / len(steps)
                stats["idm"] += out.idm_loss.item() / n_terms
            loss.backward()
            stats["kl"] += (kl * w).sum().item() / denominator / n_terms
            stats["policy_loss"] += (policy_loss * w).sum().item() / denominator / n_terms
            stats["clip_frac"] += step_stats["clip_frac"] / n_terms
            stats["approx_kl"] += step_stats["approx_kl"] / n_terms
        stats["updated"] += guard.step(model, optimizer, grad_clip, update, f"policy minibatch {m}")
    return stats


def ground_generated_images(images, batch, reward, update):
    """Generated images whose reward reaches ground_threshold train the grounding head, their layouts
    as targets (clean images, t = 0), with ground_negatives hard negative phrases each, as in PMTP.
    Every rank runs it (DDP), a rank without such images with no targets. -> (the loss, the number
    of images used)."""
    use = reward >= ground_threshold
    if ground_negatives:  # seeded by the update and each image's place in the global batch (resume, DDP)
        first = dist_ctx.rank * samples_per_rank
        batch = shapescenes.add_hard_negatives(batch, tokenizer, ground_negatives,
                                        [[seed, update, first + j] for j in range(samples_per_rank)])
    B = images.shape[0]
    task = torch.ones(B, dtype=torch.long, device=dev)
    with runtime.autocast(dev):
        grounding = train_model(images.detach(), torch.zeros(B, device=dev), batch["caption_ids"],
                                batch["phrase_ids"], batch["boxes"], batch["instance_mask"], task).grounding
    loss = criterion(grounding, batch["boxes"], batch["phrase_ids"], batch["instance_mask"] & use[:, None],
                     batch.get("negative"))["loss"]
    (ground_weight * loss).backward()
    guard.step(model, optimizer, grad_clip, update, "grounding of the generated images")
    return loss.item(), int(use.sum())


def checker_per_image(images, scenes):
    """The rule-based checker on this rank's generated images (B,): each image's share of passed
    instances. Logged beside the reward to show whether the reward agrees with the checker; it never
    enters the reward."""
    pictures = sampler.to_uint8(images)
    return torch.tensor([float(np.mean([shapescenes.check_instance(picture, inst)["success"]
                                        for inst in scenes[j // group_size]["instances"]]))
                         for j, picture in enumerate(pictures)], device=dev)


def rl_update(update):
    """Sample, reward, advantages, the policy steps (and the critic's, the head's) of one update."""
    scenes, batch = draw_layouts(update)
    # the SDE's noise: a generator per sample, seeded by the update and the sample's place in the
    # global batch, so that N ranks draw what one rank draws
    first = dist_ctx.rank * samples_per_rank
    sde_generators = [runtime.step_generator(seed + 7919 * (first + j + 1), update, dev) for j in range(samples_per_rank)]
    # sampled in the minibatches that policy_update will score, so that the first one's ratio is
    # exactly 1 (a matmul over another batch size may round differently)
    noise, per_minibatch = draw_noise(update), samples_per_rank // minibatches
    rows = [slice(m * per_minibatch, (m + 1) * per_minibatch) for m in range(minibatches)]
    parts = [sampler.sample_sde(model, {k: v[r] for k, v in batch.items()}, noise[r], sample_steps, cfg_scale, shift,
                                sde_noise_level, sde_generators[r], sde_window) for r in rows]
    trajectory = {"x0": torch.cat([p["x0"] for p in parts]),  # (B, C, R, R); the steps' records are (S, B, ...)
                  **{k: torch.cat([p[k] for p in parts], dim=1) for k in ("x_t", "x_next", "log_prob")},
                  **{k: parts[0][k] for k in ("t", "t_next", "step")}}
    # ShapeScenes: the checker judges the policy's own samples (logged beside the reward, or the oracle reward)
    checker = checker_per_image(trajectory["x0"], scenes) if layout_pool is None else None
    if reward_kind == "brightness":
        brightness = rewards.brightness_reward(trajectory["x0"], batch["boxes"], batch["instance_mask"])
        scored = {"reward": brightness, "iou": torch.zeros_like(brightness), "confidence": torch.zeros_like(brightness)}
    elif reward_kind == "checker":
        scored = {"reward": checker, "iou": torch.zeros_like(checker), "confidence": torch.zeros_like(checker)}
    else:
        with runtime.autocast(dev):
            scored = rewards.layout_reward(grounder, trajectory["x0"], batch)
    reward = scored["reward"].float()
    steps = trained_steps(update, len(trajectory["step"]))
    record = {}
    if algo == "grpo":
        advantages = rewards.group_advantages(reward, group_size, adv_eps, adv_clip)
        # a group whose samples all scored the same carries no signal: it is skipped
        weight = (reward.view(-1, group_size).std(1) > 0).float().repeat_interleave(group_size)
        advantages = advantages[None].expand(len(steps), -1)
    else:
        values, record["critic_loss"] = train_critic(trajectory, batch, reward, steps, update)
        advantages = rewards.critic_advantages(reward, values, normalize=False)  # (S, B)
        everyone = gather(advantages.flatten())  # normalized over the gathered batch, as one rank would
        advantages = ((advantages - everyone.mean()) / (everyone.std(unbiased=False) + adv_eps)).clamp(-adv_clip, adv_clip)
        weight = torch.ones_like(reward)
    record.update(policy_update(trajectory, batch, advantages, weight, steps, update))
    if ground_generated:
        record["ground_loss"], n_used = ground_generated_images(trajectory["x0"], batch, reward, update)
        record["ground_images"] = dist_ctx.all_reduce_mean(n_used) * dist_ctx.world
    all_rewards = gather(reward)
    record.update(reward=all_rewards.mean().item(),
                  reward_std_in_group=all_rewards.view(-1, group_size).std(1, unbiased=False).mean().item(),
                  reward_iou=dist_ctx.all_reduce_mean(scored["iou"].mean().item()),
                  reward_conf=dist_ctx.all_reduce_mean(scored["confidence"].mean().item()))
    if checker is not None:
        record.update(rewards.agreement(all_rewards, gather(checker), group_size))
    for key in ("kl", "clip_frac", "approx_kl", "policy_loss", "critic_loss", "ground_loss", "idm"):
        if key in record:
            record[key] = dist_ctx.all_reduce_mean(record[key])
    record["ratio_error"] = dist_ctx.all_reduce_max(record["ratio_error"])
    return record, trajectory["x0"], scenes


REWARD_LABELS = {"grounding": "reward (IoU + confidence)", "checker": "reward (the checker's ISR: oracle)",
                 "brightness": "reward (brightness inside the boxes)"}


def validate(update):
    """The EMA model on the fixed validation set (rank 0): checker figures, grounding, a sample grid."""
    grid = os.path.join(out_dir, "samples", f"update{update:06d}.png")
    os.makedirs(os.path.dirname(grid), exist_ok=True)
    ema.eval()
    metrics = evaluate.evaluate(ema, val_set, tokenizer, eval_steps, cfg_scale, shift, grid_path=grid,
                                  judge=judge_grounder)
    log.write({"step": update, "eval": metrics})
    curve.plot_cycle_rl(curve.read_log(log.path), os.path.join(out_dir, "reward.png"), f"Cycle RL ({algo}), {out_dir}",
                        REWARD_LABELS[reward_kind])
    tqdm.write(f"update {update}: val {evaluate.summary(metrics)} -> {grid}")


def save(update):
    extra = None if critic is None else {"critic.pt": {"critic": critic.state_dict(),
                                                       "optimizer": critic_optimizer.state_dict()}}
    runtime.save_checkpoint(ckpt_path, model, ema, optimizer, tokenizer, config, update, extra)


if dist_ctx.master and step == 0 and val_scenes:
    validate(0)  # the starting point, for the before / after comparison
progress = tqdm(total=max_steps, initial=step, disable=not dist_ctx.master, desc=f"cycle-rl {algo}")
window_start = time.perf_counter()
while step < max_steps:
    if reward_model is not None and step % reward_refresh == 0:
        reward_model.load_state_dict(model.state_dict())  # the frozen own-head grounder, refreshed
    step_lr = runtime.learning_rate(step, lr, min_lr, warmup_steps, lr_decay_steps, schedule)
    for group in optimizer.param_groups:
        group["lr"] = step_lr
    record, images, scenes = rl_update(step)
    if record["updated"]:  # all of its policy steps skipped (runtime.UpdateGuard): the weights, EMA too, stay
        runtime.update_ema(ema, model, ema_decay, step)
    step += 1
    progress.update(1)
    progress.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.2e}")
    if step % log_interval == 0 or step == max_steps:
        log.write({"step": step, **record, "lr": step_lr, "seconds": time.perf_counter() - window_start})
        window_start = time.perf_counter()
    if dist_ctx.master and val_scenes and ((eval_interval and step % eval_interval == 0) or step == max_steps):
        validate(step)
        # the policy's own samples of this update, one row per group, the asked boxes drawn over them
        rows = [[layouts.draw_boxes(image, scene) for image in sampler.to_uint8(images[i * group_size:(i + 1) * group_size])]
                for i, scene in enumerate(scenes)]
        layouts.save_grid(os.path.join(out_dir, "samples", f"update{step:06d}_groups.png"), rows)
    if dist_ctx.master and ((ckpt_interval and step % ckpt_interval == 0) or step == max_steps):
        save(step)
progress.close()
if dist_ctx.master:
    print(f"done: checkpoint {ckpt_path}, log {log.path}")
dist_ctx.close()
