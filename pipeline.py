"""
The main job: EchoGen's three stages on one command, each model evaluated as soon as it exists, and
one results table at the end.

    python pipeline.py                          # the main job: one chain on the CPU (R = 32) -> out/pipeline/
    python pipeline.py --preset=ablations       # what each stage adds: the main job's stages and their controls
    python pipeline.py --preset=scarce --seeds=3  # where paired images are scarce: every arm from one PMTP on 256 pairs
    python pipeline.py --preset=gpu --nproc=8   # R = 64 (config/gpu.py); the training stages under torchrun
    python pipeline.py --fresh                  # start over (by default finished stages are skipped)

A preset names its stages (the keys of its budgets, in order). Each training stage is a subprocess of
its own script, so that its tqdm line, its torchrun launch and its checkpoint format stay the
script's own:
    judge         train_detector.py                    the standalone detector, on true renders only, at the pipeline's R
    gen_only      train_pretrain.py --ground_every=0   the generation-only baseline
    pmtp          train_pretrain.py                    stage 1, PMTP
    pmtp_idm      train_pretrain.py --idm=True         PMTP with IDM: with pmtp, the IDM on/off pair
    pmtp_more     train_pretrain.py                    PMTP continued from pmtp with DJO's lr and seeds: DJO's control
    djo           train_joint.py                       stage 2, DJO, from pmtp
    djo_more      train_joint.py                       DJO continued from djo at Cycle RL's lr: Cycle RL's control
    cycle_rl      train_cycle_rl.py --algo=grpo        stage 3, Cycle RL (GRPO), from djo
    cycle_rl_ppo  train_cycle_rl.py --algo=ppo         stage 3 with PPO and its critic, from djo, the same sampling budget
    cycle_rl_oracle  train_cycle_rl.py --reward_kind=checker   GRPO with the checker's verdict as its reward, from djo:
                  what Cycle RL could add with a reward that agrees with the checker (a diagnosis, never the method)
    cycle_rl_judge   train_cycle_rl.py --reward_ckpt=JUDGE    GRPO with the standalone judge as its reward (AI feedback)
    cycle_rl_noise   train_cycle_rl.py --reward_kind=noise    GRPO with a reward of pure noise: the floor
    self_train    train_cycle_rl.py --algo=self_train      verified self-training: own-head-verified samples train the flow
A preset may start a stage from another one than this list's (its "parents"), append arguments to the
scripts that read paired images (its "data_args"), and name a "control": with --seeds=K every stage
but the judge trains again with other seeds into out_dir/seed{k}/, and the table ends with each arm
against the control, the difference of ISR and head Acc@0.5 with a 95% interval over seeds and scenes.
The main job (tiny) is the chain judge, pmtp, djo, cycle_rl: most of its minutes go to PMTP, and it
ends on the best model the project makes on a CPU. The ablations preset holds the main job's stages
(the same commands in the same out_dir: after the main job only the others train) and the stages
that answer what each one adds, each control at the minutes of what it is compared with.
After each model stage, eval.evaluate_checkpoint scores it on the fixed scene sets (in-distribution,
held-out compositions, crowded, the attribute-leakage probe) with the checker, the model's own
grounding head and the judge.

What out_dir holds: {stage}/ (the script's out_dir: ckpt/, log.jsonl; Cycle RL's reward.png, the
reward against updates above the checker's ISR), eval/{stage}/ (evaluate.py's table.md, results.json,
grids/{set}.png: generated image with the asked boxes | true render | the model's own grounding of
its image), and table.md + results.json (table_{preset}.md and results_{preset}.json for the other
presets): per scene set a table with a row per model, under a first row of the world's true renders
(the ceiling of every column at this R).

Resuming: a stage whose checkpoint has reached its budget is skipped and one cut short resumes from
its checkpoint; a stage whose command changed (a budget tuned in PRESETS) is trained again, and so is
every stage that starts from a stage trained in this run; an evaluation is repeated only when its
model, the judge or the evaluation settings changed. --fresh deletes what the pipeline wrote first.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import data
import runtime
import shapescenes
import evaluate

# -----------------------------------------------------------------------------
# presets: the step budgets, evaluation settings and per-script arguments (on top of each script's own
# defaults) of every stage; the stages' --out_dir, --max_steps, --lr_decay_steps, --init_from, --res,
# --data_dir and --device are the pipeline's
# Cycle RL's updates in the main job: 256 samples each (train_cycle_rl.py's default), about 40 s alone on 2 cores,
# so 6 updates hold the stage's earlier 4 minutes
CYCLE_RL_UPDATES = 6
# the tiny config's per-script arguments, shared by the main job and its ablations
TINY_ARGS = dict(
    # the judge shares the generators' cache (R = 32, 20000 scenes, seed 0) and is evaluated once, at the
    # end. feature_level=1 (stride 4): 8 x 8 feature tokens at R = 32, as level 2 gives at 64; after 200
    # steps val Acc@0.5 0.76 against 0.66 with level 2's 4 x 4, at the same speed
    judge=["--feature_level=1", "--cache_scenes=20000", "--warmup_steps=100", "--eval_interval=0",
           "--ckpt_interval=200"],
    # the scripts' own periodic figures are off: the pipeline evaluates every model once, on every set
    pretrain=["--val_scenes=0", "--eval_interval=0", "--ckpt_interval=200"],
    djo=["--val_scenes=0", "--eval_interval=0", "--ckpt_interval=100", "--warmup_steps=20"],
    cycle_rl=["--val_scenes=64", "--eval_interval=5", "--ckpt_interval=5", "--eval_steps=10"],
)
# the scarce preset: SCARCE_PAIRS paired images, layouts unlimited (I-DRUID's premise: pairs are scarce, layouts are
# cheap to write). Every image any arm sees, for generation or grounding (confusable rows and hard negatives
# included), comes from the same SCARCE_PAIRS scenes of the cache (data seed 0); Cycle RL and self-training see
# only layouts and their own samples.
SCARCE_PAIRS = 256
SCARCE_DATA = [f"--cache_scenes={SCARCE_PAIRS}", "--data_seed=0"]
SCARCE_ARGS = dict(TINY_ARGS, cycle_rl=["--val_scenes=0", "--eval_interval=0", "--ckpt_interval=5"])
PRESETS = {
    # the main job: CPU, R = 32, the scripts' tiny config, one chain; must finish within 30 minutes on 2 cores
    "tiny": dict(
        out_dir="out/pipeline",
        res=32,
        budgets=dict(judge=600, pmtp=2200, djo=200, cycle_rl=CYCLE_RL_UPDATES),
        eval=dict(sets="val,heldout,crowded,leakage", n=64, steps=25, cfg=3.0),
        args=TINY_ARGS,
    ),
    # what each stage adds: the main job's stages (the same commands in the same out_dir, so that after
    # `python pipeline.py` only the others train) and their controls at equal minutes on 2 CPU cores,
    # from the speeds of the main job's latest run alone there: PMTP 2.7 steps/s, DJO 1.12, a Cycle RL
    # update of 256 samples 49 s (timed alone from a PMTP, not yet in a whole run); generation only 3.09 steps/s (200 steps alone, with the conv stem) against PMTP's 2.76
    # over its 798 s of training:
    #   gen_only   PMTP's 2200 steps' minutes of generation only
    #   pmtp_idm   PMTP's 2200 steps with IDM (the IDM on/off pair is at equal steps)
    #   pmtp_more  PMTP continued for DJO's 200 steps' minutes (485 steps)
    #   djo_more   DJO continued for Cycle RL's 6 updates' minutes (330 steps)
    #   cycle_rl_ppo  PPO from the same DJO checkpoint, with GRPO's sampling budget
    #   cycle_rl_oracle  GRPO from the same DJO checkpoint and budget, the checker's verdict as the reward
    "ablations": dict(
        out_dir="out/pipeline",
        res=32,
        budgets=dict(judge=600, gen_only=2450, pmtp=2200, pmtp_idm=2200, pmtp_more=485, djo=200, djo_more=330,
                     cycle_rl=CYCLE_RL_UPDATES, cycle_rl_ppo=CYCLE_RL_UPDATES, cycle_rl_oracle=CYCLE_RL_UPDATES),
        eval=dict(sets="val,heldout,crowded,leakage", n=64, steps=25, cfg=3.0),
        args=TINY_ARGS,
    ),
    # where paired images are scarce (SCARCE_PAIRS of them): every arm starts from one PMTP trained on the pairs and
    # trains for about 5 minutes alone on 2 CPU cores, from the speeds measured there: PMTP 2.7 steps/s, DJO 1.12, a
    # Cycle RL update of 256 samples 49 s; self-training's update (the same sampling, one flow step) is estimated at
    # 30 s, not yet timed; gen_only at PMTP's minutes. --seeds=K repeats every stage but the judge with other training
    # seeds into out_dir/seed{k}/, and the table compares each arm with pmtp_more over seeds and scenes
    # (evaluate.compare). Not yet run whole: its time on 2 cores is an estimate, about an hour a seed.
    "scarce": dict(
        out_dir="out/scarce",
        res=32,
        budgets=dict(judge=600, pmtp=1200, gen_only=1300, pmtp_more=810, djo=340, cycle_rl=6, cycle_rl_judge=6,
                     cycle_rl_oracle=6, cycle_rl_noise=6, self_train=10),
        parents=dict(pmtp_more="pmtp", djo="pmtp", cycle_rl="pmtp", cycle_rl_judge="pmtp", cycle_rl_oracle="pmtp",
                     cycle_rl_noise="pmtp", self_train="pmtp"),
        eval=dict(sets="val,heldout,crowded", n=200, steps=25, cfg=3.0),
        args=SCARCE_ARGS,
        data_args=SCARCE_DATA,  # after every image-reading stage's own arguments (pmtp_more's data seed too)
        control="pmtp_more",
        rows=dict(pmtp=f"PMTP on the {SCARCE_PAIRS} pairs (the start)", pmtp_more="PMTP continued (the control)",
                  djo="DJO", cycle_rl="Cycle RL, own head (the method)"),
    ),
    # seconds: the micro models of the tests, every stage, two steps each (tests/test_pipeline.py)
    "micro": dict(
        out_dir="out/pipeline_micro",
        res=32,
        budgets=dict(judge=2, gen_only=2, pmtp=2, pmtp_idm=2, pmtp_more=2, djo=2, djo_more=2, cycle_rl=1,
                     cycle_rl_ppo=1, cycle_rl_oracle=1, cycle_rl_judge=1, cycle_rl_noise=1, self_train=1),
        eval=dict(sets="val,heldout,crowded,leakage", n=3, steps=2, cfg=3.0),
        args=dict(
            judge=["--dim=32", "--depth=1", "--heads=2", "--text_depth=1", "--batch_size=4", "--cache_scenes=64",
                   "--val_scenes=0", "--warmup_steps=1", "--eval_interval=0", "--ckpt_interval=0"],
            pretrain=["--patch=8", "--dim=32", "--depth=2", "--heads=2", "--text_depth=1", "--batch_size=4",
                      "--cache_scenes=64", "--val_scenes=0", "--warmup_steps=1", "--eval_interval=0",
                      "--ckpt_interval=0"],
            djo=["--batch_size=4", "--cache_scenes=64", "--val_scenes=0", "--warmup_steps=1", "--eval_interval=0",
                 "--ckpt_interval=0"],
            cycle_rl=["--val_scenes=0", "--layouts_per_update=2", "--group_size=2", "--sample_steps=2",
                      "--reward_refresh=1", "--ckpt_interval=1", "--probe_scenes=2"],
        ),
    ),
    # GPUs: the main job's chain at R = 64, the DiT-S-sized model of config/gpu.py (bf16, torch.compile);
    # --nproc=N for torchrun.
    # Not yet run: the budgets are the scripts' GPU defaults, untimed.
    "gpu": dict(
        out_dir="out/pipeline_gpu",
        res=64,
        budgets=dict(judge=3000, pmtp=20000, djo=2000, cycle_rl=200),
        eval=dict(sets="val,heldout,crowded,leakage", n=256, steps=25, cfg=3.0),
        args=dict(
            judge=["--cache_scenes=50000", "--eval_interval=1000", "--ckpt_interval=1000", "--compile=True"],
            pretrain=["config/gpu.py", "--val_scenes=256"],
            djo=["--batch_size=64", "--cache_scenes=50000", "--val_scenes=256", "--eval_interval=500",
                 "--ckpt_interval=500"],
            cycle_rl=["--layouts_per_update=8", "--val_scenes=256", "--eval_interval=25", "--ckpt_interval=25"],
        ),
    ),
}
# -----------------------------------------------------------------------------

# name -> (script, the preset's argument list it takes, its own arguments, the stage whose checkpoint it starts from)
CONTINUED = ["--lr=3e-4", "--min_lr=3e-5", "--warmup_steps=20", "--seed=2024", "--data_seed=1"]  # DJO's lr, warmup and seeds
STAGES = {
    "judge": (["train_detector.py"], "judge", [], None),
    "gen_only": (["train_pretrain.py"], "pretrain", ["--ground_every=0"], None),
    "pmtp": (["train_pretrain.py"], "pretrain", [], None),
    "pmtp_idm": (["train_pretrain.py"], "pretrain", ["--idm=True"], None),
    # PMTP warm-started from its checkpoint with DJO's optimizer, schedule and seeds: DJO's control
    "pmtp_more": (["train_pretrain.py"], "pretrain", CONTINUED, "pmtp"),
    "djo": (["train_joint.py"], "djo", [], "pmtp"),
    # DJO warm-started from its checkpoint at Cycle RL's lr: Cycle RL's control
    "djo_more": (["train_joint.py"], "djo", ["--lr=1e-4", "--min_lr=1e-5", "--seed=2025", "--data_seed=2"], "djo"),
    "cycle_rl": (["train_cycle_rl.py"], "cycle_rl", ["--algo=grpo"], "djo"),
    "cycle_rl_ppo": (["train_cycle_rl.py"], "cycle_rl", ["--algo=ppo"], "djo"),
    # the checker as the reward: an upper bound on what the stage can add in its budget (the head gets no gift:
    # its verdict is not a grounder's)
    "cycle_rl_oracle": (["train_cycle_rl.py"], "cycle_rl", ["--algo=grpo", "--reward_kind=checker",
                                                           "--ground_generated=False"], "djo"),
    # the standalone judge (trained on the pipeline's images, out_dir/judge) as the reward: I-DRUID's AI feedback
    "cycle_rl_judge": (["train_cycle_rl.py"], "cycle_rl", ["--algo=grpo", "--reward_ckpt={root}/judge/ckpt"], "djo"),
    # a reward of pure noise: the floor, which must leave the model where it was
    "cycle_rl_noise": (["train_cycle_rl.py"], "cycle_rl", ["--algo=grpo", "--reward_kind=noise",
                                                          "--ground_generated=False"], "djo"),
    # verified self-training: each layout's best own-head-verified sample trains the flow loss (at a supervised lr)
    "self_train": (["train_cycle_rl.py"], "cycle_rl", ["--algo=self_train", "--lr=1e-4", "--min_lr=1e-4"], "djo"),
}
ROWS = {  # the rows of the results table, in its order (those of the preset's stages)
    "gen_only": "generation only (baseline)",
    "pmtp": "PMTP",
    "pmtp_idm": "PMTP + IDM",
    "pmtp_more": "PMTP continued (DJO's minutes)",
    "djo": "PMTP + DJO",
    "djo_more": "PMTP + DJO continued (Cycle RL's minutes)",
    "cycle_rl": "PMTP + DJO + Cycle RL (GRPO)",
    "cycle_rl_ppo": "PMTP + DJO + Cycle RL (PPO)",
    "cycle_rl_oracle": "PMTP + DJO + Cycle RL, the checker as reward (oracle)",
    "cycle_rl_judge": "Cycle RL, the standalone judge as reward",
    "cycle_rl_noise": "Cycle RL, a reward of pure noise (the floor)",
    "self_train": "verified self-training",
}
TRUE_RENDERS = "true renders (the ceiling)"
ROOT = os.path.dirname(os.path.abspath(__file__))


def table_files(preset_name):
    """The combined table and its JSON in out_dir: tiny's table.md and results.json, the other presets'
    table_{preset}.md and results_{preset}.json (ablations shares the main job's out_dir)."""
    suffix = "" if preset_name == "tiny" else f"_{preset_name}"
    return f"table{suffix}.md", f"results{suffix}.json"


WRITTEN = [*STAGES, "eval", "timings.json", *(f for name in PRESETS for f in table_files(name))]  # what --fresh deletes


def model_stages(preset):
    """The preset's stages that make a model, each a row of its table, in ROWS' order."""
    return [name for name in ROWS if name in preset["budgets"]]


def checkpoint_step(stage_dir):
    """The step of a stage's checkpoint, None when it has none yet."""
    path = os.path.join(stage_dir, "ckpt", "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["step"]


def read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def repository_path(arg):
    """A script or config file of this repository, as a path from the working directory (which the stages
    share with the pipeline, so that out_dir and data_dir mean the same to all); other arguments as they are."""
    return os.path.relpath(os.path.join(ROOT, arg)) if arg.endswith(".py") and not arg.startswith("--") else arg


IMAGE_READERS = ("judge", "pretrain", "djo")  # the argument lists of the scripts that read paired images


def parent_stage(name, preset):
    """The stage whose checkpoint this one starts from: the preset's choice, else STAGES'."""
    return preset.get("parents", {}).get(name, STAGES[name][3])


def seed_dir(out_dir, k):
    """Where training seed k's stages live: out_dir itself for seed 0, out_dir/seed{k} for the others."""
    return out_dir if k == 0 else os.path.join(out_dir, f"seed{k}")


def stage_argv(name, preset, out_dir, data_dir, device, k=0, root=None):
    """The stage's script and arguments, without the launcher and without --init_from=resume: what is
    recorded in {stage}/pipeline.json and compared on the next run. out_dir: the seed's folder; root: the
    pipeline's (where the shared judge lives); k > 0: a further training seed, 100 k + the stage's place in
    STAGES, so that no two stages or seeds share one."""
    script, key, own, _ = STAGES[name]
    parent, budget = parent_stage(name, preset), preset["budgets"][name]
    own = [arg.replace("{root}", root or out_dir) for arg in own]
    argv = [*map(repository_path, script + preset["args"][key]), *own, f"--out_dir={os.path.join(out_dir, name)}",
            f"--max_steps={budget}", f"--lr_decay_steps={budget}", f"--data_dir={data_dir}", f"--device={device}"]
    if key in IMAGE_READERS:
        argv += preset.get("data_args", [])
    if k:
        argv.append(f"--seed={100 * k + list(STAGES).index(name)}")
    if key in ("judge", "pretrain"):  # the others take the resolution from their init checkpoint
        argv.append(f"--res={preset['res']}")
    if parent:
        argv.append(f"--init_from={os.path.join(out_dir, parent, 'ckpt')}")
    return argv


def launcher(nproc):
    """One process, or torchrun (gloo on the CPU, NCCL on GPUs; each rank draws its own data)."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def train_stage(name, preset, args, retrained, k=0):
    """Train one stage of training seed k unless its checkpoint is finished with the same command.
    -> True when it trained."""
    out_dir = seed_dir(args.out_dir, k)
    stage_dir = os.path.join(out_dir, name)
    argv = stage_argv(name, preset, out_dir, args.data_dir, args.device, k, args.out_dir)
    parent = parent_stage(name, preset)
    recorded = read_json(os.path.join(stage_dir, "pipeline.json"))
    if os.path.isdir(stage_dir) and (parent in retrained or (recorded or {}).get("argv") != argv):
        why = f"{parent} was trained again" if parent in retrained else "its command changed (or it has no record)"
        print(f"{name}: starting over, {why}", flush=True)
        shutil.rmtree(stage_dir)
    step, budget = checkpoint_step(stage_dir), preset["budgets"][name]
    if step is not None and step >= budget:
        print(f"{name}: finished earlier (step {step} of {budget}), skipped", flush=True)
        return False
    if step is None:
        shutil.rmtree(stage_dir, ignore_errors=True)  # a run cut before its first checkpoint: its log starts again
    os.makedirs(stage_dir, exist_ok=True)
    evaluate.write_text(os.path.join(stage_dir, "pipeline.json"), json.dumps({"argv": argv}, indent=1) + "\n")
    # resuming replaces the parent checkpoint as init (the scripts read their reference from the saved config)
    command = launcher(args.nproc) + [a for a in argv if not a.startswith("--init_from=")] + (
        ["--init_from=resume"] if step is not None else [a for a in argv if a.startswith("--init_from=")])
    print(f"{name}: {' '.join(command[1:] if args.nproc == 1 else command)}"
          + (f" (resuming from step {step})" if step is not None else ""), flush=True)
    result = subprocess.run(command)
    if result.returncode != 0:
        runtime.fail(f"stage {name} failed (exit status {result.returncode}, its output is above); "
                     f"run the pipeline again to resume it from its last checkpoint")
    return True


def eval_stage(name, preset, args, device, must, k=0):
    """eval.evaluate_checkpoint of seed k's model of a stage into eval/{stage}/ of the seed's folder,
    unless results with the same model and settings are there and must is False. -> the results dict."""
    out_dir = seed_dir(args.out_dir, k)
    out = os.path.join(out_dir, "eval", name)
    ckpt = os.path.join(out_dir, name, "ckpt")
    judge = os.path.join(args.out_dir, "judge", "ckpt")
    settings = preset["eval"]
    previous = read_json(os.path.join(out, "results.json"))
    same = (previous is not None and previous["step"] == checkpoint_step(os.path.join(out_dir, name))
            and previous["judge"] == judge and list(previous["sets"]) == settings["sets"].split(",")
            and all(previous[key] == settings[key] for key in ("n", "steps", "cfg")))
    if same and not must:
        print(f"eval {name}: done earlier, skipped", flush=True)
        return previous
    return evaluate.evaluate_checkpoint(ckpt, settings["sets"].split(","), settings["n"], settings["steps"],
                                         settings["cfg"], 1.0, device, judge, out, label=name)


def true_render_figures(preset, args, device):
    """Every column on the world's own renders at the pipeline's R: the checker's and the judge's ceiling."""
    judge = evaluate.load_judge(os.path.join(args.out_dir, "judge", "ckpt"), preset["res"], device)
    settings = preset["eval"]
    return {kind: evaluate.evaluate(None, shapescenes.make_scene_set(kind, settings["n"], seed=0), None, judge=judge,
                                      generator=lambda scenes: data.scene_images(scenes, preset["res"]))
            for kind in settings["sets"].split(",")}


def row_label(name, preset):
    """A stage's row in the table: the preset's own label, else ROWS'."""
    return preset.get("rows", {}).get(name, ROWS[name])


def comparisons(preset, out_dir, seeds):
    """Each model stage against the preset's control, over every training seed and the scenes: the difference
    of ISR and head Acc@0.5 with its 95% interval (evaluate.compare), a table per arm."""
    control = preset["control"]
    results = lambda name: [os.path.join(seed_dir(out_dir, k), "eval", name, "results.json") for k in range(seeds)]
    lines = [f"## Each arm against `{control}` ({seeds} training seed{'s' if seeds > 1 else ''}; "
             f"95% intervals over seeds and scenes)\n"]
    for name in model_stages(preset):
        if name != control:
            lines += [f"### {row_label(name, preset)} (`{name}`)\n", evaluate.compare(results(name), results(control))]
    return "\n".join(lines)


def minutes(seconds):
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def results_table(name, preset, rows, timings, command):
    """The combined markdown table: per scene set, a row per model."""
    settings = preset["eval"]
    lines = [f"# EchoGen, the main job: preset {name}\n",
             f"`{command}`, R = {preset['res']}; each model's EMA weights, {settings['n']} scenes per set (seed 0), "
             f"{settings['steps']} Euler steps, CFG {settings['cfg']}. Step budgets: "
             + ", ".join(f"{stage} {budget}" for stage, budget in preset["budgets"].items())
             + ". Wall time per stage (training + evaluation, as measured when it last ran): "
             + ", ".join(f"{stage} {minutes(s)}" for stage, s in timings.items())
             + f"; total {minutes(sum(timings.values()))}.\n",
             "Columns: the rule-based checker on the generated images (ISR, mIoU, color and shape accuracy, image "
             "success; color leak on the leakage probe: the share of boxes holding another object's color); "
             "the standalone judge's ISR and mIoU on the generated images; the model's own grounding head on the "
             "true renders (Acc@0.5, mIoU, AP) and on its own images against the asked boxes (self-grounding, "
             "the view of Cycle RL's reward).\n"]
    for kind in settings["sets"].split(","):
        lines.append(f"## {evaluate.SET_NAMES.get(kind, kind)} (`{kind}`)\n")
        lines.append(evaluate.markdown_table([(label, sets[kind]) for label, sets in rows.items()], "model"))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description="EchoGen's main job: the three stages, evaluated, one table.")
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS), help="tiny (the main job, CPU, the default), "
                        "ablations (every stage, CPU), micro (seconds, for the tests) or gpu (R = 64, config/gpu.py)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per training stage; > 1 launches torchrun")
    parser.add_argument("--out_dir", default="", help="default: the preset's (out/pipeline for tiny)")
    parser.add_argument("--data_dir", default="data", help="where the scripts keep the pre-rendered caches")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--fresh", action="store_true", help="delete what an earlier run wrote and train everything")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds of every stage but the judge; the further "
                        "ones train into out_dir/seed{k}/, and a preset with a control compares each arm with it")
    args = parser.parse_args()
    if args.nproc < 1:
        runtime.fail(f"--nproc must be >= 1, got {args.nproc}")
    if args.seeds < 1:
        runtime.fail(f"--seeds must be >= 1, got {args.seeds}")
    preset = PRESETS[args.preset]
    args.out_dir = args.out_dir or preset["out_dir"]
    device = runtime.resolve_device(args.device)
    if args.fresh:
        for entry in WRITTEN + [f"seed{k}" for k in range(1, args.seeds)]:
            path = os.path.join(args.out_dir, entry)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(args.out_dir, exist_ok=True)
    timings_path = os.path.join(args.out_dir, "timings.json")
    timings = read_json(timings_path) or {}
    start, retrained = time.perf_counter(), {k: [] for k in range(args.seeds)}  # per seed: the stages trained now

    stages = list(preset["budgets"])
    runs = [(k, name) for k in range(args.seeds) for name in stages if k == 0 or name != "judge"]  # one judge
    for i, (k, name) in enumerate(runs):
        label = name if k == 0 else f"seed{k}/{name}"
        print(f"[{i + 1}/{len(runs)}] {label}", flush=True)
        tic = time.perf_counter()
        if train_stage(name, preset, args, retrained[k], k):
            retrained[k].append(name)
        if name in ROWS:
            eval_stage(name, preset, args, device, must=name in retrained[k] or "judge" in retrained[0], k=k)
        if name in retrained[k]:
            timings[label] = round(time.perf_counter() - tic, 1)
            evaluate.write_text(timings_path, json.dumps(timings, indent=1) + "\n")

    # one table: the true renders' row, then each model's results as eval wrote them
    rows = {TRUE_RENDERS: true_render_figures(preset, args, device)}
    for name in model_stages(preset):
        rows[row_label(name, preset)] = read_json(os.path.join(args.out_dir, "eval", name, "results.json"))["sets"]
    command = "python pipeline.py" + (f" --preset={args.preset}" if args.preset != "tiny" else "") + (
        f" --nproc={args.nproc}" if args.nproc > 1 else "") + (f" --seeds={args.seeds}" if args.seeds > 1 else "")
    table = results_table(args.preset, preset, rows, {k: timings[k] for k in stages if k in timings}, command)
    if "control" in preset:
        table += "\n" + comparisons(preset, args.out_dir, args.seeds)
    results = {"preset": args.preset, "res": preset["res"], "budgets": preset["budgets"], "eval": preset["eval"],
               "seconds": timings, "rows": rows}
    table_path, results_path = (os.path.join(args.out_dir, f) for f in table_files(args.preset))
    evaluate.write_text(table_path, table)
    evaluate.write_text(results_path, json.dumps(results, indent=1) + "\n")
    print("\n" + table)
    trained = [name if k == 0 else f"seed{k}/{name}" for k, names in retrained.items() for name in names]
    print(f"done in {minutes(time.perf_counter() - start)} (this run; trained: {', '.join(trained) or 'nothing'})")
    print(f"table: {table_path} (figures: {results_path})")
    print(f"grids: {os.path.join(args.out_dir, 'eval', '{stage}', 'grids', '{set}.png')} "
          f"(generated image with the asked boxes | true render | the model's own grounding of its image)")


if __name__ == "__main__":
    main()
