"""
Evaluation of an EchoGen model on fixed, seeded ShapeScenes sets (docs/design.md, "Honest measurement"):
layout-to-image quality by the rule-based checker (never by a learned grounder), and the
model's own grounding of the world's true renders.

    python evaluate.py --ckpt out/pretrain/ckpt                          # val and heldout, 64 scenes each
    python evaluate.py --ckpt out/pretrain/ckpt --sets val,heldout,crowded,leakage --n 64 --steps 25 --cfg 3.0
    python evaluate.py --ckpt out/pretrain/ckpt --sets val,heldout,crowded,leakage --judge out/detector/ckpt --out out/eval
    python evaluate.py --ckpt out/pretrain/ckpt --agreement 24     # does the own-head reward agree with the checker?

prints one JSON line per set, then a markdown table (a row per set). The sets: "val" in-distribution,
"heldout" the held-out compositions, "crowded" 5 to 8 objects, "leakage" the attribute-leakage probe
(objects of one shape in different colors, where IDM should help; "leakage" is its hardest case,
"leakage_CASE" each case of shapescenes.LEAKAGE_CASES): besides the checker's ISR and color accuracy (its own
color found in each box) it reports color_leak, the share of boxes holding another object's color.
Per set, at the checkpoint's resolution:
  - the rule-based checker on the generated images: ISR, mIoU, color and shape accuracy, image success;
  - "grounding": the model's own head on the world's true renders (Acc@0.5, mIoU, AP), and its mean
    confidence on the true phrases and on hard negatives, the same objects with the shape or the
    color swapped (conf_true, conf_wrong_shape, conf_wrong_color: a wrong shape scored like the true
    phrase means the confidence cannot see shapes);
  - "self_grounding": the same head on the model's own images against the asked boxes (Acc@0.5, mIoU),
    the view Cycle RL's reward takes: rising beside a flat checker, it shows reward hacking;
  - with --judge (a StandaloneDetector of the same resolution, train_detector.py --res=R): "judge", its
    ISR and mIoU (IoU >= 0.5 with the asked box) on the generated images, a learned verdict beside the
    checker's.
--out DIR writes table.md, results.json and DIR/grids/{set}.png (per row: the generated image with the
asked boxes | the true render | the model's own grounding of its generated image). The sets, seeds
and sampling noise are fixed, so two runs of the same checkpoint print and write the same figures.
The training scripts call evaluate() for their periodic validation figures; pipeline.py calls
evaluate_checkpoint() after every stage.

On real data (a COCO-format set: --dataset as the training scripts take it, by default the one the
checkpoint was trained on) there is no checker. The scenes are the data set's held-out images;
layout-to-image is scored as COCO-MIG does, by a StandaloneDetector trained on the real training
images (--judge): ISR = the share of instances whose phrase the judge finds with IoU >= 0.5 to the
asked box, mIoU the mean of those IoUs ("judge_real": the same judge on the real images, its
ceiling); grounding is scored against the annotations:
    python evaluate.py --ckpt out/coco/ckpt --judge out/coco_judge/ckpt --n 500
"""

import json
import os

import numpy as np
import torch
from tqdm import tqdm

import coco
import data
import layouts
import runtime
import shapescenes
import detector
import rewards
import sampler
from model import EchoGen


def is_leakage_scene(scene):
    """Two or more instances of one shape, each in its own color: a scene of the attribute-leakage probes."""
    instances = scene["instances"]
    shapes, colors = {inst.get("shape") for inst in instances}, [inst.get("color") for inst in instances]
    return len(instances) >= 2 and len(shapes) == 1 and None not in shapes and len(set(colors)) == len(colors)


def leakage_metrics(scenes, images):
    """On an attribute-leakage probe (every scene objects of one shape in different colors): {"color_leak":
    the share of instances whose box holds another instance's color}, found as the checker finds colors
    (connected to the box's core), so a true render scores 0 and a swap of colors 1. {} otherwise."""
    if not scenes or not all(map(is_leakage_scene, scenes)):
        return {}
    leaks = [any(shapescenes.check_instance(image, dict(instance, color=other["color"]))["color_found"]
                 for other in scene["instances"] if other is not instance)
             for scene, image in zip(scenes, images) for instance in scene["instances"]]
    return {"color_leak": round(sum(leaks) / len(leaks), 4)}


