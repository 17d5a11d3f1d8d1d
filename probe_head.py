"""
What limits the grounding head: its features or its training? A probe (docs/grounding.md, "What the
head reads"). The EchoGen trunk is frozen; a fresh GroundingHead is trained on the image tokens of
one source at a time, with the trunk's own grounding queries, on clean true renders (half of the
scenes are ones where two objects share a color, as PMTP's ground_confusable = 0.5 draws them), and
scored on the "val" set: Acc@0.5 in all, where the color is shared (the grounder must see shapes) and
where it is the instance's own.

    python probe_head.py --ckpt out/pipeline/pmtp/ckpt
    python probe_head.py --ckpt out/pipeline/pmtp/ckpt --judge out/pipeline/judge/ckpt --sources 4,judge --steps 800

Sources: "embed" (the patch embedding with positions, before any block), 1 .. depth (the image tokens
after that block; depth is what the trained head reads), "judge" (the standalone judge's CNN features
with its positions: the same queries and head on features that were made for grounding). The first
row is the checkpoint's own trained head. A fresh head that beats the trained one on the same
features says its training was short; no source beating it says the features are the limit.
"""

import json

import numpy as np
import torch

import data
import detector
import evaluate
import layouts
import objectives
import runtime
import shapescenes
from model import EchoGen, GroundingHead


def trunk_features(model, judge, batch):
    """Clean images of a collated batch -> the image tokens of every source (S, B, P, D) in the order
    embed, block 1 .. depth[, judge], and the grounding queries after the last block (B, N, D)."""
    B, N = batch["images"].shape[0], batch["instance_mask"].shape[1]
    task = torch.ones(B, dtype=torch.long)
    cond = model.encode_conditions(batch["caption_ids"], batch["phrase_ids"], None, batch["instance_mask"], task)
    captured = []
    hooks = [block.register_forward_hook(lambda module, inputs, outputs: captured.append(outputs))
             for block in model.blocks]
    try:
        model.run_blocks(batch["images"], torch.zeros(B), cond)
    finally:
        for hook in hooks:
            hook.remove()
    sources = [model.patch_embed(batch["images"]).flatten(2).transpose(1, 2) + model.pos_embed]
    sources += [image_tokens for _, image_tokens in captured]
    if judge is not None:
        features = judge.input_proj(judge.backbone(batch["images"])[-1])  # (B, D, g, g)
        sources.append(features.flatten(2).transpose(1, 2) + judge.pos_embed)
    return torch.stack(sources), captured[-1][0][:, -N:]


@torch.no_grad()
def extract(model, judge, batches):
    """-> sources (S, n, P, D), queries (n, N, D), and the batches' boxes, phrase ids and instance masks."""
    sources, queries, parts = [], [], []
    for batch in batches:
        s, q = trunk_features(model, judge, batch)
        sources.append(s)
        queries.append(q)
        parts.append(batch)
    targets = {k: torch.cat([b[k] for b in parts]) for k in ("boxes", "phrase_ids", "instance_mask")}
    return torch.cat(sources, 1), torch.cat(queries), targets


def train_probe(features, queries, targets, steps, dim, depth, heads, max_instances, seed=0, lr=1e-3, batch_size=64):
    """A fresh GroundingHead on fixed features: AdamW, 50 warmup steps, cosine to lr / 10, the DETR loss."""
    torch.manual_seed(seed)
    head = GroundingHead(dim, depth, heads, max_instances)
    criterion = objectives.GroundingCriterion()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = runtime.learning_rate(step, lr, lr / 10, 50, steps, "cosine")
        rows = torch.randint(0, features.shape[0], (batch_size,), generator=generator)
        outputs = head(features[rows], queries[rows], targets["instance_mask"][rows])
        loss = criterion(outputs, targets["boxes"][rows], targets["phrase_ids"][rows], targets["instance_mask"][rows])
        optimizer.zero_grad(set_to_none=True)
        loss["loss"].backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
    return head.eval()


