"""Cycle RL: the SDE step and its log-probability, the SDE sampler, the closed-form KL, the layout
reward and the advantages (sampler.py, rewards.py), and train_cycle_rl.py run as a user runs it."""

import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import rewards
import sampler
from model import EchoGen, ModelConfig
from test_model import random_batch  # the same conditions; random_batch reads only fields this TINY shares

TINY = ModelConfig(res=16, patch=4, dim=32, depth=2, heads=2, text_depth=1, vocab_size=20,
                   max_caption_len=10, max_phrase_len=4, max_instances=3, ground_depth=1)


def tiny_model(seed=0):
    """A tiny EchoGen whose zero-initialized layers got some weight, so its velocity is not 0."""
    torch.manual_seed(seed)
    model = EchoGen(TINY).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


# -----------------------------------------------------------------------------
# the step


@pytest.mark.parametrize("t, t_next", [(1.0, 0.9), (0.5, 0.45), (0.05, 0.0)])
def test_step_log_prob_is_the_normal_log_prob_of_its_mean_and_std(t, t_next):
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    step = sampler.sde_step_with_logprob(v, x, t, t_next, noise_level=0.7, generator=g)
    expected = torch.distributions.Normal(step.mean, step.std.expand_as(step.mean)).log_prob(step.sample)
    torch.testing.assert_close(step.log_prob, expected.flatten(1).mean(1))
    assert step.sample.dtype == step.log_prob.dtype == torch.float32
    # scoring a given sample returns that sample and the same figure
    again = sampler.sde_step_with_logprob(v, x, t, t_next, noise_level=0.7, prev_sample=step.sample)
    assert torch.equal(again.log_prob, step.log_prob) and torch.equal(again.sample, step.sample)
    assert torch.isfinite(step.std).all() and (step.std > 0).all()


def test_step_is_float32_under_bfloat16_inputs_and_autocast():
    x, v = torch.randn(2, 3, 4, 4).bfloat16(), torch.randn(2, 3, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step = sampler.sde_step_with_logprob(v, x, 0.6, 0.5, noise_level=0.5)
    assert step.sample.dtype == step.mean.dtype == step.log_prob.dtype == torch.float32


def test_a_zero_is_the_euler_step_and_the_euler_sampler():
    x, v = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    times = sampler.timestep_schedule(10, 3.0).tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        step = sampler.sde_step_with_logprob(v, x, t, t_next, noise_level=0.0)
        assert torch.equal(step.sample, x + (t_next - t) * v) and step.log_prob is None
    model, batch = tiny_model(), random_batch()
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    for cfg_scale in (1.0, 2.5):
        ode = sampler.sample(model, batch, noise, steps=6, cfg_scale=cfg_scale, shift=2.0)
        sde = sampler.sample_sde(model, batch, noise, steps=6, cfg_scale=cfg_scale, shift=2.0, noise_level=0.0)
        assert torch.equal(ode, sde["x0"]) and sde["log_prob"].numel() == 0


def gaussian_velocity(m, S):
    """The exact rectified-flow velocity of data N(m, S): with x_t = (1 - t) x0 + t eps, (x_t, eps - x0)
    is jointly Gaussian, so v(x, t) = E[eps - x0 | x_t = x] = -m + (t I - (1 - t) S) C_t^-1 (x - (1 - t) m),
    C_t = (1 - t)^2 S + t^2 I."""
    eye = torch.eye(len(m), dtype=torch.float64)

    def v(x, t):
        C = (1 - t) ** 2 * S + t ** 2 * eye
        gain = (t * eye - (1 - t) * S) @ torch.linalg.inv(C)
        return -m + (x.double() - (1 - t) * m) @ gain.T

    return v


@pytest.mark.parametrize("noise_level, sde_window", [(0.7, None), (1.0, (0, 100))])
def test_sde_samples_of_gaussian_data_have_the_target_mean_and_covariance(noise_level, sde_window):
    m = torch.tensor([1.0, -0.5], dtype=torch.float64)
    S = torch.tensor([[0.5, 0.2], [0.2, 0.3]], dtype=torch.float64)
    velocity = gaussian_velocity(m, S)
    n, steps = 40000, 200
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g)
    stochastic = set(sampler.stochastic_steps(steps, sde_window))
    times = sampler.timestep_schedule(steps, 1.0).tolist()
    for i, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        x = sampler.sde_step_with_logprob(velocity(x, t).float(), x, t, t_next, noise_level if i in stochastic else 0.0,
                                          generator=g).sample
    x = x.double()
    mean, cov = x.mean(0), torch.cov(x.T)
    # sampling error: the mean's std is sqrt(S_ii / n) ~ 0.004; the covariance's ~ 0.004 too
    torch.testing.assert_close(mean, m, atol=0.02, rtol=0)
    torch.testing.assert_close(cov, S, atol=0.025, rtol=0)


