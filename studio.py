"""
Layout studio: a local page to draw a layout, generate it with an EchoGen checkpoint and see what came
out (docs/studio.md). Boxes are drawn, moved, resized and deleted on a canvas, each with a phrase (a
color and a shape of the closed ShapeScenes vocabulary, or free text for a checkpoint with another
tokenizer). Generate shows per seed the image with the asked boxes, the same image with the boxes the
model's own grounding head finds (with its confidence) and, on ShapeScenes, the checker's verdict
per instance beside the world's true render. The layout downloads and uploads in the layout file
format of every CLI (README, "The layout file").

    python studio.py --ckpt out/pipeline/pmtp/ckpt [--port 8000] [--host 127.0.0.1] [--device auto]

then open http://127.0.0.1:8000/. The API is JSON over HTTP:
    GET  /vocab      what the page needs: vocabulary, palette, limits, defaults
    POST /validate   a layout document -> its scenes as layouts.parse_layouts reads them (caption built if missing)
    POST /generate   a layout document of one scene + seed, steps, cfg, n_seeds -> PNG data URLs and figures;
                     best_of > 1 or repair > 0: self-verified sampling (sampler.py's), with every candidate
A bad request answers 400 with {"error": one line}: a layout error is the line the CLIs print (the
validation is layouts.parse_layouts, the CLIs' own), a bad number names the field and the value. Nothing is computed for it.
One model is in memory; a lock makes concurrent requests queue for it.
"""

import argparse
import base64
import io
import json
import os
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import torch
from PIL import Image

import detector
import evaluate
import layouts
import runtime
import sampler
import shapescenes
from model import EchoGen

# -----------------------------------------------------------------------------
# config

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "studio.html")
SEED, STEPS, CFG, N_SEEDS = 0, 25, 3.0, 1  # the defaults of a request: sampler.py's
MAX_STEPS = 200  # one request holds the model: a bound keeps a typo from blocking the page for an hour
MAX_SEEDS = 8    # images per request (the page's "4 seeds" asks for 4)
MAX_BODY_BYTES = 1_000_000  # a layout document of the world's largest scenes is a few kB
# the numbers of a /generate request: field -> the CLIs' flag type (which names the allowed values), default, upper bound
REQUEST_FIELDS = {"seed": (runtime.seed_int, SEED, None), "steps": (runtime.positive_int, STEPS, MAX_STEPS),
                  "cfg": (runtime.non_negative_float, CFG, None), "n_seeds": (runtime.positive_int, N_SEEDS, MAX_SEEDS)}
MAX_BEST_OF, MAX_REPAIR = 8, 4  # candidates per seed and repair rounds: n_seeds x best_of images in one pass
# the switch for self-verified sampling (sampler.py --best_of, --repair); at their defaults /generate answers as without them
VERIFY_FIELDS = {"best_of": (runtime.positive_int, 1, MAX_BEST_OF), "repair": (runtime.non_negative_int, 0, MAX_REPAIR)}


