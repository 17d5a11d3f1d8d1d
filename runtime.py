"""
The training runtime that every EchoGen script shares, so that no script carries a copy:
the nanoGPT-style configurator, DDP setup, the data order, the lr schedule, EMA, the JSONL log,
atomic writes, the checkpoint format and its checked loaders, and the flag checks and error of every CLI.

A checkpoint is a folder:
    model.safetensors   raw weights            ema.safetensors   EMA weights (used for sampling)
    config.json         {"model": ModelConfig, "train": the script's config, "step": N}
    tokenizer.json      the tokenizer the model was trained with
    train_state.pt      optimizer state and step, everything an exact resume needs
It is written to `ckpt`.tmp and swapped in by renames (save_checkpoint): a kill at any instant
leaves the new or the previous complete checkpoint, which every loader finds (checkpoint_folder),
and the next save clears what the kill left. A step whose gradients are not finite is skipped
(UpdateGuard), and a resumed run's log drops the records after its checkpoint (JsonlLog).
"""

import argparse
import ast
import json
import math
import os
import pickle
import shutil
import sys
import warnings
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer


class LayoutError(ValueError):
    """Bad layout, text or data file; the message is one line naming the scene or file, the field and
    the value. Raised by the data code, turned into fail() by every CLI."""


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
    check_config(config)
    return config


# the range of every config value that more than one script has, checked by check_config before a
# script creates anything; a script's own keys (prediction, algo, ...) are checked by the script
AT_LEAST_1 = ("max_steps", "lr_decay_steps", "batch_size", "grad_accum", "cache_scenes", "log_interval", "res", "patch",
              "dim", "depth", "heads", "text_depth", "max_instances", "ground_depth", "ground_candidates",
              "sample_steps", "eval_steps", "layouts_per_update", "minibatches", "min_objects", "reward_refresh",
              "critic_hidden")
AT_LEAST_0 = ("eval_interval", "ckpt_interval", "warmup_steps", "val_scenes", "data_seed", "seed", "layout_seed",
              "weight_decay", "grad_clip", "lr", "min_lr", "ground_every", "ground_weight", "idm_weight", "cycle_weight",
              "recon_weight", "kl_weight", "box_attn_bias", "layout_map", "pixel_head", "conv_stem", "negatives", "feature_level",
              "clip_range", "adv_eps", "adv_clip", "critic_lr", "ground_threshold", "sde_window_start")
POSITIVE = ("cfg_scale", "shift")
FRACTIONS = ("cond_drop", "ground_clean", "ground_confusable", "ground_t_max", "cycle_t_max", "recon_min_conf",
             "train_fraction", "beta1", "beta2", "ema_decay", "sde_noise_level", "heldout_share")  # in [0, 1]
CHOICES = {"schedule": ("cosine", "constant"), "device": ("auto", "cpu", "cuda")}