def judge_images(judge, scenes, images):
    """COCO-MIG's layout-to-image figures from a judge (a detector.Grounder, with its own tokenizer and
    resolution): each instance's phrase is grounded in its image, one box per instance (repeated
    phrases matched one-to-one); ISR = the share with IoU >= 0.5 to the asked box, mIoU their mean IoU."""
    images = data.scene_images([{"image": image} for image in images], judge.res)
    boxes, scores = detector.ground_scenes(judge, scenes, images, judge.tokenizer, judge.max_instances, judge.device)
    found = detector.grounding_metrics(boxes, scores, scenes)
    return {"isr": round(found["acc50"], 4), "miou": round(found["miou"], 4),
            "n_instances": sum(len(scene["instances"]) for scene in scenes)}


def real_data_metrics(scenes, images, truths, judge):
    """Real scenes (they carry their image) have no checker: the judge's figures of the model's images
    when a judge is given, and "judge_real", the same judge on the real images (its ceiling)."""
    metrics = {}
    if judge is not None:
        metrics.update(judge_images(judge, scenes, images))
        metrics["judge_real"] = judge_images(judge, scenes, truths)
    return metrics


def own_grounder(model, tokenizer):
    """The model's own grounding head as a detector.Grounder; None without one (generation only, or no model)."""
    if model is None or not model.config.grounding:
        return None
    device = next(model.parameters()).device
    return detector.Grounder("EchoGen", model, tokenizer, model.config.res, model.config.max_instances, device)


def ground(grounder, scenes, images):
    """A grounder's boxes for the scenes' phrases in images, and its figures against the scenes' boxes
    -> (boxes_xyxy (S, N, 4), {"acc50", "miou", "ap", "ap50"})."""
    boxes, scores = detector.ground_scenes(grounder, scenes, images, grounder.tokenizer, grounder.max_instances,
                                           grounder.device)
    return boxes, {k: round(v, 4) for k, v in detector.grounding_metrics(boxes, scores, scenes).items()}


def shared_color_accuracy(boxes, scenes):
    """Acc@0.5 of each instance's own slot, apart for the instances whose color another object of the
    scene shares (there the color alone cannot find the object: the grounder must see its shape) and
    for the others -> {"acc50_shared_color", "acc50_own_color"} (None where a set has no such instance)."""
    hits = {True: [], False: []}
    for scene, scene_boxes in zip(scenes, boxes.tolist()):
        colors = [inst["color"] for inst in scene["instances"]]
        for inst, box in zip(scene["instances"], scene_boxes):
            hits[colors.count(inst["color"]) > 1].append(shapescenes.box_iou(box, inst["box"]) >= 0.5)
    return {f"acc50_{name}": round(float(np.mean(hits[shared])), 4) if hits[shared] else None
            for name, shared in (("shared_color", True), ("own_color", False))}


def drawable(box, res):
    """A predicted xyxy box that layouts.draw_boxes can draw: at least a pixel of the image wide and high
    (a collapsed prediction would otherwise make PIL refuse the rectangle)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, max(x1, x0 + 1 / res), max(y1, y0 + 1 / res)]


def draw_found(image, scene, boxes):
    """The image with the boxes (N, 4) xyxy a grounder found for the scene's phrases, in their colors."""
    found = [dict(inst, box=drawable(box, image.shape[0])) for inst, box in zip(scene["instances"], boxes)]
    return layouts.draw_boxes(image, dict(scene, instances=found))


def grid_rows(scenes, images, truths, own_boxes=None, n_rows=8):
    """Rows of a sample grid: the generated image with the asked boxes | the true render (or real image)
    with them | with own_boxes, the generated image with the boxes the model's head found in it."""
    rows = []
    for i, (scene, image, truth) in enumerate(list(zip(scenes, images, truths))[:n_rows]):
        row = [layouts.draw_boxes(image, scene), layouts.draw_boxes(truth, scene)]
        if own_boxes is not None:
            row.append(draw_found(image, scene, own_boxes[i]))
        rows.append(row)
    return rows


