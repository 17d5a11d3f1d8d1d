"""Tests of the data code: the ShapeScenes world rules, renderer and checker (shapescenes.py), layout files, tokenizer and cache (layouts.py, data.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import layouts  # noqa: E402
import runtime  # noqa: E402
import shapescenes  # noqa: E402

EPS = 1e-9


@pytest.fixture(scope="module")
def tokenizer():
    return shapescenes.build_tokenizer()


def overlap_fraction(a, b):
    """Intersection over the smaller box's area."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])
    return iw * ih / min(area(a), area(b))


def non_overlapping_scenes(n, seed, n_objects=(1, 4)):
    rng = np.random.default_rng(seed)
    return [shapescenes.sample_scene(rng, n_objects, max_overlap=0.0) for _ in range(n)]

# -----------------------------------------------------------------------------
# world rules


def assert_world_rules(scene, max_overlap=0.10, caption_order=None):
    boxes = [inst["box"] for inst in scene["instances"]]
    for inst, (x0, y0, x1, y1) in zip(scene["instances"], boxes):
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        w, h = x1 - x0, y1 - y0
        assert 0.18 - EPS <= w <= 0.45 + EPS and 0.18 - EPS <= h <= 0.45 + EPS
        assert 0.75 - 1e-3 <= w / h <= 1.33 + 1e-3  # boxes are rounded to 4 decimals
        assert inst["phrase"] == f"{inst['color']} {inst['shape']}"
        assert np.abs(np.array(inst["rgb"]) - shapescenes.PALETTE[inst["color"]]).max() <= 12
    for i in range(len(boxes)):
        for j in range(i):
            assert overlap_fraction(boxes[i], boxes[j]) <= max_overlap + EPS
    background = scene["background"]
    assert 24 <= background["gray"] <= 96 and -24 <= background["gradient"] <= 24
    in_caption = scene["instances"] if caption_order is None else [scene["instances"][i] for i in caption_order]
    assert scene["caption"] == shapescenes.make_caption(in_caption, background["gray"])


def pairs_of(scene):
    return [(inst["color"], inst["shape"]) for inst in scene["instances"]]


def test_world_rules_over_sampled_scenes():
    rng = np.random.default_rng(0)
    scenes = [shapescenes.sample_scene(rng) for _ in range(2000)]
    for scene in scenes:
        assert_world_rules(scene)
        assert 1 <= len(scene["instances"]) <= 4
        assert not set(pairs_of(scene)) & shapescenes.HELD_OUT
    counts = np.bincount([len(s["instances"]) for s in scenes])
    assert (counts[1:] > 400).all()  # every count from 1 to 4 is drawn


def test_scene_sets_keep_their_pairs_and_counts():
    for kind, (lo, hi) in [("train", (1, 4)), ("val", (1, 4)), ("heldout", (1, 4)), ("crowded", (5, 8))]:
        for scene in shapescenes.make_scene_set(kind, 200, seed=1):
            assert_world_rules(scene)
            assert lo <= len(scene["instances"]) <= hi
            held_out = [pair in shapescenes.HELD_OUT for pair in pairs_of(scene)]
            assert all(held_out) if kind == "heldout" else not any(held_out)


def test_leakage_pair_is_two_same_shape_objects_side_by_side():
    relations = set()
    for scene in shapescenes.make_scene_set("leakage_pair", 300, seed=0):
        assert_world_rules(scene, max_overlap=0.0)
        a, b = scene["instances"]
        assert a["shape"] == b["shape"] and a["color"] != b["color"]
        assert not set(pairs_of(scene)) & shapescenes.HELD_OUT
        left, right = sorted([a["box"], b["box"]])
        assert left[2] < right[0]  # apart: strictly left / right of each other
        relations.add(shapescenes.relation(a["box"], b["box"]))
    assert relations == {"left of", "right of"}