def scores(head, features, queries, targets, scenes):
    with torch.no_grad():
        boxes, confidence = detector.decode_predictions(head(features, queries, targets["instance_mask"]))
    metrics = detector.grounding_metrics(boxes, confidence, scenes)
    metrics.update(evaluate.shared_color_accuracy(boxes, scenes))
    return {"acc50": round(metrics["acc50"], 4), "miou": round(metrics["miou"], 4),
            "acc50_shared_color": metrics["acc50_shared_color"], "acc50_own_color": metrics["acc50_own_color"]}


def main():
    parser = runtime.ArgumentParser(description="Which image features limit the grounding head (a frozen-trunk probe).")
    parser.add_argument("--ckpt", required=True, help="an EchoGen checkpoint with a grounding head (its EMA weights)")
    parser.add_argument("--judge", default="", help="a StandaloneDetector checkpoint of the same resolution, for the 'judge' source")
    parser.add_argument("--sources", default="", help="comma-separated from embed, 1 .. depth, judge; default: all there are")
    parser.add_argument("--steps", type=runtime.positive_int, default=800, help="training steps of each fresh head")
    parser.add_argument("--train_scenes", type=runtime.positive_int, default=6000)
    parser.add_argument("--val_scenes", type=runtime.positive_int, default=300, help="'val' scenes, seed 0")
    args = parser.parse_args()
    saved = runtime.read_checkpoint_config(args.ckpt)
    if saved["kind"] != "EchoGen" or not saved["model"].get("grounding"):
        runtime.fail(f"--ckpt: needs an EchoGen checkpoint with a grounding head, got '{args.ckpt}'")
    model, tokenizer, saved = runtime.load_model(args.ckpt, EchoGen, "ema", "cpu")
    model.eval()
    config = model.config
    judge = evaluate.load_judge(args.judge, config.res, "cpu").model.eval() if args.judge else None
    names = ["embed", *map(str, range(1, config.depth + 1))] + (["judge"] if judge is not None else [])
    wanted = args.sources.split(",") if args.sources else names
    for name in wanted:
        if name not in names:
            runtime.fail(f"--sources: unknown source '{name}' (this checkpoint and judge have {', '.join(names)})")

    train = saved["train"]
    cache = data.load_or_prepare_cache(config.res, train.get("cache_scenes", 20000), train.get("data_seed", 0),
                                       max_instances=config.max_instances, data_dir=train.get("data_dir", "data"))
    confusable = shapescenes.confusable_scenes(cache.arrays["phrase_ids"], cache.arrays["instance_mask"])
    rng = np.random.default_rng(0)
    half = args.train_scenes // 2
    indices = np.concatenate([rng.choice(len(cache), args.train_scenes - half, replace=False),
                              rng.choice(confusable, half)])
    val_scenes = shapescenes.make_scene_set("val", args.val_scenes, seed=0)
    val_images = [shapescenes.render_scene(scene, config.res) for scene in val_scenes]
    train_set = extract(model, judge, (cache.batch(indices[i:i + 128]) for i in range(0, len(indices), 128)))
    val_set = extract(model, judge, (layouts.collate(val_scenes[i:i + 100], val_images[i:i + 100], tokenizer,
                                                     config.max_instances) for i in range(0, len(val_scenes), 100)))

    rows = [("trained head (reads block %d)" % config.depth,
             scores(model.grounding_head, val_set[0][config.depth], *val_set[1:], val_scenes))]
    for name in wanted:
        k = names.index(name)
        head = train_probe(train_set[0][k], *train_set[1:], args.steps, config.dim, config.ground_depth,
                           config.heads, config.max_instances)
        rows.append((f"fresh head on {name if name in ('embed', 'judge') else 'block ' + name}",
                     scores(head, val_set[0][k], *val_set[1:], val_scenes)))
        print(json.dumps({"source": rows[-1][0], **rows[-1][1]}), flush=True)
    print(f"\n{args.val_scenes} val scenes; fresh heads: {args.steps} steps on {args.train_scenes} true renders\n")
    print("| head | Acc@0.5 | mIoU | Acc@0.5, color shared | Acc@0.5, color own |\n| --- | --- | --- | --- | --- |")
    for name, m in rows:
        print(f"| {name} | {m['acc50']:.3f} | {m['miou']:.3f} | {m['acc50_shared_color']:.3f} | {m['acc50_own_color']:.3f} |")


if __name__ == "__main__":
    main()
