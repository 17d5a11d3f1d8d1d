"""Real data: coco.py's COCO-format loader, on a small data set that these tests write themselves (a
dozen images drawn with PIL, an instances file and a captions file): boxes through resizing,
cropping and padding, the filters, phrases and captions, the trained tokenizer, one error per kind
of bad annotation file, and every stage (and evaluate.py, sampler.py) run on it as a user runs them."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import coco  # noqa: E402
import data  # noqa: E402
import layouts  # noqa: E402
import runtime  # noqa: E402
import shapescenes  # noqa: E402

# category id, name (LVIS-style underscores in one), the color its rectangles are drawn in
CATEGORIES = [(1, "red block", (220, 40, 40)), (2, "blue_ball", (40, 70, 215)), (3, "green box", (40, 170, 60)),
              (5, "cat", (235, 215, 40)), (8, "white cup", (245, 245, 245)), (9, "purple kite", (150, 60, 200))]
BACKGROUND = (90, 90, 90)
SIZES = [(96, 64), (128, 128), (64, 96), (80, 80), (128, 64), (72, 120), (100, 60), (90, 90), (64, 112), (120, 80),
         (96, 96), (80, 104)]  # (width, height) of the 12 images; image 101 holds 6 boxes, more than max_instances
CROWD = {"image_id": 100, "category_id": 1, "bbox": [20, 10, 40, 40], "iscrowd": 1}  # not drawn
TINY = {"image_id": 100, "category_id": 3, "bbox": [60, 40, 3, 3], "iscrowd": 0}  # not drawn
MAX_INSTANCES = 4


def place(rng, width, height, k):
    """k integer boxes (x, y, w, h), at least 14 px a side, 2 px apart."""
    boxes = []
    while len(boxes) < k:
        w, h = (int(v) for v in rng.integers(14, min(width, height) // 2 + 1, size=2))
        x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        if all(x + w + 2 <= bx or bx + bw + 2 <= x or y + h + 2 <= by or by + bh + 2 <= y for bx, by, bw, bh in boxes):
            boxes.append((x, y, w, h))
    return boxes


def write_coco(root, n_images=len(SIZES)):
    """The images (PNG), instances.json and captions.json (captions for the first 10 images only, the
    first caption of image 102 too long for the caption budget) under root -> the two documents."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images, annotations, captions = [], [], []
    for i in range(n_images):
        (width, height), image_id, k = SIZES[i % len(SIZES)], 100 + i, 6 if i == 1 else 1 + i % 4
        picture = Image.new("RGB", (width, height), BACKGROUND)
        draw = ImageDraw.Draw(picture)
        categories = [CATEGORIES[j] for j in rng.permutation(len(CATEGORIES))[:k]]  # one color per box
        for (category_id, name, rgb), (x, y, w, h) in zip(categories, place(rng, width, height, k)):
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=rgb)  # covers [x, x + w) x [y, y + h)
            annotation = {"image_id": image_id, "category_id": category_id, "bbox": [x, y, w, h], "iscrowd": 0}
            if name == "cat" and i % 2 == 0:
                annotation["attributes"] = ["striped"]
            annotations.append(annotation)
        picture.save(root / "images" / f"{image_id:012d}.png")
        images.append({"id": image_id, "file_name": f"{image_id:012d}.png", "width": width, "height": height})
        if i < 10:  # the others get a caption built from their phrases
            if i == 2:
                captions.append({"image_id": image_id, "caption": " ".join(["a very long caption"] * 20)})
            captions.append({"image_id": image_id, "caption": f"A picture with {k} things on a gray floor."})
            captions.append({"image_id": image_id, "caption": "Some colored blocks, seen from above!"})
    annotations += [CROWD, TINY]
    for j, annotation in enumerate(annotations):
        annotation["id"] = j + 1
    instances = {"images": images, "annotations": annotations,
                 "categories": [{"id": c, "name": name} for c, name, _ in CATEGORIES]}
    captions = {"images": images, "annotations": [dict(c, id=j) for j, c in enumerate(captions)]}
    (root / "instances.json").write_text(json.dumps(instances))
    (root / "captions.json").write_text(json.dumps(captions))
    return instances, captions


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    instances, captions = write_coco(root)
    return root, instances, captions


