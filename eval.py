"""
Evaluation of an EchoGen model on fixed, seeded ShapeScenes sets (DESIGN.md, "Honest measurement"):
layout-to-image quality by the rule-based checker (never by a learned grounder), and the
model's own grounding of the world's true renders.

    python eval.py --ckpt out/pretrain/ckpt                          # val and heldout, 64 scenes each
    python eval.py --ckpt out/pretrain/ckpt --sets val,heldout,crowded,leakage --n 64 --steps 25 --cfg 3.0

prints one JSON line per set. "leakage" is the attribute-leakage probe (two objects of one shape in
two colors side by side, where IDM should help): besides the checker's ISR and color accuracy
(its own color found in each box) it reports color_leak, the share of boxes holding the other
object's color. The sets, seeds and sampling noise are fixed, so two runs of the
same checkpoint print the same figures. The training scripts call evaluate() for their periodic
validation figures.

On real data (a COCO-format set: --dataset as the training scripts take it, by default the one the
checkpoint was trained on) there is no checker. The scenes are the data set's held-out images;
layout-to-image is scored as COCO-MIG does, by a StandaloneDetector trained on the real training
images (--judge): ISR = the share of instances whose phrase the judge finds with IoU >= 0.5 to the
asked box, mIoU the mean of those IoUs ("judge_real": the same judge on the real images, its
ceiling); grounding is scored against the annotations:
    python eval.py --ckpt out/coco/ckpt --judge out/coco_judge/ckpt --n 500
"""

import argparse
import json

import torch

import data
import detector
import runtime
import sampler


def is_leakage_pair(scene):
    """Two instances of one shape in two colors: a scene of the attribute-leakage probe."""
    first, *others = scene["instances"]
    return (len(others) == 1 and first.get("shape") is not None and first.get("shape") == others[0].get("shape")
            and first.get("color") != others[0].get("color"))


def leakage_metrics(scenes, images):
    """On the attribute-leakage probe (every scene a pair of one shape in two colors): {"color_leak":
    the share of instances whose box holds the OTHER instance's color}, found as the checker finds
    colors (connected to the box's core), so a true render scores 0 and a color swap 1. {} otherwise."""
    if not scenes or not all(map(is_leakage_pair, scenes)):
        return {}
    leaks = [data.check_instance(image, dict(instance, color=other["color"]))["color_found"]
             for scene, image in zip(scenes, images)
             for instance, other in zip(scene["instances"], scene["instances"][::-1])]
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


def real_data_metrics(model, scenes, tokenizer, steps, cfg, shift, grid_path, judge):
    """Real scenes (they carry their image) have no checker: the judge's figures of the model's images
    when a judge is given, and "judge_real", the same judge on the real images (its ceiling). A grid:
    generated image with the asked boxes | the real image with them. -> (metrics, generated images)"""
    images, truths = sampler.generate(model, scenes, tokenizer, steps, cfg, shift), data.scene_images(scenes, model.config.res)
    metrics = {}
    if judge is not None:
        metrics.update(judge_images(judge, scenes, images))
        metrics["judge_real"] = judge_images(judge, scenes, truths)
    if grid_path:
        data.save_grid(grid_path, [[data.draw_boxes(image, scene), data.draw_boxes(truth, scene)]
                                   for scene, image, truth in list(zip(scenes, images, truths))[:8]])
    return metrics, images


def evaluate(model, scenes, tokenizer, steps=25, cfg=3.0, shift=1.0, grid_path=None, judge=None):
    """The checker's figures of the model's images of `scenes` (at the model's resolution), color_leak
    on the leakage probe, and, for a model with a grounding head, {"grounding": Acc@0.5, mIoU, AP} of
    its grounding of the true renders. Real scenes: real_data_metrics instead of the checker's, and
    grounding of the real images. A judge on ShapeScenes adds its figures as {"judge": ...}."""
    if data.is_real(scenes):
        metrics, images = real_data_metrics(model, scenes, tokenizer, steps, cfg, shift, grid_path, judge)
    else:
        metrics, images = sampler.generate_and_check(model, scenes, tokenizer, steps, cfg, shift, grid_path=grid_path,
                                                     return_images=True)
        metrics.update(leakage_metrics(scenes, images))
        if judge is not None:
            metrics["judge"] = judge_images(judge, scenes, images)
    if model.config.grounding:
        device = next(model.parameters()).device
        renders = data.scene_images(scenes, model.config.res)  # the true renders, or the real images
        grounder = detector.Grounder("EchoGen", model, tokenizer, model.config.res, model.config.max_instances, device)
        boxes, scores = detector.ground_scenes(grounder, scenes, renders, tokenizer, model.config.max_instances, device)
        metrics["grounding"] = {k: round(v, 4) for k, v in detector.grounding_metrics(boxes, scores, scenes).items()}
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
    return line


def main():
    parser = argparse.ArgumentParser(description="Checker and grounding figures of an EchoGen checkpoint.")
    parser.add_argument("--ckpt", required=True, help="checkpoint folder (its EMA weights)")
    parser.add_argument("--sets", default="val,heldout", help=f"comma-separated, from {', '.join(data.SCENE_SETS)}")
    parser.add_argument("--n", type=int, default=64, help="scenes per set (seed 0)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=3.0)
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dataset", help=f"{data.DATASET_HELP}; default: the checkpoint's own")
    parser.add_argument("--data_dir", help="where the data set's cache lives; default: the checkpoint's own")
    parser.add_argument("--judge", default="", help="a StandaloneDetector checkpoint trained on the real training "
                        "images: scores layout-to-image on real data (COCO-MIG's ISR and mIoU)")
    args = parser.parse_args()
    sets = args.sets.split(",")
    for kind in sets:
        if kind not in data.SCENE_SETS:
            runtime.fail(f"--sets: unknown set '{kind}' ({', '.join(data.SCENE_SETS)})")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    model, tokenizer, saved = runtime.load_model(args.ckpt, "ema", device)
    judge = detector.load_grounder(args.judge, device) if args.judge else None
    dataset = args.dataset or saved["train"].get("dataset", "shapescenes")
    if dataset != "shapescenes":  # real data: its held-out images, at the model's resolution, with its tokenizer
        try:
            _, _, scenes = data.load_dataset(dataset, model.config.res, model.config.max_instances,
                                             args.data_dir or saved["train"].get("data_dir", "data"),
                                             val_scenes=args.n, tokenizer=tokenizer)
        except data.LayoutError as e:
            runtime.fail(e)
        metrics = evaluate(model, scenes, tokenizer, args.steps, args.cfg, args.shift, judge=judge)
        print(json.dumps({"set": "val", "dataset": dataset, "n": len(scenes), **metrics}), flush=True)
        return
    for kind in sets:
        scenes = data.make_scene_set(kind, args.n, seed=0)
        metrics = evaluate(model, scenes, tokenizer, args.steps, args.cfg, args.shift, judge=judge)
        print(json.dumps({"set": kind, "n": args.n, **metrics}), flush=True)


if __name__ == "__main__":
    main()
