"""
Evaluation of an EchoGen model on fixed, seeded ShapeScenes sets (docs/design.md, "Honest measurement"):
layout-to-image quality by the rule-based checker (never by a learned grounder), and the
model's own grounding of the world's true renders.

    python evaluate.py --ckpt out/pretrain/ckpt                          # val and heldout, 64 scenes each
    python evaluate.py --ckpt out/pretrain/ckpt --sets val,heldout,crowded,leakage --n 64 --steps 25 --cfg 3.0
    python evaluate.py --ckpt out/pretrain/ckpt --sets val,heldout,crowded,leakage --judge out/detector/ckpt --out out/eval
    python evaluate.py --ckpt out/pretrain/ckpt --agreement 24     # does the own-head reward agree with the checker?
    python evaluate.py --compare a1/results.json,a2/results.json,a3/results.json --against b1/results.json,...

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

Every ISR and Acc@0.5 comes with its 95% percentile bootstrap interval over the scenes (2000 resamples,
seeded; "isr_ci", "acc50_ci", shown as "0.745 [0.71, 0.78]"), and results.json keeps per set the per-scene
counts they come from ("per_scene": each scene's instances, those the checker passes, those the head finds).
--compare A1/results.json,A2/... --against B1/results.json,... compares two arms, each a results.json per
training seed, on the same scene sets: per set, each arm's ISR and head Acc@0.5 (the mean over its seeds)
and A - B with a 95% interval that resamples the seeds of each arm and the scenes, paired (the same scenes
for both arms); a difference whose interval holds 0 is not one.

--self_verify measures self-verified sampling (sampler.py --best_of, --repair) at equal sampling compute:
    python evaluate.py --ckpt CKPT --sets heldout,crowded --n 200 --self_verify 1,2,4,8 [--repair 2] \
        [--verifier own|judge:CKPT] --out DIR
Per set, N candidates of every scene (N the largest count) are drawn once, candidate k of scene i from seed
1000 k + i as sampler.py draws them (candidate 0 is the image evaluate() scores), each grounded by the verifier
(the model's own head, or a judge at the model's resolution) and judged by the checker; every figure is chosen
from that cache. Per count n, among the first n candidates: the ISR of the verifier's choice (the best worst
instance: sampler.best_of's rule), of a random one (the floor, N = 1 in expectation) and of the checker's (the
most instances passed: the ceiling, a diagnosis), each with its interval and the paired difference against
N = 1, and the verifier's efficiency (verifier - random) / (checker - random). Each row's network function
evaluations (NFE) per image: per candidate steps x 2 with guidance (both halves are rows of one batch; x 1
without), + 1 per grounding for the verifier, which grounds every candidate; a repair round costs its Euler
steps below sampler.REPAIR_T0 the same way, + 1 grounding (the text encoder's passes are not counted).
The verifier's discrimination: the AUROC of its per-instance confidence x IoU against the checker's verdict,
and how often its pass (>= sampler.PASS_SCORE) and the checker's disagree. --repair K repairs the N = 1 images
for up to K rounds (sampler.repair): ISR before and after, the checker's failures fixed and passes broken, PSNR
outside the region redrawn, the instances never redrawn before and after, and two controls: whole-image
resampling of the images repair touched at its NFE (fresh verified candidates, as many as round(repair's NFE /
a candidate's), kept only if better) and a repair forced on the instances the checker passes. DIR gets
self_verify_{set}.md, .json and .png (ISR against NFE per image).

On real data (a COCO-format set: --dataset as the training scripts take it, by default the one the
checkpoint was trained on) there is no checker. The scenes are the data set's held-out images;
layout-to-image is scored as COCO-MIG does, by a StandaloneDetector trained on the real training
images (--judge): ISR = the share of instances whose phrase the judge finds with IoU >= 0.5 to the
asked box, mIoU the mean of those IoUs ("judge_real": the same judge on the real images, its
ceiling); grounding is scored against the annotations:
    python evaluate.py --ckpt out/coco/ckpt --judge out/coco_judge/ckpt --n 500
"""