def shares_an_edge(a, b):
    """Boxes that touch along a side: one's right (bottom) edge is the other's left (top), spans overlapping."""
    side_by_side = (abs(a[2] - b[0]) < EPS or abs(b[2] - a[0]) < EPS) and min(a[3], b[3]) > max(a[1], b[1])
    stacked = (abs(a[3] - b[1]) < EPS or abs(b[3] - a[1]) < EPS) and min(a[2], b[2]) > max(a[0], b[0])
    return side_by_side or stacked


def caption_order(scene):
    """The instances in the order the caption names them (each phrase appears once in these probes)."""
    at = [scene["caption"].index(inst["phrase"]) for inst in scene["instances"]]
    return sorted(range(len(at)), key=at.__getitem__)


@pytest.mark.parametrize("case", list(shapescenes.LEAKAGE_CASES))
def test_each_leakage_case_is_what_its_row_of_the_table_says(case):
    (lo, hi), touching, close, shuffled = shapescenes.LEAKAGE_CASES[case]
    counts = set()
    for scene in shapescenes.make_scene_set(f"leakage_{case}", 200, seed=0):
        instances, order = scene["instances"], caption_order(scene)
        assert_world_rules(scene, max_overlap=0.0, caption_order=order)
        counts.add(len(instances))
        assert len({inst["shape"] for inst in instances}) == 1 and len({inst["color"] for inst in instances}) == len(instances)
        assert not set(pairs_of(scene)) & shapescenes.HELD_OUT
        boxes = [inst["box"] for inst in instances]
        if touching:  # every object touches another one
            assert all(any(shares_an_edge(a, b) for b in boxes if b is not a) for a in boxes)
        else:
            assert not any(shares_an_edge(a, b) for a in boxes for b in boxes if b is not a)
        if close:  # a run of neighbours in HUES, and neighbours in hue touch in the image
            hues = [shapescenes.HUES.index(inst["color"]) for inst in instances]
            assert sorted(hues) == list(range(min(hues), min(hues) + len(hues)))
            assert all(shares_an_edge(boxes[hues.index(h)], boxes[hues.index(h + 1)]) for h in sorted(hues)[:-1])
        assert (order != sorted(order)) == shuffled
    assert counts == set(range(lo, hi + 1))
    assert shapescenes.make_scene_set("leakage", 20, seed=0)[0]["instances"] == \
        shapescenes.sample_scene(shapescenes._scene_rng("leakage", 0), split=f"leakage_{shapescenes.LEAKAGE_HARDEST}")["instances"]


def test_crowded_scenes_sample_fast_even_without_overlap():
    rng = np.random.default_rng(3)
    for _ in range(30):
        scene = shapescenes.sample_scene(rng, n_objects=(8, 8), max_overlap=0.0)
        assert len(scene["instances"]) == 8
        assert_world_rules(scene, max_overlap=0.0)


def test_make_scene_set_is_deterministic_and_seeded_by_kind():
    assert shapescenes.make_scene_set("val", 20, seed=5) == shapescenes.make_scene_set("val", 20, seed=5)
    assert shapescenes.make_scene_set("val", 20, seed=5) != shapescenes.make_scene_set("val", 20, seed=6)
    train, val = shapescenes.make_scene_set("train", 20, seed=5), shapescenes.make_scene_set("val", 20, seed=5)
    assert [s["instances"] for s in train] != [s["instances"] for s in val]
    assert [s["id"] for s in val] == [f"val{i}" for i in range(20)]

# -----------------------------------------------------------------------------
# language


def instance(phrase, box):
    return {"phrase": phrase, "box": box}


