"""
What every data set of EchoGen shares (ShapeScenes, shapescenes.py; COCO-format data, coco.py): the
token budgets and text encoding, the layout file format (read with full validation, written
atomically; docs/world.md, "Layout files"), collation of scenes into model inputs, the in-memory cache
a training script draws its batches from, and sample grids.
"""

import json
import math
import os
import re

import numpy as np
import torch
from PIL import Image, ImageDraw

import runtime
from runtime import LayoutError
import shapescenes

# -----------------------------------------------------------------------------
# token budgets and text

MAX_CAPTION_LEN = 64             # token budgets, checked against the longest caption at import
MAX_PHRASE_LEN = 12


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
    widest = [{"phrase": shapescenes.short_phrase("orange", "triangle"), "box": [0.1 * i, 0, 0.1 * i + 0.05, 0.05]}
              for i in range(shapescenes.MAX_OBJECTS)]
    caption_len = len(shapescenes.text_words(shapescenes.make_caption(widest, gray=0)))
    phrase_len = len(shapescenes.text_words(shapescenes.long_phrase("orange", "triangle", [0.6, 0.7, 0.9, 0.95])))
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


def finite(v):
    """JSON's NaN and Infinity parse as floats; an int of any size is finite (math.isfinite would overflow)."""
    return isinstance(v, int) or math.isfinite(v)


def _read_box(box, where):
    if not (isinstance(box, list) and len(box) == 4 and
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        raise LayoutError(f"{where}: not 4 numbers ({json.dumps(box)})")
    for v in box:
        if not finite(v):
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
    color, shape = shapescenes.parse_phrase(phrase)
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
    caption = scene.get("caption", shapescenes.make_caption(instances, gray=80))  # built from the phrases when missing
    if not isinstance(caption, str):
        raise LayoutError(f"{where}: caption: not a string ({json.dumps(caption)})")
    encode_text(tokenizer, caption, MAX_CAPTION_LEN, f"{where}: caption")
    return {"id": scene_id, "caption": caption, "instances": instances}


def read_layouts(path, tokenizer, max_instances):
    """The scenes of a layout file, every field validated before anything is returned."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise LayoutError(f"{path}: cannot read the layout file ({e.strerror})") from None
    return parse_layouts(raw, tokenizer, max_instances, where=path)


def parse_layouts(raw, tokenizer, max_instances, where):
    """The scenes of a layout document given as bytes (a file's, a request's), every field validated;
    where names the document in the messages."""
    try:
        document = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise LayoutError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise LayoutError(f"{where}: malformed JSON at line {e.lineno} col {e.colno}: {e.msg}") from None
    if not isinstance(document, dict) or not isinstance(document.get("scenes"), list):
        raise LayoutError(f"{where}: scenes: missing, a layout file is {{\"scenes\": [...]}}")
    if not document["scenes"]:
        raise LayoutError(f"{where}: scenes: empty, a layout file holds at least one scene")
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


def tokenize_scenes(scenes, tokenizer, max_instances):
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
    return _to_tensors(tokenize_scenes(scenes, tokenizer, max_instances), images)

# -----------------------------------------------------------------------------
# the in-memory cache a training script draws its batches from

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


# -----------------------------------------------------------------------------
# pictures


def draw_boxes(image, scene, scale=4):
    res = image.shape[0] * scale
    picture = Image.fromarray(image).resize((res, res), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    for inst in scene["instances"]:
        x0, y0, x1, y1 = (v * res for v in inst["box"])
        color = shapescenes.PALETTE.get(inst.get("color") or shapescenes.parse_phrase(inst["phrase"])[0], (255, 255, 255))
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=color)
    return np.asarray(picture)


def read_image(path, scene_id):
    """The RGB uint8 (H, W, 3) image of scene scene_id at path; a missing or unreadable file is a LayoutError."""
    if not os.path.isfile(path):
        raise LayoutError(f"scene {scene_id}: image: missing file ({path})")
    try:
        with Image.open(path) as picture:
            return np.asarray(picture.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's ways to refuse a file
        raise LayoutError(f"scene {scene_id}: image: cannot read {path} ({runtime.one_line(e)})") from None


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

