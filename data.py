"""
ShapeScenes: the built-in layout world of EchoGen (shared/WORLD.md), and everything that turns
scenes into model inputs: the scene sampler and its captions, the anti-aliased renderer, the
closed-vocabulary tokenizer, layout files (read with full validation, written atomically),
collation into tensors, a pre-rendered cache (nanoGPT's "prepare" step) and the rule-based
checker that scores layout-to-image results without any learned judge (WORLD.md, Metrics).

From the command line (bad input prints "error: <message>" on stderr and exits 2, writing nothing):
    python data.py sample --kind val --n 64 --seed 0 --out val.json      # seeded layout file
    python data.py render --layouts val.json --out renders/ --res 64     # true renders {id}.png
    python data.py check --layouts val.json --images renders/            # checker scores, one JSON line
    python data.py prepare --res 32 --n 20000 --seed 0                   # build the training cache
"""

import argparse
import json
import math
import multiprocessing
import os
import re
import time
import zlib

import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

import runtime

# -----------------------------------------------------------------------------
# the world (WORLD.md)

PALETTE = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (235, 215, 40), "green": (40, 170, 60),
    "cyan": (40, 200, 215), "blue": (40, 70, 215), "purple": (150, 60, 200), "white": (245, 245, 245),
}
COLORS = list(PALETTE)
SHAPES = ["square", "circle", "triangle", "diamond", "cross", "ring"]
HELD_OUT = frozenset([("red", "triangle"), ("blue", "circle"), ("green", "cross"),
                      ("yellow", "ring"), ("purple", "square"), ("cyan", "diamond")])
TRAIN_PAIRS = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT]
HELD_OUT_PAIRS = sorted(HELD_OUT)

MAX_OBJECTS = 8                  # the world's upper limit on objects per scene
SIDE_RANGE = (0.18, 0.45)
ASPECT_RANGE = (0.75, 1.33)
DARK_BELOW = 60                  # background gray level under which captions say "dark"
SIZE_WORDS = ("small", "medium", "large")
WHERE = [["in the top left", "at the top", "in the top right"],
         ["on the left", "in the center", "on the right"],
         ["in the bottom left", "at the bottom", "in the bottom right"]]
RELATIONS = ("left of", "right of", "above", "below")

MAX_CAPTION_LEN = 64             # token budgets, checked against the longest caption at import
MAX_PHRASE_LEN = 12
SUPERSAMPLE = 4                  # anti-aliasing: draw at 4x, box-filter down

# the scene sets of the benchmark: kind -> (split, range of object counts)
SCENE_SETS = {"train": ("train", (1, 4)), "val": ("train", (1, 4)), "heldout": ("heldout", (1, 4)),
              "crowded": ("train", (5, 8)), "leakage": ("leakage", (2, 2))}


class LayoutError(ValueError):
    """Bad layout or text; the message is one line naming the scene id, the field and the value."""

# -----------------------------------------------------------------------------
# language


def short_phrase(color, shape):
    return f"{color} {shape}"


def long_phrase(color, shape, box):
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    size = "small" if side < 0.25 else "large" if side > 0.35 else "medium"
    row, col = min(int((y0 + y1) / 2 * 3), 2), min(int((x0 + x1) / 2 * 3), 2)
    return f"a {size} {color} {shape} {WHERE[row][col]}"


def relation(box_a, box_b):
    """Where a lies relative to b, by the dominant axis of the difference of their centres."""
    dx = (box_b[0] + box_b[2] - box_a[0] - box_a[2]) / 2
    dy = (box_b[1] + box_b[3] - box_a[1] - box_a[3]) / 2
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def _noun(phrase):
    """The phrase without a leading article, so that long phrases also read well in a caption."""
    words = phrase.split()
    return " ".join(words[1:]) if len(words) > 1 and words[0].lower() in ("a", "an") else phrase


def _with_article(phrase):
    noun = _noun(phrase)
    return ("an " if noun[0].lower() in "aeiou" else "a ") + noun