def test_caption_grammar():
    red_left, blue_right = instance("red circle", [0.1, 0.2, 0.4, 0.5]), instance("blue square", [0.55, 0.3, 0.85, 0.62])
    assert shapescenes.make_caption([red_left, blue_right], gray=40) == (
        "a red circle and a blue square; the red circle is left of the blue square on a dark background")
    assert shapescenes.make_caption([blue_right, red_left], gray=40).endswith("the blue square is right of the red circle on a dark background")
    orange_below = instance("orange square", [0.15, 0.6, 0.45, 0.9])  # dy = 0.4 dominates dx = 0.05
    green = instance("green cross", [0.6, 0.6, 0.8, 0.8])
    assert shapescenes.make_caption([red_left, orange_below, green], gray=70) == (
        "a red circle, an orange square and a green cross; the red circle is above the orange square on a gray background")
    assert shapescenes.make_caption([orange_below, red_left], gray=70).startswith("an orange square and a red circle; the orange square is below")
    assert shapescenes.make_caption([orange_below], gray=59.99) == "an orange square on a dark background"
    assert shapescenes.make_caption([orange_below], gray=60) == "an orange square on a gray background"


def test_long_phrase_size_and_where():
    def size_word(side):
        return shapescenes.long_phrase("red", "ring", [0.0, 0.3, side, 0.5]).split()[1]  # x0 = 0: the side is exact
    assert [size_word(s) for s in (0.2, 0.2499, 0.25, 0.35, 0.3501, 0.45)] == ["small", "small", "medium", "medium", "large", "large"]
    wheres = [[shapescenes.long_phrase("orange", "cross", [cx - 0.1, cy - 0.1, cx + 0.1, cy + 0.1]).split(" ", 4)[4]
               for cx in (0.15, 0.5, 0.85)] for cy in (0.15, 0.5, 0.85)]
    assert wheres == [["in the top left", "at the top", "in the top right"],
                      ["on the left", "in the center", "on the right"],
                      ["in the bottom left", "at the bottom", "in the bottom right"]]
    assert shapescenes.long_phrase("orange", "cross", [0.4, 0.4, 0.7, 0.7]) == "a medium orange cross in the center"

# -----------------------------------------------------------------------------
# rendering


def one_object_scene(shape, box, rgb=(200, 30, 30), gray=50.0, gradient=20.0):
    return {"caption": "", "instances": [{"phrase": f"red {shape}", "box": box, "color": "red", "shape": shape, "rgb": list(rgb)}],
            "background": {"gray": gray, "gradient": gradient}}


def test_render_background_gradient_and_fill_at_centre():
    res = 64
    for shape in shapescenes.SHAPES:
        image = shapescenes.render_scene(one_object_scene(shape, [0.5, 0.5, 0.9, 0.9]), res)
        assert image.shape == (res, res, 3) and image.dtype == np.uint8
        for row in (0, 10, 31):  # left half: background only, rows follow g + d (y - 0.5)
            expected = np.rint(50.0 + 20.0 * ((row + 0.5) / res - 0.5))
            assert (image[row, :20] == expected).all()
        centre = image[int(0.7 * res), int(0.7 * res)]
        if shape == "ring":  # the hole shows the background
            assert (centre == np.rint(50.0 + 20.0 * ((int(0.7 * res) + 0.5) / res - 0.5))).all()
        else:
            assert centre.tolist() == [200, 30, 30]


def test_triangle_apex_up():
    image = shapescenes.render_scene(one_object_scene("triangle", [0.25, 0.25, 0.75, 0.75], gradient=0.0), 64)
    is_fill = (image == [200, 30, 30]).all(-1)
    near_top, near_bottom = is_fill[18], is_fill[46]  # rows just inside the box's top and bottom
    assert 0 < near_top.sum() < near_bottom.sum() / 4
    assert is_fill[46, 17] and not is_fill[18, 17]  # bottom-left corner filled, top-left not


def test_render_user_layout_uses_palette_and_caption_background():
    scene = {"caption": "a blue square on a dark background", "instances": [{"phrase": "blue square", "box": [0.2, 0.2, 0.6, 0.6]}]}
    image = shapescenes.render_scene(scene, 32)
    assert image[0, 31].tolist() == [48, 48, 48] and image[12, 12].tolist() == list(shapescenes.PALETTE["blue"])
    scene["caption"] = "a blue square on a gray background"
    assert shapescenes.render_scene(scene, 32)[31, 31].tolist() == [80, 80, 80]
    scene["instances"][0]["phrase"] = "blue thing"
    with pytest.raises(runtime.LayoutError, match="blue thing"):
        shapescenes.render_scene(scene, 32)