def spec(root, *options, captions=True, instances="instances.json"):
    fields = [str(root / instances), str(root / "images")] + ([str(root / "captions.json")] if captions else [])
    return ":".join(["coco", *fields, *options])


def load(root, *options, res=32, captions=True, data_dir="data", **kwargs):
    return data.load_dataset(spec(root, *options, captions=captions), res, MAX_INSTANCES, str(root / data_dir), **kwargs)


def everything(cache, val):
    """(scene, image) of the training cache and the held-out scenes."""
    return list(zip(cache.scenes, cache.images)) + [(scene, scene["image"]) for scene in val]


def visible_fraction(bbox, width, height, fit):
    left, top, side = coco.fit_window(width, height, fit)
    x, y, w, h = bbox
    inside_w = max(0, min(x + w, left + side) - max(x, left))
    inside_h = max(0, min(y + h, top + side) - max(y, top))
    return inside_w * inside_h / (w * h)

# -----------------------------------------------------------------------------
# images and boxes


@pytest.mark.parametrize("fit", ["crop", "pad"])
@pytest.mark.parametrize("res", [32, 64])
def test_drawn_rectangles_land_where_the_transformed_boxes_say(coco_set, fit, res):
    """The boxes come from the annotations, the pixels from resizing the drawn images: each pixel is
    labelled with its nearest drawing color, and the tight box of a rectangle's color must be the
    transformed box to the pixel (within 0.6 px: a pixel half covered by the edge may go either way)."""
    root, _, _ = coco_set
    cache, _, val = load(root, f"fit={fit}", res=res)
    names = [name.replace("_", " ") for _, name, _ in CATEGORIES]
    palette = np.array([rgb for _, _, rgb in CATEGORIES] + [BACKGROUND, (coco.PAD_GRAY,) * 3], np.float64)
    checked = 0
    for scene, image in everything(cache, val):
        assert image.shape == (res, res, 3) and image.dtype == np.uint8
        label = np.linalg.norm(image[:, :, None, :].astype(np.float64) - palette, axis=-1).argmin(-1)
        for inst in scene["instances"]:
            ys, xs = np.nonzero(label == names.index(inst["phrase"].replace("striped ", "")))
            tight = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            assert np.abs(tight - np.array(inst["box"]) * res).max() <= 0.6, (scene["id"], inst, tight)
            checked += 1
    assert checked >= 25


def test_crop_drops_what_it_cuts_away_and_pad_keeps_everything(coco_set):
    root, instances, _ = coco_set
    sizes = {image["id"]: (image["width"], image["height"]) for image in instances["images"]}
    for fit in ("crop", "pad"):
        cache, _, val = load(root, f"fit={fit}", "val=0")
        assert val == []
        kept = {scene["id"]: len(scene["instances"]) for scene in cache.scenes}
        for image_id, (width, height) in sizes.items():
            drawn = [a for a in instances["annotations"] if a["image_id"] == image_id and a not in (CROWD, TINY)]
            visible = [a for a in drawn if visible_fraction(a["bbox"], width, height, fit) >= 0.5]
            assert kept.get(str(image_id), 0) == min(len(visible), MAX_INSTANCES), (fit, image_id)
        if fit == "pad":
            assert len(cache) == 12
    assert any(visible_fraction(a["bbox"], *sizes[a["image_id"]], "crop") < 0.5 for a in instances["annotations"])


