"""
The learning curve of a training config against minutes of training on this machine: the checker's
ISR, mIoU and shape accuracy of the EMA model on the fixed validation set, at training minutes (the
time spent in training steps; evaluations and checkpoints excluded), then the final model on the
fixed val, heldout and crowded sets.

    python curve.py --minutes=15 --out_dir=out/curve_gen --ground_every=0       # generation only
    python curve.py --minutes=15 --out_dir=out/curve_pmtp                       # PMTP, the tiny config
    python curve.py --minutes=15 --out_dir=out/curve_old --ground_every=0 --layout_map=0 --pixel_head=0 --prediction=v
    python curve.py --log=out/curve_gen/log.jsonl                               # print the curve of a finished run
    python curve.py --log=out/cycle_rl/log.jsonl                                # plot Cycle RL's reward and checker ISR
    python curve.py --logs=out/a/log.jsonl,out/b/log.jsonl --png=probes.png     # Cycle RL arms on their fixed probe

Every other --key=value (or config file) goes to train_pretrain.py unchanged. The step budget comes
from the config's measured speed: a 40-step calibration run first, then max_steps = lr_decay_steps =
minutes x 60 x steps/s, with `points` evaluations along the way. Run it alone on the machine: the
minutes are wall-clock minutes of this CPU (or GPU), and another process on the same cores slows it.
"""

import argparse
import json
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

import evaluate

HERE = os.path.dirname(os.path.abspath(__file__))


def train(args, out_dir):
    """train_pretrain.py with the given arguments; stops this script if it fails."""
    command = [sys.executable, os.path.join(HERE, "train_pretrain.py"), *args, f"--out_dir={out_dir}"]
    if subprocess.run(command).returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed")


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def measured_steps_per_s(train_args, out_dir, steps=40):
    """Training steps per second of the config, from a short run's last log window (its first ten
    steps hold the warmup of the allocator and are left out by the log interval)."""
    train([*train_args, f"--max_steps={steps}", f"--lr_decay_steps={steps}", "--eval_interval=0", "--val_scenes=0",
           "--ckpt_interval=0", "--log_interval=10"], out_dir)
    return read_log(os.path.join(out_dir, "log.jsonl"))[-1]["steps_per_s"]