import argparse
import json
import os
import re
from typing import NamedTuple

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
    _, found, _ = ground(judge, scenes, images)
    return {"isr": found["acc50"], "isr_ci": found["acc50_ci"], "miou": found["miou"],
            "n_instances": sum(instance_counts(scenes))}


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
    -> (boxes_xyxy (S, N, 4), {"acc50", "acc50_ci", "miou", "ap", "ap50"}, found (S,): per scene, how many
    of its instances the boxes find, IoU >= 0.5 with the matched truth: Acc@0.5's count)."""
    boxes, scores = detector.ground_scenes(grounder, scenes, images, grounder.tokenizer, grounder.max_instances,
                                           grounder.device)
    figures = {k: round(v, 4) for k, v in detector.grounding_metrics(boxes, scores, scenes).items()}
    found = [int((ious >= 0.5).sum()) for ious in detector.instance_ious(boxes, scenes)]
    figures["acc50_ci"] = bootstrap_interval(found, instance_counts(scenes))
    return boxes, figures, found


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


# -----------------------------------------------------------------------------
# 95% percentile bootstrap intervals: over the scenes, and for comparisons over the training seeds too

RESAMPLES = 2000


def instance_counts(scenes):
    return [len(scene["instances"]) for scene in scenes]


def pooled_ratio(passed, instances):
    """passed (K, S): per training seed, each scene's passed (found) instances; instances (S,) -> the ratio of
    all K seeds together, instance-weighted as ISR and Acc@0.5 are (= the mean over seeds of each seed's ratio)."""
    return passed.sum() / (len(passed) * instances.sum())


def resampled_ratios(passed, instances, scene_draws, rng):
    """pooled_ratio of each resample -> (B,): scene_draws (B, S) are its scenes; its K seeds are drawn here, with
    replacement, so that a few lucky training runs widen the interval as a few easy scenes do."""
    seed_draws = rng.integers(0, len(passed), (len(scene_draws), len(passed)))  # (B, K)
    found = passed[seed_draws[:, :, None], scene_draws[:, None, :]].sum((1, 2))  # (B,)
    return found / (len(passed) * instances[scene_draws].sum(1))


def draw_scenes(n_scenes, seed):
    """A seeded generator and the scenes of each resample, (RESAMPLES, n_scenes) indices drawn with replacement."""
    rng = np.random.default_rng(seed)
    return rng, rng.integers(0, n_scenes, (RESAMPLES, n_scenes))


def percentile_interval(values):
    return [round(float(v), 4) for v in np.percentile(values, [2.5, 97.5])]


def bootstrap_interval(passed, instances, seed=0):
    """The 95% interval over the scenes of sum(passed) / sum(instances) (ISR, Acc@0.5): passed and instances
    (S,), per scene its passed (found) instances and its instances -> [low, high]."""
    rng, scenes = draw_scenes(len(instances), seed)
    return percentile_interval(resampled_ratios(np.asarray(passed)[None], np.asarray(instances), scenes, rng))


def difference_interval(passed_a, passed_b, instances, seed=0):
    """Arm A's ratio minus arm B's, on the same scenes: passed_a (K_a, S) and passed_b (K_b, S) per training
    seed per scene, instances (S,). Each resample draws each arm's seeds, independently, and the scenes, the
    same for both arms (paired: a hard scene is hard for both, and that cancels). 1-D passed: one seed per arm,
    the paired bootstrap over scenes. -> (the difference of the means over seeds, [low, high])."""
    passed_a, passed_b, instances = np.atleast_2d(passed_a), np.atleast_2d(passed_b), np.asarray(instances)
    rng, scenes = draw_scenes(len(instances), seed)
    differences = resampled_ratios(passed_a, instances, scenes, rng) - resampled_ratios(passed_b, instances, scenes, rng)
    mean = pooled_ratio(passed_a, instances) - pooled_ratio(passed_b, instances)
    return round(float(mean), 4), percentile_interval(differences)


def evaluate(model, scenes, tokenizer, steps=25, cfg_scale=3.0, shift=1.0, grid_path=None, judge=None, generator=None):
    """The checker's figures of the model's images of `scenes` (at the model's resolution), color_leak
    on the leakage probe, and, for a model with a grounding head, {"grounding": Acc@0.5, mIoU, AP} of
    its grounding of the true renders and {"self_grounding": Acc@0.5, mIoU} of its grounding of its
    own images. Real scenes: real_data_metrics instead of the checker's, and grounding of the real
    images. A judge on ShapeScenes adds its figures as {"judge": ...}. Each ISR and Acc@0.5 comes with its
    95% bootstrap interval over the scenes ("isr_ci", "acc50_ci"), and {"per_scene": {"instances", "isr",
    "acc50"}} holds the counts they come from (per scene its instances, those the checker passes, those the
    head finds in the true renders), for comparisons over training seeds (compare). grid_path: a sample grid
    (grid_rows). generator: scenes -> uint8 images, in place of sampling the model (the tests score
    the world's true renders and noise through it); with one, model may be None (no grounding)."""
    if generator is None:
        generator = lambda scenes: sampler.generate(model, scenes, tokenizer, steps, cfg_scale, shift)
    images = generator(scenes)
    res = images[0].shape[0] if len(images) else model.config.res
    truths = data.scene_images(scenes, res)  # the true renders, or the real images
    real = data.is_real(scenes)
    per_scene = {"instances": instance_counts(scenes)}
    if real:
        metrics = real_data_metrics(scenes, images, truths, judge)
    else:
        verdicts = shapescenes.check_scenes(scenes, images)
        per_scene["isr"] = [sum(verdict["success"] for verdict in scene) for scene in verdicts]
        metrics = {**shapescenes.checker_figures(verdicts), "isr_ci": bootstrap_interval(per_scene["isr"],
                                                                                          per_scene["instances"]),
                   **leakage_metrics(scenes, images)}
        if judge is not None:
            metrics["judge"] = judge_images(judge, scenes, images)
    grounder, own_boxes = own_grounder(model, tokenizer), None
    if grounder is not None:
        boxes, metrics["grounding"], per_scene["acc50"] = ground(grounder, scenes, truths)
        if not real:
            metrics["grounding"].update(shared_color_accuracy(boxes, scenes))
            # does its confidence see shapes and colors, or only boxes? (the confidence half of the reward)
            metrics["grounding"].update(detector.presence_confidence(grounder, scenes, truths, tokenizer,
                                                                     grounder.max_instances, grounder.device))
            # the view of Cycle RL's reward: the head's boxes in the model's own images
            own_boxes, found, _ = ground(grounder, scenes, images)
            metrics["self_grounding"] = {key: found[key] for key in ("acc50", "acc50_ci", "miou")}
    if grid_path:
        layouts.save_grid(grid_path, grid_rows(scenes, images, truths, own_boxes))
    return {**metrics, "per_scene": per_scene}


def shown(metrics, path):
    """A figure as the tables and the log show it: "0.745 [0.71, 0.78]" with its 95% interval where it has
    one ("..._ci" beside it), "-" where it is missing."""
    value, interval = figure(metrics, path), figure(metrics, path[:-1] + (path[-1] + "_ci",))
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "")


def signed(difference, interval):
    """A difference as the tables show it: "+0.031 [-0.012, +0.074]" with its 95% interval."""
    return f"{difference:+.3f} [{interval[0]:+.3f}, {interval[1]:+.3f}]"


def summary(metrics):
    """One line for a progress bar or a log."""
    line = "ISR {} mIoU {miou:.3f}".format(shown(metrics, ("isr",)), **metrics) if "isr" in metrics else "no judge"
    if "color_acc" in metrics:
        line += " color {color_acc:.3f} shape {shape_acc:.3f}".format(**metrics)
    if "color_leak" in metrics:
        line += " leak {color_leak:.3f}".format(**metrics)
    if "grounding" in metrics:
        line += " | grounding Acc@0.5 {} mIoU {miou:.3f} AP {ap:.3f}".format(shown(metrics, ("grounding", "acc50")),
                                                                             **metrics["grounding"])
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
    """rows: [(label, a set's metrics)] -> a markdown table of COLUMNS, each figure shown(); a column that no
    row has (no judge, no grounding head, no leakage probe) is left out."""
    columns = [(header, path) for header, path in COLUMNS if any(figure(m, path) is not None for _, m in rows)]
    lines = ["| " + " | ".join([first_header] + [header for header, _ in columns]) + " |",
             "| " + " | ".join(["---"] * (len(columns) + 1)) + " |"]
    for label, metrics in rows:
        lines.append("| " + " | ".join([label] + [shown(metrics, path) for _, path in columns]) + " |")
    return "\n".join(lines) + "\n"