def check_config(config):
    """Refuse a value out of its range, in one line naming the key, the value and what is allowed."""
    def refuse(key, allowed):
        fail(f"config {key} = {config[key]!r}: must be {allowed}")

    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            refuse(key, "a finite number")
        if key in AT_LEAST_1 and value < 1:
            refuse(key, ">= 1")
        if key in AT_LEAST_0 and value < 0:
            refuse(key, ">= 0")
        if key in POSITIVE and value <= 0:
            refuse(key, "> 0")
        if key in FRACTIONS and not 0 <= value <= 1:
            refuse(key, "in [0, 1]")
        if key in CHOICES and value not in CHOICES[key]:
            refuse(key, "one of " + ", ".join(map(repr, CHOICES[key])))
    if config.get("device") == "cuda" and not torch.cuda.is_available():
        refuse("device", "'auto' or 'cpu' on this machine, which has no CUDA device")
    if "dim" in config and config["dim"] % 4:
        refuse("dim", "a multiple of 4 (the 2-D sin-cos position embedding)")
    if "heads" in config and "dim" in config and config["dim"] % config["heads"]:
        refuse("heads", f"a divisor of dim = {config['dim']}")
    if "patch" in config and "res" in config and config["res"] % config["patch"]:
        refuse("patch", f"a divisor of res = {config['res']}")


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
    """One JSON object per line; rank 0 alone writes. A fresh run (from_step 0) starts a new log; a
    resumed one keeps the records up to its checkpoint's step and drops the later ones, which a kill
    after their log line and before the next checkpoint left behind: the steps trained again are
    logged again, so every step is in the log once."""

    def __init__(self, path, enabled, from_step=0):
        self.path = path if enabled else None
        if self.path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            kept = []
            if from_step and os.path.isfile(path):
                with open(path) as f:
                    kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= from_step]
            write_atomically(path, lambda f: f.write("".join(kept).encode()))

    def write(self, record):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class UpdateGuard:
    """Skips an optimizer step whose gradients are not finite (a NaN or inf in the loss or anywhere in
    its backward pass) without touching the weights or the optimizer's state, and stops the run with
    one line after `limit` such steps in a row: one bad batch should not ruin a run, a run that keeps
    producing them is broken. Under DDP the gradients are all-reduced first, so every rank decides alike.
    A skipped step is logged as {"step": n, "skipped": what}, n counting the steps done as the log does."""

    def __init__(self, log, limit=3):
        self.log, self.limit, self.in_a_row = log, limit, 0
        self.grad_norm = 0.0  # the last step's gradient norm before clipping, for the log

    def step(self, model, optimizer, grad_clip, step, what="update"):
        """Clip (grad_clip > 0), then step the optimizer if the gradient norm is finite; zero the
        gradients either way. step: the index of the training step; what: which of its updates this
        is, for the log. -> True when the weights were updated."""
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
        finite = bool(torch.isfinite(norm))
        self.grad_norm = norm.item()
        if finite:
            optimizer.step()
            self.in_a_row = 0
        else:
            self.in_a_row += 1
            self.log.write({"step": step + 1, "skipped": what})
            print(f"step {step + 1}: non-finite gradients, {what} skipped", file=sys.stderr)
            if self.in_a_row >= self.limit:
                fail(f"{self.in_a_row} optimizer steps in a row had non-finite gradients (a NaN or inf loss); "
                     f"stopping, the last checkpoint holds the weights before them")
        optimizer.zero_grad(set_to_none=True)
        return finite


# -----------------------------------------------------------------------------
# files and checkpoints


def write_atomically(path, write):
    """Write through write(file) into a temporary file, then rename: readers never see half a file.
    The pid in its name keeps DDP ranks that write the same path from sharing one temporary file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "tokenizer.json", "train_state.pt", "config.json")


def checkpoint_step(folder):
    """The step of a complete checkpoint folder, or None: config.json is written last and renamed into
    place, so its presence (with every other file) marks a folder whose writing finished."""
    if not all(os.path.isfile(os.path.join(folder, name)) for name in CHECKPOINT_FILES):
        return None
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoint_folder(path):
    """The folder a loader reads for the checkpoint `path`: `path` itself, unless a kill inside
    save_checkpoint left it missing, then the newest complete of `path`.tmp (the new one) and
    `path`.old (the previous one). Reads only: the next save_checkpoint puts things back in order."""
    if os.path.isdir(path):
        return path
    found = [(checkpoint_step(p), p) for p in (path + ".tmp", path + ".old")]
    found = [(step, p) for step, p in found if step is not None]
    return max(found)[1] if found else path


def recover_checkpoint(path):
    """Undo what a kill inside an earlier save_checkpoint left: the newest complete copy becomes `path`,
    the leftovers go. Every state that save_checkpoint passes through is handled (see its steps)."""
    tmp, old = path + ".tmp", path + ".old"
    if not os.path.isdir(path):
        newest = checkpoint_folder(path)
        if newest != path:
            os.replace(newest, path)
    for leftover in (tmp, old):
        if os.path.exists(leftover):
            shutil.rmtree(leftover)


def save_checkpoint(path, model, ema, optimizer, tokenizer, train_config, step, extra=None):
    """Write the checkpoint folder `path` so that a kill at any instant leaves the new or the previous
    complete checkpoint where checkpoint_folder finds it:
      1. the new one is written to `path`.tmp, config.json last and by rename (the mark of completion);
      2. `path` -> `path`.old;  3. `path`.tmp -> `path`;  4. `path`.old is deleted.
    A kill inside 1 leaves `path` as it was; between 2 and 3 leaves no `path` but both complete copies;
    inside 4 a half-deleted `path`.old, which the next save (recover_checkpoint) clears away.
    extra: {file name: state} saved with torch.save beside the rest (Cycle RL's critic)."""
    tmp, old = path + ".tmp", path + ".old"
    recover_checkpoint(path)
    os.makedirs(tmp)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, os.path.join(tmp, "ema.safetensors"))
    tokenizer.save(os.path.join(tmp, "tokenizer.json"))
    torch.save({"optimizer": optimizer.state_dict(), "step": step}, os.path.join(tmp, "train_state.pt"))
    for name, state in (extra or {}).items():
        torch.save(state, os.path.join(tmp, name))
    config = {"kind": type(model).__name__, "model": asdict(model.config), "train": train_config, "step": step}
    write_atomically(os.path.join(tmp, "config.json"), lambda f: f.write(json.dumps(config, indent=1).encode()))
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# Every loader below checks what it reads before anything uses it: a missing or damaged file, or
# weights that do not fit the checkpoint's own config.json, stop the script with one line naming
# the folder and the file, never a traceback from inside torch, safetensors or tokenizers.

