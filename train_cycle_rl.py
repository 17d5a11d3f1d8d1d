"""
Stage 3 of EchoGen, Cycle RL (docs/design.md "The three stages", 3, and "SDE for flow models"): layouts
only, no images. The policy is the generator sampled through the SDE of sampler.py; the reward is
the model's own grounding of what it generated, against the layout it was asked for.

Per update:
  1. layouts_per_update layouts per rank from the world's scene sampler (shapescenes.sample_scene, no images;
     min_objects..max_objects objects, a heldout_share of them of the held-out pairs no training image shows),
     or, on real data (--dataset=coco:..., by default the checkpoint's own), from its training annotations;
  2. group_size samples of each through the SDE (same_noise: the G samples share their initial
     noise and differ by the SDE's noise alone), every stochastic step's transition and log-prob kept,
     in forward passes of sample_batch rows;
  3. rewards (rewards.layout_reward): IoU + confidence from a frozen copy of the model's own head,
     refreshed every reward_refresh updates (or, reward_ckpt, a fixed standalone detector); for the
     sanity ladder and diagnosis (docs/cycle_rl.md), reward_kind = "checker" (the rule-based checker's
     verdict: an oracle), "brightness" (analytic) or "noise" (pure noise) in its place;
  4. advantages: GRPO (algo = "grpo"), per group mean / std, groups whose rewards are all equal
     carry none; PPO (algo = "ppo", I-DRUID), r - phi(x_t, t, layout) from a small MLP critic trained on
     the rewards (rewards.ValueCritic);
     awm (advantage-weighted flow matching): the GRPO advantages weight each sample's flow loss, re-noised
     at a fresh t with its asked layout as the condition (flow_update), plus kl_weight x ||v - v_ref||^2,
     in one optimizer step; self_train: each group's best sample, if it reaches self_train_threshold,
     the same way with weight 1; then step 5 is skipped;
  5. grpo / ppo: the clipped ratio objective over the trained steps (train_steps: "all", "early" = the first
     train_fraction of the stochastic steps, the high-noise ones, or "random" = a random
     train_fraction of them each update), plus kl_weight times the closed-form KL to the frozen
     reference policy per step and sample, averaged over every sample of the update, the gradient
     accumulated over all of them (256 by default) before one optimizer step (minibatches > 1: that
     many steps, the first with a ratio of exactly 1, the later ones clipped), gradient clipping, a
     warmup, and no step at all when no group carries signal; for a model with IDM (the checkpoint's
     ModelConfig.idm), plus idm_weight times L_dis of those same velocity passes (logged as "idm"),
     so that RL does not undo the disentangling;
  6. ground_generated (on by default): generated images whose reward reaches ground_threshold
     train the grounding head with their own layouts as targets (the cycle's gift to grounding).
The policy, its reference and its EMA all start from the init checkpoint's init_weights (its EMA by
default: the weights every evaluation of that checkpoint scored).
Logs per update: mean reward, std of the reward within groups, KL, clip fraction, approx-KL, the
gradient norm before clipping; the fixed probe (probe_scenes layouts and their noise, the same at every
update, sampled by the current policy): its checker ISR and reward (probe_isr, probe_reward, also
before the first update, at step 0); on ShapeScenes the rule-based checker on the update's own samples
(never part of the reward, but for the oracle): their ISR (sample_isr), the share of groups whose rewards all tie
(tie_groups) and the correlation of reward and checker ISR, over all samples and within groups; every
eval_interval updates the rule-based checker's ISR / mIoU of the EMA model on the fixed validation
set (so reward hacking shows as a rising reward with a flat checker), its grounding, a sample grid,
and out_dir/reward.png: the reward and the probe against updates above the checker's ISR (curve.plot_cycle_rl).

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
layouts_per_update = 32  # per rank: 32 x 8 = 256 trajectories per optimizer step (the public flow-GRPO recipes use
# 64 to 576): the policy gradient is mostly noise, and Adam moves every weight by about lr whatever its signal
group_size = 8  # G samples per layout
sample_batch = 32  # rows per forward pass, for sampling and scoring alike; the gradients accumulate over them
same_noise = True  # the G samples of a layout share their initial noise and differ by the SDE's noise alone,
# so that the advantages credit what the trained steps chose, not the draw of the initial noise
sample_steps = 10
cfg_scale = 3.0
shift = 1.0
sde_noise_level = 0.7  # the SDE's noise level a: sigma_t = a sqrt(t / (1 - t))
sde_window_start = 0  # the stochastic steps are [start, end) of the schedule; the rest are ODE steps
sde_window_end = -1  # <= 0 counts from the end: 0 = every step, -1 = all but the last (Flow-GRPO trains 9 of 10). The
# last step's std is 9 times smaller than the first's, and the policy gradient scales as 1 / std (the KL as 1 / std^2):
# updates that drew it had gradient norms 5 to 30 times larger, swamping the steps where the layout is decided
# (docs/cycle_rl.md, the ladder); it is an Euler step, changed only through the weights it shares
train_steps = "random"  # "all", "early" (the first train_fraction of the stochastic steps) or "random" (a random
# train_fraction of them each update: every step is trained, and held to the reference, in expectation)
train_fraction = 0.3
# the objective
algo = "grpo"  # "grpo" (the likelihood-ratio policy gradient over the SDE's steps), "ppo" (the same with a critic),
# "awm": advantage-weighted flow matching, each sample's flow loss (its asked layout the condition) weighted by
# its group advantage, positive and negative: the gradient of DiffusionNFT's objective at the sampling policy,
# a supervised-size signal per sample instead of a log-prob ratio, or "self_train": verified self-training
# (rejection-sampling fine-tuning), each group's best sample, if its reward reaches self_train_threshold
credit = "instance"  # awm: "image" (each sample's advantage on all its pixels) or "instance": each asked instance's
# own advantage (its reward against the same instance in the group's other samples) on the pixels of its box, 0
# outside the boxes: an image of 8 objects is no longer credited for 7 by the fate of one
self_train_threshold = 1.5
clip_range = 1e-3  # on the ratio of per-dimension-mean log-probs (sampler.sde_step_with_logprob)
adv_clip = 5.0
adv_eps = 1e-4
kl_weight = 0.1  # grpo / ppo: the closed-form KL to the reference per trained step, on every sample (tied groups
# too); awm / self_train: the velocity-matching term ||v - v_ref||^2 at the trained x_t
idm_weight = 0.01  # L_dis on the policy's velocity passes, for a model with IDM (ignored without); untuned
minibatches = 1  # grpo / ppo: optimizer steps per update, each over a share of the samples and all trained steps
# reward
reward_kind = "grounding"  # "grounding" (the layout reward); for the sanity ladder (docs/cycle_rl.md) and diagnosis,
# never the method: "checker" (ShapeScenes: the rule-based checker's verdict itself, an oracle that agrees with
# the verdict by construction), "brightness" (analytic, inside the boxes: must rise), "noise" (uniform, drawn
# from (seed, update): must not move the model)
reward_ckpt = ""  # "" = the model's own head (a frozen copy); else a grounder checkpoint (StandaloneDetector)
reward_refresh = 5  # updates between refreshes of the frozen own-head copy
# the fixed probe: probe_scenes layouts of the training layouts' distribution and their initial noise, drawn once,
# sampled by the policy's current weights (Euler, sample_steps) after every update and scored by the checker and
# the reward, so that an update's effect is not hidden by the layouts it drew; 0 = none
probe_scenes = 32
# the cycle's gift to grounding
ground_generated = True
ground_threshold = 1.5  # the reward from which an image trains the head (IoU + confidence is in [0, 2]; the
# checker's reward, its share of passed instances, in [0, 1])
ground_weight = 0.1
ground_negatives = -1  # hard negative phrases per such image (shapescenes.add_hard_negatives); -1 = as the checkpoint's PMTP
# the PPO critic
critic_lr = 1e-3
critic_hidden = 128
# optimizer: a full fine-tune, so a warmup (Adam's first steps are lr x sign(g) on every weight)
init_weights = "ema"  # the init checkpoint's weights that the policy, its reference and its EMA start from: "ema" (the
# weights every evaluation of that checkpoint scored) or "model"
lr = 1e-4  # at 1e-5 the oracle's probe did not move in 3 updates, at 1e-3 every reward's drifted (docs/cycle_rl.md)
min_lr = 1e-4
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.99
grad_clip = 1.0
schedule = "constant"
warmup_steps = 3
max_steps = 40  # updates
lr_decay_steps = 40
ema_decay = 0.9
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
if reward_kind not in ("grounding", "checker", "brightness", "noise"):
    runtime.fail(f"reward_kind must be 'grounding', 'checker', 'brightness' or 'noise', got {reward_kind!r}")
if init_weights not in ("ema", "model"):
    runtime.fail(f"init_weights must be 'ema' or 'model', got {init_weights!r}")
if algo not in ("grpo", "ppo", "awm", "self_train"):
    runtime.fail(f"algo must be 'grpo', 'ppo', 'awm' or 'self_train', got {algo!r}")
if credit not in ("image", "instance"):
    runtime.fail(f"credit must be 'image' or 'instance', got {credit!r}")
if train_steps not in ("all", "early", "random"):
    runtime.fail(f"train_steps must be 'all', 'early' or 'random', got {train_steps!r}")
if sde_noise_level <= 0:
    runtime.fail(f"sde_noise_level must be > 0 (the policy needs stochastic steps), got {sde_noise_level}")
if ckpt_interval and ckpt_interval % reward_refresh:
    runtime.fail(f"ckpt_interval {ckpt_interval} must be a multiple of reward_refresh {reward_refresh} (exact resume)")
if algo in ("grpo", "awm") and group_size < 2:
    runtime.fail(f"{algo} needs group_size >= 2 (its advantages are relative to the group), got {group_size}")
samples_per_rank = layouts_per_update * group_size
if algo in ("awm", "self_train") and minibatches != 1:
    runtime.fail(f"minibatches {minibatches}: {algo} takes one optimizer step an update (minibatches=1)")
if minibatches < 1 or samples_per_rank % minibatches:
    runtime.fail(f"layouts_per_update * group_size = {samples_per_rank} must be a multiple of minibatches {minibatches}")
# the rows of one forward pass: sampling and scoring cut the samples alike, so that a first minibatch's ratio is exactly 1
chunk_rows = min(sample_batch, samples_per_rank // minibatches)
if sample_batch < 1 or (samples_per_rank // minibatches) % chunk_rows:
    runtime.fail(f"sample_batch {sample_batch} must divide a minibatch's {samples_per_rank // minibatches} samples")
try:
    sde_window = (sde_window_start, sample_steps + sde_window_end if sde_window_end <= 0 else sde_window_end)
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
# which weights of it (a run saved before init_weights existed used the raw ones)
reference_weights = saved["train"].get("init_weights", "model") if init_from == "resume" else init_weights
config["init_weights"] = reference_weights
if ground_negatives == -1:
    config["ground_negatives"] = ground_negatives = saved["train"].get("ground_negatives", 0)
# the policy starts from the weights its reference holds, and the EMA from the policy, so that the figures of
# update 0 are those of the policy that trains
model, tokenizer, _ = runtime.load_model(source, EchoGen, "model" if init_from == "resume" else init_weights, dev)
model_config = model.config
res, max_instances = model_config.res, model_config.max_instances
idm_term = idm_weight if model_config.idm else None  # the weight of L_dis, None for a model without IDM
if not 1 <= min_objects <= max_objects <= min(max_instances, shapescenes.MAX_OBJECTS):
    runtime.fail(f"need 1 <= min_objects <= max_objects <= {min(max_instances, shapescenes.MAX_OBJECTS)} "
                 f"(the model's max_instances), got {min_objects}, {max_objects}")
ema = copy.deepcopy(model).requires_grad_(False)
if init_from == "resume":
    ema.load_state_dict(runtime.load_weights(source, "ema", EchoGen))
reference = copy.deepcopy(model).requires_grad_(False)
reference.load_state_dict(runtime.load_weights(reference_path, reference_weights, EchoGen))
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


def scenes_from(rngs):
    """One layout per generator: the world's scene sampler, or on real data one of its annotated layouts."""
    if layout_pool is None:
        return [shapescenes.sample_scene(rng, (min_objects, max_objects), layout_split(rng)) for rng in rngs]
    return [layout_pool[int(rng.integers(len(layout_pool)))] for rng in rngs]


