"""
Which data set a script trains on, and the command line of the data: load_dataset turns the
--dataset spec ("shapescenes", the default, or coco:..., coco.DATASET_HELP) into a training cache,
a tokenizer and the validation scenes; ShapeScenes' cache is pre-rendered once into data/ (nanoGPT's
"prepare" step) and read from memory by index afterwards.

From the command line (bad input prints "error: <message>" on stderr and exits 2, writing nothing):
    python data.py sample --kind val --n 64 --seed 0 --out val.json      # seeded layout file
    python data.py render --layouts val.json --out renders/ --res 64     # true renders {id}.png
    python data.py check --layouts val.json --images renders/            # checker scores, one JSON line
    python data.py prepare --res 32 --n 20000 --seed 0                   # build the training cache
    python data.py prepare --res 64 --dataset coco:INSTANCES.json:IMAGE_DIR:CAPTIONS.json  # a real data set's
"""

import json
import math
import multiprocessing
import os
import time
import zlib

import numpy as np
from PIL import Image

import coco
import layouts
import runtime
from runtime import LayoutError
import shapescenes

# -----------------------------------------------------------------------------
# ShapeScenes' pre-rendered training cache


def cache_path(res, n, seed, n_objects=(1, 4), data_dir="data"):
    return os.path.join(data_dir, f"shapescenes_r{res}_n{n}_s{seed}_o{n_objects[0]}-{n_objects[1]}.npz")


CACHE_CHUNK = 1000  # scenes per seeded chunk: a fixed unit of work, so the cache is the same for any worker count


def _sample_and_render_chunk(job):
    seed, chunk, count, res, n_objects = job
    rng = np.random.default_rng([seed, zlib.crc32(b"cache"), chunk])
    scenes = [shapescenes.sample_scene(rng, n_objects) for _ in range(count)]
    return scenes, np.stack([shapescenes.render_scene(scene, res) for scene in scenes])


def prepare_cache(path, n, res, seed, n_objects=(1, 4), max_instances=8, workers=None):
    """n train-split scenes, sampled and rendered in seeded chunks on all cores, tokenized, one .npz."""
    jobs = [(seed, c, min(CACHE_CHUNK, n - c * CACHE_CHUNK), res, n_objects) for c in range(math.ceil(n / CACHE_CHUNK))]
    workers = min(workers or os.cpu_count(), len(jobs))
    if workers > 1:
        # fork, not spawn: a spawned worker re-imports __main__, which would re-run a top-to-bottom train script
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            chunks = pool.map(_sample_and_render_chunk, jobs)
    else:
        chunks = [_sample_and_render_chunk(job) for job in jobs]
    scenes = [scene for chunk_scenes, _ in chunks for scene in chunk_scenes]
    images = np.concatenate([chunk_images for _, chunk_images in chunks])
    arrays = layouts.tokenize_scenes(scenes, shapescenes.build_tokenizer(), max_instances)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    runtime.write_atomically(path, lambda f: np.savez(f, images=images, res=res, seed=seed, **arrays))


def load_or_prepare_cache(res, n, seed, n_objects=(1, 4), max_instances=8, data_dir="data"):
    path = cache_path(res, n, seed, n_objects, data_dir)
    if os.path.exists(path):
        cache = layouts.SceneCache(path)
        if cache.arrays["phrase_ids"].shape[1] == max_instances:
            return cache
    print(f"preparing {path} ({n} scenes at {res}x{res})")
    prepare_cache(path, n, res, seed, n_objects, max_instances)
    return layouts.SceneCache(path)

# -----------------------------------------------------------------------------
# which data set


def load_dataset(spec, res, max_instances, data_dir="data", cache_scenes=20000, data_seed=0, val_scenes=64,
                 tokenizer=None):
    """The training cache, the tokenizer and the validation scenes of a data-set spec (coco.DATASET_HELP).
    "shapescenes": the pre-rendered cache, the closed-vocabulary tokenizer (or the given one) and the
    seeded "val" set. "coco:...": load_coco (cache_scenes and data_seed do not apply:
    the data set is what it is, and data_seed orders it). A bad spec or annotation file: LayoutError."""
    source = coco.parse_dataset_spec(spec)
    if source is None:
        cache = load_or_prepare_cache(res, cache_scenes, data_seed, data_dir=data_dir, max_instances=max_instances)
        tokenizer = tokenizer if tokenizer is not None else shapescenes.build_tokenizer()
        return cache, tokenizer, shapescenes.make_scene_set("val", val_scenes, seed=0)
    return coco.load_coco(source, res, max_instances, data_dir, val_scenes, tokenizer)


