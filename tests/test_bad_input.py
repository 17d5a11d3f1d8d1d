"""Bad input, as a user types it, through the real CLIs (subprocesses): a layout file, a flag, a damaged
checkpoint or a COCO annotation file. Each case must stop with exactly one line on stderr, "error: ...",
naming the bad field or file, exit with status 2, and leave every file and folder as it was: no output,
no empty output folder, no cache written from data that then fails. The readers' other refusals are
checked in-process at the end (no subprocess: fast)."""

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import coco  # noqa: E402
import data  # noqa: E402
import layouts  # noqa: E402
import runtime  # noqa: E402
import shapescenes  # noqa: E402
import detector  # noqa: E402
from model import EchoGen, ModelConfig  # noqa: E402
from test_coco import write_coco  # noqa: E402

MICRO = ["--res=32", "--patch=8", "--dim=32", "--depth=2", "--heads=2", "--text_depth=1", "--max_instances=4",
         "--cache_scenes=64", "--val_scenes=0", "--warmup_steps=1", "--log_interval=1", "--ckpt_interval=0",
         "--batch_size=4"]


def run(args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A micro checkpoint trained for 2 steps (and its data cache), a generation-only checkpoint, a
    layout file of two scenes with their true renders, and a small COCO-format data set."""
    root = tmp_path_factory.mktemp("world")
    result = run(["train_pretrain.py", *MICRO, "--max_steps=2", f"--data_dir={root / 'data'}",
                  f"--out_dir={root / 'run'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = shapescenes.build_tokenizer()
    gen_only = EchoGen(ModelConfig(res=32, patch=8, dim=32, depth=1, heads=2, text_depth=1, max_instances=4,
                                   vocab_size=tokenizer.get_vocab_size(), grounding=False))
    runtime.save_checkpoint(str(root / "gen_only"), gen_only, gen_only, torch.optim.AdamW(gen_only.parameters()),
                            tokenizer, {}, 0)
    scenes = shapescenes.make_scene_set("val", 2, seed=0)
    layouts.write_layouts(str(root / "layouts.json"), scenes)
    (root / "images").mkdir()
    for scene in scenes:
        layouts.save_png(str(root / "images" / f"{scene['id']}.png"), shapescenes.render_scene(scene, 32))
    write_coco(root / "coco")
    return root


def listing(*folders):
    """Every file and folder under folders with its size and mtime: what a refused command must leave alone."""
    found = {}
    for folder in folders:
        for where, dirs, files in os.walk(folder):
            for name in dirs + files:
                stat = os.stat(os.path.join(where, name))
                found[os.path.join(where, name)] = (stat.st_size, stat.st_mtime_ns)
    return found

# -----------------------------------------------------------------------------
# the inputs of the cases: w is the world fixture's folder, t the case's own tmp_path


def ckpt(w):
    return w / "run" / "ckpt"


def scene(scene_id="s1", box=(0.1, 0.1, 0.4, 0.4), **fields):
    return {"id": scene_id, "caption": "a red circle", "instances": [{"phrase": "red circle", "box": list(box)}],
            **fields}


def layout_file_in(t, *scenes, text=None):
    """A layout file in t: the scenes as JSON (NaN and Infinity as Python's json writes them), or raw bytes."""
    path = t / "layouts.json"
    path.write_bytes(text if text is not None else json.dumps({"scenes": list(scenes)}).encode())
    return path


def not_a_png(t):
    """A folder of images in t whose s1.png is not an image."""
    (t / "images").mkdir()
    (t / "images" / "s1.png").write_bytes(b"not a png")
    return t / "images"


def damaged(w, t, damage):
    """A copy of the trained checkpoint in t, damaged by damage(folder)."""
    folder = t / "ckpt"
    shutil.copytree(ckpt(w), folder)
    damage(folder)
    return folder


def truncate(name):
    return lambda folder: (folder / name).write_bytes((folder / name).read_bytes()[:1000])


def empty(name):
    return lambda folder: (folder / name).write_bytes(b"")


def remove(name):
    return lambda folder: (folder / name).unlink()


def rewrite(name, text):
    return lambda folder: (folder / name).write_text(text)


def edit_config(change):
    def damage(folder):
        saved = json.loads((folder / "config.json").read_text())
        change(saved)
        (folder / "config.json").write_text(json.dumps(saved))
    return damage


def set_in(path, value):
    """change(document): document[path[0]][path[1]]... = value."""
    def change(document):
        target = document
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change

# the commands: each CLI with good arguments, one of them replaced by the case


def sample(w, t, *flags, checkpoint=None, layout_file=None, out=None):
    return ["sampler.py", "--ckpt", checkpoint or ckpt(w), "--layouts", layout_file or w / "layouts.json",
            "--out", out or t / "out", *flags]


def evaluate(w, t, *flags, checkpoint=None, out=None):
    return ["evaluate.py", "--ckpt", checkpoint or ckpt(w), "--sets", "val", "--n", "1", "--steps", "1", "--device", "cpu",
            "--out", out or t / "eval", *flags]


def predict(w, t, *flags, checkpoint=None, layout_file=None, images=None, out=None):
    return ["detector.py", "--ckpt", checkpoint or ckpt(w), "--layouts", layout_file or w / "layouts.json",
            "--images", images or w / "images", "--out", out or t / "grounded.json", *flags]


def render(t, layout_file):
    return ["data.py", "render", "--layouts", layout_file, "--out", t / "renders"]


def check(w, layout_file, images=None):
    return ["data.py", "check", "--layouts", layout_file, "--images", images or w / "images"]


def pretrain(w, t, *flags):
    return ["train_pretrain.py", *MICRO, "--max_steps=3", f"--data_dir={w / 'data'}", f"--out_dir={t / 'out'}", *flags]


def resume(w, t, damage):
    """train_pretrain.py resuming a copy of the trained run, its checkpoint damaged by damage(folder)."""
    shutil.copytree(w / "run", t / "run")
    damage(t / "run" / "ckpt")
    return ["train_pretrain.py", *MICRO, "--max_steps=3", "--init_from=resume", f"--data_dir={w / 'data'}",
            f"--out_dir={t / 'run'}"]


def coco_run(w, t, change, captions=None):
    """train_pretrain.py on a copy of the COCO set's instances file, changed by change(document), and
    on captions (a captions document) when given."""
    document = json.loads((w / "coco" / "instances.json").read_text())
    change(document)
    (t / "instances.json").write_text(json.dumps(document))
    spec = f"coco:{t / 'instances.json'}:{w / 'coco' / 'images'}"
    if captions is not None:
        (t / "captions.json").write_text(json.dumps(captions))
        spec += f":{t / 'captions.json'}"
    return ["train_pretrain.py", *MICRO, "--max_steps=1", f"--dataset={spec}", f"--data_dir={t / 'data'}",
            f"--out_dir={t / 'out'}"]


NAN, INF = float("nan"), float("inf")
LONG_NAME = " ".join("abcdefghijklm")  # 13 words: 13 tokens, more than MAX_PHRASE_LEN = 12
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")

# (id, the command as a function of (w, t), what its error line must hold)
CASES = [
    # layout files: one reader for sampler.py, data.py render / check and detector.py predict
    ("layout box NaN", lambda w, t: sample(w, t, layout_file=layout_file_in(t, scene("ok"), scene(box=(NAN, 0, 0.5, 0.3)))),
     ["scene s1: instances[0].box", "nan"]),
    ("layout box Infinity", lambda w, t: render(t, layout_file_in(t, scene(box=(0, 0, INF, 1)))),
     ["scene s1: instances[0].box", "inf"]),
    ("layout file not UTF-8", lambda w, t: sample(w, t, layout_file=layout_file_in(t, text=b'{"scenes": [{"id": "\xff"}]}')),
     ["layouts.json", "not UTF-8"]),
    ("scene id of 300 characters", lambda w, t: sample(w, t, layout_file=layout_file_in(t, scene("ok"), scene("a" * 300))),
     ["scenes[1]: id", "300 bytes", "more than 100"]),
    ("scene id with a path separator", lambda w, t: predict(w, t, layout_file=layout_file_in(t, scene("sub/s1"))),
     ["scenes[0]: id", "sub/s1"]),
    ("caption not a string", lambda w, t: check(w, layout_file_in(t, scene(caption=7))),
     ["scene s1: caption", "not a string"]),
    ("layout file without scenes", lambda w, t: sample(w, t, layout_file=layout_file_in(t)),
     ["layouts.json", "scenes: empty"]),
    ("image that is not a PNG", lambda w, t: check(w, layout_file_in(t, scene()), not_a_png(t)),
     ["scene s1: image", "s1.png"]),
    # sampler.py's flags
    ("sampler --out is a file", lambda w, t: sample(w, t, out=w / "layouts.json"), ["--out", "not a folder"]),
    ("sampler --batch_size 0", lambda w, t: sample(w, t, "--batch_size", "0"), ["--batch_size", "'0'", ">= 1"]),
    ("sampler --cfg inf", lambda w, t: sample(w, t, "--cfg", "inf"), ["--cfg", "'inf'"]),
    pytest.param("sampler --device cuda without CUDA", lambda w, t: sample(w, t, "--device", "cuda"),
                 ["--device cuda", "no CUDA device"], marks=no_cuda),
    pytest.param("pipeline --device cuda without CUDA",
                 lambda w, t: ["pipeline.py", "--preset=micro", "--out_dir", t / "pipeline", "--device", "cuda"],
                 ["--device cuda", "no CUDA device"], marks=no_cuda),
    ("pipeline --seeds 0", lambda w, t: ["pipeline.py", "--preset=micro", "--out_dir", t / "pipeline", "--seeds", "0"],
     ["--seeds", ">= 1", "got 0"]),
    # evaluate.py's flags
    ("eval --n 0", lambda w, t: evaluate(w, t, "--n", "0"), ["--n", "'0'"]),
    ("eval --steps 0", lambda w, t: evaluate(w, t, "--steps", "0"), ["--steps", "'0'"]),
    ("eval --out is a file", lambda w, t: evaluate(w, t, out=w / "layouts.json"), ["--out", "not a folder"]),
    ("eval --agreement_set unknown", lambda w, t: evaluate(w, t, "--agreement", "1", "--agreement_set", "vall"),
     ["--agreement_set", "'vall'"]),
    # probe_head.py
    ("probe with a generation-only checkpoint", lambda w, t: ["probe_head.py", "--ckpt", w / "gen_only"],
     ["--ckpt", "gen_only", "grounding head"]),
    ("probe --sources 9", lambda w, t: ["probe_head.py", "--ckpt", ckpt(w), "--sources", "embed,9"],
     ["--sources", "'9'", "embed, 1, 2"]),
    ("probe --steps 0", lambda w, t: ["probe_head.py", "--ckpt", ckpt(w), "--steps", "0"], ["--steps", "'0'"]),
    # detector.py predict
    ("predict with a generation-only checkpoint", lambda w, t: predict(w, t, checkpoint=w / "gen_only"),
     ["gen_only", "no grounding head"]),
    ("predict --batch_size 0", lambda w, t: predict(w, t, "--batch_size", "0"), ["--batch_size", "'0'"]),
    ("predict --out is a folder", lambda w, t: predict(w, t, out=w / "images"), ["--out", "is a folder"]),
    # damaged checkpoints, in every CLI that loads one
    ("truncated ema.safetensors", lambda w, t: sample(w, t, checkpoint=damaged(w, t, truncate("ema.safetensors"))),
     ["ckpt", "ema.safetensors is damaged"]),
    ("empty ema.safetensors", lambda w, t: evaluate(w, t, checkpoint=damaged(w, t, empty("ema.safetensors"))),
     ["ckpt", "ema.safetensors is damaged"]),
    ("missing ema.safetensors", lambda w, t: predict(w, t, checkpoint=damaged(w, t, remove("ema.safetensors"))),
     ["ckpt", "no ema.safetensors"]),
    ("config.json of another width",
     lambda w, t: sample(w, t, checkpoint=damaged(w, t, edit_config(lambda c: c["model"].update(dim=64)))),
     ["ckpt", "ema.safetensors does not fit its config.json"]),
    ("malformed config.json", lambda w, t: evaluate(w, t, checkpoint=damaged(w, t, rewrite("config.json", '{"model"'))),
     ["ckpt", "config.json is not readable JSON"]),
    ("config.json without model",
     lambda w, t: predict(w, t, checkpoint=damaged(w, t, edit_config(lambda c: c.pop("model")))),
     ["ckpt", 'config.json has no "model"']),
    ("missing tokenizer.json", lambda w, t: sample(w, t, checkpoint=damaged(w, t, remove("tokenizer.json"))),
     ["ckpt", "no tokenizer.json"]),
    ("broken tokenizer.json", lambda w, t: predict(w, t, checkpoint=damaged(w, t, rewrite("tokenizer.json", "{"))),
     ["ckpt", "tokenizer.json is damaged"]),
    ("init_from with a truncated model.safetensors",
     lambda w, t: pretrain(w, t, f"--init_from={damaged(w, t, truncate('model.safetensors'))}"),
     ["ckpt", "model.safetensors is damaged"]),
    ("resume without train_state.pt", lambda w, t: resume(w, t, remove("train_state.pt")),
     ["ckpt", "no train_state.pt"]),
    ("resume with a truncated train_state.pt", lambda w, t: resume(w, t, truncate("train_state.pt")),
     ["ckpt", "train_state.pt is damaged"]),
    # COCO annotation files, through a training script
    ("COCO bbox NaN", lambda w, t: coco_run(w, t, set_in(["annotations", 0, "bbox"], [NAN, 0.0, NAN, 0.3])),
     ["instances.json: annotations[0].bbox", "NaN"]),
    ("COCO empty category name", lambda w, t: coco_run(w, t, set_in(["categories", 0, "name"], "")),
     ["instances.json: categories[0].name", "category id 1"]),
    ("COCO category name of 13 tokens", lambda w, t: coco_run(w, t, set_in(["categories", 0, "name"], LONG_NAME)),
     ["tokens, more than 12", LONG_NAME]),
    ("COCO caption not a string",
     lambda w, t: coco_run(w, t, lambda document: None, captions={"annotations": [{"image_id": 100, "caption": 5}]}),
     ["captions.json: annotations[0].caption", "not str"]),
]


def case_id(case):
    return (case.values if hasattr(case, "values") else case)[0]


@pytest.mark.parametrize("name, command, expected", CASES, ids=[case_id(case) for case in CASES])
def test_bad_input_stops_with_one_line_and_writes_nothing(world, tmp_path, name, command, expected):
    args = command(world, tmp_path)
    before = listing(tmp_path, world)
    result = run(args)
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for part in expected:
        assert part in lines[0], (part, lines[0])
    assert listing(tmp_path, world) == before  # nothing written, nothing changed

# -----------------------------------------------------------------------------
# the readers' other refusals, in-process: one line each, naming the field and the value


@pytest.mark.parametrize("instance, expected", [
    ('{"phrase": "red circle", "box": [0.1, 0.1, 1e400, 0.3]}', "box: not a finite number (inf)"),
    ('{"phrase": "red circle", "box": [0.1, 0.1, 0.3, 0.3], "score": true}', "score: not a number in [0, 1] (true)"),
    ('{"phrase": "red circle", "box": [0.1, 0.1, 0.3, 0.3], "score": NaN}', "score: not a number in [0, 1] (NaN)"),
])
def test_read_layouts_refuses_non_finite_and_boolean_numbers(tmp_path, instance, expected):
    path = layout_file_in(tmp_path, text=b'{"scenes": [{"id": "s1", "instances": [%s]}]}' % instance.encode())
    with pytest.raises(runtime.LayoutError, match=r"^scene s1: instances\[0\]") as error:
        layouts.read_layouts(str(path), shapescenes.build_tokenizer(), 4)
    assert expected in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("scene_id, expected", [
    (".", "not a plain file name"), ("..", "not a plain file name"), ("a b", "not a plain file name"),
    ("a\\b", "not a plain file name"), ("", "not a plain file name"), (7, "not a plain file name"),
    ("ж" * 51, "102 bytes in UTF-8, more than 100"),
])
def test_read_layouts_refuses_ids_that_are_not_safe_file_names(tmp_path, scene_id, expected):
    path = layout_file_in(tmp_path, scene(scene_id))
    with pytest.raises(runtime.LayoutError, match=r"^scenes\[0\]: id: ") as error:
        layouts.read_layouts(str(path), shapescenes.build_tokenizer(), 4)
    assert expected in str(error.value)


def test_read_layouts_refuses_ids_that_differ_in_case_only(tmp_path):
    path = layout_file_in(tmp_path, scene("s1"), scene("S1"))  # one file where the file system ignores case
    with pytest.raises(runtime.LayoutError, match=r"^scene S1: id: duplicate \('S1'"):
        layouts.read_layouts(str(path), shapescenes.build_tokenizer(), 4)


def test_read_layouts_takes_ids_of_100_bytes(tmp_path):
    path = layout_file_in(tmp_path, scene("a" * 100), scene("ж" * 50))
    assert [s["id"] for s in layouts.read_layouts(str(path), shapescenes.build_tokenizer(), 4)] == ["a" * 100, "ж" * 50]


@pytest.mark.parametrize("change, expected", [
    (set_in(["annotations", 0, "iscrowd"], NAN), r"annotations\[0\]\.iscrowd: not 0 or 1 \(NaN\)"),
    (set_in(["images", 0, "width"], INF), r"images\[0\]\.width: not int \(Infinity\)"),
    (set_in(["categories", 1, "name"], " _ "), r"categories\[1\]\.name: category id 2 has a name without a word"),
    (set_in(["annotations", 2, "bbox"], [1, 2, INF, 3]), r"annotations\[2\]\.bbox: not 4 finite numbers .*Infinity"),
    (set_in(["images", 1, "height"], NAN), r"images\[1\]\.height: not int \(NaN\)"),
    (set_in(["annotations", 1, "attributes"], [3]), r"annotations\[1\]\.attributes: not a string or a list of strings"),
])
def test_read_coco_refuses_before_writing_anything(world, tmp_path, change, expected):
    document = json.loads((world / "coco" / "instances.json").read_text())
    change(document)
    (tmp_path / "instances.json").write_text(json.dumps(document))
    with pytest.raises(runtime.LayoutError, match=expected):
        data.load_dataset(f"coco:{tmp_path / 'instances.json'}:{world / 'coco' / 'images'}", 32, 4,
                          str(tmp_path / "data"))
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("parse, text", [
    (runtime.positive_int, "0"), (runtime.positive_int, "1.5"), (runtime.positive_int, "²"),
    (runtime.non_negative_int, "-1"), (runtime.seed_int, str(2 ** 32)), (runtime.non_negative_float, "-0.5"),
    (runtime.non_negative_float, "nan"), (runtime.positive_float, "0"), (runtime.positive_float, "1e400"),
])
def test_flag_types_refuse_values_out_of_range(parse, text):
    with pytest.raises(argparse.ArgumentTypeError, match=f"got {text!r}"):
        parse(text)


def refusal(capsys, load, *args, **kwargs):
    """The one line a runtime loader stops with (runtime.fail: exit status 2)."""
    with pytest.raises(SystemExit) as stop:
        load(*args, **kwargs)
    lines = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_resume_without_ema_weights_is_refused_before_the_optimizer_is_touched(world, tmp_path, capsys):
    folder = damaged(world, tmp_path, remove("ema.safetensors"))
    model, _, _ = runtime.load_model(str(ckpt(world)), EchoGen, "model")
    optimizer = torch.optim.AdamW(model.parameters())
    line = refusal(capsys, runtime.load_train_state, str(folder), model, model, optimizer)
    assert "no ema.safetensors" in line and not optimizer.state


def test_loaders_refuse_a_checkpoint_of_another_kind(world, tmp_path, capsys):
    other = damaged(world, tmp_path, edit_config(lambda c: c.update(kind="Other")))
    assert "kind 'Other' is none of EchoGen, StandaloneDetector" in refusal(capsys, runtime.load_model, str(other), EchoGen)
    assert "kind EchoGen, this command needs a StandaloneDetector" in refusal(
        capsys, runtime.load_model, str(ckpt(world)), detector.StandaloneDetector)
    assert "model config has field" in refusal(
        capsys, runtime.check_same_model_config, "x", {**vars(ModelConfig()), "backbone": "resnet18"}, ModelConfig())
    grounder = detector.load_grounder(str(ckpt(world)))  # the trained one has its grounding head
    assert grounder.kind == "EchoGen" and grounder.res == 32


def test_an_output_folder_under_a_file_is_refused(world, capsys):
    out, file = world / "layouts.json" / "out", world / "layouts.json"
    line = refusal(capsys, runtime.check_output_folder, "--out", str(out))
    assert line == f"error: --out '{out}': '{file}' is a file, not a folder"


def test_coco_spec_refuses_a_negative_val(world):
    with pytest.raises(runtime.LayoutError, match="val >= 0 or -1"):
        coco.parse_dataset_spec(f"coco:{world / 'coco' / 'instances.json'}:{world / 'coco' / 'images'}:val=-2")