KINDS = ("EchoGen", "StandaloneDetector")  # what save_checkpoint writes as config.json's "kind"


def one_line(error, limit=300):
    """An exception's message on one line (torch's span many), cut to limit characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def checkpoint_file(path, name, why=""):
    """The path of a file the checkpoint folder `path` must hold; refused in one line when it is not there."""
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        fail(f"checkpoint '{path}': no {name} there{why}")
    return file


def read_checkpoint_config(path):
    """config.json of a checkpoint folder: {"kind", "model", "train", "step"}, checked to be JSON with a
    "model" object and a known kind (EchoGen when absent: checkpoints made before kinds existed)."""
    path = checkpoint_folder(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        fail(f"checkpoint '{path}': no config.json there (not an EchoGen checkpoint folder)")
    try:
        with open(config_file, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        fail(f"checkpoint '{path}': config.json is not readable JSON ({one_line(e)})")
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        fail(f"checkpoint '{path}': config.json has no \"model\" object (not a checkpoint's config)")
    if not isinstance(saved.setdefault("train", {}), dict):
        fail(f"checkpoint '{path}': config.json's \"train\" is not an object ({json.dumps(saved['train'])[:60]})")
    saved.setdefault("kind", "EchoGen")
    if saved["kind"] not in KINDS:
        fail(f"checkpoint '{path}': config.json kind {saved['kind']!r} is none of {', '.join(KINDS)}")
    return saved


def build_model(path, saved, model_class):
    """The model_class (EchoGen, StandaloneDetector: each names its config dataclass as config_class)
    that the checkpoint config `saved` (of the folder `path`) describes, with fresh weights."""
    config_class = model_class.config_class
    unknown = sorted(set(saved["model"]) - {f.name for f in fields(config_class)})
    if unknown:
        fail(f"checkpoint '{path}': model config has unknown field '{unknown[0]}' (made by another version?)")
    try:
        return model_class(config_class(**saved["model"]))
    except Exception as e:  # a hand-edited config can break the constructor anywhere (types, asserts, shapes)
        fail(f"checkpoint '{path}': config.json's model config builds no {saved['kind']} "
             f"({type(e).__name__}: {one_line(e)})")


def check_same_model_config(path, saved_model, current):
    """Refuse to resume a checkpoint made with another model config, naming the first difference. A
    field the checkpoint lacks (added since, e.g. idm) has its default, as load_model reads it."""
    unknown = sorted(set(saved_model) - set(asdict(current)))
    if unknown:  # a checkpoint of another kind (a StandaloneDetector's) or of another version
        fail(f"checkpoint '{path}': model config has field '{unknown[0]}', which a {type(current).__name__} "
             f"does not have (a checkpoint of another kind or version?)")
    saved_model = {**asdict(type(current)()), **saved_model}
    for key, value in asdict(current).items():
        if saved_model.get(key) != value:
            fail(f"checkpoint '{path}': model config {key} = {saved_model.get(key)!r}, this run has {value!r}")


def read_weights(path, which):
    """The tensors of `which`.safetensors in a checkpoint folder, as they are on disk."""
    name = f"{which}.safetensors"
    try:
        return load_file(checkpoint_file(path, name))
    except (SafetensorError, OSError) as e:
        fail(f"checkpoint '{path}': {name} is damaged ({one_line(e)})")


def check_weights_fit(path, which, weights, model):
    """Refuse weights that are not those of model, built from the checkpoint's own config.json: every
    tensor there, none more, each of its shape."""
    expected, name = model.state_dict(), f"{which}.safetensors"
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        fail(f"checkpoint '{path}': {name} does not fit its config.json (missing {missing[:2]}, "
             f"unexpected {unexpected[:2]})")
    for key, tensor in expected.items():
        if weights[key].shape != tensor.shape:
            fail(f"checkpoint '{path}': {name} does not fit its config.json ({key} is {list(weights[key].shape)}, "
                 f"the config makes it {list(tensor.shape)})")


def load_weights(path, which, model_class):
    """The `which` ("model" or "ema") weights of a checkpoint folder, checked against the model_class
    that its own config.json describes."""
    weights = read_weights(path, which)
    check_weights_fit(path, which, weights, build_model(path, read_checkpoint_config(path), model_class))
    return weights


def load_into(module, path, which):
    """load_weights into module; weights that do not fit it (a model of another config) stop with one line."""
    try:
        module.load_state_dict(load_weights(path, which, type(module)))
    except RuntimeError as e:  # load_state_dict's missing keys and size mismatches
        fail(f"checkpoint '{path}': {which}.safetensors does not fit this model ({one_line(e)})")


def load_state_file(path, name, restore, why=""):
    """restore(state) with the torch.save'd dict `name` of a checkpoint folder (train_state.pt, Cycle RL's
    critic.pt); a missing, damaged or ill-fitting file is refused in one line. -> what restore returns."""
    file = checkpoint_file(path, name, why)
    try:
        with warnings.catch_warnings():  # torch warns on stderr about some damaged files, beside its error
            warnings.simplefilter("ignore")
            return restore(torch.load(file, map_location="cpu", weights_only=True))
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, ValueError, KeyError, TypeError) as e:
        fail(f"checkpoint '{path}': {name} is damaged or not this model's ({type(e).__name__}: {one_line(e, 160)})")


def load_train_state(path, model, ema, optimizer):
    """Restore weights, EMA and optimizer in place; return the step to continue from."""
    checkpoint_file(path, "train_state.pt", " (a resume needs the optimizer state)")
    load_into(model, path, "model")
    load_into(ema, path, "ema")

    def restore(state):
        optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])
    return load_state_file(path, "train_state.pt", restore)


def load_tokenizer(path):
    """The tokenizer.json of a checkpoint folder."""
    try:
        return Tokenizer.from_file(checkpoint_file(path, "tokenizer.json"))
    except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
        fail(f"checkpoint '{path}': tokenizer.json is damaged ({one_line(e)})")


def load_model(path, model_class, which="ema", device="cpu"):
    """A model ready for inference from a checkpoint folder: (model, tokenizer, saved config).
    model_class: the class the caller needs (model.EchoGen, detector.StandaloneDetector); a checkpoint
    of another kind is refused."""
    path = checkpoint_folder(path)  # wherever a kill inside a save left the newest complete one
    saved = read_checkpoint_config(path)
    if saved["kind"] != model_class.__name__:
        fail(f"checkpoint '{path}': holds a model of kind {saved['kind']}, this command needs a {model_class.__name__}")
    tokenizer = load_tokenizer(path)
    model = build_model(path, saved, model_class)
    weights = read_weights(path, which)
    check_weights_fit(path, which, weights, model)
    model.load_state_dict(weights)
    return model.to(device).eval(), tokenizer, saved

# -----------------------------------------------------------------------------
# command-line input: what the CLIs (sampler.py, evaluate.py, detector.py, data.py) check alike, each
# before anything is computed or written


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other input error (subcommand parsers inherit it)
        fail(message)


def _parsed(text, kind, ok, allowed):
    """text as kind when ok(value); else argparse's error, which names the flag: "argument --x: ..."."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
    return value


def positive_int(text):
    return _parsed(text, int, lambda v: v >= 1, "an integer >= 1")


def non_negative_int(text):
    return _parsed(text, int, lambda v: v >= 0, "an integer >= 0")


def seed_int(text):  # the sampler draws scene i from seed + i: kept far below torch's 2**64 limit
    return _parsed(text, int, lambda v: 0 <= v < 2 ** 32, "an integer in [0, 2**32)")


def non_negative_float(text):
    return _parsed(text, float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def positive_float(text):
    return _parsed(text, float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def resolve_device(name):
    """--device "auto", "cpu" or "cuda" -> "cpu" or "cuda"; "cuda" on a machine without one is refused."""
    if name not in ("auto", "cpu", "cuda"):
        fail(f"--device {name!r}: must be auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: this machine has no CUDA device (torch.cuda.is_available() is False); use cpu or auto")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def check_output_folder(flag, path):
    """Refuse an output folder that could not be made or written: a file at its path or at a parent's."""
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"{flag} '{path}': exists and is not a folder")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        fail(f"{flag} '{path}': '{parent}' is a file, not a folder")
    if not os.access(parent, os.W_OK):
        fail(f"{flag} '{path}': '{parent}' is not writable")