def evaluate(model, scenes, tokenizer, steps=25, cfg_scale=3.0, shift=1.0, grid_path=None, judge=None, generator=None):
    """The checker's figures of the model's images of `scenes` (at the model's resolution), color_leak
    on the leakage probe, and, for a model with a grounding head, {"grounding": Acc@0.5, mIoU, AP} of
    its grounding of the true renders and {"self_grounding": Acc@0.5, mIoU} of its grounding of its
    own images. Real scenes: real_data_metrics instead of the checker's, and grounding of the real
    images. A judge on ShapeScenes adds its figures as {"judge": ...}. grid_path: a sample grid
    (grid_rows). generator: scenes -> uint8 images, in place of sampling the model (the tests score
    the world's true renders and noise through it); with one, model may be None (no grounding)."""
    if generator is None:
        generator = lambda scenes: sampler.generate(model, scenes, tokenizer, steps, cfg_scale, shift)
    images = generator(scenes)
    res = images[0].shape[0] if len(images) else model.config.res
    truths = data.scene_images(scenes, res)  # the true renders, or the real images
    real = data.is_real(scenes)
    if real:
        metrics = real_data_metrics(scenes, images, truths, judge)
    else:
        metrics = {**shapescenes.check_images(scenes, images), **leakage_metrics(scenes, images)}
        if judge is not None:
            metrics["judge"] = judge_images(judge, scenes, images)
    grounder, own_boxes = own_grounder(model, tokenizer), None
    if grounder is not None:
        boxes, metrics["grounding"] = ground(grounder, scenes, truths)
        if not real:
            metrics["grounding"].update(shared_color_accuracy(boxes, scenes))
            # does its confidence see shapes and colors, or only boxes? (the confidence half of the reward)
            metrics["grounding"].update(detector.presence_confidence(grounder, scenes, truths, tokenizer,
                                                                     grounder.max_instances, grounder.device))
            # the view of Cycle RL's reward: the head's boxes in the model's own images
            own_boxes, found = ground(grounder, scenes, images)
            metrics["self_grounding"] = {"acc50": found["acc50"], "miou": found["miou"]}
    if grid_path:
        layouts.save_grid(grid_path, grid_rows(scenes, images, truths, own_boxes))
    return metrics


def summary(metrics):
    """One line for a progress bar or a log."""
    line = "ISR {isr:.3f} mIoU {miou:.3f}".format(**metrics) if "isr" in metrics else "no judge"  # real data, no judge
    if "color_acc" in metrics:
        line += " color {color_acc:.3f} shape {shape_acc:.3f}".format(**metrics)
    if "color_leak" in metrics:
        line += " leak {color_leak:.3f}".format(**metrics)
    if "grounding" in metrics:
        line += " | grounding Acc@0.5 {acc50:.3f} mIoU {miou:.3f} AP {ap:.3f}".format(**metrics["grounding"])
    if "self_grounding" in metrics:
        line += " self {acc50:.3f}".format(**metrics["self_grounding"])
    if "judge" in metrics:
        line += " | judge ISR {isr:.3f} mIoU {miou:.3f}".format(**metrics["judge"])
    return line


# -----------------------------------------------------------------------------
# the results table of a checkpoint (a row per set) or of the pipeline (a row per model)

SET_NAMES = {"train": "training scenes", "val": "in-distribution", "heldout": "held-out compositions",
             "crowded": "crowded, 5 to 8 objects", "leakage": "attribute-leakage probe (its hardest case)",
             **{f"leakage_{case}": f"leakage probe, case {case}" for case in shapescenes.LEAKAGE_CASES}}
COLUMNS = [  # (header, where the figure lives in a set's metrics)
    ("ISR", ("isr",)), ("mIoU", ("miou",)), ("color acc", ("color_acc",)), ("shape acc", ("shape_acc",)),
    ("image success", ("image_success",)), ("color leak", ("color_leak",)),
    ("judge ISR", ("judge", "isr")), ("judge mIoU", ("judge", "miou")),
    ("grounding Acc@0.5", ("grounding", "acc50")),
    ("grounding Acc@0.5, color shared", ("grounding", "acc50_shared_color")),
    ("grounding Acc@0.5, color own", ("grounding", "acc50_own_color")), ("grounding mIoU", ("grounding", "miou")),
    ("grounding AP", ("grounding", "ap")), ("conf true", ("grounding", "conf_true")),
    ("conf wrong shape", ("grounding", "conf_wrong_shape")), ("conf wrong color", ("grounding", "conf_wrong_color")),
    ("self-grounding Acc@0.5", ("self_grounding", "acc50")),
]


def figure(metrics, path):
    for key in path:
        if not isinstance(metrics, dict) or key not in metrics:
            return None
        metrics = metrics[key]
    return metrics