# -----------------------------------------------------------------------------
# checker


def test_checker_passes_true_renders():
    scenes = non_overlapping_scenes(200, seed=10)
    scores = shapescenes.check_images(scenes, [shapescenes.render_scene(s, 64) for s in scenes])
    assert scores["isr"] >= 0.99 and scores["color_acc"] == 1.0 and scores["shape_acc"] >= 0.99
    assert scores["n_instances"] == sum(len(s["instances"]) for s in scenes)


def with_instances(scene, change):
    """A copy of the scene whose instances went through change(list of instance copies)."""
    instances = [dict(inst) for inst in scene["instances"]]
    change(instances)
    return {**scene, "instances": instances}


def test_checker_fails_swapped_colors():
    checked = 0
    for scene in non_overlapping_scenes(150, seed=11, n_objects=(2, 4)):
        a, b = 0, next((j for j, inst in enumerate(scene["instances"]) if inst["color"] != scene["instances"][0]["color"]), None)
        if b is None:
            continue
        def swap(instances):
            instances[a]["rgb"], instances[b]["rgb"] = instances[b]["rgb"], instances[a]["rgb"]
        image = shapescenes.render_scene(with_instances(scene, swap), 64)
        for j in (a, b):
            result = shapescenes.check_instance(image, scene["instances"][j])
            assert not result["success"] and not result["color_found"]
            checked += 1
    assert checked > 200


def test_checker_fails_objects_moved_by_half_a_box():
    checked = 0
    for scene in non_overlapping_scenes(100, seed=12):
        for axis in (0, 1):  # x, then y
            box = list(scene["instances"][0]["box"])
            half = (box[axis + 2] - box[axis]) / 2
            shift = half if box[axis + 2] + half <= 1 else -half  # one of the two always fits
            box[axis] += shift
            box[axis + 2] += shift
            def move(instances):
                instances[0]["box"] = box
            image = shapescenes.render_scene(with_instances(scene, move), 64)
            result = shapescenes.check_instance(image, scene["instances"][0])
            assert result["color_found"] and result["iou"] < 0.5 and not result["success"]
            checked += 1
    assert checked == 200


def test_checker_on_unknown_color_and_empty_image():
    scene = non_overlapping_scenes(1, seed=13)[0]
    blank = np.full((64, 64, 3), 70, np.uint8)
    assert shapescenes.check_images([scene], [blank])["isr"] == 0.0
    assert not shapescenes.check_instance(blank, {"box": [0.1, 0.1, 0.4, 0.4], "color": None, "shape": None})["color_found"]

# -----------------------------------------------------------------------------
# layout files


def good_scene(scene_id="s1"):
    return {"id": scene_id, "caption": "a red circle and a blue square; the red circle is left of the blue square on a dark background",
            "instances": [{"phrase": "red circle", "box": [0.1, 0.2, 0.4, 0.5]},
                          {"phrase": "blue square", "box": [0.55, 0.3, 0.85, 0.62]}]}


def test_layouts_round_trip(tmp_path, tokenizer):
    scenes = shapescenes.make_scene_set("val", 10, seed=0)
    scenes[0]["instances"][0]["score"] = 0.75
    path = str(tmp_path / "layouts.json")
    layouts.write_layouts(path, scenes)
    assert os.listdir(tmp_path) == ["layouts.json"]  # no temporary file left behind
    back = layouts.read_layouts(path, tokenizer, max_instances=8)
    assert [s["id"] for s in back] == [s["id"] for s in scenes]
    for original, read in zip(scenes, back):
        assert read["caption"] == original["caption"]
        assert [(i["phrase"], i["box"], i["color"], i["shape"]) for i in read["instances"]] == \
            [(i["phrase"], i["box"], i["color"], i["shape"]) for i in original["instances"]]
    assert back[0]["instances"][0]["score"] == 0.75