def results_json(results):
    """json.dumps(indent=1), but each list of numbers on one line: the per-scene counts, the intervals."""
    return re.sub(r"\[\n[-+.\deE,\s]*\]", lambda m: json.dumps(json.loads(m.group())), json.dumps(results, indent=1)) + "\n"


def write_text(path, text):
    """Atomically (a temporary name, then a rename): a reader never sees half a table."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    runtime.write_atomically(path, lambda f: f.write(text.encode()))


def load_judge(path, res, device, named=None):
    """The standalone judge of a ShapeScenes evaluation; it must see the images at the resolution they
    were made at (a judge trained at another one would be scoring resized images it never saw). named: the
    flag and value an error line names (--judge 'PATH')."""
    judge = detector.load_grounder(path, device)
    if judge.res != res:
        named = named or f"--judge '{path}'"
        runtime.fail(f"{named}: a judge of resolution {judge.res}, the model makes {res} "
                     f"(train one with train_detector.py --res={res})")
    return judge


def check_sets(sets, model, ckpt):
    """One line and exit on a set that is none of ShapeScenes', or whose scenes hold more objects than the model takes."""
    for kind in sets:
        if kind not in shapescenes.SCENE_SETS:
            runtime.fail(f"--sets: unknown set '{kind}' ({', '.join(shapescenes.SCENE_SETS)})")
        most = shapescenes.SCENE_SETS[kind][1][1]
        if most > model.config.max_instances:
            runtime.fail(f"--sets: '{kind}' holds up to {most} objects, the model at '{ckpt}' takes "
                         f"max_instances = {model.config.max_instances}")


def evaluate_checkpoint(ckpt, sets, n=64, steps=25, cfg_scale=3.0, shift=1.0, device="cpu", judge="", out_dir=None,
                        label=None):
    """evaluate() of a checkpoint's EMA weights on each ShapeScenes set (n scenes, seed 0), with a
    tqdm line. out_dir: results.json ({"ckpt", "step", the settings, "sets": {set: metrics}, "per_scene":
    {set: evaluate()'s per-scene counts}}), table.md and grids/{set}.png. -> the results dict."""
    model, tokenizer, saved = runtime.load_model(ckpt, EchoGen, "ema", device)
    check_sets(sets, model, ckpt)
    judge_grounder = load_judge(judge, model.config.res, device) if judge else None
    results = {"ckpt": ckpt, "step": saved.get("step"), "res": model.config.res, "n": n, "steps": steps, "cfg": cfg_scale,
               "shift": shift, "judge": judge or None, "sets": {}, "per_scene": {}}
    for kind in tqdm(sets, desc=f"eval {label or ckpt}"):
        scenes = shapescenes.make_scene_set(kind, n, seed=0)
        grid = os.path.join(out_dir, "grids", f"{kind}.png") if out_dir else None
        if grid:
            os.makedirs(os.path.dirname(grid), exist_ok=True)
        metrics = evaluate(model, scenes, tokenizer, steps, cfg_scale, shift, grid_path=grid, judge=judge_grounder)
        results["per_scene"][kind] = metrics.pop("per_scene")  # apart: the tables and the pipeline read "sets"
        results["sets"][kind] = metrics
    if out_dir:
        write_text(os.path.join(out_dir, "results.json"), results_json(results))
        write_text(os.path.join(out_dir, "table.md"), checkpoint_table(results))
    return results


def checkpoint_table(results):
    """The markdown table of one checkpoint's results: a row per set, under a line naming what made it."""
    judge = f", judged by {results['judge']}" if results["judge"] else ""
    head = (f"{results['ckpt']} (step {results['step']}), R = {results['res']}, {results['n']} scenes per set, "
            f"{results['steps']} Euler steps, CFG {results['cfg']}{judge}\n\n")
    rows = [(f"{kind} ({SET_NAMES.get(kind, kind)})", metrics) for kind, metrics in results["sets"].items()]
    return head + markdown_table(rows, "set")


# -----------------------------------------------------------------------------
# two arms, each trained with several seeds, on the same scenes: the difference over seeds and scenes

COMPARED = [("isr", "ISR"), ("acc50", "head Acc@0.5")]  # (per-scene count, its name in the table)


def read_per_scene(flag, path):
    """The per-scene counts of a results.json of evaluate.py --out -> {set: {"instances", "isr", ...: (S,)}};
    one line and exit on a file that is not one."""
    if not os.path.isfile(path):
        runtime.fail(f"{flag} '{path}': no such file")
    try:
        with open(path, "rb") as f:
            results = json.load(f)
    except (OSError, ValueError) as e:
        runtime.fail(f"{flag} '{path}': not readable JSON ({e})")
    if not isinstance(results, dict) or not isinstance(results.get("per_scene"), dict):
        runtime.fail(f"{flag} '{path}': no per-scene counts (not a results.json of evaluate.py --out, or an older one)")
    runs = {}
    for kind, counts in results["per_scene"].items():
        try:
            runs[kind] = {key: np.array(values, np.int64) for key, values in counts.items()}
        except (AttributeError, TypeError, ValueError):  # not a dict of lists of numbers: refused just below
            runs[kind] = {}
        if "instances" not in runs[kind] or any(c.ndim != 1 or c.shape != runs[kind]["instances"].shape
                                                for c in runs[kind].values()):
            runtime.fail(f"{flag} '{path}': set '{kind}': the per-scene counts are not lists of numbers of one length")
    return runs


