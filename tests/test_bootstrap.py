"""evaluate.py's 95% bootstrap intervals: over scenes against the binomial formula, the paired difference
of two arms on the same scenes, the hierarchical one over training seeds and scenes, the per-scene counts
evaluate() keeps and results.json holds, and evaluate.py --compare, refusals included (in-process: fast)."""

import json
import os
import sys

import numpy as np
import pytest
import torch

import data
import evaluate
import layouts
import runtime
import shapescenes
from model import EchoGen, ModelConfig

TOKENIZER = shapescenes.build_tokenizer()
MICRO = ModelConfig(res=32, patch=8, dim=32, depth=2, heads=2, text_depth=1, vocab_size=TOKENIZER.get_vocab_size(),
                    max_caption_len=layouts.MAX_CAPTION_LEN, max_phrase_len=layouts.MAX_PHRASE_LEN, max_instances=8)


def one_instance_scenes(p, n, seed):
    """n scenes of one instance each, each passed with probability p -> (passed, instances)."""
    return (np.random.default_rng(seed).random(n) < p).astype(int), np.ones(n, int)


def width(interval):
    return interval[1] - interval[0]


def test_interval_of_a_binomial_sample_covers_the_truth_with_the_normal_width():
    for p, n in ((0.7, 400), (0.9, 1000)):
        passed, instances = one_instance_scenes(p, n, seed=1)
        low, high = evaluate.bootstrap_interval(passed, instances)
        estimate = passed.mean()
        assert low < p < high and low < estimate < high
        assert width((low, high)) == pytest.approx(2 * 1.96 * np.sqrt(estimate * (1 - estimate) / n), rel=0.15)


def test_interval_weighs_instances_and_is_deterministic_given_its_seed():
    instances = np.array([1, 8] * 50)
    passed = np.array([0, 8] * 50)  # the 8-instance scenes all pass: ISR 8/9, not the scenes' mean 1/2
    low, high = evaluate.bootstrap_interval(passed, instances)
    assert low < 8 / 9 < high and low > 0.75
    rng = np.random.default_rng(0)
    passed, instances = rng.integers(0, 3, 64), np.full(64, 2)
    assert evaluate.bootstrap_interval(passed, instances) == evaluate.bootstrap_interval(passed, instances)
    assert evaluate.bootstrap_interval(passed, instances, seed=1) != evaluate.bootstrap_interval(passed, instances)
    assert (evaluate.difference_interval(np.stack([passed, passed]), passed[None], instances)
            == evaluate.difference_interval(np.stack([passed, passed]), passed[None], instances))


def test_paired_difference_of_identical_arms_is_exactly_zero_and_a_shift_excludes_zero():
    passed, instances = one_instance_scenes(0.7, 200, seed=2)
    assert evaluate.difference_interval(passed, passed, instances) == (0.0, [0.0, 0.0])
    # B loses a fifth of A's passes: 0.14 lower; paired, the scenes both arms pass cancel
    worse = passed * (np.random.default_rng(3).random(200) > 0.2)
    difference, (low, high) = evaluate.difference_interval(passed, worse, instances)
    assert difference == pytest.approx(passed.mean() - worse.mean()) and 0 < low < difference < high
    _, unpaired = evaluate.difference_interval(passed, np.roll(worse, 100), instances)
    assert width(unpaired) > 1.5 * width((low, high))  # pairing is what makes it narrow


def test_hierarchical_interval_widens_when_the_seeds_disagree():
    instances = np.ones(200, int)
    arm = lambda ps: np.stack([one_instance_scenes(p, 200, seed=10 + k)[0] for k, p in enumerate(ps)])
    baseline = arm([0.6, 0.6, 0.6])
    agree, (agree_low, agree_high) = evaluate.difference_interval(arm([0.7, 0.7, 0.7]), baseline, instances)
    disagree, (low, high) = evaluate.difference_interval(arm([0.5, 0.7, 0.9]), baseline, instances)
    assert 0 < agree_low and agree == pytest.approx(disagree, abs=0.04)
    assert high - low > 2 * (agree_high - agree_low) and low < 0 < high  # lucky seeds: no evidence
    # one seed of the disagreeing arm says more than it knows: the scene interval alone is narrow
    _, one_seed = evaluate.difference_interval(arm([0.9]), baseline[:1], instances)
    assert width(one_seed) < (high - low) / 2