def curve_table(records):
    """The eval records of a train_pretrain.py log -> a markdown table against training minutes."""
    lines = ["| step | training minutes | val ISR | val mIoU | val shape acc | val color acc |",
             "| --- | --- | --- | --- | --- | --- |"]
    for record in records:
        if "eval" in record:
            m = record["eval"]
            lines.append(f"| {record['step']} | {record.get('train_seconds', float('nan')) / 60:.1f} | {m['isr']:.3f} | "
                         f"{m['miou']:.3f} | {m['shape_acc']:.3f} | {m['color_acc']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_cycle_rl(records, path, title="", reward_label="reward (IoU + confidence)"):
    """A Cycle RL log -> a PNG of two panels against updates: the reward (per update, its running mean
    over 10, and on the fixed probe), and the rule-based checker's ISR, on the update's own SDE samples,
    on the fixed probe (the policy, Euler sampler) and on the validation set (the EMA model) at its
    evaluations. A rising reward over a flat checker is reward hacking; written to a temporary name,
    then renamed."""
    updates = [r for r in records if "reward" in r]
    probes = [r for r in records if "probe_isr" in r or "probe_reward" in r]
    evals = [r for r in records if "isr" in r.get("eval", {})]  # real data without a judge has no ISR
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 5.5))
    x, reward = [r["step"] for r in updates], [r["reward"] for r in updates]
    top.plot(x, reward, color="tab:blue", alpha=0.35, lw=1, label="reward per update")
    top.plot(x, [sum(reward[max(0, i - 9):i + 1]) / len(reward[max(0, i - 9):i + 1]) for i in range(len(reward))],
             color="tab:blue", lw=2, label="running mean (10 updates)")
    if any("probe_reward" in r for r in probes):
        top.plot([r["step"] for r in probes if "probe_reward" in r], [r["probe_reward"] for r in probes
                                                                     if "probe_reward" in r],
                 color="tab:purple", lw=2, label="on the fixed probe")
    top.set_ylabel(reward_label)
    top.legend(loc="lower right", fontsize=8)
    if updates and "sample_isr" in updates[0]:
        bottom.plot(x, [r["sample_isr"] for r in updates], color="tab:orange", alpha=0.5, lw=1,
                    label="checker ISR of the update's samples")
    if any("probe_isr" in r for r in probes):
        bottom.plot([r["step"] for r in probes if "probe_isr" in r], [r["probe_isr"] for r in probes if "probe_isr" in r],
                    color="tab:purple", lw=2, label="checker ISR on the fixed probe (policy)")
    bottom.plot([r["step"] for r in evals], [r["eval"]["isr"] for r in evals], "o-", color="tab:green", lw=2,
                label="checker ISR on val (EMA)")
    bottom.set_xlabel("update")
    bottom.set_ylabel("checker ISR")
    bottom.legend(loc="lower right", fontsize=8)
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
    top.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path):
    """A matplotlib figure -> a PNG, written to a temporary name, then renamed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def plot_probes(runs, path, title=""):
    """Cycle RL arms {label: log records} -> a PNG of two panels against updates: each arm's mean reward on
    its fixed probe (the same layouts and noise at every update) as the change from before its first
    update, since the arms' rewards have other scales, and its checker ISR there. Arms that share the
    probe's settings (probe_scenes, layout_seed, seed) share its layouts, so their curves compare."""
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 5.5))
    for i, (label, records) in enumerate(runs.items()):
        color = f"C{i}"
        rewards = [(r["step"], r["probe_reward"]) for r in records if r.get("probe_reward") is not None]
        if rewards:
            top.plot([s for s, _ in rewards], [v - rewards[0][1] for _, v in rewards], "o-", color=color, lw=1.5,
                     ms=3, label=label)
        isr = [(r["step"], r["probe_isr"]) for r in records if r.get("probe_isr") is not None]
        if isr:
            bottom.plot(*zip(*isr), "o-", color=color, lw=1.5, ms=3, label=label)
    top.axhline(0, color="gray", lw=0.8)
    top.set_ylabel("probe reward - its start")
    bottom.set_ylabel("checker ISR on the probe")
    bottom.set_xlabel("update")
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    top.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--minutes", type=float, default=15.0, help="training minutes (wall clock, this machine)")
    parser.add_argument("--points", type=int, default=6, help="validation evaluations along the run")
    parser.add_argument("--out_dir", default="out/curve")
    parser.add_argument("--log", default="", help="only print the curve of this train_pretrain.py log.jsonl, or "
                        "plot a train_cycle_rl.py log.jsonl (reward and checker ISR) into --png")
    parser.add_argument("--logs", default="", help="comma-separated train_cycle_rl.py log.jsonl files: their fixed probes "
                        "in one plot (--png), each labelled by its folder")
    parser.add_argument("--png", default="", help="with a Cycle RL --log: the plot (default: reward.png beside the log); "
                        "with --logs: required")
    parser.add_argument("--sets", default="val,heldout,crowded", help="the final model's sets (evaluate.py --sets)")
    parser.add_argument("--n", type=int, default=100, help="scenes per set of the final model (seed 0)")
    parser.add_argument("--steps", type=int, default=25, help="Euler steps of the final evaluation")
    parser.add_argument("--cfg", type=float, default=3.0, help="guidance scale of the final evaluation")
    args, train_args = parser.parse_known_args()
    if args.logs:
        paths = args.logs.split(",")
        for path in paths:
            if not os.path.isfile(path):
                sys.exit(f"error: --logs: no file '{path}'")
        if not args.png:
            sys.exit("error: --logs needs --png")
        plot_probes({os.path.basename(os.path.dirname(os.path.abspath(p))): read_log(p) for p in paths}, args.png,
                    ", ".join(paths) if len(paths) < 4 else "")
        print(f"plot: {args.png}")
        return
    if args.log:
        records = read_log(args.log)
        if any("reward" in r for r in records):
            png = args.png or os.path.join(os.path.dirname(args.log), "reward.png")
            plot_cycle_rl(records, png, args.log)
            print(f"plot: {png}")
        else:
            print(curve_table(records), end="")
        return
    if args.minutes <= 0 or args.points < 1:
        sys.exit(f"error: --minutes must be > 0 and --points >= 1, got {args.minutes} and {args.points}")
    speed = measured_steps_per_s(train_args, os.path.join(args.out_dir, "calibrate"))
    every = max(1, round(args.minutes * 60 * speed / args.points))
    max_steps = every * args.points  # the last evaluation is the final one
    print(f"curve: {speed:.2f} steps/s measured, so {max_steps} steps for {args.minutes:g} minutes", flush=True)
    run_dir = os.path.join(args.out_dir, "run")
    log_path = os.path.join(run_dir, "log.jsonl")  # a run from scratch starts its log afresh
    train([*train_args, f"--max_steps={max_steps}", f"--lr_decay_steps={max_steps}", f"--eval_interval={every}",
           f"--ckpt_interval={every}", "--init_from=scratch"], run_dir)
    table = curve_table(read_log(log_path))
    results = evaluate.evaluate_checkpoint(os.path.join(run_dir, "ckpt"), args.sets.split(","), args.n, args.steps,
                                             args.cfg, out_dir=os.path.join(args.out_dir, "final"))
    command = " ".join(["python curve.py", f"--minutes={args.minutes:g}", f"--out_dir={args.out_dir}", *train_args])
    report = (f"`{command}` ({speed:.2f} steps/s measured)\n\n{table}\n"
              f"{evaluate.checkpoint_table(results)}")
    evaluate.write_text(os.path.join(args.out_dir, "curve.md"), report)
    print("\n" + report, end="")


if __name__ == "__main__":
    main()
