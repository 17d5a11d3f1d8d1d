"""The layout studio (studio.py, studio.html): its HTTP API on micro checkpoints, served on a free port
from a thread of this process, and the page driven in Debian's Chromium by Selenium (skipped, with the
reason, where chromium, chromedriver or selenium is missing). STUDIO_SCREENSHOT=docs/studio.png saves
the browser test's screenshot there (STUDIO_CKPT=folder: of that checkpoint instead of the micro one)."""

import base64
import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import coco  # noqa: E402
import layouts  # noqa: E402
import runtime  # noqa: E402
import sampler  # noqa: E402
import shapescenes  # noqa: E402
import studio  # noqa: E402
from model import EchoGen, ModelConfig  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MICRO = dict(res=32, patch=8, dim=32, depth=2, heads=2, text_depth=1, max_instances=4, layout_map=8, pixel_head=8,
             prediction="x0")
RED_CIRCLE = {"phrase": "red circle", "box": [0.1, 0.2, 0.4, 0.5]}
BLUE_SQUARE = {"phrase": "blue square", "box": [0.55, 0.3, 0.85, 0.62]}


def save_micro_checkpoint(folder, tokenizer):
    """A micro EchoGen with a grounding head, fresh seeded weights: what the studio shows does not need a
    trained model, and building one in-process takes a second where a training run takes twenty."""
    torch.manual_seed(0)
    model = EchoGen(ModelConfig(vocab_size=tokenizer.get_vocab_size(), **MICRO))
    runtime.save_checkpoint(str(folder), model, model, torch.optim.AdamW(model.parameters()), tokenizer, {}, 0)
    return folder