def test_evaluate_keeps_per_scene_counts_that_give_its_figures_and_intervals():
    scenes = shapescenes.make_scene_set("crowded", 12, seed=0)
    # half the scenes drawn right, half blank: ISR about one half, with an interval around it
    generator = lambda scenes: [render if i % 2 else np.full_like(render, 255)
                                for i, render in enumerate(data.scene_images(scenes, 32))]
    torch.manual_seed(0)
    metrics = evaluate.evaluate(EchoGen(MICRO).eval(), scenes, TOKENIZER, steps=1, generator=generator)
    counts = metrics["per_scene"]
    assert counts["instances"] == [len(scene["instances"]) for scene in scenes]
    assert sum(counts["isr"]) / sum(counts["instances"]) == pytest.approx(metrics["isr"], abs=1e-4)
    assert sum(counts["acc50"]) / sum(counts["instances"]) == pytest.approx(metrics["grounding"]["acc50"], abs=1e-4)
    assert metrics["isr_ci"][0] < metrics["isr"] < metrics["isr_ci"][1] and 0.3 < metrics["isr"] < 0.7
    assert metrics["isr_ci"] == evaluate.bootstrap_interval(counts["isr"], counts["instances"])
    assert {"acc50_ci"} <= set(metrics["grounding"]) and {"acc50_ci"} <= set(metrics["self_grounding"])
    assert evaluate.shown(metrics, ("isr",)) == f"{metrics['isr']:.3f} [{metrics['isr_ci'][0]:.2f}, " \
                                                f"{metrics['isr_ci'][1]:.2f}]"
    assert f"ISR {evaluate.shown(metrics, ('isr',))}" in evaluate.summary(metrics)
    assert evaluate.shown(metrics, ("color_acc",)) == f"{metrics['color_acc']:.3f}"  # no interval: the figure alone


# --- results.json and evaluate.py --compare


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A micro checkpoint evaluated by evaluate_checkpoint on val and heldout, 3 scenes each, 1 step -> the
    path of its results.json."""
    root = tmp_path_factory.mktemp("evaluated")
    torch.manual_seed(0)
    model = EchoGen(MICRO)
    runtime.save_checkpoint(str(root / "ckpt"), model, model, torch.optim.AdamW(model.parameters()), TOKENIZER, {}, 0)
    evaluate.evaluate_checkpoint(str(root / "ckpt"), ["val", "heldout"], n=3, steps=1, out_dir=str(root / "eval"))
    return str(root / "eval" / "results.json")


def run_main(monkeypatch, capsys, *args):
    """evaluate.py's main() with args -> (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *args])
    try:
        evaluate.main()
        status = 0
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def test_results_json_holds_the_per_scene_counts_one_line_each(evaluated):
    text = open(evaluated).read()
    results = json.loads(text)
    assert list(results["per_scene"]) == ["val", "heldout"]
    for kind, counts in results["per_scene"].items():
        assert set(counts) == {"instances", "isr", "acc50"} and all(len(c) == 3 for c in counts.values())
        assert "per_scene" not in results["sets"][kind] and len(results["sets"][kind]["isr_ci"]) == 2
        assert f'"instances": {json.dumps(counts["instances"])}' in text  # one line, not one number a line
    assert text == evaluate.results_json(results)


def write_seeds(folder, name, isr, acc50, seeds=3, n=120):
    """results.json files of `seeds` training seeds of an arm on the sets val and crowded (n scenes of 1 to 4
    instances, the same for every arm), each instance passed with probability isr and found with acc50
    -> their paths, comma-separated."""
    instances = np.random.default_rng(0).integers(1, 5, n)
    paths = []
    for seed in range(seeds):
        rng = np.random.default_rng([seed, *name.encode()])
        counts = {"instances": instances.tolist(), "isr": rng.binomial(instances, isr).tolist(),
                  "acc50": rng.binomial(instances, acc50).tolist()}
        paths.append(str(folder / f"{name}{seed}.json"))
        evaluate.write_text(paths[-1], evaluate.results_json({"per_scene": {"val": counts, "crowded": counts}}))
    return ",".join(paths)