def make_caption(instances, gray):
    objects = [_with_article(inst["phrase"]) for inst in instances]
    caption = objects[0] if len(objects) == 1 else ", ".join(objects[:-1]) + " and " + objects[-1]
    if len(instances) >= 2:
        a, b = instances[:2]
        caption += f"; the {_noun(a['phrase'])} is {relation(a['box'], b['box'])} the {_noun(b['phrase'])}"
    return caption + (" on a dark background" if gray < DARK_BELOW else " on a gray background")


def parse_phrase(phrase):
    """(color, shape) named by a phrase; each None unless the phrase names exactly one."""
    words = re.findall(r"\w+", phrase.lower())
    colors, shapes = [w for w in words if w in PALETTE], [w for w in words if w in SHAPES]
    return (colors[0] if len(colors) == 1 else None), (shapes[0] if len(shapes) == 1 else None)

# -----------------------------------------------------------------------------
# scene sampling


def _random_sizes(rng, k):
    """(k, 2) box sizes (w, h): sides U[0.18, 0.45], redrawn until the aspect w / h is in range."""
    sizes = np.zeros((0, 2))
    while len(sizes) < k:
        draws = np.round(rng.uniform(*SIDE_RANGE, size=(2 * k, 2)), 4)  # 4 decimals: readable files, exact round trip
        aspect = draws[:, 0] / draws[:, 1]
        sizes = np.concatenate([sizes, draws[(aspect >= ASPECT_RANGE[0]) & (aspect <= ASPECT_RANGE[1])]])
    return sizes[:k]


def _boxes_at(x0, y0, sizes):
    """(k, 4) xyxy boxes; x0, y0 rounded like the sizes, so boxes stay inside the canvas exactly."""
    x0, y0 = np.round(x0, 4), np.round(y0, 4)
    return np.stack([x0, y0, np.round(x0 + sizes[:, 0], 4), np.round(y0 + sizes[:, 1], 4)], axis=1)


def _overlap_ok(candidates, placed, max_overlap):
    """(k,) whether each candidate overlaps every placed box by at most max_overlap of the smaller area."""
    c, p = candidates[:, None, :], placed[None, :, :]  # (k, 1, 4), (1, m, 4)
    iw = np.clip(np.minimum(c[..., 2], p[..., 2]) - np.maximum(c[..., 0], p[..., 0]), 0, None)
    ih = np.clip(np.minimum(c[..., 3], p[..., 3]) - np.maximum(c[..., 1], p[..., 1]), 0, None)
    area = lambda box: (box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1])
    return (iw * ih <= max_overlap * np.minimum(area(c), area(p))).all(axis=1)


def _place_boxes(rng, n, max_overlap, candidates_per_object=256):
    """n boxes obeying the overlap rule, placed one by one. Each candidate has its own size, so
    small boxes fill the gaps of a crowded scene; a scene that gets stuck restarts from scratch."""
    while True:
        placed = np.zeros((0, 4))
        for _ in range(n):
            sizes = _random_sizes(rng, candidates_per_object)
            candidates = _boxes_at(rng.uniform(0, 1 - sizes[:, 0]), rng.uniform(0, 1 - sizes[:, 1]), sizes)
            fits = np.flatnonzero(_overlap_ok(candidates, placed, max_overlap))
            if len(fits) == 0:
                break
            placed = np.concatenate([placed, candidates[fits[:1]]])
        else:
            return placed.tolist()