def test_read_layouts_builds_missing_caption_and_parses_phrases(tmp_path, tokenizer):
    scene = good_scene()
    del scene["caption"]
    scene["instances"][1]["phrase"] = "a small red blue square in the top left"
    path = tmp_path / "l.json"
    path.write_text(json.dumps({"scenes": [scene]}))
    read = layouts.read_layouts(str(path), tokenizer, max_instances=8)[0]
    assert read["caption"] == ("a red circle and a small red blue square in the top left; "
                               "the red circle is left of the small red blue square in the top left on a gray background")
    assert (read["instances"][0]["color"], read["instances"][0]["shape"]) == ("red", "circle")
    assert (read["instances"][1]["color"], read["instances"][1]["shape"]) == (None, "square")


def set_path(document, keys, value):
    target = document
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return document


def bad_documents():
    """(name, file text, substrings the error message must hold)."""
    scene = lambda **change: json.dumps({"scenes": [{**good_scene(), **change}]})
    box = lambda value: json.dumps(set_path({"scenes": [good_scene()]}, ["scenes", 0, "instances", 1, "box"], value))
    phrase = lambda value: json.dumps(set_path({"scenes": [good_scene()]}, ["scenes", 0, "instances", 0, "phrase"], value))
    return [
        ("malformed", '{"scenes": [\n  {"id": "s1",}\n]}', ["malformed JSON", "line 2"]),
        ("no scenes", '{"layouts": []}', ["scenes", "missing"]),
        ("no instances", scene(instances=[]), ["scene s1", "instances", "[]"]),
        ("too many", scene(instances=[{"phrase": "red circle", "box": [0.1, 0.1, 0.2, 0.2]}] * 9), ["scene s1", "instances", "9"]),
        ("empty phrase", phrase("  "), ["scene s1", "instances[0].phrase", '"  "']),
        ("unknown phrase word", phrase("red zebra"), ["scene s1", "instances[0].phrase", "'zebra'"]),
        ("unknown caption word", scene(caption="a red circle on a zebra"), ["scene s1", "caption", "'zebra'"]),
        ("three numbers", box([0.1, 0.2, 0.3]), ["scene s1", "instances[1].box", "[0.1, 0.2, 0.3]"]),
        ("not numbers", box(["a", 0.2, 0.3, 0.4]), ["scene s1", "instances[1].box", '"a"']),
        ("outside", box([0.1, 0.2, 1.3, 0.5]), ["scene s1", "instances[1].box", "1.3"]),
        ("x0 >= x1", box([0.7, 0.2, 0.3, 0.5]), ["scene s1", "instances[1].box", "x0 >= x1 (0.7 >= 0.3)"]),
        ("y0 >= y1", box([0.1, 0.6, 0.3, 0.6]), ["scene s1", "instances[1].box", "y0 >= y1 (0.6 >= 0.6)"]),
        ("duplicate", json.dumps({"scenes": [good_scene(), good_scene("s2"), good_scene()]}), ["scene s1", "id", "duplicate"]),
        ("unsafe id", json.dumps({"scenes": [good_scene("../s1")]}), ["id", "../s1"]),
    ]


@pytest.mark.parametrize("name,text,expected", bad_documents(), ids=[case[0] for case in bad_documents()])
def test_read_layouts_rejects(tmp_path, tokenizer, name, text, expected):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(runtime.LayoutError) as error:
        layouts.read_layouts(str(path), tokenizer, max_instances=8)
    message = str(error.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (part, message)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd)


def test_cli_rejects_bad_file_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(bad_documents()[10][1])  # x0 >= x1 in scene s1
    out = tmp_path / "renders"
    out.mkdir()
    result = run_cli("render", "--layouts", bad, "--out", out)
    assert result.returncode == 2
    assert result.stderr.startswith("error: scene s1: instances[1].box: x0 >= x1") and result.stderr.count("\n") == 1
    assert os.listdir(out) == []

# -----------------------------------------------------------------------------
# tokenizer and batching