def test_compare_prints_a_row_per_set_with_the_difference_and_its_interval(tmp_path, monkeypatch, capsys):
    better, worse = write_seeds(tmp_path, "better", 0.8, 0.9), write_seeds(tmp_path, "worse", 0.5, 0.9)
    status, out, err = run_main(monkeypatch, capsys, "--compare", better, "--against", worse)
    assert status == 0 and err == "" and out.startswith("3 seeds of A")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()[4:]]
    assert [row[:2] for row in rows] == [["val", "120"], ["crowded", "120"]]
    for row in rows:
        isr_a, isr_b, acc_a, acc_b = (float(row[i]) for i in (2, 3, 5, 6))
        assert isr_a == pytest.approx(0.8, abs=0.05) and isr_b == pytest.approx(0.5, abs=0.05)
        isr_low, isr_high = (float(v) for v in row[4].split("[")[1].rstrip("]").split(","))
        acc_low, acc_high = (float(v) for v in row[7].split("[")[1].rstrip("]").split(","))
        assert 0 < isr_low < isr_a - isr_b < isr_high  # 0.3 better: the interval excludes 0
        assert acc_a == pytest.approx(acc_b, abs=0.05) and acc_low < 0 < acc_high  # the same Acc@0.5: it holds 0
    status, out, _ = run_main(monkeypatch, capsys, "--compare", better.split(",")[0], "--against", better.split(",")[0])
    assert status == 0 and out.count("+0.000 [+0.000, +0.000]") == 4  # an arm against itself, paired: exactly 0


def refusal_cases(evaluated, tmp):
    """(arguments, what the error line must hold) for each bad input; the files they need, written in tmp."""
    results = json.load(open(evaluated))
    one_set = dict(results, per_scene={"val": results["per_scene"]["val"]})
    more_scenes = json.loads(json.dumps(results))
    more_scenes["per_scene"]["heldout"] = {key: counts + [1] for key, counts in results["per_scene"]["heldout"].items()}
    ragged = json.loads(json.dumps(results))
    ragged["per_scene"]["val"]["isr"] = [1]
    older = {key: value for key, value in results.items() if key != "per_scene"}
    files = {"one_set": one_set, "more_scenes": more_scenes, "ragged": ragged, "older": older}
    for name, document in files.items():
        (tmp / f"{name}.json").write_text(json.dumps(document))
    (tmp / "broken.json").write_text('{"per_scene": ')
    good = evaluated
    return [
        (["--compare", f"{good},{tmp / 'missing.json'}", "--against", good], ["--compare", "missing.json", "no such file"]),
        (["--compare", good, "--against", f"{good},"], ["--against", "''", "no such file"]),
        (["--compare", good, "--against", str(tmp / "one_set.json")], ["--against", "one_set.json", "sets val, but"]),
        (["--compare", good, "--against", str(tmp / "more_scenes.json")],
         ["--against", "more_scenes.json", "'heldout'", "other scenes"]),
        (["--compare", str(tmp / "ragged.json"), "--against", good], ["--compare", "ragged.json", "set 'val'"]),
        (["--compare", good, "--against", str(tmp / "older.json")], ["--against", "older.json", "no per-scene counts"]),
        (["--compare", str(tmp / "broken.json"), "--against", good], ["--compare", "broken.json", "not readable JSON"]),
        (["--compare", good], ["--against: needed beside --compare"]),
        (["--sets", "val"], ["--ckpt: required"]),
    ]


def test_compare_refuses_bad_input_with_one_line_and_writes_nothing(evaluated, tmp_path, monkeypatch, capsys):
    cases = refusal_cases(evaluated, tmp_path)
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(os.path.dirname(evaluated)))
    for args, expected in cases:
        status, out, err = run_main(monkeypatch, capsys, *args)
        assert status == 2 and out == "", (args, out, err)
        assert err.startswith("error: ") and err.count("\n") == 1, (args, err)
        assert all(part in err for part in expected), (args, err)
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(os.path.dirname(evaluated)))) == before