def compare(paths_a, paths_b):
    """Arm A (results.json files of evaluate.py --out, one per training seed) against arm B, on the same scene
    sets -> a markdown table, a row per set: each arm's ISR and head Acc@0.5 (the mean over its seeds) and
    A - B with its 95% interval over seeds and scenes (difference_interval)."""
    arms = [[(flag, path, read_per_scene(flag, path)) for path in paths] for flag, paths in (("--compare", paths_a),
                                                                                              ("--against", paths_b))]
    _, first_path, first = arms[0][0]
    for flag, path, run in arms[0] + arms[1]:
        if list(run) != list(first):
            runtime.fail(f"{flag} '{path}': sets {', '.join(run)}, but '{first_path}' has {', '.join(first)}")
        for kind in run:
            if not np.array_equal(run[kind]["instances"], first[kind]["instances"]):
                runtime.fail(f"{flag} '{path}': set '{kind}' holds other scenes than in '{first_path}' (another --n?)")
    lines = [f"{len(paths_a)} seeds of A ({', '.join(paths_a)}) against {len(paths_b)} of B ({', '.join(paths_b)}); "
             f"A - B with its 95% interval over seeds and scenes ({RESAMPLES} resamples)\n",
             "| set | scenes | " + " | ".join(f"{name} A | {name} B | {name} A - B [95%]" for _, name in COMPARED) + " |",
             "| --- | --- |" + " --- | --- | --- |" * len(COMPARED)]
    for kind, counts in first.items():
        cells = [kind, str(len(counts["instances"]))]
        for key, _ in COMPARED:
            if not all(key in run[kind] for arm in arms for _, _, run in arm):  # generation only: no head
                cells += ["-"] * 3
                continue
            a, b = (np.stack([run[kind][key] for _, _, run in arm]) for arm in arms)
            difference, interval = difference_interval(a, b, counts["instances"])
            cells += [f"{pooled_ratio(a, counts['instances']):.3f}", f"{pooled_ratio(b, counts['instances']):.3f}",
                      signed(difference, interval)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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


# -----------------------------------------------------------------------------
# self-verified sampling at equal compute (sampler.py's best_of and repair): N candidates per scene drawn
# once, and every figure chosen from them: the verifier's choice against a random one (the floor) and the
# checker's (the ceiling), how well the verifier's scores tell the checker's passes from its failures, and
# repair against whole-image resampling at the same network evaluations


def candidate_counts(text):
    """--self_verify's type: comma-separated candidate counts, each >= 1 -> sorted, without repeats."""
    try:
        counts = sorted({int(part) for part in text.split(",")})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers >= 1, got {text!r}")
    return counts


def verifier_spec(text):
    """--verifier's type: own (the model's grounding head) or judge:PATH (a grounder's checkpoint folder)."""
    if text != "own" and not (text.startswith("judge:") and len(text) > len("judge:")):
        raise argparse.ArgumentTypeError(f"must be own or judge:PATH (a StandaloneDetector checkpoint), got {text!r}")
    return text


def load_verifier(spec, model, tokenizer, ckpt):
    """The grounder that verifies the model's images (verifier_spec). A judge grounds the batches the model
    draws from (sampler.repair passes it one batch for both), so it must read them as they are: the model's
    resolution, its vocabulary, room for its instance slots. One line and exit otherwise."""
    if spec == "own":
        grounder = own_grounder(model, tokenizer)
        if grounder is None:
            runtime.fail(f"--verifier own: checkpoint '{ckpt}' is a generation-only EchoGen (config grounding = "
                         f"false), it has no grounding head to verify its images with (try --verifier judge:PATH)")
        return grounder
    path, named = spec[len("judge:"):], f"--verifier '{spec}'"
    if not os.path.isdir(runtime.checkpoint_folder(path)):
        runtime.fail(f"{named}: no such checkpoint folder")
    judge = load_judge(path, model.config.res, next(model.parameters()).device, named)
    if judge.tokenizer.get_vocab() != tokenizer.get_vocab() or judge.max_instances < model.config.max_instances:
        runtime.fail(f"{named}: reads other phrases or fewer instance slots ({judge.max_instances}) than the model at "
                     f"'{ckpt}' writes ({model.config.max_instances})")
    return judge


class Candidates(NamedTuple):
    """K candidates of each of S scenes, per instance slot (N: the model's max_instances; empty slots hold 0 and
    False), on the CPU."""
    score: np.ndarray  # (K, S, N): the verifier's confidence x IoU (sampler.verify)
    worst: np.ndarray  # (K, S): each image's worst instance score, what the verifier ranks by
    success: np.ndarray  # (K, S, N) bool: the checker's verdict (shapescenes.check_instance's "success")


def checker_success(scenes, images, n_slots):
    """The checker's verdict on each instance of the scenes' uint8 images -> (S, n_slots) bool, False on empty slots."""
    success = np.zeros((len(scenes), n_slots), bool)
    for i, verdicts in enumerate(shapescenes.check_scenes(scenes, images)):
        success[i, :len(verdicts)] = [verdict["success"] for verdict in verdicts]
    return success


def instance_slots(instances, n_slots):
    """(S, n_slots) bool: the slots holding each scene's instances (layouts.collate fills them first)."""
    return np.arange(n_slots) < np.asarray(instances)[:, None]


@torch.no_grad()
def draw_candidates(model, grounder, scenes, tokenizer, ks, steps, cfg_scale, shift, batch_size=64):
    """Candidates ks (a range) of every scene, by sampler's seed rule (sampler.candidate_seed; seed 0), each
    grounded by the verifier and judged by the checker. Candidate 0 is evaluate()'s image bit for bit: the same
    noise, batch_size scenes a pass as sampler.generate takes them. -> (Candidates, (the float images (S, C, R,
    R) of candidate ks[0], their sampler.Verdict): what a repair starts from, as sampler.generate_verified's)."""
    C, R, N = model.config.channels, model.config.res, model.config.max_instances
    found, first = {"score": [], "worst": [], "success": []}, []
    for k in tqdm(ks, desc="candidates", leave=False):
        for start, batch in sampler.scene_batches(model, scenes, tokenizer, batch_size):
            part = scenes[start:start + len(batch["boxes"])]
            noise = sampler.initial_noise(len(part), (C, R, R), sampler.candidate_seed(0, k), start)
            images = sampler.sample(model, batch, noise.to(batch["boxes"].device), steps, cfg_scale, shift)
            verdict = sampler.verify(grounder, images, batch)
            found["score"].append(verdict.score.cpu().numpy())
            found["worst"].append(verdict.worst.cpu().numpy())
            found["success"].append(checker_success(part, sampler.to_uint8(images), N))
            if k == ks[0]:
                first.append((images.cpu(), sampler.Verdict(*(v.cpu() for v in verdict))))
    # candidate-major: each candidate's batches cover the scenes in order
    candidates = Candidates(*(np.concatenate(found[key]).reshape(len(ks), len(scenes), *found[key][0].shape[1:])
                              for key in Candidates._fields))
    images, verdicts = zip(*first)
    return candidates, (torch.cat(images), sampler.Verdict(*map(torch.cat, zip(*verdicts))))


def best_among_first(values, n):
    """Per scene, the index of the largest of values (K, S) among its first n candidates (n: one count, or one per
    scene), the first of ties (argmax's rule, and so sampler.best_of's)."""
    return np.where(np.arange(len(values))[:, None] < n, values, -np.inf).argmax(0)


CHOOSERS = {"verifier": "the verifier's choice", "random": "a random choice",
            "checker": "the checker's choice (ceiling)"}


def choices(candidates, n, seed=0):
    """The candidate each chooser keeps among the first n of every scene -> {chooser: (S,) indices}: the
    verifier's (the best worst instance, sampler.best_of's rule), a random one (seeded by seed and n: the
    floor, N = 1 in expectation) and the checker's (the most instances passed: what a perfect verifier would
    keep, a diagnosis and no sampler)."""
    return {"verifier": best_among_first(candidates.worst, n),
            "random": np.random.default_rng([seed, n]).integers(0, n, candidates.worst.shape[1]),
            "checker": best_among_first(candidates.success.sum(-1), n)}


def isr_figures(passed, instances, baseline=None):
    """ISR from per-scene counts (passed instances, instances counted), with its 95% bootstrap interval, and
    given baseline (per scene, the passes of the same instances in other images) the paired difference
    passed - baseline with its interval. Scenes without an instance counted are left out (a resample of only
    those would be 0 / 0). -> {"isr", "isr_ci"[, "difference", "difference_ci"]}, None where no scene has one."""
    keep = np.asarray(instances) > 0
    if not keep.any():
        return None
    passed, instances = np.asarray(passed)[keep], np.asarray(instances)[keep]
    figures = {"isr": round(float(passed.sum() / instances.sum()), 4), "isr_ci": bootstrap_interval(passed, instances)}
    if baseline is not None:
        figures["difference"], figures["difference_ci"] = difference_interval(passed, np.asarray(baseline)[keep],
                                                                              instances)
    return figures


def efficiency(verifier, random, checker):
    """The share of the checker's gain over a random choice that the verifier makes, (verifier - random) /
    (checker - random), from ISRs or pass counts alike; None where the checker gains nothing (nothing to find)."""
    return None if checker == random else round(float((verifier - random) / (checker - random)), 4)


def velocity_rows(cfg_scale):
    """Network evaluations per image in one Euler step: sampler.guided_velocity sends the conditional and the
    unconditional half through as two rows of one batch; without guidance one row."""
    return 1 if cfg_scale == 1.0 else 2


def evaluation_costs(steps, cfg_scale, shift, t0=sampler.REPAIR_T0):
    """Network function evaluations (NFE) per image of each operation, as the code runs them: a sample is
    `steps` Euler steps of velocity_rows each, a repair round's redraw the Euler steps of sampler.redraw_times
    (those below t0), a grounding one pass of the verifier (the model's trunk and head, or the judge). Not
    counted: the text encoder's passes (one per sample or redraw of a batch, its conditions reused by every step;
    one inside each grounding), a small part of a pass, and the checker's rules, which a sampler does not have."""
    rows = velocity_rows(cfg_scale)
    return {"sample": steps * rows, "redraw": (len(sampler.redraw_times(t0, steps, shift)) - 1) * rows, "ground": 1}


def best_of_rows(candidates, counts, instances, costs):
    """A row per candidate count n and chooser: NFE per image (n samples; the verifier adds n groundings, as
    sampler.best_of grounds every candidate), ISR with its interval, the paired difference against N = 1
    (candidate 0, evaluate()'s image) and, for the verifier, efficiency()."""
    passed, scenes = candidates.success.sum(-1), np.arange(len(instances))  # (K, S)
    rows = []
    for n in counts:
        chosen = {name: passed[index, scenes] for name, index in choices(candidates, n).items()}
        for name, chosen_passed in chosen.items():
            row = {"n": n, "chooser": name, "nfe": n * costs["sample"],
                   **isr_figures(chosen_passed, instances, passed[0])}
            if name == "verifier":
                row["nfe"] += n * costs["ground"]
                row["efficiency"] = efficiency(*(chosen[c].sum() for c in ("verifier", "random", "checker")))
            rows.append(row)
    return rows


def auroc(scores, labels):
    """The area under the ROC curve of scores for labels (bool): the chance that a positive scores above a
    negative, ties counted one half (Mann-Whitney's U from average ranks); None without both kinds."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(scores, kind="stable")
    _, first, ties = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (ties + 1) / 2, ties)  # 1-based; a group of ties all at its average rank
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def share(flags):
    """The share of True in a boolean array; None when it is empty."""
    return round(float(np.mean(flags)), 4) if np.size(flags) else None


def discrimination(candidates, instances, pass_score=sampler.PASS_SCORE):
    """Does the verifier's score tell the checker's passes from its failures? Over every instance of every
    candidate: the AUROC of its confidence x IoU, and how often its pass (score >= pass_score, sampler's rule)
    disagrees with the checker's, split into false passes (the checker fails them) and false alarms (the
    checker passes them: a repair would redraw a good object)."""
    slots = np.broadcast_to(instance_slots(instances, candidates.score.shape[-1]), candidates.score.shape)
    score, success = candidates.score[slots], candidates.success[slots]
    head_pass = score >= pass_score
    area = auroc(score, success)
    return {"auroc": None if area is None else round(area, 4), "disagreement": share(head_pass != success),
            "false_pass": share(head_pass & ~success), "false_alarm": share(~head_pass & success),
            "instances": int(slots.sum())}


class Repaired(NamedTuple):
    """The outcome of sampler.repair_rounds over S scenes (N instance slots)."""
    images: list  # the uint8 images after the rounds
    success: np.ndarray  # (S, N) bool: the checker on them
    targeted: np.ndarray  # (S, N) bool: the instances redrawn in a round
    region: np.ndarray  # (S, R, R): the union of the regions of the rounds kept; where 0 no pixel can have changed
    rounds: np.ndarray  # (S,): the rounds run on each image (each a redraw and a grounding)
    kept: np.ndarray  # (S,): the rounds kept


@torch.no_grad()
def run_repair(model, grounder, scenes, tokenizer, first, rounds, steps, cfg_scale, shift, forced=None, batch_size=64):
    """sampler.repair_rounds over the scenes from candidate 0 (first: its float images and Verdict), with the round
    noises of sampler.generate_verified (sampler.repair_seed): the instances the verifier fails in each round
    (sampler.failing_instances: sampler.repair itself), or with forced (S, N) bool those in every round. -> Repaired"""
    C, R, N = model.config.channels, model.config.res, model.config.max_instances
    parts = []
    for start, batch in sampler.scene_batches(model, scenes, tokenizer, batch_size):
        rows, device = slice(start, start + len(batch["boxes"])), batch["boxes"].device
        images, verdict = first[0][rows].to(device), sampler.Verdict(*(v[rows].to(device) for v in first[1]))
        noises = [sampler.initial_noise(len(images), (C, R, R), sampler.repair_seed(0, r), start).to(device)
                  for r in range(rounds)]
        if forced is None:
            targets = lambda verdict: sampler.failing_instances(verdict, batch)
        else:
            targets = lambda verdict: torch.as_tensor(forced[rows], device=device)
        targeted, region = torch.zeros_like(batch["instance_mask"]), torch.zeros(len(images), R, R, device=device)
        run, kept = torch.zeros(len(images), dtype=torch.long), torch.zeros(len(images), dtype=torch.long)
        for images, verdict, round_targets, round_kept in sampler.repair_rounds(
                model, grounder, batch, images, verdict, noises, targets, sampler.REPAIR_T0, steps, cfg_scale, shift):
            targeted |= round_targets
            region = torch.maximum(region, sampler.failing_region(batch["boxes"], round_targets, R)[:, 0]
                                   * round_kept[:, None, None])
            run += round_targets.any(1).cpu()
            kept += round_kept.cpu()
        uint8 = sampler.to_uint8(images)
        parts.append((uint8, checker_success(scenes[rows], uint8, N), targeted.cpu().numpy(), region.cpu().numpy(),
                      run.numpy(), kept.numpy()))
    images, *arrays = zip(*parts)
    return Repaired(sum(images, []), *map(np.concatenate, arrays))


def psnr_outside(before, after, region, changed):
    """How far the images a repair changed (changed (S,) bool) moved where its region (S, R, R) is 0, against the
    images before: {"mse_outside": the mean squared difference in levels, "psnr_outside": 10 log10(255^2 / mse) dB,
    None where they are identical, as an exact blend keeps them}; {} where there is no such pixel."""
    outside = (region == 0) & changed[:, None, None]
    differences = (np.stack(after).astype(np.float64) - np.stack(before))[outside]  # (pixels, 3)
    if differences.size == 0:
        return {}
    mse = float((differences ** 2).mean())
    return {"mse_outside": round(mse, 4), "psnr_outside": None if mse == 0 else round(10 * np.log10(255 ** 2 / mse), 2)}


def resample_control(model, grounder, scenes, tokenizer, candidates, repaired, costs, steps, cfg_scale, shift):
    """Whole-image resampling at repair's compute: each image a repair redrew gets instead m fresh candidates
    (1, 2, ... of the same cache, drawn now where it holds too few), m the nearest whole number (at least 1) to
    its repair's NFE over a verified candidate's, repair rounds x (redraw + grounding) / (sample + grounding);
    it keeps the candidate whose worst instance scores best, the image before on ties, as repair keeps a
    redraw only if better. -> (per scene the passes of the image kept, the mean NFE per image it spent on top)"""
    spent = repaired.rounds * (costs["redraw"] + costs["ground"])
    verified = costs["sample"] + costs["ground"]
    fresh = np.where(repaired.rounds > 0, np.maximum(1, np.floor(spent / verified + 0.5)), 0).astype(int)
    if fresh.max() >= len(candidates.worst):
        more, _ = draw_candidates(model, grounder, scenes, tokenizer, range(len(candidates.worst), fresh.max() + 1),
                                  steps, cfg_scale, shift)
        candidates = Candidates(*map(np.concatenate, zip(candidates, more)))
    chosen = best_among_first(candidates.worst, fresh + 1)
    return candidates.success.sum(-1)[chosen, np.arange(len(scenes))], float(np.mean(fresh * verified))


def repair_figures(model, grounder, scenes, tokenizer, candidates, first, rounds, costs, steps, cfg_scale, shift):
    """Up to `rounds` repairs of the N = 1 images (candidate 0) -> their ISR before and after with the paired
    difference, the shares of the checker's failures fixed and passes broken, PSNR outside the region redrawn,
    the instances never redrawn before and after, and two controls: whole-image resampling at the same NFE
    (resample_control) and a repair forced, round after round, on the instances the checker passes, under
    repair's own rule of keeping a redraw only if the verifier scores it better (what a false alarm costs)."""
    instances = np.array(instance_counts(scenes))
    slots = instance_slots(instances, candidates.success.shape[-1])
    before, verified = candidates.success[0], costs["sample"] + costs["ground"]
    round_cost = costs["redraw"] + costs["ground"]
    repaired = run_repair(model, grounder, scenes, tokenizer, first, rounds, steps, cfg_scale, shift)
    after, untouched = repaired.success, slots & ~repaired.targeted
    resampled, resample_nfe = resample_control(model, grounder, scenes, tokenizer, candidates, repaired, costs, steps,
                                               cfg_scale, shift)
    passing = slots & before
    forced = run_repair(model, grounder, scenes, tokenizer, first, rounds, steps, cfg_scale, shift, forced=passing)
    return {
        "rounds": rounds,
        "before": {"nfe": verified, **isr_figures(before.sum(1), instances)},
        "repair": {"nfe": verified + float(np.mean(repaired.rounds)) * round_cost,
                   **isr_figures(after.sum(1), instances, before.sum(1)),
                   "images_redrawn": share(repaired.rounds > 0), "images_kept": share(repaired.kept > 0),
                   "fixed": share(after[slots & ~before]), "broken": share(~after[passing]),
                   **psnr_outside(sampler.to_uint8(first[0]), repaired.images, repaired.region, repaired.kept > 0)},
        "untouched": {"before": isr_figures((before & untouched).sum(1), untouched.sum(1)),
                      "after": isr_figures((after & untouched).sum(1), untouched.sum(1), (before & untouched).sum(1))},
        "resample": {"nfe": verified + resample_nfe, **isr_figures(resampled, instances, before.sum(1))},
        "forced": {"nfe": verified + float(np.mean(forced.rounds)) * round_cost, "images_kept": share(forced.kept > 0),
                   "before": isr_figures(passing.sum(1), passing.sum(1)),  # 1 by construction
                   "after": isr_figures((forced.success & passing).sum(1), passing.sum(1), passing.sum(1))},
    }


def self_verify_set(model, grounder, scenes, tokenizer, counts, repair_rounds, steps, cfg_scale, shift):
    """The self-verified sampling figures of one scene set: max(counts) candidates per scene drawn once,
    best_of_rows and discrimination from them, with repair_rounds > 0 repair_figures, and the per-scene
    counts (each candidate's passes, its worst score)."""
    costs = evaluation_costs(steps, cfg_scale, shift)
    candidates, first = draw_candidates(model, grounder, scenes, tokenizer, range(max(counts)), steps, cfg_scale,
                                        shift)
    instances = np.array(instance_counts(scenes))
    result = {"costs": costs, "best_of": best_of_rows(candidates, counts, instances, costs),
              "discrimination": discrimination(candidates, instances)}
    if repair_rounds:
        result["repair"] = repair_figures(model, grounder, scenes, tokenizer, candidates, first, repair_rounds, costs,
                                          steps, cfg_scale, shift)
    result["per_scene"] = {"instances": instances.tolist(), "passed": candidates.success.sum(-1).tolist(),
                           "worst": candidates.worst.round(4).tolist()}
    return result


def self_verify_checkpoint(ckpt, sets, n=64, counts=(1, 2, 4, 8), repair_rounds=0, verifier="own", steps=25,
                           cfg_scale=3.0, shift=1.0, device="cpu", out_dir=None):
    """self_verify_set of a checkpoint's EMA weights on each ShapeScenes set (n scenes, seed 0: evaluate()'s),
    every input checked before anything is drawn. out_dir: per set self_verify_{set}.md (self_verify_table),
    .json (the settings and the figures) and .png (plot_self_verify), each written as its set is done.
    -> {set: its results}"""
    model, tokenizer, saved = runtime.load_model(ckpt, EchoGen, "ema", device)
    check_sets(sets, model, ckpt)
    grounder = load_verifier(verifier, model, tokenizer, ckpt)
    results = {}
    for kind in tqdm(sets, desc=f"self-verify {ckpt}"):
        scenes = shapescenes.make_scene_set(kind, n, seed=0)
        results[kind] = {"ckpt": ckpt, "step": saved.get("step"), "set": kind, "res": model.config.res, "n": n,
                         "steps": steps, "cfg": cfg_scale, "shift": shift, "verifier": verifier,
                         "pass_score": sampler.PASS_SCORE, "t0": sampler.REPAIR_T0,
                         **self_verify_set(model, grounder, scenes, tokenizer, counts, repair_rounds, steps, cfg_scale,
                                           shift)}
        if out_dir:
            path = os.path.join(out_dir, f"self_verify_{kind}")
            write_text(path + ".json", results_json(results[kind]))
            write_text(path + ".md", self_verify_table(results[kind]))
            plot_self_verify(results[kind], path + ".png")
    return results


def shown_difference(figures):
    """A figures dict's paired difference as the tables show it, "-" where it has none."""
    if not figures or "difference" not in figures:
        return "-"
    return signed(figures["difference"], figures["difference_ci"])


def shown_value(value):
    """A share, an AUROC or an efficiency as the tables show it: three decimals, "-" where there is none."""
    return "-" if value is None else f"{value:.3f}"


def self_verify_table(result):
    """The markdown of one set's self_verify_set figures: what made them and how NFE is counted, a row per candidate
    count and chooser, the verifier's discrimination, and with repair its rows and controls."""
    costs, d = result["costs"], result["discrimination"]
    lines = [f"{result['ckpt']} (step {result['step']}), set {result['set']} ({SET_NAMES.get(result['set'], '')}), "
             f"{result['n']} scenes, {sum(result['per_scene']['instances'])} instances, R = {result['res']}, "
             f"{result['steps']} Euler steps, CFG {result['cfg']}, verifier {result['verifier']} (an instance passes "
             f"at confidence x IoU >= {result['pass_score']})\n",
             f"NFE per image: {costs['sample']} a sample ({result['steps']} steps x {velocity_rows(result['cfg'])} "
             f"rows), {costs['ground']} a grounding, {costs['redraw']} a repair's redraw (the steps below t0 = "
             f"{result['t0']}); the verifier grounds every candidate, a random or the checker's choice costs no pass; "
             f"the text encoder's passes are not counted. ISR with its 95% interval over scenes; - N = 1 paired.\n",
             "| N | chooser | NFE / image | ISR [95%] | - N = 1 [95%] | efficiency |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in result["best_of"]:
        lines.append(f"| {row['n']} | {CHOOSERS[row['chooser']]} | {row['nfe']} | {shown(row, ('isr',))} | "
                     f"{shown_difference(row)} | {shown_value(row.get('efficiency'))} |")
    lines.append(f"\nThe verifier against the checker, over the {d['instances']} instances of every candidate: AUROC "
                 f"{shown_value(d['auroc'])}; their passes disagree on {shown_value(d['disagreement'])} (false passes "
                 f"{shown_value(d['false_pass'])}, false alarms {shown_value(d['false_alarm'])}).")
    if "repair" in result:
        lines += repair_lines(result["repair"])
    return "\n".join(lines) + "\n"


def repair_lines(repair):
    """The repair part of self_verify_table."""
    rows = [("N = 1, before repair", repair["before"]), (f"repair, up to {repair['rounds']} rounds", repair["repair"]),
            ("whole-image resampling at repair's NFE", repair["resample"])]
    lines = ["", "| images | NFE / image | ISR [95%] | - N = 1 [95%] |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {figures['nfe']:.1f} | {shown(figures, ('isr',))} | {shown_difference(figures)} |"
              for name, figures in rows]
    fixed, untouched, forced = repair["repair"], repair["untouched"], repair["forced"]
    psnr = ("identical" if fixed.get("mse_outside") == 0 else
            f"{fixed['psnr_outside']:.1f} dB" if "psnr_outside" in fixed else "no image changed")
    lines += ["", f"- Images redrawn {shown_value(fixed['images_redrawn'])}, a redraw kept on "
                  f"{shown_value(fixed['images_kept'])}; of the checker's failures {shown_value(fixed['fixed'])} pass "
                  f"after, of its passes {shown_value(fixed['broken'])} fail after.",
              f"- Outside the region redrawn (where failing_region is 0), against the image before: {psnr}.",
              f"- Instances never redrawn: ISR {shown(untouched['before'], ('isr',))} before, "
              f"{shown(untouched['after'], ('isr',))} after ({shown_difference(untouched['after'])}).",
              f"- Repair forced on the instances the checker passes ({forced['nfe']:.1f} NFE / image, a redraw kept on "
              f"{shown_value(forced['images_kept'])} of the images): their ISR {shown(forced['before'], ('isr',))} "
              f"before, {shown(forced['after'], ('isr',))} after ({shown_difference(forced['after'])})."]
    return lines


def plot_self_verify(result, path):
    """A PNG of one set's ISR against NFE per image: a line per chooser through its candidate counts (95% intervals
    as bars), repair and its resampling control as points; written to a temporary name, then renamed."""
    import matplotlib  # here, not above: the training scripts import this module and never plot
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    fig, axis = plt.subplots(figsize=(7, 4.5))
    bars = lambda rows: np.clip([[r["isr"] - r["isr_ci"][0] for r in rows], [r["isr_ci"][1] - r["isr"] for r in rows]],
                                0, None)
    for name, style in (("verifier", "o-"), ("random", "s--"), ("checker", "^:")):
        rows = [row for row in result["best_of"] if row["chooser"] == name]
        axis.errorbar([r["nfe"] for r in rows], [r["isr"] for r in rows], yerr=bars(rows), fmt=style, capsize=3,
                      label=CHOOSERS[name])
        if name == "verifier":
            for row in rows:
                axis.annotate(f"N={row['n']}", (row["nfe"], row["isr"]), textcoords="offset points", xytext=(4, -12),
                              fontsize=8)
    if "repair" in result:
        for key, style, label in (("repair", "*", "N = 1 + repair"),
                                  ("resample", "X", "N = 1 + whole-image resampling")):
            point = result["repair"][key]
            axis.errorbar([point["nfe"]], [point["isr"]], yerr=bars([point]), fmt=style, markersize=11, capsize=3,
                          label=label)
    axis.set_xlabel("network function evaluations per image")
    axis.set_ylabel("checker ISR")
    axis.set_title(f"{result['set']}: {result['n']} scenes, verifier {result['verifier']}, {result['ckpt']}",
                   fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize=8)
    fig.tight_layout()
    runtime.write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def main():
    parser = runtime.ArgumentParser(description="Checker and grounding figures of an EchoGen checkpoint.")
    parser.add_argument("--ckpt", help="checkpoint folder (its EMA weights)")
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
    parser.add_argument("--out", default="", help="ShapeScenes: write table.md, results.json and grids/{set}.png here "
                        "(with --self_verify: self_verify_{set}.md, .json and .png)")
    parser.add_argument("--agreement", type=runtime.non_negative_int, default=0,
                        help="ShapeScenes: only measure, on this many layouts x 8 SDE samples, how the own-head "
                        "reward agrees with the checker within groups (reward_agreement)")
    parser.add_argument("--agreement_set", default="train", help="--agreement's layouts: the distribution of this "
                        f"scene set ({', '.join(shapescenes.SCENE_SETS)}), other seeds than the set's own")
    parser.add_argument("--compare", default="", help="instead of evaluating: arm A, comma-separated results.json "
                        "files of evaluate.py --out (one per training seed), against --against's on the same scenes")
    parser.add_argument("--against", default="", help="--compare's arm B, comma-separated results.json files")
    parser.add_argument("--self_verify", type=candidate_counts, default=None, help="instead of evaluating: per set, "
                        "N candidates per scene (N the largest of these comma-separated counts), and per count the ISR "
                        "of the verifier's choice against a random one and the checker's (self_verify_checkpoint)")
    parser.add_argument("--repair", type=runtime.non_negative_int, default=0, help="with --self_verify: up to K repair "
                        "rounds on the N = 1 images, against whole-image resampling at the same NFE")
    parser.add_argument("--verifier", type=verifier_spec, default=None, help="with --self_verify: own (the model's "
                        "grounding head, the default) or judge:PATH (a StandaloneDetector at the model's resolution)")
    args = parser.parse_args()
    if args.compare or args.against:
        if not (args.compare and args.against):
            runtime.fail(f"--{'against' if args.compare else 'compare'}: needed beside "
                         f"--{'compare' if args.compare else 'against'} (each arm's results.json files, comma-separated)")
        print(compare(args.compare.split(","), args.against.split(",")), end="")
        return
    if not args.ckpt:
        runtime.fail("--ckpt: required (or --compare and --against)")
    sets = args.sets.split(",")
    for kind in sets:
        if kind not in shapescenes.SCENE_SETS:
            runtime.fail(f"--sets: unknown set '{kind}' ({', '.join(shapescenes.SCENE_SETS)})")
    if args.out:
        runtime.check_output_folder("--out", args.out)
    device = runtime.resolve_device(args.device)
    saved = runtime.read_checkpoint_config(args.ckpt)
    dataset = args.dataset or saved.get("train", {}).get("dataset", "shapescenes")
    if args.self_verify:
        if dataset != "shapescenes":
            runtime.fail(f"--self_verify: needs the rule-based checker, ShapeScenes only; '{args.ckpt}' is for "
                         f"{dataset}")
        if args.judge:
            runtime.fail(f"--judge '{args.judge}': not with --self_verify (a judge as the verifier: "
                         f"--verifier judge:PATH)")
        results = self_verify_checkpoint(args.ckpt, sets, args.n, args.self_verify, args.repair, args.verifier or "own",
                                         args.steps, args.cfg, args.shift, device, args.out or None)
        print("\n".join(map(self_verify_table, results.values())), end="")
        if args.out:
            print(f"wrote {os.path.join(args.out, 'self_verify_{set}')}.md, .json and .png")
        return
    if args.repair or args.verifier:
        runtime.fail(f"--{'repair' if args.repair else 'verifier'}: only with --self_verify")
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