def test_tokenizer_round_trips_every_caption_and_phrase(tokenizer):
    vocab = tokenizer.get_vocab()
    assert vocab["[PAD]"] == 0 and vocab["[UNK]"] == 1
    texts = [s["caption"] for kind in shapescenes.SCENE_SETS for s in shapescenes.make_scene_set(kind, 100, seed=0)]
    texts += [shapescenes.long_phrase(c, s, [x, y, x + w, y + w]) for c in shapescenes.COLORS for s in shapescenes.SHAPES
              for x in (0.05, 0.4, 0.7) for y in (0.05, 0.4, 0.7) for w in (0.2, 0.3, 0.4) if x + w <= 1 and y + w <= 1]
    for text in texts:
        ids = layouts.encode_text(tokenizer, text, layouts.MAX_CAPTION_LEN, "test")
        assert len(ids) == layouts.MAX_CAPTION_LEN
        words = [tokenizer.id_to_token(i) for i in ids if i != 0]
        assert words == shapescenes.text_words(text)
    assert layouts.encode_text(tokenizer, "Red CIRCLE", layouts.MAX_PHRASE_LEN, "test")[:2] == [vocab["red"], vocab["circle"]]


def test_encode_text_errors_name_the_word(tokenizer):
    with pytest.raises(runtime.LayoutError, match=r"^scene s3: instances\[1\].phrase: unknown word 'zebra' in 'a zebra'$"):
        layouts.encode_text(tokenizer, "a zebra", layouts.MAX_PHRASE_LEN, "scene s3: instances[1].phrase")
    with pytest.raises(runtime.LayoutError, match="13 tokens, more than 12"):
        layouts.encode_text(tokenizer, " ".join(["red"] * 13), layouts.MAX_PHRASE_LEN, "p")


def test_collate_shapes_and_values(tokenizer):
    scenes = shapescenes.make_scene_set("crowded", 3, seed=0)
    images = [shapescenes.render_scene(s, 16) for s in scenes]
    batch = layouts.collate(scenes, images, tokenizer, max_instances=8)
    assert batch["images"].shape == (3, 3, 16, 16) and batch["images"].dtype == torch.float32
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    assert torch.allclose(batch["images"][1, :, 2, 5], torch.tensor(images[1][2, 5] / 127.5 - 1, dtype=torch.float32))
    assert batch["caption_ids"].shape == (3, layouts.MAX_CAPTION_LEN) and batch["caption_ids"].dtype == torch.long
    assert batch["phrase_ids"].shape == (3, 8, layouts.MAX_PHRASE_LEN) and batch["boxes"].shape == (3, 8, 4)
    n = len(scenes[0]["instances"])
    assert batch["instance_mask"][0].tolist() == [True] * n + [False] * (8 - n)
    assert torch.allclose(batch["boxes"][0, :n], torch.tensor([i["box"] for i in scenes[0]["instances"]]))
    assert (batch["boxes"][0, n:] == 0).all() and (batch["phrase_ids"][0, n:] == 0).all()
    assert "images" not in layouts.collate(scenes, None, tokenizer, max_instances=8)
    with pytest.raises(runtime.LayoutError, match="more than max_instances"):
        layouts.collate(scenes, None, tokenizer, max_instances=4)