def _leakage_objects(rng):
    """The attribute-leakage probe: one shape in two colors, side by side, not overlapping."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colors = [c for c in COLORS if (c, shape) not in HELD_OUT]
    pair = [colors[i] for i in rng.choice(len(colors), size=2, replace=False)]
    sizes = _random_sizes(rng, 2)
    tallest = sizes[:, 1].max()
    center_y = rng.uniform(tallest / 2, 1 - tallest / 2)
    left_x0 = rng.uniform(0, 0.5 - sizes[0, 0])    # left box ends before the middle ...
    right_x0 = rng.uniform(0.5, 1 - sizes[1, 0])   # ... the right one starts after it
    boxes = _boxes_at(np.array([left_x0, right_x0]), center_y - sizes[:, 1] / 2, sizes).tolist()
    order = [0, 1] if rng.random() < 0.5 else [1, 0]  # so captions say both "left of" and "right of"
    return [(pair[i], shape) for i in order], [boxes[i] for i in order]


def sample_scene(rng, n_objects=(1, 4), split="train", max_overlap=0.10):
    """One scene. split "train": no held-out (color, shape) pair; "heldout": only held-out pairs;
    "leakage": the probe of _leakage_objects (n_objects and max_overlap do not apply)."""
    if split == "leakage":
        pairs, boxes = _leakage_objects(rng)
    elif split in ("train", "heldout"):
        if not 1 <= n_objects[0] <= n_objects[1] <= MAX_OBJECTS:
            raise ValueError(f"n_objects must lie within [1, {MAX_OBJECTS}], got {n_objects}")
        n = int(rng.integers(n_objects[0], n_objects[1] + 1))
        boxes = _place_boxes(rng, n, max_overlap)
        allowed = TRAIN_PAIRS if split == "train" else HELD_OUT_PAIRS
        pairs = [allowed[i] for i in rng.integers(len(allowed), size=n)]
    else:
        raise ValueError(f"unknown split {split!r} (train, heldout, leakage)")
    instances = []
    for (color, shape), box in zip(pairs, boxes):
        rgb = np.clip(np.array(PALETTE[color]) + rng.integers(-12, 13, size=3), 0, 255)
        instances.append({"phrase": short_phrase(color, shape), "box": box,
                          "color": color, "shape": shape, "rgb": rgb.tolist()})
    gray, gradient = round(rng.uniform(24, 96), 2), round(rng.uniform(-24, 24), 2)
    return {"caption": make_caption(instances, gray), "instances": instances,
            "background": {"gray": gray, "gradient": gradient}}


def _scene_rng(kind, seed):
    # the kind is part of the seed, so "train" and "val" with the same seed differ
    return np.random.default_rng([seed, zlib.crc32(kind.encode())])


def make_scene_set(kind, n, seed):
    if kind not in SCENE_SETS:
        raise ValueError(f"unknown scene set {kind!r} ({', '.join(SCENE_SETS)})")
    split, n_objects = SCENE_SETS[kind]
    rng = _scene_rng(kind, seed)
    return [{"id": f"{kind}{i}", **sample_scene(rng, n_objects, split)} for i in range(n)]

# -----------------------------------------------------------------------------
# rendering


def _shape_mask(shape, box, xs, ys):
    """(len(ys), len(xs)) bool: which sample points, all inside the box, lie inside the shape."""
    x0, y0, x1, y1 = box
    u = ((xs - (x0 + x1) / 2) / ((x1 - x0) / 2))[None, :]  # -1 .. 1 across the box
    v = ((ys - (y0 + y1) / 2) / ((y1 - y0) / 2))[:, None]
    radius2 = u ** 2 + v ** 2
    if shape == "square":
        return np.ones((len(ys), len(xs)), bool)
    if shape == "circle":
        return radius2 <= 1
    if shape == "ring":
        return (radius2 <= 1) & (radius2 > 0.25)
    if shape == "triangle":
        return np.abs(u) <= (v + 1) / 2
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    if shape == "cross":
        return (np.abs(v) <= 1 / 3) | (np.abs(u) <= 1 / 3)
    raise ValueError(f"unknown shape {shape!r}")


def _rasterize(shape, box, size):
    """Row slice, column slice and mask of the shape on a size x size grid of sample points."""
    def span(a, b):  # sample points whose centre (i + 0.5) / size lies in [a, b]
        return slice(max(math.ceil(a * size - 0.5), 0), min(math.floor(b * size - 0.5), size - 1) + 1)
    rows, cols = span(box[1], box[3]), span(box[0], box[2])
    xs = (np.arange(cols.start, cols.stop) + 0.5) / size
    ys = (np.arange(rows.start, rows.stop) + 0.5) / size
    return rows, cols, _shape_mask(shape, box, xs, ys)


def _background(scene):
    if "background" in scene:
        return scene["background"]["gray"], scene["background"]["gradient"]
    dark = "dark" in re.findall(r"\w+", scene.get("caption", "").lower())
    return (48 if dark else 80), 0.0  # a user's layout file has no background: WORLD.md's two looks


def _color_and_shape(scene, j):
    inst = scene["instances"][j]
    parsed = parse_phrase(inst["phrase"])  # a user's layout names them only in the phrase
    color, shape = inst.get("color", parsed[0]), inst.get("shape", parsed[1])
    if color is None or shape is None:
        raise LayoutError(f"scene {scene.get('id', '?')}: instances[{j}].phrase: "
                          f"names no single color and shape ({inst['phrase']!r})")
    return color, shape


def _box_filter(samples):
    """(S, S, ...) -> (S/4, S/4, ...): the mean of each 4x4 block of samples, as strided sums
    (ten times faster than a mean over a reshaped array's axes 1 and 3)."""
    rows = sum(samples[i::SUPERSAMPLE] for i in range(SUPERSAMPLE))
    return sum(rows[:, i::SUPERSAMPLE] for i in range(SUPERSAMPLE)) / SUPERSAMPLE ** 2


def render_scene(scene, res):
    size = res * SUPERSAMPLE
    gray, gradient = _background(scene)
    ys = (np.arange(size) + 0.5) / size
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = (gray + gradient * (ys - 0.5))[:, None, None]
    for j, inst in enumerate(scene["instances"]):  # list order: later objects on top
        color, shape = _color_and_shape(scene, j)
        rows, cols, mask = _rasterize(shape, inst["box"], size)
        canvas[rows, cols][mask] = inst.get("rgb", PALETTE[color])
    return np.clip(np.rint(_box_filter(canvas)), 0, 255).astype(np.uint8)


# -----------------------------------------------------------------------------
# tokenizer


def _text_words(text):
    return re.findall(r"\w+|[^\w\s]+", text.lower())  # the rule of the Whitespace pre-tokenizer


def _vocabulary():
    """Every word of the grammar: the word lists, plus the glue words of two example captions."""
    examples = [{"phrase": short_phrase(color, "circle"), "box": [0.3 * i, 0, 0.3 * i + 0.2, 0.2]}
                for i, color in enumerate(["orange", "red", "blue"])]
    texts = COLORS + SHAPES + list(SIZE_WORDS) + list(RELATIONS) + [where for row in WHERE for where in row]
    texts += [make_caption(examples, gray) for gray in (DARK_BELOW - 1, DARK_BELOW)]
    return sorted({word for text in texts for word in _text_words(text)})


def build_tokenizer():
    vocab = {"[PAD]": 0, "[UNK]": 1}
    vocab.update({word: i + 2 for i, word in enumerate(_vocabulary())})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def encode_text(tokenizer, text, max_len, where):
    """Token ids of text, padded with [PAD] = 0 to max_len; unknown words and overlong text are errors."""
    encoding = tokenizer.encode(text)
    for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
        if token_id == 1:
            raise LayoutError(f"{where}: unknown word {text[start:end]!r} in {text!r}")
    if len(encoding.ids) > max_len:
        raise LayoutError(f"{where}: {len(encoding.ids)} tokens, more than {max_len}, in {text!r}")
    return encoding.ids + [0] * (max_len - len(encoding.ids))


def _check_token_budgets():
    widest = [{"phrase": short_phrase("orange", "triangle"), "box": [0.1 * i, 0, 0.1 * i + 0.05, 0.05]}
              for i in range(MAX_OBJECTS)]
    caption_len = len(_text_words(make_caption(widest, gray=0)))
    phrase_len = len(_text_words(long_phrase("orange", "triangle", [0.6, 0.7, 0.9, 0.95])))
    if caption_len > MAX_CAPTION_LEN or phrase_len > MAX_PHRASE_LEN:
        raise RuntimeError(f"token budgets too small: caption {caption_len} > {MAX_CAPTION_LEN} "
                           f"or long phrase {phrase_len} > {MAX_PHRASE_LEN}")


_check_token_budgets()

# -----------------------------------------------------------------------------
# layout files (WORLD.md, "Layout files")


def _write_atomically(path, write):
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


def write_layouts(path, scenes):
    lines = []
    for i, scene in enumerate(scenes):
        instances = [{k: inst[k] for k in ("phrase", "box", "score") if k in inst} for inst in scene["instances"]]
        lines.append(json.dumps({"id": scene.get("id", f"s{i}"), "caption": scene["caption"], "instances": instances}))
    text = '{"scenes": [\n' + ",\n".join(lines) + "\n]}\n"  # one scene per line: diffable and greppable
    _write_atomically(path, lambda f: f.write(text.encode()))


def _read_box(box, where):
    if not (isinstance(box, list) and len(box) == 4 and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        raise LayoutError(f"{where}: not 4 numbers ({json.dumps(box)})")
    for v in box:
        if not 0 <= v <= 1:
            raise LayoutError(f"{where}: coordinate outside [0, 1] ({v})")
    for name, lo, hi in (("x", box[0], box[2]), ("y", box[1], box[3])):
        if lo >= hi:
            raise LayoutError(f"{where}: {name}0 >= {name}1 ({lo} >= {hi})")
    return [float(v) for v in box]


def _read_instance(inst, tokenizer, where):
    if not isinstance(inst, dict):
        raise LayoutError(f"{where}: not an object ({json.dumps(inst)})")
    phrase = inst.get("phrase")
    if not isinstance(phrase, str) or not phrase.strip():
        raise LayoutError(f"{where}.phrase: empty phrase ({json.dumps(phrase)})")
    encode_text(tokenizer, phrase, MAX_PHRASE_LEN, f"{where}.phrase")
    color, shape = parse_phrase(phrase)
    out = {"phrase": phrase, "box": _read_box(inst.get("box"), f"{where}.box"), "color": color, "shape": shape}
    if "score" in inst:
        score = inst["score"]
        if not (isinstance(score, (int, float)) and 0 <= score <= 1):
            raise LayoutError(f"{where}.score: not a number in [0, 1] ({json.dumps(score)})")
        out["score"] = float(score)
    return out


def _read_scene(i, scene, tokenizer, max_instances):
    if not isinstance(scene, dict):
        raise LayoutError(f"scenes[{i}]: not an object ({json.dumps(scene)[:60]})")
    scene_id = scene.get("id")
    if not isinstance(scene_id, str) or not re.fullmatch(r"[\w.-]+", scene_id) or scene_id in (".", ".."):
        raise LayoutError(f"scenes[{i}]: id: not a plain file name ({json.dumps(scene_id)})")
    where = f"scene {scene_id}"
    instances = scene.get("instances")
    if not isinstance(instances, list) or not instances:
        raise LayoutError(f"{where}: instances: no instances ({json.dumps(instances)})")
    if len(instances) > max_instances:
        raise LayoutError(f"{where}: instances: {len(instances)} instances, more than max_instances = {max_instances}")
    instances = [_read_instance(inst, tokenizer, f"{where}: instances[{j}]") for j, inst in enumerate(instances)]
    caption = scene.get("caption", make_caption(instances, gray=80))  # built from the phrases when missing
    if not isinstance(caption, str):
        raise LayoutError(f"{where}: caption: not a string ({json.dumps(caption)})")
    encode_text(tokenizer, caption, MAX_CAPTION_LEN, f"{where}: caption")
    return {"id": scene_id, "caption": caption, "instances": instances}


def read_layouts(path, tokenizer, max_instances):
    """The scenes of a layout file, every field validated before anything is returned."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise LayoutError(f"{path}: cannot read the layout file ({e.strerror})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        raise LayoutError(f"{path}: malformed JSON at line {e.lineno} col {e.colno}: {e.msg}") from None
    if not isinstance(document, dict) or not isinstance(document.get("scenes"), list):
        raise LayoutError(f"{path}: scenes: missing, a layout file is {{\"scenes\": [...]}}")
    scenes, seen = [], set()
    for i, raw in enumerate(document["scenes"]):
        scene = _read_scene(i, raw, tokenizer, max_instances)
        if scene["id"] in seen:
            raise LayoutError(f"scene {scene['id']}: id: duplicate ({scene['id']!r})")
        seen.add(scene["id"])
        scenes.append(scene)
    return scenes

# -----------------------------------------------------------------------------
# batching


def _tokenize_scenes(scenes, tokenizer, max_instances):
    """Numpy arrays of the model inputs; phrases repeat a lot, so each is encoded once."""
    n = len(scenes)
    arrays = {"caption_ids": np.zeros((n, MAX_CAPTION_LEN), np.int32),
              "phrase_ids": np.zeros((n, max_instances, MAX_PHRASE_LEN), np.int32),
              "boxes": np.zeros((n, max_instances, 4), np.float32),
              "instance_mask": np.zeros((n, max_instances), bool)}
    phrase_cache = {}
    for i, scene in enumerate(scenes):
        where = f"scene {scene.get('id', i)}"
        if len(scene["instances"]) > max_instances:
            raise LayoutError(f"{where}: instances: {len(scene['instances'])} instances, "
                              f"more than max_instances = {max_instances}")
        arrays["caption_ids"][i] = encode_text(tokenizer, scene["caption"], MAX_CAPTION_LEN, f"{where}: caption")
        for j, inst in enumerate(scene["instances"]):
            if inst["phrase"] not in phrase_cache:
                phrase_cache[inst["phrase"]] = encode_text(
                    tokenizer, inst["phrase"], MAX_PHRASE_LEN, f"{where}: instances[{j}].phrase")
            arrays["phrase_ids"][i, j] = phrase_cache[inst["phrase"]]
            arrays["boxes"][i, j] = inst["box"]
            arrays["instance_mask"][i, j] = True
    return arrays


def _to_tensors(arrays, images):
    batch = {k: torch.from_numpy(v).long() if k.endswith("_ids") else torch.from_numpy(v) for k, v in arrays.items()}
    if images is not None:
        images = np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2))  # (B, R, R, 3) -> (B, 3, R, R)
        batch["images"] = torch.from_numpy(images).float() / 127.5 - 1
    return batch


def collate(scenes, images, tokenizer, max_instances):
    images = None if images is None else np.stack(images)
    return _to_tensors(_tokenize_scenes(scenes, tokenizer, max_instances), images)

# -----------------------------------------------------------------------------
# pre-rendered cache


def cache_path(res, n, seed, n_objects=(1, 4), data_dir="data"):
    return os.path.join(data_dir, f"shapescenes_r{res}_n{n}_s{seed}_o{n_objects[0]}-{n_objects[1]}.npz")


CACHE_CHUNK = 1000  # scenes per seeded chunk: a fixed unit of work, so the cache is the same for any worker count


def _sample_and_render_chunk(job):
    seed, chunk, count, res, n_objects = job
    rng = np.random.default_rng([seed, zlib.crc32(b"cache"), chunk])
    scenes = [sample_scene(rng, n_objects) for _ in range(count)]
    return scenes, np.stack([render_scene(scene, res) for scene in scenes])


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
    arrays = _tokenize_scenes(scenes, build_tokenizer(), max_instances)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    _write_atomically(path, lambda f: np.savez(f, images=images, res=res, seed=seed, **arrays))


class SceneCache:

    def __init__(self, path):
        with np.load(path) as f:
            self.arrays = {k: f[k] for k in ("caption_ids", "phrase_ids", "boxes", "instance_mask")}
            self.images = f["images"]
            self.res, self.seed = int(f["res"]), int(f["seed"])

    def __len__(self):
        return len(self.images)

    def batch(self, indices):
        return _to_tensors({k: v[indices] for k, v in self.arrays.items()}, self.images[indices])


def load_or_prepare_cache(res, n, seed, n_objects=(1, 4), max_instances=8, data_dir="data"):
    path = cache_path(res, n, seed, n_objects, data_dir)
    if os.path.exists(path):
        cache = SceneCache(path)
        if cache.arrays["phrase_ids"].shape[1] == max_instances:
            return cache
    print(f"preparing {path} ({n} scenes at {res}x{res})")
    prepare_cache(path, n, res, seed, n_objects, max_instances)
    return SceneCache(path)

# -----------------------------------------------------------------------------
# the rule-based checker (WORLD.md, Metrics)

MARGIN = 0.25           # the box is grown by this fraction of its side on every side
CORE = 0.25             # the box's core: shrunk by this fraction of its side on every side
COLOR_DISTANCE = 60.0   # a pixel has a color when that palette entry is its nearest and this close
MIN_COLOR_FRACTION = 0.1  # color found when its region covers this much of the box's pixel area
PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], np.float32)


def box_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _pixel_window(box, res, grow):
    """Row and column slices of the pixels of the box grown (or, grow < 0, shrunk) by grow * side."""
    x0, y0, x1, y1 = box
    gx, gy = grow * (x1 - x0), grow * (y1 - y0)
    rows = slice(max(int(np.floor((y0 - gy) * res)), 0), min(int(np.ceil((y1 + gy) * res)), res))
    cols = slice(max(int(np.floor((x0 - gx) * res)), 0), min(int(np.ceil((x1 + gx) * res)), res))
    return rows, cols


def _dilate(mask):
    """One step of 8-connected growth."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    wide = grown.copy()
    wide[:, 1:] |= grown[:, :-1]
    wide[:, :-1] |= grown[:, 1:]
    return wide


def _connected_to(seeds, mask):
    """The pixels of mask 8-connected to the seeds (flood fill by repeated dilation)."""
    region = seeds & mask
    while True:
        grown = _dilate(region) & mask
        if (grown == region).all():
            return region
        region = grown


def _template(shape, region, res):
    """The shape rasterized as the renderer does into the region (pixel-aligned): coverage > 1/2."""
    _, _, mask = _rasterize(shape, region, res * SUPERSAMPLE)
    return _box_filter(mask.astype(np.float32)) > 0.5


def check_instance(image, instance):
    res = image.shape[0]
    box, color = instance["box"], instance.get("color")
    result = {"color_found": False, "shape_pred": None, "shape_ok": False, "iou": 0.0, "success": False}
    if color not in PALETTE:
        return result
    rows, cols = _pixel_window(box, res, MARGIN)
    pixels = image[rows, cols].astype(np.float32)
    distance = np.linalg.norm(pixels[:, :, None, :] - PALETTE_RGB, axis=-1)  # (h, w, 8)
    index = COLORS.index(color)
    colored = (distance.argmin(-1) == index) & (distance[..., index] <= COLOR_DISTANCE)
    # Only the colored pixels connected to the box's core count: the grown box may reach into a
    # neighbour of the same color, whose pixels would otherwise stretch the tight bounding box
    # (true renders at R = 64, no overlap: ISR 0.976 with all colored pixels, 0.998 with this).
    core_rows, core_cols = _pixel_window(box, res, -CORE)
    seeds = np.zeros_like(colored)
    seeds[core_rows.start - rows.start:core_rows.stop - rows.start,
          core_cols.start - cols.start:core_cols.stop - cols.start] = True
    found = _connected_to(seeds, colored)
    box_pixels = (box[2] - box[0]) * (box[3] - box[1]) * res * res
    if found.sum() < max(1.0, MIN_COLOR_FRACTION * box_pixels):
        return result
    ys, xs = np.flatnonzero(found.any(1)), np.flatnonzero(found.any(0))
    found = found[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1]
    r0, c0 = rows.start + ys[0], cols.start + xs[0]
    region = [c0 / res, r0 / res, (c0 + found.shape[1]) / res, (r0 + found.shape[0]) / res]

    def fit(shape):  # mask IoU of the shape's template with the colored pixels
        template = _template(shape, region, res)
        return (template & found).sum() / (template | found).sum()

    shape_pred = max(SHAPES, key=fit)
    iou = float(box_iou(region, box))
    shape_ok = shape_pred == instance.get("shape")
    return {"color_found": True, "shape_pred": shape_pred, "shape_ok": shape_ok, "iou": iou,
            "success": shape_ok and iou >= 0.5}


def check_images(scenes, images):
    per_image = [[check_instance(image, inst) for inst in scene["instances"]] for scene, image in zip(scenes, images)]
    results = [r for rs in per_image for r in rs]
    rate = lambda values: round(float(np.mean(values)), 4) if values else 0.0
    return {"isr": rate([r["success"] for r in results]), "miou": rate([r["iou"] for r in results]),
            "color_acc": rate([r["color_found"] for r in results]), "shape_acc": rate([r["shape_ok"] for r in results]),
            "image_success": rate([all(r["success"] for r in rs) for rs in per_image]), "n_instances": len(results)}

# -----------------------------------------------------------------------------
# pictures


def draw_boxes(image, scene, scale=4):
    res = image.shape[0] * scale
    picture = Image.fromarray(image).resize((res, res), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    for inst in scene["instances"]:
        x0, y0, x1, y1 = (v * res for v in inst["box"])
        color = PALETTE.get(inst.get("color") or parse_phrase(inst["phrase"])[0], (255, 255, 255))
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=color)
    return np.asarray(picture)


def save_png(path, image):
    _write_atomically(path, lambda f: Image.fromarray(image).save(f, format="PNG"))


def save_grid(path, rows, pad=2):
    cell_h = max(im.shape[0] for row in rows for im in row)
    cell_w = max(im.shape[1] for row in rows for im in row)
    n_cols = max(len(row) for row in rows)
    grid = np.full((pad + len(rows) * (cell_h + pad), pad + n_cols * (cell_w + pad), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            top, left = pad + i * (cell_h + pad), pad + j * (cell_w + pad)
            grid[top:top + im.shape[0], left:left + im.shape[1]] = im
    save_png(path, grid)

# -----------------------------------------------------------------------------
# command line


def cmd_sample(args):
    write_layouts(args.out, make_scene_set(args.kind, args.n, args.seed))


def cmd_render(args):
    scenes = read_layouts(args.layouts, build_tokenizer(), MAX_OBJECTS)
    images = [render_scene(s, args.res) for s in scenes]  # all of them first: nothing written on error
    os.makedirs(args.out, exist_ok=True)
    for scene, image in zip(scenes, images):
        save_png(os.path.join(args.out, f"{scene['id']}.png"), image)


def cmd_check(args):
    scenes = read_layouts(args.layouts, build_tokenizer(), MAX_OBJECTS)
    images = []
    for scene in scenes:
        path = os.path.join(args.images, f"{scene['id']}.png")
        if not os.path.exists(path):
            raise LayoutError(f"scene {scene['id']}: image: missing file ({path})")
        image = np.asarray(Image.open(path).convert("RGB"))
        if image.shape[0] != image.shape[1]:
            raise LayoutError(f"scene {scene['id']}: image: not square ({path}, {image.shape[1]}x{image.shape[0]})")
        images.append(image)
    print(json.dumps(check_images(scenes, images)))


def cmd_prepare(args):
    t0 = time.time()
    path = cache_path(args.res, args.n, args.seed)
    prepare_cache(path, args.n, args.res, args.seed)
    print(f"wrote {path} in {time.time() - t0:.1f} s")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other input error (subcommand parsers inherit it)
        runtime.fail(message)


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return int(text)


def main(argv=None):
    parser = Parser(description="ShapeScenes: sample, render, check, prepare.")
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", help="write a seeded layout file")
    sample.add_argument("--kind", choices=list(SCENE_SETS), default="val")
    sample.add_argument("--n", type=positive_int, default=64)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", required=True)
    render = commands.add_parser("render", help="true renders {id}.png of a layout file")
    render.add_argument("--layouts", required=True)
    render.add_argument("--out", required=True)
    render.add_argument("--res", type=positive_int, default=64)
    check = commands.add_parser("check", help="score images {id}.png against their layouts")
    check.add_argument("--layouts", required=True)
    check.add_argument("--images", required=True)
    prepare = commands.add_parser("prepare", help="build the pre-rendered training cache")
    prepare.add_argument("--res", type=positive_int, default=32)
    prepare.add_argument("--n", type=positive_int, default=20000)
    prepare.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        {"sample": cmd_sample, "render": cmd_render, "check": cmd_check, "prepare": cmd_prepare}[args.command](args)
    except (ValueError, OSError) as e:  # LayoutError is a ValueError
        runtime.fail(e)


if __name__ == "__main__":
    main()