def test_sde_is_stochastic_and_records_only_its_window():
    model, batch = tiny_model(), random_batch()
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    runs = [sampler.sample_sde(model, batch, noise, steps=6, cfg_scale=2.0, shift=1.0, noise_level=0.7,
                               generator=torch.Generator().manual_seed(s), sde_window=(1, 4)) for s in (0, 0, 1)]
    assert torch.equal(runs[0]["x0"], runs[1]["x0"]) and not torch.equal(runs[0]["x0"], runs[2]["x0"])
    trajectory = runs[0]
    assert trajectory["step"].tolist() == [1, 2, 3]
    assert trajectory["x_t"].shape == trajectory["x_next"].shape == (3, 2, 3, 16, 16)
    assert trajectory["log_prob"].shape == (3, 2)
    assert torch.equal(trajectory["x_t"][1:], trajectory["x_next"][:-1])  # a chain of stored transitions
    with pytest.raises(ValueError):
        sampler.stochastic_steps(6, (4, 7))


def policy_log_probs(model, batch, trajectory, cfg_scale, noise_level):
    """Re-score every stored transition of a trajectory under the model's current parameters."""
    return [sampler.policy_step(model, batch, x_t, float(t), float(t_next), cfg_scale, noise_level, prev_sample=x_next)
            for x_t, x_next, t, t_next in zip(trajectory["x_t"], trajectory["x_next"], trajectory["t"],
                                               trajectory["t_next"])]


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_ratio_is_exactly_one_before_an_update(cfg_scale):
    model, batch = tiny_model(), random_batch()
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    # train mode for both, as the trainer does: in eval mode under no_grad nn.TransformerEncoder takes
    # a fused fast path that rounds differently from the path with gradients (~6e-8 in the log-prob)
    model.train()
    trajectory = sampler.sample_sde(model, batch, noise, steps=5, cfg_scale=cfg_scale, shift=3.0, noise_level=0.7,
                                    generator=torch.Generator().manual_seed(0))
    steps = policy_log_probs(model, batch, trajectory, cfg_scale, 0.7)
    log_probs = torch.stack([s.log_prob for s in steps])
    assert log_probs.requires_grad
    assert torch.equal(log_probs.detach(), trajectory["log_prob"])
    assert torch.equal(torch.exp(log_probs - trajectory["log_prob"]).detach(), torch.ones(5, 2))