def test_hard_negatives_name_absent_training_pairs_in_free_slots(tokenizer):
    scenes = shapescenes.make_scene_set("val", 200, seed=0) + shapescenes.make_scene_set("crowded", 50, seed=0)
    batch = layouts.collate(scenes, None, tokenizer, max_instances=8)
    before = {k: v.clone() for k, v in batch.items()}
    seeds = [[0, i] for i in range(len(scenes))]
    out = shapescenes.add_hard_negatives(batch, tokenizer, 2, seeds)
    again = shapescenes.add_hard_negatives(batch, tokenizer, 2, seeds)
    halves = [shapescenes.add_hard_negatives({k: v[part] for k, v in batch.items()}, tokenizer, 2, seeds[part])
              for part in (slice(0, 100), slice(100, None))]
    assert all(torch.equal(out[k], torch.cat([h[k] for h in halves])) for k in out)  # the same, batch split or not
    assert all(torch.equal(before[k], batch[k]) for k in before)  # the input batch is left as it was
    assert all(torch.equal(out[k], again[k]) for k in out)  # seeded
    swaps = {"color": 0, "shape": 0}
    for i, scene in enumerate(scenes):
        n = len(scene["instances"])
        assert torch.equal(out["phrase_ids"][i, :n], batch["phrase_ids"][i, :n])
        assert out["negative"][i].tolist() == [False] * n + [True] * min(2, 8 - n) + [False] * (8 - n - min(2, 8 - n))
        assert out["instance_mask"][i].tolist() == (out["negative"][i] | batch["instance_mask"][i]).tolist()
        present = {(inst["color"], inst["shape"]) for inst in scene["instances"]}
        for slot in range(n, min(n + 2, 8)):
            color, shape = shapescenes.parse_phrase(tokenizer.decode(out["phrase_ids"][i, slot].tolist()))
            assert (color, shape) not in present and (color, shape) not in shapescenes.HELD_OUT
            # one word of one of the scene's objects changed
            assert any((color == c) != (shape == s) for c, s in present)
            swaps["color" if any(shape == s for _, s in present) and not any(color == c for c, _ in present)
                  else "shape"] += 1
    assert min(swaps.values()) > 100, swaps  # both kinds, about half each
    for swap, kept in (("shape", 0), ("color", 1)):  # one kind only: the other word is one of the scene's
        out = shapescenes.add_hard_negatives(batch, tokenizer, 2, seeds, swap=swap)
        for i, scene in enumerate(scenes):
            present = {(inst["color"], inst["shape"]) for inst in scene["instances"]}
            for slot in torch.nonzero(out["negative"][i]).flatten().tolist():
                pair = shapescenes.parse_phrase(tokenizer.decode(out["phrase_ids"][i, slot].tolist()))
                assert pair not in present and any(pair[kept] == p[kept] for p in present)
    with pytest.raises(ValueError, match="swap must be"):
        shapescenes.add_hard_negatives(batch, tokenizer, 2, seeds, swap="shapes")

# -----------------------------------------------------------------------------
# cache


