"""
The training runtime that every EchoGen script shares, so that no script carries a copy:
the nanoGPT-style configurator, DDP setup, the data order, the lr schedule, EMA, the JSONL log,
atomic writes and the checkpoint format.

A checkpoint is a folder:
    model.safetensors   raw weights            ema.safetensors   EMA weights (used for sampling)
    config.json         {"model": ModelConfig, "train": the script's config, "step": N}
    tokenizer.json      the tokenizer the model was trained with
    train_state.pt      optimizer state and step, everything an exact resume needs
It is written to a temporary folder and renamed, so a crash never leaves half a checkpoint.
"""

import ast
import json
import math
import os
import shutil
import sys
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

import model as mmdit  # a module import: model -> detector -> data -> runtime is a cycle, resolved at call time


def fail(message):
    """The one way a CLI stops on bad input: one line on stderr, exit status 2, no stack trace."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# -----------------------------------------------------------------------------
# configuration (nanoGPT's configurator, with unknown keys refused)


def configure(defaults, argv, skip_unknown_file_keys=False):
    """defaults: {key: value} from the script's config block. Each argument is a config file of
    plain Python assignments (config/gpu.py) or --key=value. Returns the updated dict.
    skip_unknown_file_keys lets a tool (bench.py) read a training config file for the keys it knows."""
    config = dict(defaults)

    def set_key(key, value, source):
        if key not in config and skip_unknown_file_keys and source.startswith("config file"):
            return
        if key not in config:
            fail(f"{source}: unknown config key '{key}'")
        default = config[key]
        if isinstance(default, bool) and not isinstance(value, bool):
            fail(f"{source}: {key} must be True or False, got {value!r}")
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            fail(f"{source}: {key} must be {type(default).__name__}, got {value!r}")
        config[key] = value

    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                fail(f"argument '{arg}': expected --key=value")
            try:
                value = ast.literal_eval(text)
            except (SyntaxError, ValueError):
                value = text  # a bare string such as --out_dir=out/x
            set_key(key, value, f"argument '{arg}'")
        else:
            if not os.path.isfile(arg):
                fail(f"config file '{arg}' not found")
            namespace = {}
            exec(open(arg).read(), namespace)
            for key, value in namespace.items():
                if not key.startswith("__"):
                    set_key(key, value, f"config file '{arg}'")
    return config


# -----------------------------------------------------------------------------
# distributed setup: torchrun sets RANK, LOCAL_RANK, WORLD_SIZE; plain python runs one process


class Dist:
    def __init__(self, device_pref):
        self.ddp = "RANK" in os.environ
        want_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        if self.ddp:
            dist.init_process_group("nccl" if want_cuda else "gloo")
        if want_cuda:
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.master = self.rank == 0

    def all_reduce_mean(self, value):
        """A float averaged over ranks (for logging: every rank then logs the same figure)."""
        if not self.ddp:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def all_reduce_max(self, value):
        """The largest of a float over ranks (for logging)."""
        if not self.ddp:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def barrier(self):
        if self.ddp:
            dist.barrier()

    def close(self):
        """Leave the process group together: a rank that tears it down while rank 0 still writes the
        final checkpoint can abort the run (gloo: "terminate called without an active exception")."""
        if self.ddp:
            dist.barrier()
            dist.destroy_process_group()


def autocast(device):
    """bf16 autocast on CUDA; plain float32 on the CPU (bf16 matmuls are slow on most CPUs)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


# -----------------------------------------------------------------------------
# data order and per-step randomness: both are pure functions of (seed, step), which is what makes
# a resumed run equal to an uninterrupted one and N ranks equal to one rank with the same batch


def global_batch_indices(step, global_batch, n_items, seed):
    """Indices of the global batch of `step`: epoch after epoch of seeded permutations of range(n_items)."""
    first = step * global_batch
    positions = np.arange(first, first + global_batch)
    epochs = positions // n_items
    out = np.empty(global_batch, dtype=np.int64)
    for epoch in np.unique(epochs):
        permutation = np.random.default_rng([seed, int(epoch)]).permutation(n_items)
        where = epochs == epoch
        out[where] = permutation[positions[where] % n_items]
    return out


def rank_slice(global_batch, dist_ctx):
    """This rank's share of the global batch: contiguous, so ranks together cover it once."""
    per_rank = global_batch // dist_ctx.world
    return slice(dist_ctx.rank * per_rank, (dist_ctx.rank + 1) * per_rank)


def step_generator(seed, step, device):
    """A generator for the random draws of one step (t, noise, condition dropout), drawn for the
    whole global batch so that every rank sees the draws of its own samples."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + step)
    return g


def learning_rate(step, base_lr, min_lr, warmup_steps, decay_steps, schedule):
    """Linear warmup, then cosine decay to min_lr at decay_steps, or constant."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (base_lr - min_lr)


@torch.no_grad()
def update_ema(ema, model, decay, step):
    """EMA of the weights; the decay ramps up over the first steps so short runs are not all init."""
    decay = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


class JsonlLog:
    """One JSON object per line; rank 0 alone writes. Appends, so a resumed run continues its log."""

    def __init__(self, path, enabled):
        self.path = path if enabled else None
        if self.path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def write(self, record):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, model, ema, optimizer, tokenizer, train_config, step):
    """Write the checkpoint folder to `path`.tmp, then swap it in with renames."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, os.path.join(tmp, "ema.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({"kind": type(model).__name__, "model": asdict(model.config), "train": train_config, "step": step},
                  f, indent=1)
    tokenizer.save(os.path.join(tmp, "tokenizer.json"))
    torch.save({"optimizer": optimizer.state_dict(), "step": step}, os.path.join(tmp, "train_state.pt"))
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def read_checkpoint_config(path):
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        fail(f"checkpoint '{path}': no config.json there (not an EchoGen checkpoint folder)")
    with open(config_file) as f:
        saved = json.load(f)
    saved.setdefault("kind", "EchoGen")
    return saved


def check_same_model_config(path, saved_model, current):
    """Refuse to resume a checkpoint made with another model config, naming the first difference. A
    field the checkpoint lacks (added since, e.g. idm) has its default, as load_model reads it."""
    saved_model = {**asdict(type(current)()), **saved_model}
    for key, value in asdict(current).items():
        if saved_model.get(key) != value:
            fail(f"checkpoint '{path}': model config {key} = {saved_model.get(key)!r}, this run has {value!r}")


def load_weights(path, which="ema"):
    return load_file(os.path.join(path, f"{which}.safetensors"))


def load_train_state(path, model, ema, optimizer):
    """Restore weights, EMA and optimizer in place; return the step to continue from."""
    model.load_state_dict(load_weights(path, "model"))
    ema.load_state_dict(load_weights(path, "ema"))
    state = torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def load_model(path, which="ema", device="cpu"):
    """A model ready for inference from a checkpoint folder: (model, tokenizer, saved config)."""
    saved = read_checkpoint_config(path)
    if saved["kind"] != "EchoGen":
        fail(f"checkpoint '{path}': holds a {saved['kind']}, not an EchoGen model")
    unknown = sorted(set(saved["model"]) - {f.name for f in fields(mmdit.ModelConfig)})
    if unknown:
        fail(f"checkpoint '{path}': model config has unknown field '{unknown[0]}' (made by another version?)")
    model = mmdit.EchoGen(mmdit.ModelConfig(**saved["model"]))
    model.load_state_dict(load_weights(path, which))
    tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    return model.to(device).eval(), tokenizer, saved