def test_kl_is_zero_against_itself_and_positive_after_an_update():
    model, batch = tiny_model().train(), random_batch()
    reference = copy.deepcopy(model).requires_grad_(False)  # in train mode too: see the test above
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    trajectory = sampler.sample_sde(model, batch, noise, steps=4, cfg_scale=2.0, shift=1.0, noise_level=0.7,
                                    generator=torch.Generator().manual_seed(0))

    def kl():
        ours, ref = (policy_log_probs(m, batch, trajectory, 2.0, 0.7) for m in (model, reference))
        return torch.stack([sampler.gaussian_step_kl(o.mean, r.mean, o.std) for o, r in zip(ours, ref)])

    assert torch.equal(kl(), torch.zeros(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = policy_log_probs(model, batch, trajectory, 2.0, 0.7)
    (-torch.stack([s.log_prob for s in steps]).mean()).backward()
    optimizer.step()
    after = kl()
    assert (after > 0).all() and torch.isfinite(after).all()
    # the closed form is the KL of the two Gaussians, reduced as the log-probability (mean over dimensions)
    step, ref = policy_log_probs(model, batch, trajectory, 2.0, 0.7)[0], policy_log_probs(reference, batch,
                                                                                           trajectory, 2.0, 0.7)[0]
    std = step.std.expand_as(step.mean)
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(step.mean, std),
                                              torch.distributions.Normal(ref.mean, std)).flatten(1).mean(1)
    torch.testing.assert_close(after[0], exact.detach())


# -----------------------------------------------------------------------------
# rewards and advantages


def layout(boxes, phrases, n_slots=4):
    """A batch of one layout: boxes xyxy per instance, phrases as word-id tuples."""
    target = torch.zeros(1, n_slots, 4)
    phrase_ids = torch.zeros(1, n_slots, 3, dtype=torch.long)
    mask = torch.zeros(1, n_slots, dtype=torch.bool)
    for j, (box, phrase) in enumerate(zip(boxes, phrases)):
        target[0, j], phrase_ids[0, j, :len(phrase)], mask[0, j] = torch.tensor(box), torch.tensor(phrase), True
    return target, phrase_ids, mask


BOXES = [[0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.9, 0.8], [0.5, 0.1, 0.7, 0.4]]
PHRASES = [(3, 4), (3, 4), (5, 6)]  # two "red circle"s and one other phrase


def test_reward_is_two_for_perfect_boxes_with_full_confidence():
    target, phrase_ids, mask = layout(BOXES, PHRASES)
    out = rewards.score_layouts(target.clone(), torch.ones(1, 4), target, phrase_ids, mask)
    torch.testing.assert_close(out["reward"], torch.tensor([2.0]))
    assert torch.isfinite(out["reward"]).all()  # the empty slot's 0 / 0 IoU does not leak
    half = rewards.score_layouts(target.clone(), torch.full((1, 4), 0.5), target, phrase_ids, mask)
    torch.testing.assert_close(half["reward"], torch.tensor([1.5]))


def test_reward_is_invariant_to_swapping_two_same_phrase_predictions():
    target, phrase_ids, mask = layout(BOXES, PHRASES)
    pred = target.clone() + 0.02 * torch.tensor([[1, 0, 1, 0], [0, -1, 0, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    scores = torch.tensor([[0.9, 0.4, 0.7, 0.0]])
    base = rewards.score_layouts(pred, scores, target, phrase_ids, mask)["reward"]
    swapped = pred[:, [1, 0, 2, 3]], scores[:, [1, 0, 2, 3]]
    torch.testing.assert_close(rewards.score_layouts(*swapped, target, phrase_ids, mask)["reward"], base)
    # swapping predictions of DIFFERENT phrases is a mistake, and costs reward
    other = pred[:, [2, 1, 0, 3]], scores[:, [2, 1, 0, 3]]
    assert rewards.score_layouts(*other, target, phrase_ids, mask)["reward"] < base - 0.3


def test_layout_reward_runs_any_grounder_on_generated_images():
    target, phrase_ids, mask = layout(BOXES, PHRASES)
    batch = {"boxes": target, "phrase_ids": phrase_ids, "instance_mask": mask,
             "caption_ids": torch.ones(1, 5, dtype=torch.long)}
    seen = {}

    def grounder(b):  # a perfect grounder, which checks what it is given
        seen["images"] = b["images"]
        return b["boxes"].clone(), torch.ones_like(b["instance_mask"], dtype=torch.float32)

    out = rewards.layout_reward(grounder, torch.full((1, 3, 8, 8), 3.0), batch)
    torch.testing.assert_close(out["reward"], torch.tensor([2.0]))
    assert seen["images"].max() == 1.0  # clamped to the image range


def test_group_advantages_have_zero_mean_and_unit_std_per_group():
    rewards_ = torch.tensor([0.1, 0.5, 0.9, 1.3, 2.0, 0.0, 1.0, 1.0, 0.7, 0.7, 0.7, 0.7])
    advantages = rewards.group_advantages(rewards_, group_size=4, eps=1e-8, clip=0)
    grouped = advantages.view(3, 4)
    torch.testing.assert_close(grouped[:2].mean(1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(grouped[:2].std(1, unbiased=False), torch.ones(2))
    assert torch.equal(grouped[2], torch.zeros(4))  # equal rewards: no signal, exactly 0
    assert rewards.group_advantages(torch.tensor([0.0, 0.0, 0.0, 10.0]), 4, clip=1.0).abs().max() == 1.0


def test_critic_advantage_is_reward_minus_value_and_the_critic_runs():
    r, values = torch.tensor([1.0, 0.5]), torch.tensor([[0.25, 0.5], [1.0, 0.0]], requires_grad=True)
    advantages = rewards.critic_advantages(r, values, normalize=False)
    assert torch.equal(advantages, torch.tensor([[0.75, 0.0], [0.0, 0.5]])) and not advantages.requires_grad
    critic = rewards.ValueCritic(channels=3, max_instances=4)
    assert critic(torch.randn(2, 3, 16, 16), torch.rand(2), torch.rand(2, 4, 4), torch.ones(2, 4, dtype=torch.bool)).shape == (2,)


def test_clipped_objective_and_its_statistics():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.05]))
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, stats = rewards.clipped_policy_loss(new, old, advantages, clip_range=0.2)
    torch.testing.assert_close(loss, torch.tensor([-1.0, -1.2, 0.8, 1.05]))
    assert stats["clip_frac"] == 0.5
    assert math.isclose(stats["approx_kl"], float((0.5 * new ** 2).mean()), rel_tol=1e-6)


def test_agreement_counts_tied_groups_and_correlates_within_groups():
    # group 0 ties, group 1's reward ranks its images as the checker does, group 2's ranks them backwards
    reward = torch.tensor([1.0, 1.0, 0.2, 0.8, 0.8, 0.2])
    checker = torch.tensor([0.5, 0.5, 0.0, 1.0, 0.0, 1.0])
    stats = rewards.agreement(reward, checker, group_size=2)
    assert stats["tie_groups"] == pytest.approx(1 / 3)
    assert stats["sample_isr"] == pytest.approx(0.5)
    assert stats["reward_checker_corr_in_group"] == pytest.approx(0.0, abs=1e-6)  # +1 and -1 in equal measure
    assert rewards.agreement(reward[:4], checker[:4], 2)["reward_checker_corr_in_group"] == pytest.approx(1.0)
    assert rewards.agreement(reward[:2], checker[:2], 2)["reward_checker_corr"] is None  # nothing varies


def test_brightness_reward_reads_inside_the_boxes():
    images = -torch.ones(1, 3, 8, 8)
    images[:, :, :4, :4] = 1.0  # the top-left quarter is white
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0, 0, 0, 0]]])
    per_instance = rewards.brightness_reward(images, boxes)
    torch.testing.assert_close(per_instance[:, :2], torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(rewards.instance_mean(per_instance, torch.tensor([[True, True, False]])),
                               torch.tensor([0.5]))


def test_instance_advantages_compare_each_object_with_itself_in_the_group_and_stay_in_its_box():
    # 2 layouts x G = 2 samples, 3 slots: layout 0 asks 2 objects, each passing in one sample; layout 1 asks 3,
    # its first two passing in sample 0 only, its third tied (failed in both)
    passed = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, False], [True, True, True], [True, True, True]])
    advantages = rewards.instance_advantages(passed, mask, group_size=2, eps=1e-6)
    torch.testing.assert_close(advantages, torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0],
                                                         [1.0, 1.0, 0.0], [-1.0, -1.0, 0.0]]), atol=1e-5, rtol=0)
    # layout 0's image-level advantages tie (both samples pass half): only the instance credit sees it
    assert rewards.group_advantages(rewards.instance_mean(passed, mask), 2)[:2].abs().sum() == 0
    # the map: each box's pixels carry its instance's advantage, two boxes' shared pixels their mean, the rest 0
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75], [0.0, 0.75, 0.25, 1.0]]).expand(4, 3, 4)
    weight = rewards.instance_weight_map(advantages, boxes, mask, 4)[:, 0]  # (B, R, R)
    torch.testing.assert_close(weight[0, [0, 2, 1, 3], [0, 2, 1, 3]], torch.tensor([1.0, -1.0, 0.0, 0.0]), atol=1e-5,
                               rtol=0)  # box 0 only, box 1 only, both ((1 - 1) / 2), none
    assert weight[2, 3, 0] == 0.0  # the box of a tied instance