def markdown_table(rows, first_header):
    """rows: [(label, a set's metrics)] -> a markdown table of COLUMNS; a column that no row has (no
    judge, no grounding head, no leakage probe) is left out, a figure one row lacks is "-"."""
    columns = [(header, path) for header, path in COLUMNS if any(figure(m, path) is not None for _, m in rows)]
    lines = ["| " + " | ".join([first_header] + [header for header, _ in columns]) + " |",
             "| " + " | ".join(["---"] * (len(columns) + 1)) + " |"]
    for label, metrics in rows:
        cells = [figure(metrics, path) for _, path in columns]
        lines.append("| " + " | ".join([label] + ["-" if v is None else f"{v:.3f}" for v in cells]) + " |")
    return "\n".join(lines) + "\n"


def write_text(path, text):
    """Atomically (a temporary name, then a rename): a reader never sees half a table."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    runtime.write_atomically(path, lambda f: f.write(text.encode()))


def load_judge(path, res, device):
    """The standalone judge of a ShapeScenes evaluation; it must see the images at the resolution they
    were made at (a judge trained at another one would be scoring resized images it never saw)."""
    judge = detector.load_grounder(path, device)
    if judge.res != res:
        runtime.fail(f"--judge '{path}': a judge of resolution {judge.res}, the model makes {res} "
                     f"(train one with train_detector.py --res={res})")
    return judge


def evaluate_checkpoint(ckpt, sets, n=64, steps=25, cfg_scale=3.0, shift=1.0, device="cpu", judge="", out_dir=None,
                        label=None):
    """evaluate() of a checkpoint's EMA weights on each ShapeScenes set (n scenes, seed 0), with a
    tqdm line. out_dir: results.json ({"ckpt", "step", the settings, "sets": {set: metrics}}),
    table.md and grids/{set}.png. -> the results dict."""
    model, tokenizer, saved = runtime.load_model(ckpt, EchoGen, "ema", device)
    for kind in sets:
        if kind not in shapescenes.SCENE_SETS:
            runtime.fail(f"--sets: unknown set '{kind}' ({', '.join(shapescenes.SCENE_SETS)})")
        most = shapescenes.SCENE_SETS[kind][1][1]
        if most > model.config.max_instances:
            runtime.fail(f"--sets: '{kind}' holds up to {most} objects, the model at '{ckpt}' takes "
                         f"max_instances = {model.config.max_instances}")
    judge_grounder = load_judge(judge, model.config.res, device) if judge else None
    results = {"ckpt": ckpt, "step": saved.get("step"), "res": model.config.res, "n": n, "steps": steps, "cfg": cfg_scale,
               "shift": shift, "judge": judge or None, "sets": {}}
    for kind in tqdm(sets, desc=f"eval {label or ckpt}"):
        scenes = shapescenes.make_scene_set(kind, n, seed=0)
        grid = os.path.join(out_dir, "grids", f"{kind}.png") if out_dir else None
        if grid:
            os.makedirs(os.path.dirname(grid), exist_ok=True)
        results["sets"][kind] = evaluate(model, scenes, tokenizer, steps, cfg_scale, shift, grid_path=grid,
                                         judge=judge_grounder)
    if out_dir:
        write_text(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1) + "\n")
        write_text(os.path.join(out_dir, "table.md"), checkpoint_table(results))
    return results


def checkpoint_table(results):
    """The markdown table of one checkpoint's results: a row per set, under a line naming what made it."""
    judge = f", judged by {results['judge']}" if results["judge"] else ""
    head = (f"{results['ckpt']} (step {results['step']}), R = {results['res']}, {results['n']} scenes per set, "
            f"{results['steps']} Euler steps, CFG {results['cfg']}{judge}\n\n")
    rows = [(f"{kind} ({SET_NAMES.get(kind, kind)})", metrics) for kind, metrics in results["sets"].items()]
    return head + markdown_table(rows, "set")


# variants of the layout reward from the grounder's per-instance IoU and confidence (B, N) and the
# instance mask: today's Cycle RL reward (rewards.score_layouts), its two halves, and their product
REWARD_VARIANTS = {
    "iou + confidence (Cycle RL's)": lambda iou, conf, mask: ((iou + conf) * mask).sum(1) / mask.sum(1),
    "iou": lambda iou, conf, mask: (iou * mask).sum(1) / mask.sum(1),
    "confidence": lambda iou, conf, mask: (conf * mask).sum(1) / mask.sum(1),
    "iou x confidence per instance": lambda iou, conf, mask: (iou * conf * mask).sum(1) / mask.sum(1),
}