def load_dataset_on_ranks(dist_ctx, *args, **kwargs):
    """load_dataset for a (DDP) training script: rank 0 first, which prepares the cache and trains the
    tokenizer once, then the other ranks, which read them. A bad spec or annotation file stops the run
    with one line (runtime.fail) before any training."""
    try:
        loaded = load_dataset(*args, **kwargs) if dist_ctx.master else None
        dist_ctx.barrier()
        return loaded or load_dataset(*args, **kwargs)
    except LayoutError as e:
        runtime.fail(e)


def is_real(scenes):
    """Whether scenes come from a real data set (they carry their image; no checker can score them)."""
    return any("image" in scene for scene in scenes)


def scene_images(scenes, res):
    """The true images of scenes at res: a real scene's own image (resized when another size), else the
    world's render."""
    def resized(image):
        return image if image.shape[0] == res else np.asarray(Image.fromarray(image).resize((res, res), Image.BICUBIC))
    return [resized(scene["image"]) if "image" in scene else shapescenes.render_scene(scene, res) for scene in scenes]

# -----------------------------------------------------------------------------
# command line


def cmd_sample(args):
    layouts.write_layouts(args.out, shapescenes.make_scene_set(args.kind, args.n, args.seed))


def cmd_render(args):
    runtime.check_output_folder("--out", args.out)
    scenes = layouts.read_layouts(args.layouts, shapescenes.build_tokenizer(), shapescenes.MAX_OBJECTS)
    images = [shapescenes.render_scene(s, args.res) for s in scenes]  # all of them first: nothing written on error
    os.makedirs(args.out, exist_ok=True)
    for scene, image in zip(scenes, images):
        layouts.save_png(os.path.join(args.out, f"{scene['id']}.png"), image)


def cmd_check(args):
    scenes = layouts.read_layouts(args.layouts, shapescenes.build_tokenizer(), shapescenes.MAX_OBJECTS)
    images = [layouts.read_image(os.path.join(args.images, f"{scene['id']}.png"), scene["id"]) for scene in scenes]
    for scene, image in zip(scenes, images):
        if image.shape[0] != image.shape[1]:
            path = os.path.join(args.images, f"{scene['id']}.png")
            raise LayoutError(f"scene {scene['id']}: image: not square ({path}, {image.shape[1]}x{image.shape[0]})")
    print(json.dumps(shapescenes.check_images(scenes, images)))


def cmd_prepare(args):
    t0 = time.time()
    if args.dataset != "shapescenes":  # real data: once, before a torchrun, so that no rank waits on it
        cache, tokenizer, val = load_dataset(args.dataset, args.res, args.max_instances, args.data_dir)
        print(f"{len(cache)} training images, {len(val)} held out, vocabulary {tokenizer.get_vocab_size()}, "
              f"in {time.time() - t0:.1f} s")
        return
    path = cache_path(args.res, args.n, args.seed)
    prepare_cache(path, args.n, args.res, args.seed)
    print(f"wrote {path} in {time.time() - t0:.1f} s")


def main(argv=None):
    parser = runtime.ArgumentParser(description="ShapeScenes: sample, render, check, prepare.")
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", help="write a seeded layout file")
    sample.add_argument("--kind", choices=list(shapescenes.SCENE_SETS), default="val")
    sample.add_argument("--n", type=runtime.positive_int, default=64)
    sample.add_argument("--seed", type=runtime.non_negative_int, default=0)
    sample.add_argument("--out", required=True)
    render = commands.add_parser("render", help="true renders {id}.png of a layout file")
    render.add_argument("--layouts", required=True)
    render.add_argument("--out", required=True)
    render.add_argument("--res", type=runtime.positive_int, default=64)
    check = commands.add_parser("check", help="score images {id}.png against their layouts")
    check.add_argument("--layouts", required=True)
    check.add_argument("--images", required=True)
    prepare = commands.add_parser("prepare", help="build the pre-rendered training cache")
    prepare.add_argument("--res", type=runtime.positive_int, default=32)
    prepare.add_argument("--n", type=runtime.positive_int, default=20000)
    prepare.add_argument("--seed", type=runtime.non_negative_int, default=0)
    prepare.add_argument("--dataset", default="shapescenes", help=coco.DATASET_HELP)
    prepare.add_argument("--max_instances", type=runtime.positive_int, default=shapescenes.MAX_OBJECTS,
                         help="real data: the model's")
    prepare.add_argument("--data_dir", default="data", help="real data: where its cache goes")
    args = parser.parse_args(argv)
    try:
        {"sample": cmd_sample, "render": cmd_render, "check": cmd_check, "prepare": cmd_prepare}[args.command](args)
    except (ValueError, OSError) as e:  # LayoutError is a ValueError
        runtime.fail(e)


if __name__ == "__main__":
    main()