def test_cache_batch_equals_collate_and_is_deterministic(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(data, "CACHE_CHUNK", 100)
    one, two = str(tmp_path / "one.npz"), str(tmp_path / "two.npz")
    data.prepare_cache(one, n=250, res=16, seed=4, workers=1)
    data.prepare_cache(two, n=250, res=16, seed=4, workers=2)
    assert sorted(os.listdir(tmp_path)) == ["one.npz", "two.npz"]
    cache, other = layouts.SceneCache(one), layouts.SceneCache(two)
    assert len(cache) == 250 and cache.res == 16 and cache.seed == 4
    for key in cache.arrays:
        assert np.array_equal(cache.arrays[key], other.arrays[key])
    assert np.array_equal(cache.images, other.images)
    scenes, images = data._sample_and_render_chunk((4, 1, 100, 16, (1, 4)))  # chunk 1: cache rows 100..199
    indices = np.array([105, 100, 199])
    expected = layouts.collate([scenes[i - 100] for i in indices], [images[i - 100] for i in indices], tokenizer, 8)
    got = cache.batch(indices)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key


def test_load_or_prepare_cache_uses_cache_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert data.cache_path(32, 20000, 0) == os.path.join("data", "shapescenes_r32_n20000_s0_o1-4.npz")
    cache = data.load_or_prepare_cache(res=8, n=20, seed=1, n_objects=(2, 3))
    assert os.path.exists(data.cache_path(8, 20, 1, (2, 3)))
    assert set(cache.arrays["instance_mask"].sum(1)) <= {2, 3}
    assert data.load_or_prepare_cache(res=8, n=20, seed=1, n_objects=(2, 3), data_dir="elsewhere").images.shape == (20, 8, 8, 3)
    assert os.path.exists(data.cache_path(8, 20, 1, (2, 3), data_dir="elsewhere"))

# -----------------------------------------------------------------------------
# pictures and command line


def test_draw_boxes_and_save_grid(tmp_path):
    scene = one_object_scene("square", [0.25, 0.25, 0.75, 0.75])
    picture = layouts.draw_boxes(shapescenes.render_scene(scene, 16), scene, scale=4)
    assert picture.shape == (64, 64, 3)
    assert picture[16, 40].tolist() == list(shapescenes.PALETTE["red"])  # on the box's top edge
    path = str(tmp_path / "grid.png")
    layouts.save_grid(path, [[picture, picture], [picture]], pad=2)
    from PIL import Image
    assert Image.open(path).size == (2 + 2 * 66, 2 + 2 * 66)
    assert os.listdir(tmp_path) == ["grid.png"]


def test_cli_sample_render_check(tmp_path):
    layout_file, renders = tmp_path / "layouts.json", tmp_path / "renders"
    # the leakage probe's pairs have no overlapping boxes, where the checker's ISR >= 0.99 is promised
    assert run_cli("sample", "--kind", "leakage_pair", "--n", "40", "--seed", "0", "--out", layout_file).returncode == 0
    assert run_cli("render", "--layouts", layout_file, "--out", renders, "--res", "64").returncode == 0
    assert len(os.listdir(renders)) == 40
    result = run_cli("check", "--layouts", layout_file, "--images", renders)
    assert result.returncode == 0 and result.stdout.count("\n") == 1
    scores = json.loads(result.stdout)
    assert scores["isr"] >= 0.99 and scores["n_instances"] == 80
    os.remove(renders / "leakage_pair7.png")
    result = run_cli("check", "--layouts", layout_file, "--images", renders)
    assert result.returncode == 2 and "leakage_pair7.png" in result.stderr


def test_confusable_scenes_are_those_with_two_shapes_of_one_color():
    tokenizer = shapescenes.build_tokenizer()
    scenes = [[("red", "ring"), ("red", "square")],    # confusable: the color alone cannot tell them apart
              [("red", "ring"), ("blue", "square")],   # every color its own
              [("red", "ring"), ("red", "ring")],      # one phrase twice: interchangeable, not confusable
              [("green", "cross")],
              [("blue", "ring"), ("white", "diamond"), ("blue", "circle")]]
    phrase_ids = np.zeros((len(scenes), 4, layouts.MAX_PHRASE_LEN), np.int32)
    mask = np.zeros((len(scenes), 4), bool)
    for i, pairs in enumerate(scenes):
        for j, (color, shape) in enumerate(pairs):
            phrase_ids[i, j] = layouts.encode_text(tokenizer, shapescenes.short_phrase(color, shape), layouts.MAX_PHRASE_LEN, "x")
            mask[i, j] = True
    assert shapescenes.confusable_scenes(phrase_ids, mask).tolist() == [0, 4]


def test_draw_confusable_replaces_only_grounding_rows_and_only_from_the_pool():
    indices, rows, pool = np.arange(1000, 1064), np.arange(64) % 4 == 3, np.array([7, 8, 9])
    drawn = shapescenes.draw_confusable(indices, rows, pool, 0.5, seed=0, step=5)
    assert (drawn[~rows] == indices[~rows]).all()
    swapped = drawn != indices
    assert set(drawn[swapped]) <= {7, 8, 9} and 2 <= swapped.sum() <= 14  # about half of the 16 grounding rows
    assert (shapescenes.draw_confusable(indices, rows, pool, 0.5, seed=0, step=5) == drawn).all()  # (seed, step) alone
    assert (shapescenes.draw_confusable(indices, rows, pool, 0.0, seed=0, step=5) == indices).all()
    assert (shapescenes.draw_confusable(indices, rows, pool, 1.0, seed=0, step=5)[rows] < 10).all()
