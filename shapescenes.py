"""
ShapeScenes: the built-in layout world of EchoGen (docs/world.md). Its shapes, colors and sampling
rules are the constants and sample_scene below; the scene sets of the benchmark (make_scene_set), the
captions and phrases of its closed grammar, the anti-aliased renderer, the tokenizer of its closed
vocabulary, the hard negative phrases that teach a grounder to see shapes, and the rule-based checker
that scores layout-to-image results without any learned judge.

Nothing here reads or writes a file: layouts.py turns scenes into model inputs and layout files,
data.py caches the rendered world for training and holds the command line (python data.py sample |
render | check | prepare).
"""

import math
import re
import zlib

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

import runtime
from runtime import LayoutError

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


def noun(phrase):
    """The phrase without a leading article, so that long phrases also read well in a caption."""
    words = phrase.split()
    return " ".join(words[1:]) if len(words) > 1 and words[0].lower() in ("a", "an") else phrase


def with_article(phrase):
    bare = noun(phrase)
    return ("an " if bare[0].lower() in "aeiou" else "a ") + bare


def phrase_caption(instances):
    """The objects with their articles, and the relation of the first two: a caption from the phrases
    alone (real data uses it for an image without a caption of its own)."""
    objects = [with_article(inst["phrase"]) for inst in instances]
    caption = objects[0] if len(objects) == 1 else ", ".join(objects[:-1]) + " and " + objects[-1]
    if len(instances) >= 2:
        a, b = instances[:2]
        caption += f"; the {noun(a['phrase'])} is {relation(a['box'], b['box'])} the {noun(b['phrase'])}"
    return caption


def make_caption(instances, gray):
    """A ShapeScenes caption: the phrases' caption and the background."""
    return phrase_caption(instances) + (" on a dark background" if gray < DARK_BELOW else " on a gray background")


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
# the tokenizer of the closed vocabulary


def text_words(text):
    return re.findall(r"\w+|[^\w\s]+", text.lower())  # the rule of the Whitespace pre-tokenizer


def _vocabulary():
    """Every word of the grammar: the word lists, plus the glue words of two example captions."""
    examples = [{"phrase": short_phrase(color, "circle"), "box": [0.3 * i, 0, 0.3 * i + 0.2, 0.2]}
                for i, color in enumerate(["orange", "red", "blue"])]
    texts = COLORS + SHAPES + list(SIZE_WORDS) + list(RELATIONS) + [where for row in WHERE for where in row]
    texts += [make_caption(examples, gray) for gray in (DARK_BELOW - 1, DARK_BELOW)]
    return sorted({word for text in texts for word in text_words(text)})


def build_tokenizer():
    vocab = {"[PAD]": 0, "[UNK]": 1}
    vocab.update({word: i + 2 for i, word in enumerate(_vocabulary())})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


# -----------------------------------------------------------------------------
# hard negatives: phrases the image does not hold


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


def check_scenes(scenes, images):
    """Per scene, check_instance's verdict on each of its instances in its image."""
    return [[check_instance(image, inst) for inst in scene["instances"]] for scene, image in zip(scenes, images)]


def checker_figures(per_image):
    """check_scenes' verdicts -> the checker's figures: ISR, mIoU, color and shape accuracy over the instances,
    image success over the scenes."""
    results = [r for rs in per_image for r in rs]
    rate = lambda values: round(float(np.mean(values)), 4) if values else 0.0
    return {"isr": rate([r["success"] for r in results]), "miou": rate([r["iou"] for r in results]),
            "color_acc": rate([r["color_found"] for r in results]), "shape_acc": rate([r["shape_ok"] for r in results]),
            "image_success": rate([all(r["success"] for r in rs) for rs in per_image]), "n_instances": len(results)}


def check_images(scenes, images):
    return checker_figures(check_scenes(scenes, images))