def draw_layouts(update):
    """This rank's layouts of an update, each repeated group_size times (groups contiguous): the
    scenes and their collated conditions on the device."""
    first = dist_ctx.rank * layouts_per_update
    scenes = scenes_from([np.random.default_rng([layout_seed, update, first + i]) for i in range(layouts_per_update)])
    batch = layouts.collate(scenes, None, tokenizer, max_instances)
    return scenes, {k: v.repeat_interleave(group_size, dim=0).to(dev) for k, v in batch.items()}


PROBE_KEY = 0x70726F62  # the probe's layouts: a seed word no update index reaches


def make_probe():
    """The fixed probe: probe_scenes layouts of the training layouts' distribution, their collated
    conditions and their initial noise, the same at every update and on resume."""
    scenes = scenes_from([np.random.default_rng([layout_seed, PROBE_KEY, i]) for i in range(probe_scenes)])
    batch = {k: v.to(dev) for k, v in layouts.collate(scenes, None, tokenizer, max_instances).items()}
    noise = sampler.initial_noise(probe_scenes, (model_config.channels, res, res), seed + PROBE_KEY).to(dev)
    return scenes, batch, noise


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


def chunks(rows):
    """The forward passes' slices of a range of rows, chunk_rows each."""
    return [slice(start, start + chunk_rows) for start in range(rows.start, rows.stop, chunk_rows)]


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
    """The clipped objective + KL over the trained steps, in `minibatches` optimizer steps, each
    accumulating its gradient over forward passes of chunk_rows samples. advantages (S, B) per trained
    step, weight (B,) 1 for rows whose group carries signal, 0 for tied ones (their KL still counts).
    An update without a single such row on any rank takes no step at all: Adam's momentum would otherwise
    move every weight along the last gradient with nothing to hold it.
    -> the log's statistics, averaged, with "updated": how many minibatch steps changed the weights and
    "grad_norm": the last one's gradient norm before clipping."""
    # ratio_error: max |ratio - 1| of the first minibatch, scored before any optimizer step: the policy
    # must score its own samples exactly as it sampled them, so anything but 0 is a bug
    stats = {"kl": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "policy_loss": 0.0, "ratio_error": 0.0, "updated": 0,
             "grad_norm": 0.0}
    if idm_term is not None:
        stats["idm"] = 0.0
    if dist_ctx.all_reduce_mean(weight.sum().item()) == 0:
        return stats
    per_minibatch = samples_per_rank // minibatches
    # the mean over every row of the minibatch and every trained step, tied rows included, so that a minibatch
    # with one informative group steps less far than one with many (DDP averages it over the ranks)
    per_step_rows = per_minibatch * len(steps)
    n_passes = minibatches * (per_minibatch // chunk_rows) * len(steps)
    for m in range(minibatches):
        passes = [(rows, i) for rows in chunks(range(m * per_minibatch, (m + 1) * per_minibatch))
                  for i in range(len(steps))]
        for k, (rows, i) in enumerate(passes):
            s = steps[i]
            sub = {key: value[rows] for key, value in batch.items()}
            t, t_next = float(trajectory["t"][s]), float(trajectory["t_next"][s])
            x_t, x_next = trajectory["x_t"][s][rows], trajectory["x_next"][s][rows]
            if dist_ctx.ddp:  # gradients are all-reduced with the minibatch's last backward (nanoGPT)
                train_model.require_backward_grad_sync = k == len(passes) - 1
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
            loss = (policy_loss * weight[rows] + kl_weight * kl).sum() / per_step_rows
            if idm_term is not None:
                loss = loss + idm_term * out.idm_loss / len(passes)
                stats["idm"] += out.idm_loss.item() / n_passes
            loss.backward()
            stats["kl"] += kl.mean().item() / n_passes
            stats["policy_loss"] += (policy_loss * weight[rows]).mean().item() / n_passes
            stats["clip_frac"] += step_stats["clip_frac"] / n_passes
            stats["approx_kl"] += step_stats["approx_kl"] / n_passes
        stats["updated"] += guard.step(model, optimizer, grad_clip, update, f"policy minibatch {m}")
        stats["grad_norm"] = guard.grad_norm
    return stats


def flow_update(images, batch, rows, row_weight, update, tied=1):
    """One optimizer step of the flow loss on the policy's own samples images[rows] with their asked
    layouts as the condition (PMTP's generation term and condition dropout), each row weighted by
    row_weight (n,), or each pixel by a weight map (n, 1, R, R), plus kl_weight x the velocity-matching
    term ||v - v_ref||^2 to the frozen reference at the same x_t (the KL of two Euler-Maruyama steps of
    one std is this up to a factor). The mean runs over
    every row passed, accumulated over forward passes of chunk_rows; no step when no rank has a row of
    nonzero weight. self_train: the rows are each group's best sample, weighted 1 if it reaches the
    threshold; awm: every sample, weighted by its group advantage, and tied = group_size: the rows of a
    group share their t, noise and dropout (common random numbers), so that with advantages summing to 0
    over the group the part of the gradient that the draw of (t, noise) makes cancels, and what is left
    is the difference between the samples. -> the log's statistics."""
    stats = {"updated": 0, "grad_norm": 0.0, "ratio_error": 0.0, "kl": 0.0, "flow_loss": 0.0}
    if dist_ctx.all_reduce_mean(float((row_weight != 0).sum())) == 0:
        return stats
    # t, dropout and noise of the global batch's rows, from (seed, update); this rank's slice (resume, DDP)
    n, first, draws = len(rows), dist_ctx.rank * len(rows), len(rows) * dist_ctx.world // tied
    g = torch.Generator().manual_seed(seed * 1_000_003 + update)
    t = objectives.sample_timesteps(draws, g).repeat_interleave(tied)[first:first + n].to(dev)
    drop = (torch.rand(draws, generator=g) < 0.1).repeat_interleave(tied)[first:first + n].to(dev)  # PMTP's cond_drop
    noise = torch.randn((draws, *images.shape[1:]), generator=runtime.step_generator(seed + 31, update, dev),
                        device=dev).repeat_interleave(tied, dim=0)[first:first + n]
    pairs = {**{k: v[rows] for k, v in batch.items()}, "images": images[rows].detach().clamp(-1, 1)}
    x_t, caption_ids, instance_mask = objectives.pmtp_inputs(pairs, torch.zeros(n, dtype=torch.long, device=dev), t,
                                                             noise, drop)
    passes = chunks(range(n))
    for k, r in enumerate(passes):
        if dist_ctx.ddp:  # gradients are all-reduced with the last backward (nanoGPT)
            train_model.require_backward_grad_sync = k == len(passes) - 1
        condition = (x_t[r], t[r], caption_ids[r], pairs["phrase_ids"][r], pairs["boxes"][r], instance_mask[r])
        with runtime.autocast(dev):
            v = train_model(*condition).v
            with torch.no_grad():
                v_ref = reference(*condition).v
        flow = objectives.flow_loss(v, pairs["images"][r], noise[r], row_weight=row_weight[r])
        matching = (v.float() - v_ref.float()).pow(2).mean()
        share = len(x_t[r]) / n
        ((flow + kl_weight * matching) * share).backward()
        stats["flow_loss"] += flow.item() * share
        stats["kl"] += matching.item() * share
    stats["updated"] = int(guard.step(model, optimizer, grad_clip, update, algo))
    stats["grad_norm"] = guard.grad_norm
    return stats


def ground_generated_images(images, batch, reward, update):
    """Generated images whose reward reaches ground_threshold train the grounding head, their layouts
    as targets (clean images, t = 0), with ground_negatives hard negative phrases each, as in PMTP.
    Every rank runs it (DDP), a rank without such images with no targets; when no rank has one, no
    step is taken. -> (the loss, the number of images used)."""
    use = reward >= ground_threshold
    n_used = int(use.sum())
    if dist_ctx.all_reduce_mean(n_used) == 0:
        return 0.0, 0
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
    return loss.item(), n_used


def checker_per_instance(images, scenes, repeats):
    """The rule-based checker on generated images: (B, max_instances), 1 for each asked instance that
    passes, 0 for one that fails and on empty slots; image j was asked for scenes[j // repeats]. Logged
    beside the reward to show whether the reward agrees with the checker; it enters the reward only as
    the oracle (reward_kind "checker")."""
    passed = torch.zeros(len(images), max_instances)
    for j, picture in enumerate(sampler.to_uint8(images)):
        for k, inst in enumerate(scenes[j // repeats]["instances"]):
            passed[j, k] = float(shapescenes.check_instance(picture, inst)["success"])
    return passed.to(dev)


def score(images, batch, checker, update):
    """The reward_kind's reward of generated images -> {"reward", "iou", "confidence"}, each (B,), and
    "per_instance" (B, max_instances), whose instance_mean is the reward. checker: the images'
    checker_per_instance (ShapeScenes) or None. The noise reward is drawn per instance from (seed, update)
    for the global batch, so that N ranks draw what one rank draws."""
    if reward_kind == "grounding":
        with runtime.autocast(dev):
            return rewards.layout_reward(grounder, images, batch)
    if reward_kind == "brightness":
        per_instance = rewards.brightness_reward(images, batch["boxes"])
    elif reward_kind == "checker":
        per_instance = checker
    else:
        g = runtime.step_generator(seed + 104729, update, dev)
        first = dist_ctx.rank * samples_per_rank
        per_instance = torch.rand((dist_ctx.world * samples_per_rank, max_instances), generator=g,
                                  device=dev)[first:first + len(images)]
    per_instance = per_instance * batch["instance_mask"]
    reward = rewards.instance_mean(per_instance, batch["instance_mask"])
    return {"reward": reward, "per_instance": per_instance, "iou": torch.zeros_like(reward),
            "confidence": torch.zeros_like(reward)}


@torch.no_grad()
def probe(update):
    """The policy's current weights on the fixed probe (Euler sampler, the probe's own noise): the
    checker's ISR (ShapeScenes) and the mean reward of its images, which needs no draw (the noise
    reward has none). -> a dict for the log."""
    scenes, batch, noise = probe_set
    images = torch.cat([sampler.sample(model, {k: v[rows] for k, v in batch.items()}, noise[rows], sample_steps,
                                       cfg_scale, shift) for rows in chunks(range(probe_scenes))])
    record = {}
    if layout_pool is None:
        record["probe_isr"] = shapescenes.check_images(scenes, sampler.to_uint8(images))["isr"]
    if reward_kind != "noise" and (reward_kind != "checker" or layout_pool is None):
        checker = checker_per_instance(images, scenes, 1) if reward_kind == "checker" else None
        record["probe_reward"] = score(images, batch, checker, update)["reward"].float().mean().item()
    return record


def rl_update(update):
    """Sample, reward, advantages, the policy steps (and the critic's, the head's) of one update."""
    scenes, batch = draw_layouts(update)
    # the SDE's noise: a generator per sample, seeded by the update and the sample's place in the
    # global batch, so that N ranks draw what one rank draws
    first = dist_ctx.rank * samples_per_rank
    sde_generators = [runtime.step_generator(seed + 7919 * (first + j + 1), update, dev) for j in range(samples_per_rank)]
    # sampled in the forward passes that policy_update will score, so that the first minibatch's ratio is
    # exactly 1 (a matmul over another batch size may round differently)
    noise = draw_noise(update)
    parts = [sampler.sample_sde(model, {k: v[r] for k, v in batch.items()}, noise[r], sample_steps, cfg_scale, shift,
                                sde_noise_level, sde_generators[r], sde_window) for r in chunks(range(samples_per_rank))]
    trajectory = {"x0": torch.cat([p["x0"] for p in parts]),  # (B, C, R, R); the steps' records are (S, B, ...)
                  **{k: torch.cat([p[k] for p in parts], dim=1) for k in ("x_t", "x_next", "log_prob")},
                  **{k: parts[0][k] for k in ("t", "t_next", "step")}}
    # ShapeScenes: the checker judges the policy's own samples (logged beside the reward, or the oracle reward)
    checker = checker_per_instance(trajectory["x0"], scenes, group_size) if layout_pool is None else None
    scored = score(trajectory["x0"], batch, checker, update)
    reward = scored["reward"].float()
    steps = trained_steps(update, len(trajectory["step"]))
    record = {}
    if algo == "self_train":  # each group's best sample, kept if its reward reaches the threshold
        grouped = reward.view(-1, group_size)  # (layouts, G)
        best = grouped.argmax(1) + torch.arange(len(grouped), device=dev) * group_size  # (layouts,) rows of the batch
        keep = (reward[best] >= self_train_threshold).float()
        record.update(flow_update(trajectory["x0"], batch, best, keep, update),
                      self_train_kept=dist_ctx.all_reduce_mean(keep.sum().item()) * dist_ctx.world)
    elif algo == "awm":  # every sample, its flow loss weighted by its group advantage (0 in a tied group)
        if credit == "image":
            weight = rewards.group_advantages(reward, group_size, adv_eps, adv_clip)  # (B,)
        else:  # each asked instance's advantage over the pixels of its box, 0 elsewhere: (B, 1, R, R)
            advantages = rewards.instance_advantages(scored["per_instance"], batch["instance_mask"], group_size,
                                                     adv_eps, adv_clip)
            weight = rewards.instance_weight_map(advantages, batch["boxes"], batch["instance_mask"], res)
        record.update(flow_update(trajectory["x0"], batch, torch.arange(len(reward), device=dev), weight, update,
                                  tied=group_size))
    elif algo == "grpo":
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
    if algo in ("grpo", "ppo"):
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
        record.update(rewards.agreement(all_rewards, gather(rewards.instance_mean(checker, batch["instance_mask"])),
                                        group_size))
    for key in ("kl", "clip_frac", "approx_kl", "policy_loss", "critic_loss", "ground_loss", "idm", "flow_loss"):
        if key in record:
            record[key] = dist_ctx.all_reduce_mean(record[key])
    record["grad_norm"] = dist_ctx.all_reduce_max(record["grad_norm"])  # all-reduced gradients: the same on every rank
    record["ratio_error"] = dist_ctx.all_reduce_max(record["ratio_error"])
    return record, trajectory["x0"], scenes


REWARD_LABELS = {"grounding": "reward (IoU + confidence)", "checker": "reward (the checker's ISR: oracle)",
                 "brightness": "reward (brightness inside the boxes)", "noise": "reward (uniform noise)"}


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


probe_set = make_probe() if probe_scenes else None
if dist_ctx.master and step == 0:  # the starting point, for the before / after comparison
    if probe_scenes:
        log.write({"step": 0, **probe(0)})
    if val_scenes:
        validate(0)
progress = tqdm(total=max_steps, initial=step, disable=not dist_ctx.master, desc=f"cycle-rl {algo}")
window_start = time.perf_counter()
while step < max_steps:
    if reward_model is not None and step % reward_refresh == 0:
        reward_model.load_state_dict(model.state_dict())  # the frozen own-head grounder, refreshed
    step_lr = runtime.learning_rate(step, lr, min_lr, warmup_steps, lr_decay_steps, schedule)
    for group in optimizer.param_groups:
        group["lr"] = step_lr
    record, images, scenes = rl_update(step)
    if record["updated"]:  # no policy step taken (no signal, or runtime.UpdateGuard): the weights, EMA too, stay
        runtime.update_ema(ema, model, ema_decay, step)
    if dist_ctx.master and probe_scenes:
        record.update(probe(step))
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
                for i, scene in enumerate(scenes[:8])]
        layouts.save_grid(os.path.join(out_dir, "samples", f"update{step:06d}_groups.png"), rows)
    if dist_ctx.master and ((ckpt_interval and step % ckpt_interval == 0) or step == max_steps):
        save(step)
progress.close()
if dist_ctx.master:
    print(f"done: checkpoint {ckpt_path}, log {log.path}")
dist_ctx.close()