def test_crowd_and_tiny_boxes_are_filtered_by_configurable_rules(coco_set):
    root, _, _ = coco_set
    phrases = lambda scenes: [inst["phrase"] for inst in next(s for s in scenes if s["id"] == "100")["instances"]]
    source = coco.parse_dataset_spec(spec(root))
    scenes, counts = coco.read_coco(source, MAX_INSTANCES)
    assert counts["crowd"] == 1 and counts["tiny"] == 1
    assert "red block" not in phrases(scenes) and "green box" not in phrases(scenes)
    scenes, counts = coco.read_coco(coco.parse_dataset_spec(spec(root, "crowd=keep", "min_area=0", "min_side=0")),
                                    MAX_INSTANCES)
    assert counts["crowd"] == 0 and counts["tiny"] == 0
    assert {"red block", "green box"} <= set(phrases(scenes))
    tiny = next(inst for s in scenes if s["id"] == "100" for inst in s["instances"] if inst["phrase"] == "green box")
    left, top, side = coco.fit_window(96, 64, "crop")
    assert tiny["box"] == pytest.approx([(60 - left) / side, (40 - top) / side, (63 - left) / side, (43 - top) / side])


def test_instances_are_capped_at_max_instances_largest_first(coco_set):
    root, instances, _ = coco_set
    cache, _, _ = load(root, "fit=pad", "val=0")
    row = [s["id"] for s in cache.scenes].index("101")  # 128 x 128: pad and crop are the identity
    scene = cache.scenes[row]
    drawn = sorted((a for a in instances["annotations"] if a["image_id"] == 101), key=lambda a: -a["bbox"][2] * a["bbox"][3])
    assert len(drawn) == 6 and len(scene["instances"]) == MAX_INSTANCES
    for inst, annotation in zip(scene["instances"], drawn):
        x, y, w, h = annotation["bbox"]
        assert inst["box"] == pytest.approx([x / 128, y / 128, (x + w) / 128, (y + h) / 128], abs=1e-6)
    assert cache.arrays["instance_mask"][row].all()  # the model's inputs: the same boxes in the same order
    assert np.allclose(cache.arrays["boxes"][row], [inst["box"] for inst in scene["instances"]], atol=1e-6)

# -----------------------------------------------------------------------------
# language


def test_phrases_come_from_categories_and_attributes_captions_from_the_file_or_the_phrases(coco_set):
    root, _, _ = coco_set
    cache, tokenizer, _ = load(root, "fit=pad", "val=0")
    scenes = {s["id"]: s for s in cache.scenes}
    phrases = {inst["phrase"] for s in scenes.values() for inst in s["instances"]}
    assert "blue ball" in phrases and "blue_ball" not in phrases  # LVIS-style names read as words
    assert "striped cat" in phrases and "cat" in phrases  # the attribute text leads the phrase
    assert scenes["100"]["caption"] == "A picture with 1 things on a gray floor."
    assert scenes["102"]["caption"] == "A picture with 3 things on a gray floor."  # the too-long first one skipped
    assert scenes["110"]["caption"] == shapescenes.phrase_caption(scenes["110"]["instances"])  # no caption in the file
    assert scenes["110"]["caption"].startswith("a ") and "; the " in scenes["110"]["caption"]
    for name in ("100", "110"):
        ids = [i for i in cache.arrays["caption_ids"][[s["id"] for s in cache.scenes].index(name)] if i]
        assert tokenizer.decode(ids) == " ".join(shapescenes.text_words(scenes[name]["caption"]))
    no_captions, _, _ = load(root, "fit=pad", captions=False)
    assert all(s["caption"] == shapescenes.phrase_caption(s["instances"]) for s in no_captions.scenes)