class RequestError(ValueError):
    """A request refused before anything is computed; the message is one line naming the field and value."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status

# -----------------------------------------------------------------------------
# reading a request with the CLIs' own checks


def read_number(document, field, fields=REQUEST_FIELDS):
    """A /generate number, checked by the CLI flag type of the same name; refused naming field and value."""
    kind, default, most = fields[field]
    if field not in document:
        return default
    try:
        value = kind(json.dumps(document[field]))  # as JSON text: "5" (a string) and true are no integers
    except argparse.ArgumentTypeError as e:
        raise RequestError(f"{field}: {e}") from None
    if most is not None and value > most:
        raise RequestError(f"{field}: at most {most} here, got {json.dumps(document[field])}")
    return value


def read_generate_request(body, tokenizer, max_instances):
    """(scene, {seed, steps, cfg, n_seeds}, {best_of, repair}) of a /generate body: a layout document of one scene,
    with the numbers beside "scenes"."""
    scenes = layouts.parse_layouts(body, tokenizer, max_instances, where="request")
    document = json.loads(body)  # parse_layouts parsed it already: this cannot fail
    unknown = sorted(set(document) - {"scenes", *REQUEST_FIELDS, *VERIFY_FIELDS})
    if unknown:
        raise RequestError(f"request: unknown field {unknown[0]!r} "
                           f"(known: scenes, {', '.join([*REQUEST_FIELDS, *VERIFY_FIELDS])})")
    if len(scenes) != 1:
        raise RequestError(f"scenes: {len(scenes)} scenes, /generate draws one at a time")
    return (scenes[0], {field: read_number(document, field) for field in REQUEST_FIELDS},
            {field: read_number(document, field, VERIFY_FIELDS) for field in VERIFY_FIELDS})

# -----------------------------------------------------------------------------
# the model and what a request gets from it


def png_data_url(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def layout_scene(scene):
    """A scene as the layout file holds it (read_layouts adds the parsed color and shape)."""
    return {"id": scene["id"], "caption": scene["caption"],
            "instances": [{"phrase": inst["phrase"], "box": inst["box"]} for inst in scene["instances"]]}


class Studio:
    """The one model in memory and what the page asks of it. closed: the checkpoint's tokenizer is the
    ShapeScenes one, so phrases are picked from its vocabulary and the world can render and check."""

    def __init__(self, model, tokenizer, ckpt=""):
        self.model, self.tokenizer, self.ckpt = model, tokenizer, ckpt
        self.res, self.max_instances = model.config.res, model.config.max_instances
        self.closed = tokenizer.get_vocab() == shapescenes.build_tokenizer().get_vocab()
        self.grounder = evaluate.own_grounder(model, tokenizer)  # None for a generation-only model
        self.lock = threading.Lock()  # one generation at a time: the model is shared by every request thread

    def vocab(self):
        return {"closed": self.closed, "colors": shapescenes.COLORS if self.closed else [],
                "shapes": shapescenes.SHAPES if self.closed else [], "palette": shapescenes.PALETTE,
                "max_instances": self.max_instances, "res": self.res, "grounding": self.grounder is not None,
                "ckpt": self.ckpt, "defaults": {field: default for field, (_, default, _) in REQUEST_FIELDS.items()},
                "limits": {"steps": MAX_STEPS, "n_seeds": MAX_SEEDS}}

    def validate(self, body):
        """/validate: every scene of a layout document, as parse_layouts reads it; "caption_built" says the
        caption was missing and is the one parse_layouts built from the phrases."""
        scenes = layouts.parse_layouts(body, self.tokenizer, self.max_instances, where="request")
        raw = json.loads(body)["scenes"]
        return {"scenes": [dict(layout_scene(scene), caption_built="caption" not in sent,
                                parsed=[{"color": inst["color"], "shape": inst["shape"]} for inst in scene["instances"]])
                           for scene, sent in zip(scenes, raw)]}

    def generate(self, body):
        """/generate: n_seeds images of one scene (seeds seed, seed + 1, ...), each as sampler.py writes it."""
        scene, request, verify = read_generate_request(body, self.tokenizer, self.max_instances)
        if verify["best_of"] > 1 or verify["repair"] > 0:
            return self.generate_verified(scene, request, verify)
        seeds = list(range(request["seed"], request["seed"] + request["n_seeds"]))
        started = time.perf_counter()
        with self.lock:
            # initial_noise draws row i from seed + i: row i is exactly the image of `sampler.py --seed seed+i`
            images = sampler.generate(self.model, [scene] * len(seeds), self.tokenizer, request["steps"],
                                      request["cfg"], seed=request["seed"])
            found = self.ground(scene, images)
        seconds = time.perf_counter() - started
        truth, truth_error = self.true_render(scene)
        samples = [self.sample_figures(scene, seed, image, None if found is None else (found[0][i], found[1][i]))
                   for i, (seed, image) in enumerate(zip(seeds, images))]
        return {"scene": layout_scene(scene), **request, "res": self.res, "closed": self.closed,
                "seconds": round(seconds, 3), "truth": truth, "truth_error": truth_error, "samples": samples}

    def generate_verified(self, scene, request, verify):
        """/generate with best_of > 1 or repair > 0: per seed, sampler.py's self-verified sampling (best_of, then
        repair's rounds) with the model's own head as the judge, as `sampler.py --best_of K --repair R` draws it.
        Each sample is the kept image after repair, figured as without the switch, plus every candidate (figured
        alike; candidate k of seed s is drawn from sampler.candidate_seed(s, k)), the candidate kept, and per
        instance the final verdict (sampler.scene_report's) and whether repair redrew its box: "tried", some round
        redrew it; "redrawn", a round that was kept did, so the final image holds the redraw."""
        if self.grounder is None:
            field = "best_of" if verify["best_of"] > 1 else "repair"
            raise RequestError(f"{field}: self-verified sampling needs the model's grounding head, this checkpoint "
                               f"has none, got {verify[field]}")
        K, rounds, seed = verify["best_of"], verify["repair"], request["seed"]
        scenes = [scene] * request["n_seeds"]
        C, R = self.model.config.channels, self.res
        started = time.perf_counter()
        with self.lock:
            _, batch = next(sampler.scene_batches(self.model, scenes, self.tokenizer, len(scenes)))
            noise = lambda noise_seed: sampler.initial_noise(len(scenes), (C, R, R), noise_seed).to(batch["boxes"].device)
            # best_of grounds every candidate once, as its PNG holds it: the images it sees are the candidates
            seen = []
            judge = lambda b: seen.append(b["images"]) or self.grounder(b)
            x, verdict, kept, worst = sampler.best_of(self.model, judge, batch,
                                                      torch.stack([noise(sampler.candidate_seed(seed, k)) for k in range(K)]),
                                                      request["steps"], request["cfg"])
            candidates = sampler.to_uint8(seen[0])  # candidate-major: candidate k of row i is k * n_seeds + i
            # repair's rounds (sampler.repair, kept apart to learn which boxes were redrawn)
            failing = lambda v: sampler.failing_instances(v, batch, sampler.PASS_SCORE)
            tried = torch.zeros_like(batch["instance_mask"])  # (B, N): redrawn by some round
            redrawn = torch.zeros_like(batch["instance_mask"])  # (B, N): redrawn by a round whose image was kept
            repairs_kept = torch.zeros(len(scenes), dtype=torch.long, device=x.device)
            for x, verdict, targeted, better in sampler.repair_rounds(
                    self.model, self.grounder, batch, x, verdict, [noise(sampler.repair_seed(seed, r)) for r in range(rounds)],
                    failing, sampler.REPAIR_T0, request["steps"], request["cfg"]):
                tried |= targeted
                redrawn |= targeted & better[:, None]
                repairs_kept += better
            images = sampler.to_uint8(x)
            found = self.ground(scene, images + candidates)
        seconds = time.perf_counter() - started
        truth, truth_error = self.true_render(scene)
        B, samples = len(scenes), []
        for i, image in enumerate(images):
            figures = lambda row, s, img: self.sample_figures(scene, s, img, (found[0][row], found[1][row]))
            report = sampler.scene_report(scene, verdict, i, sampler.PASS_SCORE)
            for j, inst in enumerate(report["instances"]):
                inst.update(redrawn=bool(redrawn[i, j]), tried=bool(tried[i, j]))
            samples.append(dict(figures(i, seed + i, image), kept=int(kept[i]),
                                candidate_worst=[round(float(w), 4) for w in worst[i]],
                                candidates=[figures(B + k * B + i, sampler.candidate_seed(seed, k) + i, candidates[k * B + i])
                                            for k in range(K)],
                                repairs_kept=int(repairs_kept[i]), worst_score=report["worst_score"],
                                verdict=report["instances"]))
        return {"scene": layout_scene(scene), **request, **verify, "pass_score": sampler.PASS_SCORE, "res": self.res,
                "closed": self.closed, "seconds": round(seconds, 3), "truth": truth, "truth_error": truth_error,
                "samples": samples}

    def ground(self, scene, images):
        """The own head's (boxes (S, N, 4), scores (S, N)) for the scene's phrases in each image; None without a head."""
        if self.grounder is None:
            return None
        g = self.grounder
        return detector.ground_scenes(g, [scene] * len(images), images, g.tokenizer, g.max_instances, g.device)

    def true_render(self, scene):
        """(the world's render with the asked boxes as a data URL, None), or (None, why there is none)."""
        if not self.closed:
            return None, "no true render: the checkpoint's tokenizer is not the ShapeScenes one"
        try:
            return png_data_url(layouts.draw_boxes(shapescenes.render_scene(scene, self.res), scene)), None
        except runtime.LayoutError as e:  # a phrase of known words that names no single color and shape
            return None, f"no true render: {e}"

    def sample_figures(self, scene, seed, image, found):
        """One seed's pictures and per-instance figures: the checker's verdict (ShapeScenes) and the own
        head's box, confidence and IoU with the asked box. found: (boxes (N, 4), scores (N,)) or None."""
        instances = []
        for j, inst in enumerate(scene["instances"]):
            figures = {"phrase": inst["phrase"], "box": inst["box"], "color": inst["color"], "shape": inst["shape"],
                       "checker": shapescenes.check_instance(image, inst) if self.closed else None, "found": None}
            if found is not None:
                box = [round(float(v), 4) for v in found[0][j]]
                figures["found"] = {"box": box, "confidence": round(float(found[1][j]), 4),
                                    "iou": round(float(shapescenes.box_iou(box, inst["box"])), 4)}
            instances.append(figures)
        sample = {"seed": seed, "image": png_data_url(image), "asked": png_data_url(layouts.draw_boxes(image, scene)),
                  "found": None, "instances": instances}
        if found is not None:  # drawn as evaluate.py's grids draw the head's boxes
            sample["found"] = png_data_url(evaluate.draw_found(image, scene, found[0]))
        return sample

# -----------------------------------------------------------------------------
# HTTP


class Handler(BaseHTTPRequestHandler):
    studio = None  # set by make_server
    page = b""
    server_version = "EchoGenStudio/1"

    def do_GET(self):
        route = urlsplit(self.path).path
        if route in ("/", "/studio.html"):
            self.send(200, self.page, "text/html; charset=utf-8")
        elif route == "/vocab":
            self.answer(lambda: self.studio.vocab())
        elif route == "/favicon.ico":  # browsers ask for one: no icon, and no 404 in their console
            self.send(204, b"", "image/x-icon")
        else:
            self.send_json(404, {"error": f"no page {route} here (GET /, GET /vocab, POST /validate, POST /generate)"})

    def do_POST(self):
        route = urlsplit(self.path).path
        work = {"/validate": self.studio.validate, "/generate": self.studio.generate}.get(route)
        if work is None:
            self.send_json(404, {"error": f"no endpoint POST {route} here (POST /validate, POST /generate)"})
        else:
            self.answer(lambda: work(self.read_body()))

    def read_body(self):
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if length < 0:  # a chunked body, or none: reading would wait for a length that never comes
            raise RequestError("request body: no Content-Length (POST a layout document as JSON)", 411)
        if length > MAX_BODY_BYTES:
            raise RequestError(f"request body: {length} bytes, more than {MAX_BODY_BYTES}", 413)
        return self.rfile.read(length)

    def answer(self, work):
        """work() -> a JSON answer with 200; a refused request 4xx with its one line; anything else 500
        with one line, the traceback on the server's stderr only."""
        try:
            self.send_json(200, work())
        except RequestError as e:
            self.send_json(e.status, {"error": str(e)})
        except runtime.LayoutError as e:
            self.send_json(400, {"error": str(e)})
        except Exception as e:
            traceback.print_exc()
            self.send_json(500, {"error": f"internal error ({type(e).__name__}: {runtime.one_line(e)}); "
                                          f"the studio's log has the details"})

    def send_json(self, status, value):
        self.send(status, json.dumps(value).encode(), "application/json")

    def send(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


def make_server(studio, host="127.0.0.1", port=8000, page=PAGE):
    """A threading HTTP server for studio, not yet serving (port 0: a free port, server.server_address[1])."""
    with open(page, "rb") as f:
        handler = type("StudioHandler", (Handler,), {"studio": studio, "page": f.read()})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True  # a stuck client must not keep the process alive at Ctrl-C
    return server


def parse_args(argv):
    parser = runtime.ArgumentParser(description="A local page to draw layouts and generate them with an EchoGen checkpoint.")
    parser.add_argument("--ckpt", required=True, help="EchoGen checkpoint folder (uses its EMA weights and tokenizer)")
    parser.add_argument("--port", type=runtime.non_negative_int, default=8000, help="0 = any free port")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return parser.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    if args.port > 65535:
        runtime.fail(f"argument --port: must be an integer in [0, 65535], got {args.port}")
    if not os.path.isfile(PAGE):
        runtime.fail(f"{PAGE}: the page is missing (studio.html belongs beside studio.py)")
    model, tokenizer, _ = runtime.load_model(args.ckpt, EchoGen, "ema", runtime.resolve_device(args.device))
    studio = Studio(model, tokenizer, args.ckpt)
    try:
        server = make_server(studio, args.host, args.port)
    except OSError as e:
        runtime.fail(f"--host {args.host} --port {args.port}: cannot listen there ({e.strerror})")
    host, port = server.server_address[:2]
    print(f"layout studio for {args.ckpt} ({'ShapeScenes' if studio.closed else 'free text'}) at http://{host}:{port}/")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main(sys.argv[1:])
