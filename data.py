"""
ShapeScenes: the built-in layout world of EchoGen (its shapes, colors and sampling rules are the
constants and sample_scene below), and everything that turns scenes into model inputs: the scene
sampler and its captions, the anti-aliased renderer, the closed-vocabulary tokenizer, layout files
(read with full validation, written atomically), collation into tensors, a pre-rendered cache
(nanoGPT's "prepare" step) and the rule-based checker that scores layout-to-image results without
any learned judge (README, "Train, sample, check").
Real data: load_dataset turns a COCO-format instances file, its image folder and optionally a
captions file (--dataset=coco:INSTANCES.json:IMAGE_DIR[:CAPTIONS.json][:key=value ...]) into the
same kind of cache, with a WordPiece tokenizer trained on its text; every script takes that spec.

From the command line (bad input prints "error: <message>" on stderr and exits 2, writing nothing):
    python data.py sample --kind val --n 64 --seed 0 --out val.json      # seeded layout file
    python data.py render --layouts val.json --out renders/ --res 64     # true renders {id}.png
    python data.py check --layouts val.json --images renders/            # checker scores, one JSON line
    python data.py prepare --res 32 --n 20000 --seed 0                   # build the training cache
    python data.py prepare --res 64 --dataset coco:INSTANCES.json:IMAGE_DIR:CAPTIONS.json  # a real data set's
"""

import hashlib
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
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import runtime

# -----------------------------------------------------------------------------
# the world (docs/world.md)

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

# The attribute-leakage probes: objects of one shape in different colors, case -> (object counts,
# boxes touching, colors neighbours in HUES, caption listing the objects in another order than the
# layout). "leakage" itself is the hardest case (docs/idm.md, "The leakage probe").
LEAKAGE_CASES = {"pair": ((2, 2), False, False, False), "touching": ((2, 2), True, False, False),
                 "close": ((2, 2), True, True, False), "row": ((3, 4), True, False, False),
                 "close_row": ((3, 4), True, True, False), "shuffled": ((3, 4), True, True, True)}
LEAKAGE_HARDEST = "shuffled"
LEAKAGE_SPLITS = {"leakage": LEAKAGE_HARDEST, **{f"leakage_{case}": case for case in LEAKAGE_CASES}}
HUES = ["red", "orange", "yellow", "green", "cyan", "blue", "purple"]  # neighbours here are close in RGB
# the scene sets of the benchmark: kind -> (split, range of object counts)
SCENE_SETS = {"train": ("train", (1, 4)), "val": ("train", (1, 4)), "heldout": ("heldout", (1, 4)),
              "crowded": ("train", (5, 8)),
              **{split: (split, LEAKAGE_CASES[case][0]) for split, case in LEAKAGE_SPLITS.items()}}


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


def _leakage_colors(rng, shape, n, close):
    """n distinct colors allowed with the shape; close: a run of neighbours in HUES, in hue order
    (None where the shape has no such run)."""
    allowed = [c for c in COLORS if (c, shape) not in HELD_OUT]
    if not close:
        return [allowed[i] for i in rng.choice(len(allowed), size=n, replace=False)]
    runs = [HUES[i:i + n] for i in range(len(HUES) - n + 1) if all(c in allowed for c in HUES[i:i + n])]
    if not runs:  # e.g. every run of 4 hues holds green, held out with the cross
        return None
    run = runs[rng.integers(len(runs))]
    return run if rng.random() < 0.5 else run[::-1]


def _touching_boxes(rng, n):
    """n boxes sharing edges, each a neighbour of the next: a row of 2 or 3, or a 2 x 2 block of 4
    ordered around it (top left, top right, bottom right, bottom left)."""
    while True:
        sizes = _random_sizes(rng, n)
        if n == 4:  # a block: columns of the widest box in each, rows of the tallest
            w, h = sizes[:, 0].reshape(2, 2).max(0), sizes[:, 1].reshape(2, 2).max(1)
            aspect = w[[0, 1, 1, 0]] / h[[0, 0, 1, 1]]
            if w.sum() > 1 or h.sum() > 1 or (aspect < ASPECT_RANGE[0]).any() or (aspect > ASPECT_RANGE[1]).any():
                continue
            x0, y0 = rng.uniform(0, 1 - w.sum()), rng.uniform(0, 1 - h.sum())
            xs, ys = np.array([x0, x0 + w[0], x0 + w[0], x0]), np.array([y0, y0, y0 + h[0], y0 + h[0]])
            cells = np.array([[w[0], h[0]], [w[1], h[0]], [w[1], h[1]], [w[0], h[1]]])
            return _boxes_at(xs, ys, np.round(cells, 4)).tolist()
        if sizes[:, 0].sum() > 1:
            continue
        tallest = sizes[:, 1].max()
        center_y = rng.uniform(tallest / 2, 1 - tallest / 2)
        x0 = rng.uniform(0, 1 - sizes[:, 0].sum()) + np.concatenate([[0], np.cumsum(sizes[:-1, 0])])
        return _boxes_at(x0, center_y - sizes[:, 1] / 2, sizes).tolist()


def _apart_boxes(rng):
    """Two boxes side by side with a gap: the left one ends before the middle, the right one starts after."""
    sizes = _random_sizes(rng, 2)
    tallest = sizes[:, 1].max()
    center_y = rng.uniform(tallest / 2, 1 - tallest / 2)
    x0 = np.array([rng.uniform(0, 0.5 - sizes[0, 0]), rng.uniform(0.5, 1 - sizes[1, 0])])
    return _boxes_at(x0, center_y - sizes[:, 1] / 2, sizes).tolist()