def test_tokenizer_round_trips_the_captions_and_is_cached(coco_set, tmp_path):
    root, _, captions = coco_set
    cache, tokenizer, _ = load(root, "fit=pad", data_dir=tmp_path.name)
    assert tokenizer.token_to_id("[PAD]") == 0 and tokenizer.token_to_id("[UNK]") == 1
    texts = [c["caption"] for c in captions["annotations"]] + [inst["phrase"] for s in cache.scenes for inst in s["instances"]]
    for text in texts:
        ids = tokenizer.encode(text).ids
        assert 1 not in ids and tokenizer.decode(ids) == " ".join(shapescenes.text_words(text)), text
    saved = [p for p in os.listdir(root / tmp_path.name) if p.endswith("_tokenizer.json")]
    assert len(saved) == 1
    path = root / tmp_path.name / saved[0]
    stamp, text = path.stat().st_mtime_ns, path.read_text()
    _, again, _ = load(root, "fit=pad", data_dir=tmp_path.name, res=64)  # another cache of images, the same text
    assert path.stat().st_mtime_ns == stamp and again.to_str() == tokenizer.to_str() == text
    with pytest.raises(runtime.LayoutError, match="unknown word 'жук'"):
        layouts.encode_text(tokenizer, "a striped жук", layouts.MAX_PHRASE_LEN, "phrase")

# -----------------------------------------------------------------------------
# bad annotation files: one line each, naming the file, the field and the value


def without(record, key):
    return {k: v for k, v in record.items() if k != key}