@torch.no_grad()
def reward_agreement(model, tokenizer, n_layouts, kind="train", group_size=8, steps=10, cfg_scale=3.0, noise_level=0.7,
                     sde_window=(0, 3), seed=0):
    """Does the model's own layout reward agree with the checker where GRPO looks, within a group?
    n_layouts layouts of the scene set `kind`'s distribution (seeded by seed and index, not the set's own
    seed), group_size samples each through Cycle RL's SDE
    (sampler.sample_sde, the default window of the early steps), each image grounded by the model's
    head and judged by the checker. -> {variant: rewards.agreement(...)} for REWARD_VARIANTS, and the
    head's mean IoU and confidence on the instances the checker passes and on those it fails."""
    device = next(model.parameters()).device
    grounder = own_grounder(model, tokenizer)
    model.train()  # Cycle RL samples in train mode (sampler.policy_step)
    per_variant, checker, instances = {name: [] for name in REWARD_VARIANTS}, [], []
    for i in tqdm(range(n_layouts), desc="agreement", leave=False):
        split, n_objects = shapescenes.SCENE_SETS[kind]
        scene = shapescenes.sample_scene(np.random.default_rng([seed, i]), n_objects, split)
        batch = {k: v.repeat_interleave(group_size, 0).to(device)
                 for k, v in layouts.collate([scene], None, tokenizer, model.config.max_instances).items()}
        noise = torch.randn((group_size, model.config.channels, model.config.res, model.config.res),
                            generator=torch.Generator().manual_seed(seed * 100003 + i)).to(device)
        generators = [runtime.step_generator(seed + 7919 * (j + 1), i, device) for j in range(group_size)]
        images = sampler.sample_sde(model, batch, noise, steps, cfg_scale, 1.0, noise_level, generators, sde_window)["x0"]
        boxes, scores = grounder({**batch, "images": images.float().clamp(-1, 1)})
        iou = rewards.matched_ious(boxes, batch["boxes"], batch["phrase_ids"], batch["instance_mask"])
        mask = batch["instance_mask"].float()
        for name, variant in REWARD_VARIANTS.items():
            per_variant[name].append(variant(iou, scores.float(), mask).cpu())
        passed = torch.tensor([[shapescenes.check_instance(picture, inst)["success"] for inst in scene["instances"]]
                               for picture in sampler.to_uint8(images)], dtype=torch.float32)  # (G, n)
        checker.append(passed.mean(1))
        n = len(scene["instances"])
        instances += list(zip(passed.flatten().tolist(), iou[:, :n].flatten().tolist(), scores[:, :n].flatten().tolist()))
    model.eval()
    checker = torch.cat(checker)
    result = {name: rewards.agreement(torch.cat(values), checker, group_size) for name, values in per_variant.items()}
    for verdict, key in ((1.0, "passed"), (0.0, "failed")):
        chosen = [(iou, conf) for ok, iou, conf in instances if ok == verdict]
        result[key] = {"instances": len(chosen), "iou": round(float(np.mean([c[0] for c in chosen])), 4) if chosen else None,
                       "confidence": round(float(np.mean([c[1] for c in chosen])), 4) if chosen else None}
    return result