def _leakage_objects(rng, case):
    """A scene of the leakage probe LEAKAGE_CASES[case]: one shape in n colors.
    -> (color, shape) pairs, boxes, and the order in which the caption lists the objects."""
    (lo, hi), touching, close, shuffled = LEAKAGE_CASES[case]
    n = int(rng.integers(lo, hi + 1))
    colors = None
    while colors is None:
        shape = SHAPES[rng.integers(len(SHAPES))]
        colors = _leakage_colors(rng, shape, n, close)
    boxes = _touching_boxes(rng, n) if touching else _apart_boxes(rng)
    order = list(rng.permutation(n)) if n > 2 else ([0, 1] if rng.random() < 0.5 else [1, 0])
    if not shuffled:  # the layout lists the objects in the caption's order
        colors, boxes, order = [colors[i] for i in order], [boxes[i] for i in order], list(range(n))
    while shuffled and order == sorted(order):
        order = list(rng.permutation(n))
    return [(color, shape) for color in colors], boxes, [int(i) for i in order]


def sample_scene(rng, n_objects=(1, 4), split="train", max_overlap=0.10):
    """One scene. split "train": no held-out (color, shape) pair; "heldout": only held-out pairs;
    "leakage" and "leakage_CASE": the probes of LEAKAGE_CASES (n_objects and max_overlap do not apply)."""
    caption_order = None
    if split in LEAKAGE_SPLITS:
        pairs, boxes, caption_order = _leakage_objects(rng, LEAKAGE_SPLITS[split])
    elif split in ("train", "heldout"):
        if not 1 <= n_objects[0] <= n_objects[1] <= MAX_OBJECTS:
            raise ValueError(f"n_objects must lie within [1, {MAX_OBJECTS}], got {n_objects}")
        n = int(rng.integers(n_objects[0], n_objects[1] + 1))
        boxes = _place_boxes(rng, n, max_overlap)
        allowed = TRAIN_PAIRS if split == "train" else HELD_OUT_PAIRS
        pairs = [allowed[i] for i in rng.integers(len(allowed), size=n)]
    else:
        raise ValueError(f"unknown split {split!r} (train, heldout, {', '.join(LEAKAGE_SPLITS)})")
    instances = []
    for (color, shape), box in zip(pairs, boxes):
        rgb = np.clip(np.array(PALETTE[color]) + rng.integers(-12, 13, size=3), 0, 255)
        instances.append({"phrase": short_phrase(color, shape), "box": box,
                          "color": color, "shape": shape, "rgb": rgb.tolist()})
    gray, gradient = round(rng.uniform(24, 96), 2), round(rng.uniform(-24, 24), 2)
    in_caption = instances if caption_order is None else [instances[i] for i in caption_order]
    return {"caption": make_caption(in_caption, gray), "instances": instances,
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
    return (48 if dark else 80), 0.0  # a user's layout file has no background: docs/world.md's two looks


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
# layout files (docs/world.md, "Layout files")

MAX_ID_BYTES = 100  # a scene id names its image file {id}.png


def write_layouts(path, scenes):
    lines = []
    for i, scene in enumerate(scenes):
        instances = [{k: inst[k] for k in ("phrase", "box", "score") if k in inst} for inst in scene["instances"]]
        lines.append(json.dumps({"id": scene.get("id", f"s{i}"), "caption": scene["caption"], "instances": instances}))
    text = '{"scenes": [\n' + ",\n".join(lines) + "\n]}\n"  # one scene per line: diffable and greppable
    runtime.write_atomically(path, lambda f: f.write(text.encode()))


def _finite(v):
    """JSON's NaN and Infinity parse as floats; an int of any size is finite (math.isfinite would overflow)."""
    return isinstance(v, int) or math.isfinite(v)


def _read_box(box, where):
    if not (isinstance(box, list) and len(box) == 4 and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        raise LayoutError(f"{where}: not 4 numbers ({json.dumps(box)})")
    for v in box:
        if not _finite(v):
            raise LayoutError(f"{where}: not a finite number ({v}) in {json.dumps(box)}")
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
        if not (isinstance(score, (int, float)) and not isinstance(score, bool) and 0 <= score <= 1):
            raise LayoutError(f"{where}.score: not a number in [0, 1] ({json.dumps(score)})")
        out["score"] = float(score)
    return out


def _read_scene(i, scene, tokenizer, max_instances):
    if not isinstance(scene, dict):
        raise LayoutError(f"scenes[{i}]: not an object ({json.dumps(scene)[:60]})")
    scene_id = scene.get("id")
    if not isinstance(scene_id, str) or not re.fullmatch(r"[\w.-]+", scene_id) or scene_id in (".", ".."):
        raise LayoutError(f"scenes[{i}]: id: not a plain file name of letters, digits, '_', '.' and '-' "
                          f"({json.dumps(scene_id)[:60]})")
    if len(scene_id.encode()) > MAX_ID_BYTES:  # it names the file {id}.png: file systems allow 255 bytes
        raise LayoutError(f"scenes[{i}]: id: {len(scene_id.encode())} bytes in UTF-8, more than {MAX_ID_BYTES} "
                          f"({json.dumps(scene_id[:40])} ...)")
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
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise LayoutError(f"{path}: cannot read the layout file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise LayoutError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        raise LayoutError(f"{path}: malformed JSON at line {e.lineno} col {e.colno}: {e.msg}") from None
    if not isinstance(document, dict) or not isinstance(document.get("scenes"), list):
        raise LayoutError(f"{path}: scenes: missing, a layout file is {{\"scenes\": [...]}}")
    if not document["scenes"]:
        raise LayoutError(f"{path}: scenes: empty, a layout file holds at least one scene")
    scenes, seen = [], set()
    for i, raw in enumerate(document["scenes"]):
        scene = _read_scene(i, raw, tokenizer, max_instances)
        if scene["id"].lower() in seen:  # ids that differ in case only name one file where case is ignored
            raise LayoutError(f"scene {scene['id']}: id: duplicate ({scene['id']!r}, ids are compared ignoring case)")
        seen.add(scene["id"].lower())
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


def resolve_ground_negatives(ground_negatives, dataset, ground_every):
    """The ground_negatives config value of the training scripts -> hard negatives per grounding sample:
    -1 means 2 where they apply (ShapeScenes with grounding samples) and none elsewhere; a bad value
    stops the script with one line."""
    if ground_negatives == -1:
        return 2 if dataset == "shapescenes" and ground_every else 0
    if ground_negatives < 0:
        runtime.fail(f"ground_negatives must be >= 0, or -1 for 2 where they apply, got {ground_negatives}")
    if ground_negatives and (dataset != "shapescenes" or not ground_every):
        runtime.fail(f"ground_negatives {ground_negatives}: hard negatives swap ShapeScenes' shape and color words "
                     f"in grounding samples; they need dataset=shapescenes and ground_every > 0")
    return ground_negatives


def step_negatives(batch, tokenizer, per_scene, seed, step, first, rows):
    """add_hard_negatives on the grounding rows (rows, (B,) bool) of a training micro-batch whose first
    scene sits at place `first` of the global batch: each scene's draw is seeded by (seed, step, its
    place), so any split over ranks and micro-steps draws the same negatives."""
    seeds = [[seed, step, first + j] for j in range(len(rows))]
    return add_hard_negatives(batch, tokenizer, per_scene, seeds, rows=rows)


def confusable_scenes(phrase_ids, instance_mask):
    """phrase_ids (S, N, Lp), instance_mask (S, N) of a cache -> the indices of its scenes in which two
    instances share their phrase's first word and differ in the rest (ShapeScenes: two objects of one
    color, two shapes). There the color alone cannot tell the objects apart: a grounder must see shapes."""
    first = phrase_ids[:, :, 0]
    same_first = first[:, :, None] == first[:, None, :]  # (S, N, N)
    differ = (phrase_ids[:, :, None, :] != phrase_ids[:, None, :, :]).any(-1)
    both = instance_mask[:, :, None] & instance_mask[:, None, :]
    return np.flatnonzero((same_first & differ & both).any(axis=(1, 2)))


def draw_confusable(indices, rows, pool, share, seed, step):
    """The global batch's cache indices (G,) with a share of its grounding rows (rows (G,) bool) replaced
    by scenes drawn from pool (confusable_scenes), from (seed, step) alone, so that a resumed run and
    N ranks draw the same."""
    rng = np.random.default_rng([seed, step, 1])
    swap = rows & (rng.random(len(indices)) < share)
    indices = indices.copy()
    indices[swap] = pool[rng.integers(len(pool), size=int(swap.sum()))]
    return indices


def add_hard_negatives(batch, tokenizer, per_scene, seeds, rows=None, swap="either"):
    """Fill up to per_scene free slots of each scene of a collated ShapeScenes batch with hard
    negative phrases: one of the scene's own phrases with its shape word (half the time its color
    word) swapped, so that it names an object the image does not hold (GLIP's negative prompts).
    A grounder that learns to give them a low confidence must look at shapes: without them the
    color alone finds the box, and the confidence half of Cycle RL's reward cannot see a wrong shape.
    Only training-split pairs are named (a held-out pair taught as "always absent" would bias the
    held-out evaluation). seeds: one entropy per scene (an int or a list of ints, for
    np.random.default_rng): built from the step and the scene's place in the global batch, any number
    of ranks draws the same negatives. rows: (B,) bool, the scenes that get negatives (the grounding
    rows of a PMTP batch; generation rows must keep their layouts), None for all. swap: "either" (the
    shape or the color, half and half), "shape" or "color" only (to measure each). -> a new batch on the same
    device, its phrase_ids and instance_mask extended, plus "negative" (B, N) bool; the boxes of
    negative slots stay zeros (they carry no box loss)."""
    if swap not in ("either", "shape", "color"):
        raise ValueError(f"swap must be 'either', 'shape' or 'color', got {swap!r}")
    color_ids = {tokenizer.token_to_id(c): c for c in COLORS}
    shape_ids = {tokenizer.token_to_id(s): s for s in SHAPES}
    color_of, shape_of = {c: i for i, c in color_ids.items()}, {s: i for i, s in shape_ids.items()}
    device = batch["phrase_ids"].device
    phrase_ids, mask = batch["phrase_ids"].cpu().clone(), batch["instance_mask"].cpu().clone()
    negative = torch.zeros_like(mask)
    ids = phrase_ids.numpy()  # a view: edits land in phrase_ids
    for b in range(ids.shape[0]) if rows is None else np.flatnonzero(rows.cpu().numpy()):
        rng = np.random.default_rng(seeds[b])
        real = np.flatnonzero(mask[b].numpy())
        pairs = []  # (color, shape, position of the color word, position of the shape word) per instance
        for j in real:
            cpos = [k for k, t in enumerate(ids[b, j]) if t in color_ids]
            spos = [k for k, t in enumerate(ids[b, j]) if t in shape_ids]
            if len(cpos) != 1 or len(spos) != 1:
                raise ValueError(f"hard negatives need ShapeScenes phrases (one color, one shape word): scene {b}, slot {j}")
            pairs.append((color_ids[ids[b, j, cpos[0]]], shape_ids[ids[b, j, spos[0]]], cpos[0], spos[0]))
        present = {(c, s) for c, s, _, _ in pairs}
        for slot in np.flatnonzero(~mask[b].numpy())[:per_scene]:
            j = int(rng.integers(len(real)))
            color, shape, cpos, spos = pairs[j]
            shape_swaps = [(color, s) for s in SHAPES if (color, s) not in present and (color, s) not in HELD_OUT]
            color_swaps = [(c, shape) for c in COLORS if (c, shape) not in present and (c, shape) not in HELD_OUT]
            if swap == "either":
                options = (shape_swaps if rng.random() < 0.5 else color_swaps) or shape_swaps or color_swaps
            else:
                options = shape_swaps if swap == "shape" else color_swaps
            if not options:  # every other shape and color of this object is in the scene already
                continue
            c, s = options[int(rng.integers(len(options)))]
            ids[b, slot] = ids[b, real[j]]
            ids[b, slot, cpos], ids[b, slot, spos] = color_of[c], shape_of[s]
            mask[b, slot] = negative[b, slot] = True
    return {**batch, "phrase_ids": phrase_ids.to(device), "instance_mask": mask.to(device),
            "negative": negative.to(device)}

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
    runtime.write_atomically(path, lambda f: np.savez(f, images=images, res=res, seed=seed, **arrays))


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
# real data: a COCO-format instances file (COCO 2017, LVIS, Objects365 or your own boxes), its image
# folder and optionally a COCO captions file, turned into the same kind of cache as ShapeScenes'
# (uint8 images at R, token ids, boxes, instance masks), plus held-out scenes that carry their image

COCO_OPTIONS = {  # the rules, each overridable in the spec as :key=value
    "fit": "crop",       # "crop": short side to R, the centre square kept; "pad": long side to R, centred on gray
    "min_area": 0.01,    # a box under this fraction of the fitted image's area is tiny: dropped
    "min_side": 0.02,    # ... and so is one narrower or shorter than this fraction of the side
    "min_visible": 0.5,  # a box of which the crop keeps less than this fraction of its area is dropped
    "crowd": "drop",     # "drop" or "keep" the iscrowd boxes (one box around a crowd of objects)
    "missing": "skip",   # an image file that is missing or unreadable: "skip" it (counted) or "error"
    "outside": "error",  # a box reaching past the image (more than BOX_SLACK): an "error", or "clip" it to the image
    "val": -1,           # held-out images for validation; -1: min(500, a tenth of the images)
    "limit": 0,          # only the first N images (by id) that keep a box, 0 = all: a small subset
    "vocab": 8192,       # the trained WordPiece tokenizer's vocabulary size (at most)
}
DATASET_HELP = ("shapescenes (the default), or coco:INSTANCES.json:IMAGE_DIR[:CAPTIONS.json][:key=value ...] "
                f"with keys {', '.join(COCO_OPTIONS)}")
PAD_GRAY = 127     # fit = "pad" fills with the middle gray, 0 in the model's [-1, 1]
BOX_SLACK = 1.0    # pixels a box may reach past the image's edge (COCO rounds) before it is an error
VAL_PERMUTATION_SEED = 0  # the held-out images: the same for every script, whatever its val_scenes
IMAGES_PER_WORKER = 256  # fewer images than this per core are read in the calling process


def parse_dataset_spec(spec):
    """None for ShapeScenes; for coco:... {"instances", "images", "captions" (or None), "options"}, the
    options being COCO_OPTIONS with the spec's key=value fields applied (typed as their defaults)."""
    if spec == "shapescenes":
        return None
    kind, _, rest = spec.partition(":")
    if kind != "coco" or not rest:
        raise LayoutError(f"dataset: unknown spec {spec!r} (expected {DATASET_HELP})")
    fields = rest.split(":")
    paths = [field for field in fields if "=" not in field]
    if not 2 <= len(paths) <= 3 or not all(paths):
        raise LayoutError(f"dataset {spec!r}: expected coco:INSTANCES.json:IMAGE_DIR[:CAPTIONS.json], got {len(paths)} paths")
    options = dict(COCO_OPTIONS)
    for field in fields:
        key, sep, text = field.partition("=")
        if not sep:
            continue
        if key not in COCO_OPTIONS:
            raise LayoutError(f"dataset {spec!r}: unknown option '{key}' ({', '.join(COCO_OPTIONS)})")
        try:
            options[key] = type(COCO_OPTIONS[key])(text)
        except ValueError:
            raise LayoutError(f"dataset {spec!r}: {key} must be {type(COCO_OPTIONS[key]).__name__}, got {text!r}") from None
    for key, allowed in (("fit", ("crop", "pad")), ("crowd", ("drop", "keep")), ("missing", ("skip", "error")),
                         ("outside", ("error", "clip"))):
        if options[key] not in allowed:
            raise LayoutError(f"dataset {spec!r}: {key} must be {' or '.join(allowed)}, got {options[key]!r}")
    for key in ("min_area", "min_side", "min_visible"):
        if not 0 <= options[key] <= 1:
            raise LayoutError(f"dataset {spec!r}: {key} must lie in [0, 1], got {options[key]}")
    if options["vocab"] < 16 or options["limit"] < 0 or options["val"] < -1:
        raise LayoutError(f"dataset {spec!r}: vocab must be >= 16, limit >= 0 and val >= 0 or -1 (auto), got "
                          f"{options['vocab']}, {options['limit']} and {options['val']}")
    return {"instances": paths[0], "images": paths[1], "captions": paths[2] if len(paths) == 3 else None,
            "options": options}


def _read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise LayoutError(f"{path}: cannot read the {what} file ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise LayoutError(f"{path}: malformed JSON at line {e.lineno} col {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise LayoutError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


NUMBER = (int, float)


def _field(record, key, kind, where):
    """record[key] when it is of kind (a type or tuple of types, never bool); else one line naming the field."""
    if not isinstance(record, dict):
        raise LayoutError(f"{where}: not an object ({json.dumps(record)[:60]})")
    if key not in record:
        raise LayoutError(f"{where}: missing key '{key}'")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise LayoutError(f"{where}.{key}: not {names} ({json.dumps(value)[:60]})")
    return value


def _attributes(annotation, where):
    """Attribute words an annotation may carry ("attributes": ["red", "wooden"] or "attribute": "red"),
    put before the category name in its phrase."""
    value = annotation.get("attributes", annotation.get("attribute", []))
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise LayoutError(f"{where}.attributes: not a string or a list of strings ({json.dumps(value)[:60]})")
    words = [" ".join(v.replace("_", " ").split()) for v in value]
    return [w for w in words if w]  # "" and "_" add nothing to the phrase


def fit_window(width, height, fit):
    """The square of the source image (left, top, side, in pixels) that becomes the R x R image: "crop",
    the centred square of the short side; "pad", the square of the long side centred on the image (it
    reaches outside, where the pad is). Integer offsets, so image and boxes are moved by the same amount."""
    side = min(width, height) if fit == "crop" else max(width, height)
    return (width - side) // 2, (height - side) // 2, side


def fit_box(bbox, window):
    """A COCO box [x, y, w, h] in source pixels -> xyxy normalized in the fitted image, clipped to it, and
    the fraction of its area that the window keeps. The map x -> (x - left) / side is the image's own."""
    left, top, side = window
    x, y, w, h = bbox
    box = [(x - left) / side, (y - top) / side, (x + w - left) / side, (y + h - top) / side]
    clipped = [min(max(v, 0.0), 1.0) for v in box]
    area = lambda b: max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
    return clipped, (area(clipped) / area(box) if area(box) > 0 else 1.0)


def read_coco(source, max_instances):
    """The scenes of a COCO-format data set, every field checked: one per image that keeps a box after
    the filters, sorted by image id, each {"id", "file", "width", "height", "instances": [{"phrase",
    "box"}] (normalized in the fitted image, largest first, at most max_instances), "captions": [...]},
    and the counts of what the filters dropped."""
    path, options = source["instances"], source["options"]
    document = _read_json(path, "instances")
    for key in ("images", "annotations", "categories"):
        _field(document, key, list, path)
    categories = {}
    for i, category in enumerate(document["categories"]):
        where = f"{path}: categories[{i}]"
        raw = _field(category, "name", str, where)
        name = " ".join(raw.replace("_", " ").split())  # LVIS: "teddy_bear"
        category_id = _field(category, "id", int, where)
        if not _text_words(name):  # its phrase would hold no token, and its fallback caption no object
            raise LayoutError(f"{where}.name: category id {category_id} has a name without a word ({json.dumps(raw)})")
        categories[category_id] = name
    images = {}
    for i, image in enumerate(document["images"]):
        where = f"{path}: images[{i}]"
        image_id = _field(image, "id", int, where)
        if image_id in images:
            raise LayoutError(f"{where}.id: duplicate image id {image_id}")
        width, height = (_field(image, key, int, where) for key in ("width", "height"))
        if width < 1 or height < 1:
            raise LayoutError(f"{where}: width and height must be >= 1, got {width}x{height}")
        images[image_id] = {"id": str(image_id), "file": _field(image, "file_name", str, where),
                            "width": width, "height": height, "instances": [], "captions": [],
                            "window": fit_window(width, height, options["fit"])}
    counts = {"boxes": 0, "crowd": 0, "tiny": 0, "cropped": 0, "capped": 0}
    for i, annotation in enumerate(document["annotations"]):
        where = f"{path}: annotations[{i}]"
        image_id, category_id = _field(annotation, "image_id", int, where), _field(annotation, "category_id", int, where)
        bbox = _field(annotation, "bbox", list, where)
        if len(bbox) != 4 or not all(isinstance(v, NUMBER) and not isinstance(v, bool) for v in bbox):
            raise LayoutError(f"{where}.bbox: not 4 numbers [x, y, w, h] ({json.dumps(bbox)[:60]})")
        if not all(_finite(v) for v in bbox):
            raise LayoutError(f"{where}.bbox: not 4 finite numbers [x, y, w, h] ({json.dumps(bbox)[:60]})")
        if annotation.get("iscrowd", 0) not in (0, 1):
            raise LayoutError(f"{where}.iscrowd: not 0 or 1 ({json.dumps(annotation['iscrowd'])[:60]})")
        if image_id not in images:
            raise LayoutError(f"{where}.image_id: no image has id {image_id}")
        if category_id not in categories:
            raise LayoutError(f"{where}.category_id: no category has id {category_id}")
        image = images[image_id]
        x, y, w, h = bbox
        if w < 0 or h < 0:
            raise LayoutError(f"{where}.bbox: negative width or height ({json.dumps(bbox)})")
        if options["outside"] == "error" and (x < -BOX_SLACK or y < -BOX_SLACK or x + w > image["width"] + BOX_SLACK
                                              or y + h > image["height"] + BOX_SLACK):
            raise LayoutError(f"{where}.bbox: {json.dumps(bbox)} lies outside image {image_id} "
                              f"({image['width']}x{image['height']}; outside=clip clips such boxes)")
        x0, y0 = min(max(x, 0), image["width"]), min(max(y, 0), image["height"])  # clipped to the image: fit = "pad"
        x1, y1 = min(max(x + w, 0), image["width"]), min(max(y + h, 0), image["height"])  # would keep what lies past it
        bbox = [x0, y0, x1 - x0, y1 - y0]
        phrase = " ".join(_attributes(annotation, where) + [categories[category_id]])
        counts["boxes"] += 1
        if annotation.get("iscrowd", 0) and options["crowd"] == "drop":
            counts["crowd"] += 1
            continue
        box, visible = fit_box(bbox, image["window"])
        if visible < options["min_visible"]:
            counts["cropped"] += 1
            continue
        w, h = box[2] - box[0], box[3] - box[1]
        if w * h < options["min_area"] or min(w, h) < options["min_side"] or w <= 0 or h <= 0:
            counts["tiny"] += 1
            continue
        image["instances"].append({"phrase": phrase, "box": [round(v, 6) for v in box]})
    if source["captions"]:
        captions_path = source["captions"]
        captions = _field(_read_json(captions_path, "captions"), "annotations", list, captions_path)
        for i, annotation in enumerate(captions):
            where = f"{captions_path}: annotations[{i}]"
            image_id, caption = _field(annotation, "image_id", int, where), _field(annotation, "caption", str, where)
            if image_id in images and caption.strip():  # a captions file may cover more images (LVIS and COCO share them)
                images[image_id]["captions"].append(" ".join(caption.split()))
    scenes = []
    for image_id in sorted(images):
        scene = images[image_id]
        if scene["instances"]:
            area = lambda inst: (inst["box"][2] - inst["box"][0]) * (inst["box"][3] - inst["box"][1])
            ranked = sorted(scene["instances"], key=area, reverse=True)  # stable: ties keep the file's order
            counts["capped"] += max(len(ranked) - max_instances, 0)
            scene["instances"] = ranked[:max_instances]
            del scene["window"]
            scenes.append(scene)
    counts["images"], counts["no_boxes"] = len(images), len(images) - len(scenes)
    return scenes, counts


def _load_fitted_image(job):
    """One image file -> (uint8 (R, R, 3), None), or (None, why) when it is missing, unreadable or not the
    size the annotations say. It never raises: in a worker, a bad file must become a count or one
    error line in the parent, not a dead pool."""
    path, width, height, fit, res = job
    if not os.path.isfile(path):
        return None, f"missing file {path}"
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError ...
        return None, f"cannot read {path} ({type(e).__name__}: {e})"
    if image.size != (width, height):
        return None, f"{path} is {image.size[0]}x{image.size[1]}, its annotations say {width}x{height}"
    left, top, side = fit_window(width, height, fit)
    if fit == "crop":
        square = image.crop((left, top, left + side, top + side))
    else:
        square = Image.new("RGB", (side, side), (PAD_GRAY,) * 3)
        square.paste(image, (-left, -top))
    # bicubic with a box-filter pre-reduction (guided-diffusion's center_crop_arr does the same)
    return np.asarray(square.resize((res, res), Image.BICUBIC, reducing_gap=2.0)), None


def _read_images(scenes, image_dir, res, options):
    """The fitted images of scenes, read on all cores -> (the scenes whose image was read, (n, R, R, 3)
    uint8, the reasons of those skipped). missing = "error": the first bad file is an error instead."""
    if options["missing"] == "error":  # cheap, and before minutes of decoding
        for scene in scenes:
            if not os.path.isfile(os.path.join(image_dir, scene["file"])):
                raise LayoutError(f"image {scene['id']}: missing file {os.path.join(image_dir, scene['file'])} "
                                  "(missing=skip skips such images)")
    jobs = [(os.path.join(image_dir, s["file"]), s["width"], s["height"], options["fit"], res) for s in scenes]
    workers = min(os.cpu_count() or 1, max(1, len(jobs) // IMAGES_PER_WORKER))
    images, kept, skipped = np.zeros((len(scenes), res, res, 3), np.uint8), [], []
    # fork, not spawn: a spawned worker re-imports __main__, which would re-run a top-to-bottom train script
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(_load_fitted_image, jobs, chunksize=64) if pool else map(_load_fitted_image, jobs)
        for scene, (image, why) in zip(scenes, results):
            if image is None:
                if options["missing"] == "error":
                    raise LayoutError(f"image {scene['id']}: {why} (missing=skip skips such images)")
                skipped.append(why)
                continue
            images[len(kept)] = image
            kept.append({k: scene[k] for k in ("id", "instances", "captions")})
    finally:
        if pool:
            pool.terminate()
    return kept, images[:len(kept)], skipped


def _file_identity(path):
    try:
        stat = os.stat(path)
    except OSError as e:
        raise LayoutError(f"{path}: cannot read the annotation file ({e.strerror})") from None
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def coco_cache_stem(source, max_instances, data_dir):
    """data_dir/coco_{name}_{hash}: the hash covers the annotation files (path, size, mtime), the image
    folder, the rules and max_instances, so a change of any of them prepares a new cache. A change
    inside the image folder is not seen: delete the cache files to rebuild."""
    options = {k: v for k, v in source["options"].items() if k != "vocab"}  # the tokenizer's file names its vocab
    identity = [_file_identity(source["instances"]), source["captions"] and _file_identity(source["captions"]),
                os.path.abspath(source["images"]), options, max_instances]
    digest = hashlib.sha1(json.dumps(identity).encode()).hexdigest()[:10]
    name = re.sub(r"[^\w.-]", "_", os.path.splitext(os.path.basename(source["instances"]))[0])
    return os.path.join(data_dir, f"coco_{name}_{digest}")


def _json_bytes(value):
    return np.frombuffer(json.dumps(value).encode(), np.uint8)  # UTF-8 bytes: a numpy str would take 4 bytes a character


def prepare_coco(source, res, max_instances):
    """Read, filter and split the annotations, read and fit the images -> the arrays of the cache file
    (load_coco writes them once their text has passed the tokenizer): the training images and scenes,
    and the held-out ones (a seeded choice of the images, the same for every R)."""
    options = source["options"]
    scenes, counts = read_coco(source, max_instances)
    if options["limit"]:
        scenes = scenes[:options["limit"]]
    n_val = options["val"] if options["val"] >= 0 else min(500, len(scenes) // 10)
    if len(scenes) - n_val < 1:
        raise LayoutError(f"{source['instances']}: {len(scenes)} images keep a box after the filters, "
                          f"none left for training after {n_val} held out (val=...)")
    held_out = np.zeros(len(scenes), bool)
    held_out[np.random.default_rng(VAL_PERMUTATION_SEED).permutation(len(scenes))[:n_val]] = True
    train, images, skipped = _read_images([s for s, h in zip(scenes, held_out) if not h], source["images"], res, options)
    val, val_images, val_skipped = _read_images([s for s, h in zip(scenes, held_out) if h], source["images"], res, options)
    skipped += val_skipped
    if not train:
        raise LayoutError(f"{source['images']}: no image of the training scenes could be read ({skipped[0]})")
    arrays = {"images": images, "val_images": val_images, "res": res, "seed": 0,
              **{key: _json_bytes(value) for key, value in (("scenes", train), ("val_scenes", val), ("counts", counts))}}
    kept = sum(len(s["instances"]) for s in train + val)
    print(f"{source['instances']}: {counts['images']} images -> {len(train)} train + {len(val)} held out "
          f"({counts['no_boxes']} without a box left, {len(skipped)} missing or unreadable"
          f"{': ' + skipped[0] if skipped else ''}); {counts['boxes']} boxes -> {kept} kept ({counts['crowd']} crowd, "
          f"{counts['tiny']} tiny, {counts['cropped']} cropped away, {counts['capped']} over max_instances "
          f"{max_instances} dropped)")
    return arrays


def train_tokenizer(texts, vocab_size):
    """A WordPiece tokenizer trained on the data set's own text. [PAD] = 0 and [UNK] = 1 as in ShapeScenes'
    tokenizer; the same word rule (lowercase, Whitespace pre-tokenizer), so decode(encode(text)) gives
    the words of the text back, joined by single spaces. A word with a character never seen in
    training is [UNK], which encode_text reports by name."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(cleanup=False)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]"], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def tokenizer_texts(scenes):
    """What a data set's tokenizer is trained on: its captions, its phrases, and its fallback captions
    (for their glue words)."""
    texts = [caption for scene in scenes for caption in scene["captions"]]
    texts += sorted({inst["phrase"] for scene in scenes for inst in scene["instances"]})
    return texts + [phrase_caption(scene["instances"]) for scene in scenes]


def phrase_caption(instances):
    """A caption from the phrases, for an image without one: ShapeScenes' grammar (the objects with
    articles, the relation of the first two) without its background clause."""
    objects = [_with_article(inst["phrase"]) for inst in instances]
    caption = objects[0] if len(objects) == 1 else ", ".join(objects[:-1]) + " and " + objects[-1]
    if len(instances) >= 2:
        a, b = instances[:2]
        caption += f"; the {_noun(a['phrase'])} is {relation(a['box'], b['box'])} the {_noun(b['phrase'])}"
    return caption


def pick_caption(scene, tokenizer):
    """The scene's first caption that encodes within MAX_CAPTION_LEN tokens and without [UNK]; else one
    built from its phrases, from all of them down to the largest alone until it fits."""
    n = len(scene["instances"])
    candidates = scene["captions"] + [phrase_caption(scene["instances"][:k]) for k in range(n, 0, -1)]
    for caption in candidates:
        ids = tokenizer.encode(caption).ids
        if len(ids) <= MAX_CAPTION_LEN and 1 not in ids:
            return caption
    return candidates[-1]  # does not fit: _tokenize_scenes names it


class RealCache(SceneCache):
    """A COCO-format set in SceneCache's form: batch(indices) gives the same tensors; .scenes are its
    layouts (Cycle RL draws from them)."""

    def __init__(self, images, arrays, res, scenes):
        self.images, self.arrays, self.res, self.seed, self.scenes = images, arrays, res, 0, scenes


def load_coco(source, res, max_instances, data_dir="data", val_scenes=64, tokenizer=None):
    """(RealCache, tokenizer, the first val_scenes held-out scenes, each with its "image"), from the
    cache files when present. tokenizer: a checkpoint's; None trains one (or reads the cached one).
    A new cache file or tokenizer is written only after every scene's text has encoded: one made of
    data that then fails would make every rerun fail the same way."""
    stem = coco_cache_stem(source, max_instances, data_dir)
    path, tokenizer_path = f"{stem}_r{res}.npz", f"{stem}_v{source['options']['vocab']}_tokenizer.json"
    if os.path.exists(path):
        with np.load(path) as f:
            arrays = {key: f[key] for key in f.files}
    else:
        print(f"preparing {path} (images at {res}x{res}, fit {source['options']['fit']})")
        arrays = prepare_coco(source, res, max_instances)
    scenes, val = (json.loads(arrays[key].tobytes()) for key in ("scenes", "val_scenes"))
    new_tokenizer = tokenizer is None and not os.path.exists(tokenizer_path)
    if new_tokenizer:
        tokenizer = train_tokenizer(tokenizer_texts(scenes + val), source["options"]["vocab"])
    elif tokenizer is None:
        tokenizer = Tokenizer.from_file(tokenizer_path)
    for scene in scenes + val:
        scene["caption"] = pick_caption(scene, tokenizer)
    cache = RealCache(arrays["images"], _tokenize_scenes(scenes, tokenizer, max_instances), res, scenes)
    _tokenize_scenes(val, tokenizer, max_instances)  # the held-out scenes too: every evaluation collates them
    os.makedirs(data_dir, exist_ok=True)
    if not os.path.exists(path):
        runtime.write_atomically(path, lambda f: np.savez(f, **arrays))
    if new_tokenizer:
        runtime.write_atomically(tokenizer_path, lambda f: f.write(tokenizer.to_str().encode()))
    val = [{**scene, "image": image} for scene, image in zip(val[:val_scenes], arrays["val_images"])]
    return cache, tokenizer, val


def load_dataset(spec, res, max_instances, data_dir="data", cache_scenes=20000, data_seed=0, val_scenes=64,
                 tokenizer=None):
    """The training cache, the tokenizer and the validation scenes of a data-set spec (DATASET_HELP).
    "shapescenes": the pre-rendered cache, the closed-vocabulary tokenizer (or the given one) and the
    seeded "val" set, exactly as before. "coco:...": load_coco (cache_scenes and data_seed do not apply:
    the data set is what it is, and data_seed orders it). A bad spec or annotation file: LayoutError."""
    source = parse_dataset_spec(spec)
    if source is None:
        cache = load_or_prepare_cache(res, cache_scenes, data_seed, data_dir=data_dir, max_instances=max_instances)
        return cache, (tokenizer if tokenizer is not None else build_tokenizer()), make_scene_set("val", val_scenes, seed=0)
    return load_coco(source, res, max_instances, data_dir, val_scenes, tokenizer)


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
    return [resized(scene["image"]) if "image" in scene else render_scene(scene, res) for scene in scenes]

# -----------------------------------------------------------------------------
# the rule-based checker (docs/world.md, "Metrics")

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
    runtime.write_atomically(path, lambda f: Image.fromarray(image).save(f, format="PNG"))


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
    runtime.check_output_folder("--out", args.out)
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
        if not os.path.isfile(path):
            raise LayoutError(f"scene {scene['id']}: image: missing file ({path})")
        try:
            with Image.open(path) as picture:
                image = np.asarray(picture.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's ways to refuse a file
            raise LayoutError(f"scene {scene['id']}: image: cannot read {path} ({runtime.one_line(e)})") from None
        if image.shape[0] != image.shape[1]:
            raise LayoutError(f"scene {scene['id']}: image: not square ({path}, {image.shape[1]}x{image.shape[0]})")
        images.append(image)
    print(json.dumps(check_images(scenes, images)))


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
    sample.add_argument("--kind", choices=list(SCENE_SETS), default="val")
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
    prepare.add_argument("--dataset", default="shapescenes", help=DATASET_HELP)
    prepare.add_argument("--max_instances", type=runtime.positive_int, default=MAX_OBJECTS,
                         help="real data: the model's")
    prepare.add_argument("--data_dir", default="data", help="real data: where its cache goes")
    args = parser.parse_args(argv)
    try:
        {"sample": cmd_sample, "render": cmd_render, "check": cmd_check, "prepare": cmd_prepare}[args.command](args)
    except (ValueError, OSError) as e:  # LayoutError is a ValueError
        runtime.fail(e)


if __name__ == "__main__":
    main()