# -----------------------------------------------------------------------------
# train_cycle_rl.py as a user runs it: subprocesses on a micro config, from a micro PMTP checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO_PRETRAIN = ["--res=32", "--patch=8", "--dim=32", "--depth=2", "--heads=2", "--text_depth=1", "--max_instances=4",
                  "--cache_scenes=64", "--val_scenes=0", "--warmup_steps=1", "--ckpt_interval=0", "--max_steps=2",
                  "--batch_size=4"]
MICRO_RL = ["--val_scenes=0", "--layouts_per_update=2", "--group_size=4", "--sample_steps=4", "--reward_refresh=2",
            "--ckpt_interval=2", "--probe_scenes=4"]


def run(args, nproc=1):
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    result = subprocess.run([*launcher, *args], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def pmtp_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rl")
    run(["train_pretrain.py", *MICRO_PRETRAIN, f"--data_dir={tmp / 'data'}", f"--out_dir={tmp / 'pmtp'}"])
    return tmp / "pmtp" / "ckpt"


def read_log(out):
    with open(out / "log.jsonl") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in map(json.loads, f)]


def update_records(log):
    """The log's records of updates (the probe before the first update has its own record at step 0)."""
    return [r for r in log if "reward" in r]


def cycle_rl(ckpt, out, *extra, nproc=1):
    run(["train_cycle_rl.py", f"--init_from={ckpt}", f"--out_dir={out}", *MICRO_RL, *extra], nproc)
    return read_log(out)


