"""
Real data in COCO format (docs/real_data.md): a COCO-format instances file (COCO 2017, LVIS,
Objects365 or your own boxes), its image folder and optionally a captions file, given to every
script as --dataset=coco:INSTANCES.json:IMAGE_DIR[:CAPTIONS.json][:key=value ...]. load_coco turns
them into the same kind of cache as ShapeScenes' (layouts.SceneCache), with a WordPiece tokenizer
trained on the data set's text, plus held-out scenes that carry their image.
"""

import hashlib
import json
import multiprocessing
import os
import re

import numpy as np
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

import layouts
import runtime
from runtime import LayoutError
import shapescenes

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
        if not shapescenes.text_words(name):  # its phrase would hold no token, and its fallback caption no object
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
        if not all(layouts.finite(v) for v in bbox):
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
    return texts + [shapescenes.phrase_caption(scene["instances"]) for scene in scenes]


def pick_caption(scene, tokenizer):
    """The scene's first caption that encodes within MAX_CAPTION_LEN tokens and without [UNK]; else one
    built from its phrases, from all of them down to the largest alone until it fits."""
    n = len(scene["instances"])
    candidates = scene["captions"] + [shapescenes.phrase_caption(scene["instances"][:k]) for k in range(n, 0, -1)]
    for caption in candidates:
        ids = tokenizer.encode(caption).ids
        if len(ids) <= layouts.MAX_CAPTION_LEN and 1 not in ids:
            return caption
    return candidates[-1]  # does not fit: tokenize_scenes names it


class RealCache(layouts.SceneCache):
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
    cache = RealCache(arrays["images"], layouts.tokenize_scenes(scenes, tokenizer, max_instances), res, scenes)
    layouts.tokenize_scenes(val, tokenizer, max_instances)  # the held-out scenes too: every evaluation collates them
    os.makedirs(data_dir, exist_ok=True)
    if not os.path.exists(path):
        runtime.write_atomically(path, lambda f: np.savez(f, **arrays))
    if new_tokenizer:
        runtime.write_atomically(tokenizer_path, lambda f: f.write(tokenizer.to_str().encode()))
    val = [{**scene, "image": image} for scene, image in zip(val[:val_scenes], arrays["val_images"])]
    return cache, tokenizer, val