BAD_FILES = {
    "malformed": (lambda d: None, r"instances\.json: malformed JSON at line 1"),
    "no categories": (lambda d: without(d, "categories"), r"instances\.json: missing key 'categories'"),
    "image without width": (lambda d: {**d, "images": [without(d["images"][0], "width")] + d["images"][1:]},
                            r"instances\.json: images\[0\]: missing key 'width'"),
    "annotation without bbox": (lambda d: {**d, "annotations": [without(d["annotations"][3], "bbox")]},
                                r"instances\.json: annotations\[0\]: missing key 'bbox'"),
    "bbox not 4 numbers": (lambda d: {**d, "annotations": [{**d["annotations"][0], "bbox": [1, 2, "3", 4]}]},
                           r"annotations\[0\]\.bbox: not 4 numbers \[x, y, w, h\] \(\[1, 2, \"3\", 4\]\)"),
    "box outside the image": (lambda d: {**d, "annotations": [{**d["annotations"][0], "bbox": [50, 10, 60, 20]}]},
                              r"annotations\[0\]\.bbox: \[50, 10, 60, 20\] lies outside image 100 \(96x64;"),
    "negative width": (lambda d: {**d, "annotations": [{**d["annotations"][0], "bbox": [50, 10, -6, 20]}]},
                       r"annotations\[0\]\.bbox: negative width or height \(\[50, 10, -6, 20\]\)"),
    "unknown category": (lambda d: {**d, "annotations": [{**d["annotations"][0], "category_id": 77}]},
                         r"annotations\[0\]\.category_id: no category has id 77"),
    "unknown image": (lambda d: {**d, "annotations": [{**d["annotations"][0], "image_id": 999}]},
                      r"annotations\[0\]\.image_id: no image has id 999"),
    "duplicate image id": (lambda d: {**d, "images": d["images"] + d["images"][:1]},
                           r"images\[12\]\.id: duplicate image id 100"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_each_bad_annotation_file_gets_its_error(coco_set, tmp_path, kind):
    root, instances, _ = coco_set
    mutate, message = BAD_FILES[kind]
    bad = mutate(instances)
    path = tmp_path / "instances.json"
    path.write_text("{\"images\": [" if bad is None else json.dumps(bad))
    with pytest.raises(runtime.LayoutError, match=message):
        data.load_dataset(f"coco:{path}:{root / 'images'}", 32, MAX_INSTANCES, str(tmp_path / "data"))
    assert not (tmp_path / "data").exists() or not os.listdir(tmp_path / "data")  # nothing written


def test_images_read_by_worker_processes_equal_those_read_in_process(coco_set, tmp_path, monkeypatch):
    root, _, _ = coco_set
    one, _, _ = load(root, "fit=pad", data_dir=str(tmp_path / "one"))
    monkeypatch.setattr(coco, "IMAGES_PER_WORKER", 4)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    two, _, _ = load(root, "fit=pad", data_dir=str(tmp_path / "two"))
    assert np.array_equal(one.images, two.images) and one.scenes == two.scenes


def test_outside_clip_clips_a_box_that_reaches_past_the_image(coco_set, tmp_path):
    root, instances, _ = coco_set
    past = {**instances, "annotations": [{**instances["annotations"][0], "bbox": [50, 10, 60, 20]}]}  # image 100: 96 x 64
    (tmp_path / "instances.json").write_text(json.dumps(past))
    source = coco.parse_dataset_spec(f"coco:{tmp_path / 'instances.json'}:{root / 'images'}:fit=pad:outside=clip")
    scenes, _ = coco.read_coco(source, MAX_INSTANCES)
    left, top, side = coco.fit_window(96, 64, "pad")
    assert scenes[0]["instances"][0]["box"] == pytest.approx([(50 - left) / side, (10 - top) / side,
                                                              (96 - left) / side, (30 - top) / side], abs=1e-6)


def test_bad_captions_file_and_bad_spec_get_their_errors(coco_set, tmp_path):
    root, _, _ = coco_set
    (tmp_path / "captions.json").write_text(json.dumps({"annotations": [{"image_id": 100}]}))
    with pytest.raises(runtime.LayoutError, match=r"captions\.json: annotations\[0\]: missing key 'caption'"):
        data.load_dataset(f"coco:{root / 'instances.json'}:{root / 'images'}:{tmp_path / 'captions.json'}", 32,
                          MAX_INSTANCES, str(tmp_path / "data"))
    for bad, message in ((f"coco:{root / 'nothing.json'}:{root / 'images'}", "cannot read the annotation file"),
                         ("cocoa:x.json:images", "unknown spec"), (spec(root, "fit=stretch"), "fit must be crop or pad"),
                         (spec(root, "min_area=big"), "min_area must be float"), (spec(root, "colour=1"), "unknown option")):
        with pytest.raises(runtime.LayoutError, match=message):
            data.load_dataset(bad, 32, MAX_INSTANCES, str(tmp_path / "data"))


@pytest.fixture
def broken_images(coco_set, tmp_path):
    """A copy of the images with one file gone and one that is not an image."""
    root, _, _ = coco_set
    (tmp_path / "images").mkdir()
    for name in os.listdir(root / "images"):
        (tmp_path / "images" / name).write_bytes((root / "images" / name).read_bytes())
    (tmp_path / "images" / "000000000103.png").unlink()
    (tmp_path / "images" / "000000000105.png").write_bytes(b"not a png")
    return f"coco:{root / 'instances.json'}:{tmp_path / 'images'}:fit=pad:val=0"


def test_missing_and_unreadable_images_are_skipped_with_a_count_or_an_error(broken_images, tmp_path, capsys):
    cache, _, _ = data.load_dataset(broken_images, 32, MAX_INSTANCES, str(tmp_path / "data"))
    assert len(cache) == 10 and {"103", "105"}.isdisjoint(s["id"] for s in cache.scenes)
    assert "-> 10 train + 0 held out (0 without a box left, 2 missing or unreadable" in capsys.readouterr().out
    with pytest.raises(runtime.LayoutError, match=r"image 103: missing file .*000000000103\.png"):
        data.load_dataset(broken_images + ":missing=error", 32, MAX_INSTANCES, str(tmp_path / "data2"))
    (tmp_path / "images" / "000000000103.png").write_bytes((tmp_path / "images" / "000000000104.png").read_bytes())
    with pytest.raises(runtime.LayoutError, match=r"image 103: .*000000000103\.png is 128x64, its annotations say 80x80"):
        data.load_dataset(broken_images + ":missing=error", 32, MAX_INSTANCES, str(tmp_path / "data3"))
    (tmp_path / "images" / "000000000103.png").unlink()
    (tmp_path / "images" / "000000000103.png").write_bytes((tmp_path / "images" / "000000000105.png").read_bytes())
    with pytest.raises(runtime.LayoutError, match=r"image 103: cannot read .*000000000103\.png \(UnidentifiedImageError"):
        data.load_dataset(broken_images + ":missing=error", 32, MAX_INSTANCES, str(tmp_path / "data4"))

# -----------------------------------------------------------------------------
# every stage, evaluate.py and sampler.py on the data set, as a user runs them

MICRO = ["--res=32", "--patch=8", "--dim=32", "--depth=2", "--heads=2", "--text_depth=1", "--max_instances=4",
         "--warmup_steps=1", "--ckpt_interval=0", "--batch_size=4", "--log_interval=1"]
MICRO_JUDGE = ["--res=32", "--dim=32", "--depth=1", "--heads=2", "--text_depth=1", "--max_instances=4", "--val_scenes=1",
               "--batch_size=4", "--max_steps=2", "--warmup_steps=1", "--log_interval=1", "--eval_interval=0",
               "--ckpt_interval=0"]
MICRO_RL = ["--val_scenes=1", "--layouts_per_update=2", "--group_size=2", "--sample_steps=2", "--sde_window_end=0", "--reward_refresh=1",
            "--ckpt_interval=1", "--max_steps=1", "--minibatches=1"]


def run(args, check=True):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stages(coco_set, tmp_path_factory):
    """The judge (the standalone detector on the real training images), then PMTP, scored by it."""
    root, _, _ = coco_set
    tmp = tmp_path_factory.mktemp("stages")
    dataset = f"--dataset={spec(root)}"
    run(["train_detector.py", dataset, *MICRO_JUDGE, f"--data_dir={tmp / 'data'}", f"--out_dir={tmp / 'judge'}"])
    run(["train_pretrain.py", dataset, *MICRO, "--max_steps=2", "--val_scenes=1", "--sample_steps=2",
         f"--judge={tmp / 'judge' / 'ckpt'}", f"--data_dir={tmp / 'data'}", f"--out_dir={tmp / 'pmtp'}"])
    return tmp


def test_the_judge_and_pmtp_train_on_coco_and_pmtp_is_scored_by_the_judge(stages, coco_set):
    judge, pmtp = records(stages / "judge"), records(stages / "pmtp")
    assert [r["step"] for r in judge if "loss" in r] == [1, 2] and set(judge[-1]["eval"]) >= {"acc50", "miou"}
    assert [r["step"] for r in pmtp if "loss" in r] == [1, 2] and np.isfinite([r["loss"] for r in pmtp if "loss" in r]).all()
    figures = pmtp[-1]["eval"]
    assert set(figures) == {"isr", "isr_ci", "miou", "n_instances", "judge_real", "grounding", "per_scene"}
    assert 0 <= figures["isr"] <= 1 and 0 <= figures["judge_real"]["isr"] <= 1
    assert figures["isr_ci"][0] <= figures["isr"] <= figures["isr_ci"][1]
    assert set(figures["grounding"]) == {"acc50", "acc50_ci", "miou", "ap", "ap50"}
    assert set(figures["per_scene"]) == {"instances", "acc50"}  # no checker on real data: no "isr" counts
    # the checkpoints carry the trained tokenizer, the same file for the judge and the generator
    tokenizer = (stages / "pmtp" / "ckpt" / "tokenizer.json").read_text()
    assert tokenizer == (stages / "judge" / "ckpt" / "tokenizer.json").read_text()
    saved = json.loads((stages / "pmtp" / "ckpt" / "config.json").read_text())
    assert saved["train"]["dataset"] == spec(coco_set[0])
    assert saved["model"]["vocab_size"] == Tokenizer.from_str(tokenizer).get_vocab_size()
    assert (stages / "pmtp" / "samples" / "step000002.png").exists()


def test_djo_and_cycle_rl_run_on_coco_with_the_checkpoints_dataset(stages):
    ckpt = stages / "pmtp" / "ckpt"
    run(["train_joint.py", f"--init_from={ckpt}", f"--out_dir={stages / 'djo'}", f"--data_dir={stages / 'data'}",
         "--batch_size=4", "--max_steps=2", "--warmup_steps=1", "--log_interval=1", "--ckpt_interval=0", "--val_scenes=0"])
    assert [r["step"] for r in records(stages / "djo") if "loss" in r] == [1, 2]
    run(["train_cycle_rl.py", f"--init_from={ckpt}", f"--out_dir={stages / 'rl'}", f"--data_dir={stages / 'data'}",
         *MICRO_RL])
    rl = records(stages / "rl")
    assert [r["step"] for r in rl if "reward" in r] == [1] and "grounding" in rl[-1]["eval"]
    # the checker's verdict as the reward (the diagnostic oracle) exists for ShapeScenes only
    refused = run(["train_cycle_rl.py", f"--init_from={ckpt}", f"--out_dir={stages / 'rl_checker'}",
                   f"--data_dir={stages / 'data'}", *MICRO_RL, "--reward_kind=checker"], check=False)
    assert refused.returncode == 2 and re.fullmatch(r"error: reward_kind 'checker': .* not for dataset 'coco:.*'\n",
                                                    refused.stderr)
    assert not (stages / "rl_checker" / "ckpt").exists()


def test_eval_scores_the_held_out_images_with_the_judge(stages):
    result = run(["evaluate.py", f"--ckpt={stages / 'pmtp' / 'ckpt'}", f"--judge={stages / 'judge' / 'ckpt'}", "--steps=2",
                  "--device=cpu"])
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["set"] == "val" and line["n"] == 1 and {"isr", "miou", "judge_real", "grounding"} <= set(line)


def test_sampling_uses_the_checkpoints_tokenizer_and_names_a_word_it_cannot_encode(stages, tmp_path):
    ckpt = stages / "pmtp" / "ckpt"
    good = {"scenes": [{"id": "s0", "caption": "A picture with 2 things",
                        "instances": [{"phrase": "striped cat", "box": [0.1, 0.1, 0.5, 0.5]},
                                      {"phrase": "blue ball", "box": [0.6, 0.6, 0.9, 0.9]}]}]}
    (tmp_path / "good.json").write_text(json.dumps(good))
    run(["sampler.py", f"--ckpt={ckpt}", f"--layouts={tmp_path / 'good.json'}", f"--out={tmp_path / 'out'}", "--steps=2"])
    assert Image.open(tmp_path / "out" / "s0.png").size == (32, 32)
    good["scenes"][0]["instances"][1]["phrase"] = "blue жук"
    (tmp_path / "bad.json").write_text(json.dumps(good))
    result = run(["sampler.py", f"--ckpt={ckpt}", f"--layouts={tmp_path / 'bad.json'}", f"--out={tmp_path / 'bad'}"],
                 check=False)
    assert result.returncode == 2 and re.fullmatch(r"error: scene s0: instances\[1\]\.phrase: unknown word 'жук' .*\n",
                                                   result.stderr)


def test_a_bad_annotation_file_stops_a_training_script_with_one_line(coco_set, tmp_path):
    root, instances, _ = coco_set
    bad = {**instances, "annotations": [{**instances["annotations"][0], "category_id": 77}]}
    (tmp_path / "instances.json").write_text(json.dumps(bad))
    result = run(["train_pretrain.py", f"--dataset=coco:{tmp_path / 'instances.json'}:{root / 'images'}", *MICRO,
                  "--max_steps=1", f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}"], check=False)
    assert result.returncode == 2
    assert re.fullmatch(r"error: .*instances\.json: annotations\[0\]\.category_id: no category has id 77\n", result.stderr)


if __name__ == "__main__":  # the same kind of data set, larger, to try the pipeline: python tests/test_coco.py OUT_DIR N
    from pathlib import Path
    write_coco(Path(sys.argv[1]), int(sys.argv[2]))
