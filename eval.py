"""
Evaluation of an EchoGen model on fixed, seeded ShapeScenes sets (DESIGN.md, "Honest measurement"):
layout-to-image quality by the rule-based checker (never by a learned grounder), and the
model's own grounding of the world's true renders.

    python eval.py --ckpt out/pretrain/ckpt                          # val and heldout, 64 scenes each
    python eval.py --ckpt out/pretrain/ckpt --sets val,heldout,crowded,leakage --n 64 --steps 25 --cfg 3.0

prints one JSON line per set. The sets, seeds and sampling noise are fixed, so two runs of the
same checkpoint print the same figures. The training scripts call evaluate() for their periodic
validation figures.
"""

import argparse
import json

import torch

import data
import detector
import runtime
import sampler


def evaluate(model, scenes, tokenizer, steps=25, cfg=3.0, shift=1.0, grid_path=None):
    """The checker's figures of the model's images of `scenes` (at the model's resolution), and, for
    a model with a grounding head, {"grounding": Acc@0.5, mIoU, AP} of its grounding of the true renders."""
    metrics = sampler.generate_and_check(model, scenes, tokenizer, steps, cfg, shift, grid_path=grid_path)
    if model.config.grounding:
        device = next(model.parameters()).device
        renders = [data.render_scene(scene, model.config.res) for scene in scenes]
        grounder = detector.Grounder("EchoGen", model, tokenizer, model.config.res, model.config.max_instances, device)
        boxes, scores = detector.ground_scenes(grounder, scenes, renders, tokenizer, model.config.max_instances, device)
        metrics["grounding"] = {k: round(v, 4) for k, v in detector.grounding_metrics(boxes, scores, scenes).items()}
    return metrics


def summary(metrics):
    """One line for a progress bar or a log."""
    line = "ISR {isr:.3f} mIoU {miou:.3f} color {color_acc:.3f} shape {shape_acc:.3f}".format(**metrics)
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
    args = parser.parse_args()
    sets = args.sets.split(",")
    for kind in sets:
        if kind not in data.SCENE_SETS:
            runtime.fail(f"--sets: unknown set '{kind}' ({', '.join(data.SCENE_SETS)})")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    model, tokenizer, _ = runtime.load_model(args.ckpt, "ema", device)
    for kind in sets:
        scenes = data.make_scene_set(kind, args.n, seed=0)
        print(json.dumps({"set": kind, "n": args.n, **evaluate(model, scenes, tokenizer, args.steps, args.cfg, args.shift)}),
              flush=True)


if __name__ == "__main__":
    main()