def main():
    parser = runtime.ArgumentParser(description="Checker and grounding figures of an EchoGen checkpoint.")
    parser.add_argument("--ckpt", required=True, help="checkpoint folder (its EMA weights)")
    parser.add_argument("--sets", default="val,heldout", help=f"comma-separated, from {', '.join(shapescenes.SCENE_SETS)}")
    parser.add_argument("--n", type=runtime.positive_int, default=64, help="scenes per set (seed 0)")
    parser.add_argument("--steps", type=runtime.positive_int, default=25)
    parser.add_argument("--cfg", type=runtime.non_negative_float, default=3.0)
    parser.add_argument("--shift", type=runtime.positive_float, default=1.0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dataset", help=f"{coco.DATASET_HELP}; default: the checkpoint's own")
    parser.add_argument("--data_dir", help="where the data set's cache lives; default: the checkpoint's own")
    parser.add_argument("--judge", default="", help="a StandaloneDetector checkpoint: on ShapeScenes one trained at the "
                        "model's resolution (train_detector.py --res=R), its verdict beside the checker's; on real data "
                        "one trained on the real training images (COCO-MIG's ISR and mIoU)")
    parser.add_argument("--out", default="", help="ShapeScenes: write table.md, results.json and grids/{set}.png here")
    parser.add_argument("--agreement", type=runtime.non_negative_int, default=0,
                        help="ShapeScenes: only measure, on this many layouts x 8 SDE samples, how the own-head "
                        "reward agrees with the checker within groups (reward_agreement)")
    parser.add_argument("--agreement_set", default="train", help="--agreement's layouts: the distribution of this "
                        f"scene set ({', '.join(shapescenes.SCENE_SETS)}), other seeds than the set's own")
    args = parser.parse_args()
    sets = args.sets.split(",")
    for kind in sets:
        if kind not in shapescenes.SCENE_SETS:
            runtime.fail(f"--sets: unknown set '{kind}' ({', '.join(shapescenes.SCENE_SETS)})")
    if args.out:
        runtime.check_output_folder("--out", args.out)
    device = runtime.resolve_device(args.device)
    saved = runtime.read_checkpoint_config(args.ckpt)
    dataset = args.dataset or saved.get("train", {}).get("dataset", "shapescenes")
    if args.agreement:
        if args.agreement_set not in shapescenes.SCENE_SETS:
            runtime.fail(f"--agreement_set: unknown set '{args.agreement_set}' ({', '.join(shapescenes.SCENE_SETS)})")
        if dataset != "shapescenes" or not saved["model"].get("grounding"):
            runtime.fail(f"--agreement: needs a ShapeScenes model with a grounding head, got '{args.ckpt}'")
        model, tokenizer, _ = runtime.load_model(args.ckpt, EchoGen, "ema", device)
        result = reward_agreement(model, tokenizer, args.agreement, args.agreement_set)
        lines = ["| reward | in-group correlation with the checker | correlation over all samples | tied groups |",
                 "| --- | --- | --- | --- |"]
        for name in REWARD_VARIANTS:
            r = result[name]
            show = lambda v: "-" if v is None else f"{v:+.3f}"
            lines.append(f"| {name} | {show(r['reward_checker_corr_in_group'])} | {show(r['reward_checker_corr'])} | "
                         f"{r['tie_groups']:.2f} |")
        sample_isr = next(iter(result.values()))["sample_isr"]
        print(json.dumps(result))
        print(f"\n{args.agreement} '{args.agreement_set}' layouts x 8 SDE samples (10 steps, stochastic 0..2), "
              f"checker ISR of the samples {sample_isr:.3f}; the head on passed instances: IoU "
              f"{result['passed']['iou']}, confidence {result['passed']['confidence']}; on failed ones: IoU "
              f"{result['failed']['iou']}, confidence {result['failed']['confidence']}\n")
        print("\n".join(lines))
        return
    if dataset != "shapescenes":  # real data: its held-out images, at the model's resolution, with its tokenizer
        if args.out:
            runtime.fail(f"--out: the table, JSON and grids are written for ShapeScenes sets; on real data ({dataset}) "
                         "evaluate.py prints one JSON line")
        model, tokenizer, saved = runtime.load_model(args.ckpt, EchoGen, "ema", device)
        judge = detector.load_grounder(args.judge, device) if args.judge else None
        try:
            _, _, scenes = data.load_dataset(dataset, model.config.res, model.config.max_instances,
                                             args.data_dir or saved["train"].get("data_dir", "data"),
                                             val_scenes=args.n, tokenizer=tokenizer)
        except runtime.LayoutError as e:
            runtime.fail(e)
        metrics = evaluate(model, scenes, tokenizer, args.steps, args.cfg, args.shift, judge=judge)
        print(json.dumps({"set": "val", "dataset": dataset, "n": len(scenes), **metrics}), flush=True)
        return
    results = evaluate_checkpoint(args.ckpt, sets, args.n, args.steps, args.cfg, args.shift, device, args.judge,
                                  args.out or None)
    for kind, metrics in results["sets"].items():
        print(json.dumps({"set": kind, "n": args.n, **metrics}), flush=True)
    print("\n" + checkpoint_table(results), end="")
    if args.out:
        print(f"wrote {os.path.join(args.out, 'table.md')}, {os.path.join(args.out, 'results.json')} and the sample "
              f"grids {os.path.join(args.out, 'grids', '{set}.png')}")


if __name__ == "__main__":
    main()