def cycle_rl_side_by_side(ckpt, runs):
    """Several cycle_rl runs at once, {out: extra args}, each one process of one thread (so each computes
    what it computes alone): on two cores two runs take the time of one."""
    procs = {out: subprocess.Popen([sys.executable, "train_cycle_rl.py", f"--init_from={ckpt}", f"--out_dir={out}",
                                    *MICRO_RL, *extra], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for out, extra in runs.items()}
    for out, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
    return {out: read_log(out) for out in runs}


@pytest.mark.parametrize("algo", ["grpo", "awm"])
def test_updates_raise_an_analytic_reward(pmtp_ckpt, tmp_path, algo):
    """The sanity ladder's first rung (docs/cycle_rl.md): mean brightness inside the boxes must rise, on
    the update's own samples and on the fixed probe; the same layouts and noise with lr = 0 are the
    control, whose probe must not move at all. 64 samples per update: with 16 the gradient estimate was
    too noisy for the reward to rise reliably in 15 updates."""
    common = [f"--algo={algo}", "--reward_kind=brightness", "--ground_generated=False", "--layouts_per_update=8",
              "--group_size=8",
              "--kl_weight=0", "--max_steps=15", "--ckpt_interval=0", "--warmup_steps=0", "--train_steps=all",
              "--sde_window_end=0"]
    lrs = (0.0, 3e-3)
    logs = cycle_rl_side_by_side(pmtp_ckpt, {tmp_path / f"lr{lr}": [*common, f"--lr={lr}", f"--min_lr={lr}"] for lr in lrs})
    updates = {lr: update_records(logs[tmp_path / f"lr{lr}"]) for lr in lrs}
    curves = {lr: np.array([r["reward"] for r in updates[lr]]) for lr in lrs}
    probes = {lr: np.array([r["probe_reward"] for r in logs[tmp_path / f"lr{lr}"]]) for lr in lrs}
    # one minibatch per update: the policy is scored exactly as it sampled, so the ratio is 1
    assert all(r["ratio_error"] == 0.0 and r.get("approx_kl", 0.0) == 0.0 for log in updates.values() for r in log)
    assert len(curves[0.0]) == 15 and len(probes[0.0]) == 16  # the probe before the first update too
    np.testing.assert_allclose(curves[0.0][0], curves[3e-3][0], rtol=1e-6)  # the same start
    assert np.all(probes[0.0] == probes[0.0][0]) and probes[3e-3][0] == probes[0.0][0]
    gain = curves[3e-3][-5:].mean() - curves[0.0][-5:].mean()
    assert gain > 0.03, (curves, gain)
    assert probes[3e-3][-1] > probes[0.0][-1] + 0.03, probes


def test_accumulated_forward_passes_make_the_update_of_one_pass(pmtp_ckpt, tmp_path):
    """256 samples an optimizer step need the gradient accumulated over forward passes: 4 passes of 4
    samples must step as 1 pass of 16 (the mean over every sample, tied groups included)."""
    extra = ["--max_steps=1", "--ckpt_interval=0", "--ground_generated=False", "--lr=1e-3", "--warmup_steps=0",
             "--sde_window_end=0"]
    logs = cycle_rl_side_by_side(pmtp_ckpt, {tmp_path / f"batch{b}": [*extra, f"--sample_batch={b}"] for b in (4, 8)})
    one, four = (logs[tmp_path / f"batch{b}"][-1] for b in (8, 4))
    assert one["updated"] == four["updated"] == 1 and one["ratio_error"] == four["ratio_error"] == 0.0
    # the gradient's scale, which Adam's step would hide, and then its direction: Adam moves a weight by ~lr = 1e-3,
    # weights whose exact gradient is ~0 by normalized float noise (as in the DDP test below)
    np.testing.assert_allclose(four["grad_norm"], one["grad_norm"], rtol=1e-4)
    a, b = (load_file(str(tmp_path / f"batch{b}" / "ckpt" / "model.safetensors")) for b in (4, 8))
    for key, value in a.items():
        np.testing.assert_allclose(b[key], value, atol=2e-5, err_msg=key)


def test_the_policy_starts_from_the_init_ema_and_takes_no_step_without_signal(pmtp_ckpt, tmp_path):
    """The micro model's images pass no instance of the checker: with the checker as the reward every
    group ties, so no update may move a weight (Adam's momentum included), and the policy, its EMA and
    the figures of update 0 are the init checkpoint's EMA weights."""
    log = cycle_rl(pmtp_ckpt, tmp_path / "tied", "--reward_kind=checker", "--ground_generated=False", "--lr=1e-2",
                   "--warmup_steps=0", "--max_steps=2")
    updates = update_records(log)
    assert all(r["tie_groups"] == 1.0 and r["updated"] == 0 for r in updates) and len(updates) == 2
    init = load_file(str(pmtp_ckpt / "ema.safetensors"))
    assert any(not np.array_equal(value, load_file(str(pmtp_ckpt / "model.safetensors"))[key])
               for key, value in init.items())  # the init checkpoint's EMA is not its raw weights
    for which in ("model", "ema"):
        saved = load_file(str(tmp_path / "tied" / "ckpt" / f"{which}.safetensors"))
        for key, value in init.items():
            assert np.array_equal(saved[key], value), (which, key)


@pytest.mark.parametrize("algo", ["grpo", "ppo", "awm"])
def test_resumed_run_equals_uninterrupted_run(pmtp_ckpt, tmp_path, algo):
    # the micro model's images score 0.14 to 0.22: a threshold below that lets the cycle's gift run
    extra = [f"--algo={algo}", "--ground_threshold=0.1", "--train_steps=random", "--same_noise=True", "--ground_negatives=2"]
    whole = cycle_rl_side_by_side(pmtp_ckpt, {tmp_path / "whole": [*extra, "--max_steps=4"],
                                              tmp_path / "parts": [*extra, "--max_steps=2"]})[tmp_path / "whole"]
    parts = cycle_rl(pmtp_ckpt, tmp_path / "parts", *extra, "--max_steps=4", "--init_from=resume")
    assert parts == whole and len(update_records(whole)) == 4 and "probe_isr" in whole[0]
    whole = update_records(whole)
    assert all(k in whole[0] for k in ("reward", "reward_std_in_group", "kl", "tie_groups", "sample_isr",
                                       "reward_checker_corr", "reward_checker_corr_in_group", "grad_norm", "probe_isr",
                                       "probe_reward", *(("flow_loss",) if algo == "awm" else ("clip_frac", "approx_kl"))))
    assert all(r["ratio_error"] == 0.0 for r in whole)  # each update's first minibatch scores as it sampled
    assert any(r["ground_images"] > 0 for r in whole)  # the cycle's gift to grounding ran
    for which in ("model", "ema"):
        a, b = (load_file(str(tmp_path / run_ / "ckpt" / f"{which}.safetensors")) for run_ in ("whole", "parts"))
        for key, value in a.items():
            assert np.array_equal(value, b[key]), (which, key)


@pytest.mark.parametrize("algo", ["grpo", "ppo", "awm"])
def test_two_process_ddp_equals_one_process_with_the_same_layouts(pmtp_ckpt, tmp_path, algo):
    """Each rank its own layouts: 2 ranks x 1 layout must make the update of 1 rank x 2 layouts
    (the same layouts, initial and SDE noise per sample, rows counted over all ranks, the gift's
    boxes too). One minibatch: with more, a rank's minibatch is not the single process's."""
    # every step stochastic: with the default window (3 of the 4 steps) one weight of 4096, whose exact gradient is
    # ~0, moved 2.2e-5 apart, over the float-noise tolerance below
    extra = [f"--algo={algo}", "--minibatches=1", "--ground_threshold=0.1", "--max_steps=2", "--ckpt_interval=2",
             "--lr=1e-4", "--warmup_steps=0", "--sde_window_end=0"]
    one = update_records(cycle_rl(pmtp_ckpt, tmp_path / "one", *extra, "--layouts_per_update=2"))
    two = update_records(cycle_rl(pmtp_ckpt, tmp_path / "two", *extra, "--layouts_per_update=1", nproc=2))
    assert any(r["ground_images"] > 0 for r in one)  # the cycle's gift ran
    # (not policy_loss: with one minibatch the ratio is 1 and it is -mean(advantage), 0 up to rounding)
    for key in ("reward", "reward_std_in_group", "ground_loss", "ground_images", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=1e-4, atol=1e-7, err_msg=key)
    # the KL to the reference is 0 before the first update and ~2e-7 after it: relative tolerance only
    assert one[0]["kl"] == two[0]["kl"] == 0.0 and one[1]["kl"] > 0
    np.testing.assert_allclose(two[1]["kl"], one[1]["kl"], rtol=1e-4, atol=0, err_msg="kl")
    # Adam moves a weight by ~lr = 1e-4 a step; weights whose exact gradient is 0 move by normalized float noise
    a, b = (load_file(str(tmp_path / run_ / "ckpt" / "model.safetensors")) for run_ in ("one", "two"))
    for key, value in a.items():
        np.testing.assert_allclose(b[key], value, atol=2e-5, err_msg=key)


def test_normalized_critic_advantages_have_zero_mean_and_unit_std():
    advantages = rewards.critic_advantages(torch.tensor([1.0, 0.5, 0.2]), torch.rand(4, 3), eps=1e-8)
    torch.testing.assert_close(advantages.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(advantages.std(unbiased=False), torch.tensor(1.0))


@pytest.mark.parametrize("flag, words", [("--reward_kind=nois", ["reward_kind", "'nois'"]),
                                         ("--init_weights=raw", ["init_weights", "'raw'"]),
                                         ("--sample_batch=3", ["sample_batch 3", "8 samples"]),
                                         ("--algo=rft", ["algo", "'rft'"]),
                                         ("--algo=awm --minibatches=2", ["minibatches 2", "awm"])])
def test_bad_cycle_rl_settings_are_refused_with_one_line_and_nothing_written(pmtp_ckpt, tmp_path, flag, words):
    result = subprocess.run([sys.executable, "train_cycle_rl.py", f"--init_from={pmtp_ckpt}", f"--out_dir={tmp_path / 'rl'}",
                             *MICRO_RL, *flag.split()], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert all(word in result.stderr for word in words), result.stderr
    assert not (tmp_path / "rl").exists()