def serve(ckpt):
    """studio.py's server for ckpt on a free port of 127.0.0.1, in a daemon thread -> (server, base url)."""
    model, tokenizer, _ = runtime.load_model(str(ckpt), EchoGen, "ema", "cpu")
    server = studio.make_server(studio.Studio(model, tokenizer, str(ckpt)), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The studio of a ShapeScenes micro checkpoint -> (base url, its checkpoint folder)."""
    ckpt = save_micro_checkpoint(tmp_path_factory.mktemp("studio") / "ckpt", shapescenes.build_tokenizer())
    server, url = serve(ckpt)
    yield url, ckpt
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def free_text(tmp_path_factory):
    """The studio of a micro checkpoint whose tokenizer (WordPiece, as real data trains one) is not ShapeScenes'."""
    tokenizer = coco.train_tokenizer(["a dog on a sofa", "two cats under a red table", "a man riding a horse"] * 20, 80)
    server, url = serve(save_micro_checkpoint(tmp_path_factory.mktemp("studio_free") / "ckpt", tokenizer))
    yield url
    server.shutdown()
    server.server_close()


def request(url, path, body=None):
    """(HTTP status, parsed JSON answer); body: a dict sent as JSON, or bytes as they are."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, data=body), timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def layout(*instances, scene_id="s1", **fields):
    return {"scenes": [{"id": scene_id, "instances": list(instances)}], **fields}


def decode(url):
    """A PNG data URL -> uint8 (H, W, 3)."""
    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


@pytest.fixture
def generate_calls(monkeypatch):
    """The calls of sampler.generate made while a test runs (the studio calls it through the module)."""
    calls, generate = [], sampler.generate
    monkeypatch.setattr(sampler, "generate", lambda *a, **k: calls.append(a) or generate(*a, **k))
    return calls

# -----------------------------------------------------------------------------
# the API


def test_vocab_is_the_closed_vocabulary_on_shapescenes_and_empty_for_free_text(shapes, free_text):
    status, vocab = request(shapes[0], "/vocab")
    assert status == 200 and vocab["closed"] is True
    assert vocab["colors"] == shapescenes.COLORS and vocab["shapes"] == shapescenes.SHAPES
    assert vocab["max_instances"] == 4 and vocab["res"] == 32 and vocab["grounding"] is True
    assert vocab["palette"]["red"] == list(shapescenes.PALETTE["red"])
    assert vocab["defaults"] == {"seed": 0, "steps": 25, "cfg": 3.0, "n_seeds": 1}
    status, vocab = request(free_text, "/vocab")
    assert status == 200 and vocab["closed"] is False and vocab["colors"] == vocab["shapes"] == []


def test_the_page_is_served_and_loads_nothing_from_elsewhere(shapes):
    with urllib.request.urlopen(shapes[0] + "/", timeout=30) as response:
        page = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/html")
    assert 'id="canvas"' in page and 'id="layout"' in page
    assert "http://" not in page and "https://" not in page  # no script, font or style from outside


def test_a_good_layout_answers_images_of_the_checkpoints_size_and_one_verdict_per_instance(shapes, generate_calls):
    status, answer = request(shapes[0], "/generate", layout(RED_CIRCLE, BLUE_SQUARE, seed=7, steps=3, n_seeds=2))
    assert status == 200, answer
    assert [s["seed"] for s in answer["samples"]] == [7, 8] and len(generate_calls) == 1
    scene = {**answer["scene"], "instances": [dict(inst, color=c, shape=s) for inst, (c, s) in
                                              zip(answer["scene"]["instances"], [("red", "circle"), ("blue", "square")])]}
    assert answer["scene"]["caption"] == ("a red circle and a blue square; the red circle is left of the blue square "
                                          "on a gray background")  # built from the phrases, as read_layouts builds it
    for sample in answer["samples"]:
        image = decode(sample["image"])
        assert image.shape == (32, 32, 3)  # the checkpoint's resolution, as sampler.py writes {id}.png
        assert decode(sample["asked"]).shape == decode(sample["found"]).shape == (128, 128, 3)
        assert (decode(sample["asked"]) == layouts.draw_boxes(image, scene)).all()
        assert [inst["phrase"] for inst in sample["instances"]] == ["red circle", "blue square"]
        for inst, asked in zip(sample["instances"], scene["instances"]):
            assert inst["checker"] == shapescenes.check_instance(image, asked)  # the verdict is of the image sent
            assert 0 <= inst["found"]["confidence"] <= 1 and len(inst["found"]["box"]) == 4
            assert inst["found"]["iou"] == pytest.approx(shapescenes.box_iou(inst["found"]["box"], asked["box"]), abs=1e-4)
    assert (decode(answer["truth"]) == layouts.draw_boxes(shapescenes.render_scene(scene, 32), scene)).all()
    assert not (decode(answer["samples"][0]["image"]) == decode(answer["samples"][1]["image"])).all()


def test_seed_i_of_a_batch_is_the_image_the_sampler_cli_writes_for_that_seed(shapes, tmp_path):
    url, ckpt = shapes
    _, answer = request(url, "/generate", layout(RED_CIRCLE, seed=3, steps=2, cfg=2.0, n_seeds=2))
    (tmp_path / "layout.json").write_text(json.dumps(layout(RED_CIRCLE)))
    result = subprocess.run([sys.executable, "sampler.py", "--ckpt", str(ckpt), "--layouts", str(tmp_path / "layout.json"),
                             "--out", str(tmp_path / "out"), "--steps", "2", "--cfg", "2.0", "--seed", "4",
                             "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    written = np.asarray(Image.open(tmp_path / "out" / "s1.png").convert("RGB"))
    assert np.abs(decode(answer["samples"][1]["image"]).astype(int) - written).max() <= 1  # float rounding of a batch


def test_validate_answers_the_scenes_as_read_layouts_reads_them(shapes):
    status, answer = request(shapes[0], "/validate", {"scenes": [
        {"id": "a", "instances": [RED_CIRCLE]},
        {"id": "b", "caption": "a blue square", "instances": [dict(BLUE_SQUARE, phrase="a small blue square in the center")]}]})
    assert status == 200
    a, b = answer["scenes"]
    assert a["caption"] == "a red circle on a gray background" and a["caption_built"] is True
    assert b["caption"] == "a blue square" and b["caption_built"] is False
    assert b["parsed"] == [{"color": "blue", "shape": "square"}] and b["instances"][0]["box"] == BLUE_SQUARE["box"]


BAD_LAYOUTS = [  # (request body, the one line the CLIs print after "error: ")
    (layout(dict(RED_CIRCLE, box=[0.5, 0.1, 0.3, 0.4])), "scene s1: instances[0].box: x0 >= x1 (0.5 >= 0.3)"),
    (layout(dict(RED_CIRCLE, box=[0.1, 0.1, 1.5, 0.4])), "scene s1: instances[0].box: coordinate outside [0, 1] (1.5)"),
    (layout(dict(RED_CIRCLE, phrase="red zebra")), "scene s1: instances[0].phrase: unknown word 'zebra' in 'red zebra'"),
    (layout(*[RED_CIRCLE] * 5), "scene s1: instances: 5 instances, more than max_instances = 4"),
    (layout(RED_CIRCLE, scene_id="../x"), "scenes[0]: id: not a plain file name of letters, digits, '_', '.' and '-' "
                                          "(\"../x\")"),
    ({"scenes": []}, "request: scenes: empty, a layout file holds at least one scene"),
    (b'{"scenes": [', "request: malformed JSON at line 1 col 13: Expecting value"),
    (b"\xff{}", "request: not UTF-8 text (invalid start byte at byte 0)"),
]


@pytest.mark.parametrize("path", ["/generate", "/validate"])
@pytest.mark.parametrize("body, message", BAD_LAYOUTS)
def test_a_bad_layout_answers_400_with_the_clis_message_and_computes_nothing(shapes, generate_calls, path, body, message):
    assert request(shapes[0], path, body) == (400, {"error": message})
    assert generate_calls == []


def test_the_message_is_the_one_sampler_py_prints(shapes, tmp_path):
    body, message = BAD_LAYOUTS[2]
    (tmp_path / "layout.json").write_text(json.dumps(body))
    result = subprocess.run([sys.executable, "sampler.py", "--ckpt", str(shapes[1]), "--layouts",
                             str(tmp_path / "layout.json"), "--out", str(tmp_path / "out")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2 and result.stderr == f"error: {message}\n"
    assert request(shapes[0], "/generate", body)[1]["error"] == message


BAD_FIELDS = [
    ({"seed": -1}, "seed: must be an integer in [0, 2**32), got '-1'"),
    ({"seed": 1.5}, "seed: must be an integer in [0, 2**32), got '1.5'"),
    ({"steps": 0}, "steps: must be an integer >= 1, got '0'"),
    ({"steps": "five"}, "steps: must be an integer >= 1, got '\"five\"'"),
    ({"steps": True}, "steps: must be an integer >= 1, got 'true'"),
    ({"steps": 201}, "steps: at most 200 here, got 201"),
    ({"cfg": -1}, "cfg: must be a finite number >= 0, got '-1'"),
    ({"cfg": None}, "cfg: must be a finite number >= 0, got 'null'"),
    ({"n_seeds": 9}, "n_seeds: at most 8 here, got 9"),
    ({"n_seeds": 0}, "n_seeds: must be an integer >= 1, got '0'"),
    ({"seeds": 4}, "request: unknown field 'seeds' (known: scenes, seed, steps, cfg, n_seeds, best_of, repair)"),
    ({"best_of": 0}, "best_of: must be an integer >= 1, got '0'"),
    ({"best_of": "x"}, "best_of: must be an integer >= 1, got '\"x\"'"),
    ({"best_of": 9}, "best_of: at most 8 here, got 9"),
    ({"repair": -1}, "repair: must be an integer >= 0, got '-1'"),
    ({"repair": 1.5}, "repair: must be an integer >= 0, got '1.5'"),
    ({"repair": 5}, "repair: at most 4 here, got 5"),
]


@pytest.mark.parametrize("fields, message", BAD_FIELDS)
def test_a_bad_number_answers_400_naming_the_field_and_value(shapes, generate_calls, fields, message):
    assert request(shapes[0], "/generate", layout(RED_CIRCLE, **fields)) == (400, {"error": message})
    assert generate_calls == []


def test_best_of_1_and_repair_0_answer_exactly_as_without_them(shapes, monkeypatch):
    monkeypatch.setattr(time, "perf_counter", lambda: 0.0)  # "seconds", the one figure that is not the same twice
    body = layout(RED_CIRCLE, BLUE_SQUARE, seed=5, steps=2, n_seeds=2)
    plain = request(shapes[0], "/generate", body)
    assert plain[0] == 200 and "best_of" not in plain[1] and "candidates" not in plain[1]["samples"][0]
    assert request(shapes[0], "/generate", dict(body, best_of=1, repair=0)) == plain


def test_best_of_answers_every_candidate_and_the_one_kept(shapes):
    status, answer = request(shapes[0], "/generate", layout(RED_CIRCLE, BLUE_SQUARE, seed=5, steps=3, n_seeds=2, best_of=2))
    assert status == 200, answer
    assert answer["best_of"] == 2 and answer["repair"] == 0 and answer["pass_score"] == sampler.PASS_SCORE
    for i, sample in enumerate(answer["samples"]):
        assert sample["seed"] == 5 + i and sample["kept"] in (0, 1) and len(sample["candidate_worst"]) == 2
        assert [c["seed"] for c in sample["candidates"]] == [5 + i, 5 + i + sampler.CANDIDATE_SEED_STRIDE]
        for candidate in sample["candidates"]:  # figured as an image without the switch
            assert decode(candidate["image"]).shape == (32, 32, 3) and len(candidate["instances"]) == 2
            assert candidate["found"] is not None and candidate["instances"][0]["checker"] is not None
        assert not (decode(sample["candidates"][0]["image"]) == decode(sample["candidates"][1]["image"])).all()
        assert sample["image"] == sample["candidates"][sample["kept"]]["image"]  # no repair: the kept one, as it is
        assert sample["candidate_worst"][sample["kept"]] == max(sample["candidate_worst"]) == sample["worst_score"]
        assert sample["repairs_kept"] == 0 and not any(v["redrawn"] or v["tried"] for v in sample["verdict"])


def test_repair_answers_per_instance_which_boxes_it_redrew_and_their_verdict(shapes):
    status, answer = request(shapes[0], "/generate", layout(RED_CIRCLE, BLUE_SQUARE, seed=5, steps=2, repair=1))
    assert status == 200, answer
    (sample,) = answer["samples"]
    assert sample["kept"] == 0 and len(sample["candidates"]) == 1 and sample["repairs_kept"] in (0, 1)
    assert [v["phrase"] for v in sample["verdict"]] == ["red circle", "blue square"]
    for v in sample["verdict"]:
        assert set(v) == {"phrase", "box", "found", "confidence", "iou", "score", "pass", "redrawn", "tried"}
        assert v["pass"] == (v["score"] >= sampler.PASS_SCORE) and len(v["found"]) == 4
        assert v["redrawn"] == (v["tried"] and sample["repairs_kept"] == 1)
        if sample["repairs_kept"] == 0:  # the verdict is the candidate's: repair redrew what failed it
            assert v["tried"] == (not v["pass"])
    if sample["repairs_kept"] == 0:
        assert sample["image"] == sample["candidates"][0]["image"]


def test_self_verified_sampling_needs_a_grounding_head(shapes, generate_calls):
    model, tokenizer, _ = runtime.load_model(str(shapes[1]), EchoGen, "ema", "cpu")
    bare = studio.Studio(model, tokenizer)
    bare.grounder = None  # as for a generation-only checkpoint
    with pytest.raises(studio.RequestError, match=r"^best_of: self-verified sampling needs the model's grounding head"):
        bare.generate(json.dumps(layout(RED_CIRCLE, steps=1, best_of=2)).encode())
    assert generate_calls == []


def test_generate_draws_one_scene_at_a_time(shapes, generate_calls):
    two = {"scenes": layout(RED_CIRCLE)["scenes"] + layout(BLUE_SQUARE, scene_id="s2")["scenes"]}
    assert request(shapes[0], "/generate", two) == (400, {"error": "scenes: 2 scenes, /generate draws one at a time"})
    assert generate_calls == []


def test_an_unexpected_failure_answers_500_in_one_line_without_a_stack_trace(shapes, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("the sampler broke\nacross two lines")
    monkeypatch.setattr(sampler, "generate", broken)
    status, answer = request(shapes[0], "/generate", layout(RED_CIRCLE, steps=1))
    assert status == 500
    assert answer == {"error": "internal error (RuntimeError: the sampler broke across two lines); "
                               "the studio's log has the details"}
    assert "Traceback" in capsys.readouterr().err  # the details are on the server's stderr, not the client's


@pytest.mark.parametrize("length, status, message", [
    ("-1", 411, "request body: no Content-Length (POST a layout document as JSON)"),
    ("many", 411, "request body: no Content-Length (POST a layout document as JSON)"),
    ("2000000", 413, "request body: 2000000 bytes, more than 1000000"),
])
def test_a_body_without_a_readable_length_is_refused_without_waiting_for_it(shapes, length, status, message):
    connection = http.client.HTTPConnection(shapes[0].split("//")[1], timeout=30)
    connection.putrequest("POST", "/generate")
    connection.putheader("Content-Length", length)
    connection.endheaders()
    response = connection.getresponse()
    assert (response.status, json.loads(response.read())) == (status, {"error": message})
    connection.close()


def test_unknown_pages_answer_404_in_json(shapes):
    assert request(shapes[0], "/nothing")[0] == 404
    assert request(shapes[0], "/nothing", {"scenes": []})[0] == 404


def test_concurrent_requests_take_turns_on_the_one_model(shapes, monkeypatch):
    spans, generate = [], sampler.generate

    def slow(*args, **kwargs):
        start = time.perf_counter()
        time.sleep(0.3)  # long enough that two unlocked calls would overlap
        images = generate(*args, **kwargs)
        spans.append((start, time.perf_counter()))
        return images
    monkeypatch.setattr(sampler, "generate", slow)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(request(shapes[0], "/generate", layout(RED_CIRCLE, steps=1))))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [status for status, _ in answers] == [200] * 3
    spans.sort()
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))


def test_free_text_phrases_generate_without_checker_or_true_render(free_text):
    status, answer = request(free_text, "/generate", {"scenes": [{"id": "d", "caption": "a dog on a sofa",
                             "instances": [{"phrase": "a dog", "box": [0.2, 0.2, 0.6, 0.7]}]}], "steps": 2})
    assert status == 200, answer
    assert answer["closed"] is False and answer["truth"] is None and "not the ShapeScenes one" in answer["truth_error"]
    (sample,) = answer["samples"]
    assert decode(sample["image"]).shape == (32, 32, 3) and sample["instances"][0]["checker"] is None
    assert 0 <= sample["instances"][0]["found"]["confidence"] <= 1
    status, answer = request(free_text, "/generate", layout(RED_CIRCLE))  # ShapeScenes words it never learnt
    assert status == 400 and answer["error"].startswith("scene s1: instances[0].phrase: unknown word")


def test_a_phrase_of_known_words_without_one_shape_has_no_true_render_but_images(shapes):
    status, answer = request(shapes[0], "/generate", layout(dict(RED_CIRCLE, phrase="red"), steps=1))
    assert status == 200 and answer["truth"] is None
    assert answer["truth_error"] == "no true render: scene s1: instances[0].phrase: names no single color and shape ('red')"
    assert answer["samples"][0]["instances"][0]["checker"]["success"] is False


def test_the_studio_listens_on_this_machine_only_by_default():
    args = studio.parse_args(["--ckpt", "x"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)

# -----------------------------------------------------------------------------
# the page in a browser


def browser_missing():
    """Why the browser test cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1600,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(tmp_path / "chromium", ignore_errors=True)


def drag(driver, canvas, start, end):
    """A mouse drag on the canvas between two points given in layout coordinates."""
    from selenium.webdriver.common.action_chains import ActionChains
    size = canvas.size["width"]
    at = lambda p: (round(p[0] * size - size / 2), round(p[1] * size - size / 2))  # offsets from the centre
    (x0, y0), (x1, y1) = at(start), at(end)
    ActionChains(driver).move_to_element_with_offset(canvas, x0, y0).click_and_hold() \
        .move_by_offset((x1 - x0) // 2, (y1 - y0) // 2).move_by_offset(x1 - x0 - (x1 - x0) // 2, y1 - y0 - (y1 - y0) // 2) \
        .release().perform()


def page_layout(driver):
    """The layout document as the page's textarea holds it (what download writes)."""
    return json.loads(driver.find_element("id", "layout").get_attribute("value"))


@pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))
def test_the_page_draws_boxes_with_the_mouse_and_shows_generated_images_and_verdicts(shapes, browser, tmp_path):
    from selenium.webdriver.support.ui import Select, WebDriverWait
    ckpt = os.environ.get("STUDIO_CKPT")  # the screenshot of docs/studio.md shows a trained checkpoint
    server, url = serve(ckpt) if ckpt else (None, shapes[0])
    wait = WebDriverWait(browser, 300)
    try:
        browser.get(url + "/")
        wait.until(lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "true")
        canvas = browser.find_element("id", "canvas")
        drag(browser, canvas, (0.10, 0.15), (0.42, 0.50))
        drag(browser, canvas, (0.55, 0.50), (0.90, 0.85))
        drag(browser, canvas, (0.60, 0.05), (0.61, 0.06))  # a click: no box
        boxes = [inst["box"] for inst in page_layout(browser)["scenes"][0]["instances"]]
        assert len(boxes) == 2
        assert boxes[0] == pytest.approx([0.10, 0.15, 0.42, 0.50], abs=0.01)
        assert boxes[1] == pytest.approx([0.55, 0.50, 0.90, 0.85], abs=0.01)
        drag(browser, canvas, (0.70, 0.70), (0.60, 0.40))  # move the second box up and left by (0.10, 0.30)
        drag(browser, canvas, (0.79, 0.54), (0.85, 0.60))  # its resize handle (bottom right corner) out by 0.06
        assert page_layout(browser)["scenes"][0]["instances"][1]["box"] == pytest.approx([0.45, 0.20, 0.85, 0.60], abs=0.015)
        Select(browser.find_elements("css selector", "select.shape")[0]).select_by_visible_text("circle")
        Select(browser.find_elements("css selector", "select.color")[1]).select_by_visible_text("blue")
        drag(browser, canvas, (0.1, 0.7), (0.3, 0.95))  # a third box, then its ✕
        browser.find_elements("css selector", "button.delete")[2].click()
        document = page_layout(browser)
        assert [inst["phrase"] for inst in document["scenes"][0]["instances"]] == ["red circle", "blue circle"]
        assert "caption" not in document["scenes"][0]  # built by read_layouts, shown once the server checked it
        wait.until(lambda d: d.find_element("id", "caption").get_attribute("value").startswith("a red circle and a blue"))
        assert browser.execute_script("return window.studio.layoutDocument()") == document

        browser.find_element("id", "generate").click()
        wait.until(lambda d: d.find_elements("css selector", "#results .sample"))
        images = browser.find_elements("css selector", "#results img.result")
        assert len(images) == 3  # the true render, the generated image with the asked boxes, with the found boxes
        rows = browser.find_elements("css selector", "#results table.verdicts tbody tr")
        assert [row.find_elements("tag name", "td")[1].text for row in rows] == ["red circle", "blue circle"]
        assert all(row.find_elements("tag name", "td")[5].text in ("pass", "fail") for row in rows)
        assert browser.find_element("id", "message").text == ""

        browser.find_element("id", "generate4").click()
        wait.until(lambda d: len(d.find_elements("css selector", "#results .sample")) == 4)
        titles = [e.text for e in browser.find_elements("css selector", "#results .sample h3")]
        assert [t.split(" ·")[0] for t in titles] == ["seed 0", "seed 1", "seed 2", "seed 3"]
        assert len(browser.find_elements("css selector", "#results img.result")) == 1 + 4 * 2
        if os.environ.get("STUDIO_SCREENSHOT"):
            browser.save_screenshot(os.path.join(ROOT, os.environ["STUDIO_SCREENSHOT"]))
        print(f"Generate, 4 seeds: {browser.execute_script('return window.studio.state.lastGenerateMs'):.0f} ms")

        browser.find_element("id", "steps").clear()
        browser.find_element("id", "steps").send_keys("0")
        browser.find_element("id", "generate").click()
        wait.until(lambda d: d.find_element("id", "message").text)
        assert browser.find_element("id", "message").text == "steps: must be an integer >= 1, got '0'"

        uploaded = {"scenes": [{"id": "a", "caption": "a green cross", "instances": [
            {"phrase": "a small green cross in the top left", "box": [0.05, 0.05, 0.25, 0.25]}]},
            {"id": "b", "instances": [RED_CIRCLE, BLUE_SQUARE]}]}
        (tmp_path / "two.json").write_text(json.dumps(uploaded))
        browser.find_element("id", "upload").send_keys(str(tmp_path / "two.json"))
        wait.until(lambda d: len(d.find_elements("css selector", "#scene-pick option")) == 2)
        assert page_layout(browser) == uploaded  # what download writes: the file as it came in
        assert browser.find_element("css selector", ".original").text == "a small green cross in the top left"
        (tmp_path / "bad.json").write_text(json.dumps(layout(dict(RED_CIRCLE, box=[0.5, 0.1, 0.3, 0.4]))))
        browser.find_element("id", "upload").send_keys(str(tmp_path / "bad.json"))
        wait.until(lambda d: d.find_element("id", "message").text.startswith("bad.json"))
        assert browser.find_element("id", "message").text == "bad.json: scene s1: instances[0].box: x0 >= x1 (0.5 >= 0.3)"
        assert len(browser.find_elements("css selector", "#scene-pick option")) == 2  # the refused file changed nothing
    finally:
        if server:
            server.shutdown()
            server.server_close()
