"""EDF / DATM trajectory matching with CPD and DAE (METHODS.md §5.3-4.7) and its evaluation (4.6)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nrrdd_core import cam as cam_mod
from nrrdd_core.errors import ConfigError, ResourceError
from nrrdd_core.experts import ExpertConfig, ParamLayout, seeded_model, train_experts
from nrrdd_core.methods import edf as edf_mod
from nrrdd_core.methods import make_distiller
from nrrdd_core.methods.edf import EDFConfig, init_from_experts, matching_loss, unroll_student
from nrrdd_core.models import build_model
from nrrdd_core.models.teacher import Teacher

from test_experts import TINY, tiny_bundle

FAST = dict(iterations=4, syn_steps=2, batch_syn=4, current_max_start_epoch=1, max_start_epoch=1,
            expert_epochs=2, lr_img=10.0, dae_interval=1)


@pytest.fixture(scope="module")
def setup():
    bundle = tiny_bundle()
    path = train_experts(ExpertConfig(**TINY), bundle, device="cpu")
    torch.manual_seed(0)
    teacher = Teacher(build_model("convnet_bn", 3, 16, depth=2, width=8), "convnet_bn",
                      bundle.config, "features", {"depth": 2, "width": 8})
    return bundle, teacher, str(path)


def make(setup, seed=0, **over):
    bundle, teacher, path = setup
    return make_distiller("edf", {**FAST, "buffer": path, **over}, teacher=teacher, dataset=bundle,
                          ipc=2, device="cpu", seed=seed)


def run(d, n=None):
    for _ in range(n or d.total_steps):
        d.step()
    return d


def test_alpha_at_least_one_is_rejected():
    with pytest.raises(ConfigError, match="0/0"):
        EDFConfig(cpd_alpha=1.0)
    with pytest.raises(ConfigError):
        matching_loss(torch.zeros(3), torch.ones(3), torch.zeros(3), 1.5)


def test_cpd_drops_floor_alpha_p_smallest_with_zero_gradient():
    g = torch.Generator().manual_seed(0)
    p = 37
    theta_n = torch.randn(p, generator=g, requires_grad=True)
    theta0, target = torch.randn(p, generator=g), torch.randn(p, generator=g)
    alpha = 0.3
    loss, dropped = matching_loss(theta_n, theta0, target, alpha)
    assert dropped == math.floor(alpha * p) == 11
    e = (theta_n.detach() - target) ** 2
    keep = e.argsort()[dropped:]
    ref = e[keep].sum() / ((theta0 - target) ** 2)[keep].sum()
    assert torch.allclose(loss, ref)
    loss.backward()
    gone = e.argsort()[:dropped]
    assert (theta_n.grad[gone] == 0).all() and (theta_n.grad[keep] != 0).all()
    plain, _ = matching_loss(theta_n, theta0, target, 0.0)
    assert torch.equal(plain, ((theta_n - target) ** 2).sum() / ((theta0 - target) ** 2).sum())


def test_one_unrolled_step_is_a_hand_sgd_step():
    net = seeded_model(3, 8, {"depth": 1, "width": 4}, torch.Generator().manual_seed(0))
    layout = ParamLayout(net)
    theta0 = layout.flatten(net)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, 8, 8, generator=g), torch.randn(5, 3, generator=g)
    lr = torch.tensor(0.05)
    theta1 = unroll_student(net, layout, theta0, x, y, lr, 1, 5, torch.Generator().manual_seed(2), None)
    loss = -(F.softmax(y, 1) * F.log_softmax(net(x), 1)).sum(1).mean()
    grads = torch.autograd.grad(loss, list(net.parameters()))
    hand = theta0 - 0.05 * torch.cat([gr.reshape(-1) for gr in grads])
    assert torch.allclose(theta1, hand, atol=1e-6)


def test_plain_datm_when_alpha_and_beta_are_zero(setup, monkeypatch):
    a = run(make(setup))
    ref_calls = []

    def plain_loss(theta_n, theta0, target, alpha):
        ref_calls.append(alpha)
        return ((theta_n - target) ** 2).sum() / ((theta0 - target) ** 2).sum(), 0

    def no_cam(*args, **kw):
        raise AssertionError("DAE must not run at beta = 0")

    monkeypatch.setattr(edf_mod, "matching_loss", plain_loss)
    monkeypatch.setattr(cam_mod.CAM, "attribute", no_cam)
    b = run(make(setup))
    assert ref_calls == [0.0] * 4
    assert torch.equal(a.images()[0], b.images()[0])
    assert torch.equal(a.views()["logits"], b.views()["logits"])
    assert not torch.equal(a.images()[0], a.views()["initial"])


def test_dae_scales_only_gradients_above_the_mean(setup, monkeypatch):
    fixed = torch.rand(6, 16, 16, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(cam_mod.CAM, "attribute", lambda *a, **k: fixed.clone())
    plain = make(setup, iterations=1)
    plain.step()
    dae = make(setup, iterations=1, dae_beta=1.0)
    dae.step()
    g0, g1 = plain.x_syn.grad, dae.x_syn.grad
    below = (fixed < fixed.mean((1, 2), keepdim=True))[:, None].expand_as(g0)
    assert torch.equal(g1[below], g0[below])
    scale = (fixed + 1.0)[:, None].expand_as(g0)
    assert torch.allclose(g1[~below], (g0 * scale)[~below])
    assert dae.history[-1].info["dae"] and "mask" in dae.views()


def test_init_prefers_correct_images_then_highest_true_class_probability(caplog):
    # K=2 experts, n=4 candidates of class 1, C=3 classes; the final expert gets only image 2 right
    final = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 3.0], [0.0, 4.0, 0.0], [3.0, 2.5, 0.0]])
    first = torch.tensor([[0.0, 5.0, 0.0]] * 4)
    order, y = init_from_experts(torch.stack([first, final]), 1, 3)
    p1 = final.softmax(1)[:, 1]
    assert order.tolist() == [2, 3, 0] and p1[3] > p1[0] > p1[1]       # misclassified by p(c)
    assert "only 1 of 4" in caplog.text
    assert torch.equal(y[0], (first[2] + final[2]) / 2)                  # both experts correct
    assert torch.equal(y[1], first[3])                                   # only the first one
    caplog.clear()
    order, _ = init_from_experts(torch.stack([first, final]), 1, 1)
    assert order.tolist() == [2] and "only" not in caplog.text


@pytest.mark.parametrize("target", ["argmax_y", "distilled_class"])
def test_dae_cam_class(setup, monkeypatch, target):
    seen = []

    def fake_cam(cam, x, targets):
        seen.append(targets.clone())
        return torch.rand(len(x), 16, 16, generator=torch.Generator().manual_seed(0))

    monkeypatch.setattr(cam_mod.CAM, "attribute", fake_cam)
    d = make(setup, iterations=2, dae_beta=1.0, dae_target=target)
    d.step()
    with torch.no_grad():                                # Y drifts to class (distilled + 1) % 3
        d.y_logits.copy_(F.one_hot((d.labels + 1) % 3, 3).float() * 10)
    d.step()
    want = d.labels if target == "distilled_class" else (d.labels + 1) % 3
    assert torch.equal(seen[-1].cpu(), want)
    assert EDFConfig().dae_target == "argmax_y"                          # METHODS.md §5.5 default


def test_dae_runs_with_the_real_cam(setup):
    d = run(make(setup, iterations=2, dae_beta=1.0, cpd_alpha=0.25))
    assert d.history[-1].info["dropped"] > 0
    assert torch.isfinite(d.x_syn).all()


def test_protocol_determinism_resume_and_range(setup):
    a = run(make(setup, seed=3))
    b = make(setup, seed=3)
    run(b, 2)
    state = b.state_dict()
    c = make(setup, seed=3)
    c.load_state_dict(state)
    run(c, 2)
    x, y = a.images()
    assert x.shape == (6, 3, 16, 16) and y.shape == (6,) and y.dtype == torch.long
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and int(y.max()) < 3
    assert torch.equal(x, run(make(setup, seed=3)).images()[0])
    assert torch.equal(x, c.images()[0])
    assert a.views()["lr"].shape == (1,) and a.eval_kwargs()["syn_lr"] > 0
    assert {"match"} == set(a.history[-1].losses)


def test_memory_estimate_and_refusal(setup):
    d = make(setup, syn_steps=4, batch_syn=6)
    d._make_net()
    e4 = d.memory_estimate()
    assert e4["per_image_step"] > 0
    d8 = make(setup, syn_steps=8, batch_syn=6)
    d8._make_net()
    assert d8.memory_estimate()["bytes"] > 1.8 * (e4["bytes"] - 20 * d.layout.numel)
    tight = make(setup, memory_budget_mb=0.01)
    with pytest.raises(ResourceError, match="syn_steps"):
        tight.step()


def test_expert_phase_then_match(setup, tmp_path, monkeypatch):
    bundle, teacher, _ = setup
    monkeypatch.setenv("NRRDD_CACHE", str(tmp_path))
    monkeypatch.setattr(edf_mod, "ExpertConfig", lambda: ExpertConfig(**{**TINY, "num_experts": 1}))
    d = make_distiller("edf", {**FAST, "iterations": 1}, teacher=teacher, dataset=bundle, ipc=2,
                       device="cpu", seed=0)
    assert d.total_steps == 3 + 1 and d.images()[0].shape[0] == 0
    phases = [d.step().phase for _ in range(d.total_steps)]
    assert phases == ["experts"] * 3 + ["match"]


def test_evaluate_edf(setup):
    from nrrdd_core.evaluate import EvalConfig, evaluate_student

    bundle, teacher, _ = setup
    d = run(make(setup, iterations=1))
    x, y = d.images()
    cfg = EvalConfig(protocol="edf", epochs=2, eval_every=1)
    res = evaluate_student(x, y, teacher, bundle, cfg, device="cpu", seed=0, **d.eval_kwargs())
    assert 0 <= res.final_acc <= 1 and len(res.history) == 2 and res.n_test == 12
    assert res.config["arch_kwargs"] == {"depth": 2, "width": 8}
    again = evaluate_student(x, y, teacher, bundle, cfg, device="cpu", seed=0, **d.eval_kwargs())
    assert again.history[-1]["loss"] == res.history[-1]["loss"]
    hard = evaluate_student(x, y, teacher, bundle, cfg, device="cpu", seed=0)
    assert hard.config["soft_labels"] is False


def test_saved_run_keeps_the_edf_protocol_inputs(setup, tmp_path):
    from nrrdd_core.evaluate import EvalConfig, evaluate_student
    from nrrdd_core.export import load_run, save_run

    bundle, teacher, _ = setup
    d = run(make(setup, iterations=1))
    x, y = d.images()
    extras = d.export_extras()
    assert extras.keys() == d.eval_kwargs().keys() and extras["label_logits"].shape == (6, 3)
    loaded = load_run(save_run(tmp_path, "edf", x, y, {"method": "edf"}, extras=extras))
    assert torch.equal(loaded.extras["label_logits"], extras["label_logits"])
    assert {k: v for k, v in loaded.extras.items() if k != "label_logits"} == \
        {k: v for k, v in extras.items() if k != "label_logits"}
    cfg = EvalConfig(protocol="edf", epochs=1, eval_every=1)
    direct = evaluate_student(loaded.images01, loaded.labels, teacher, bundle, cfg, device="cpu",
                              **d.eval_kwargs())
    via_run = evaluate_student(loaded.images01, loaded.labels, teacher, bundle, cfg, device="cpu",
                               extras=loaded.extras)
    assert via_run.history == [dict(h, seconds=v["seconds"]) for h, v in
                               zip(direct.history, via_run.history)]
    assert via_run.config["lr"] == extras["syn_lr"] and via_run.config["soft_labels"]
    kd = evaluate_student(loaded.images01, loaded.labels, teacher, bundle,
                          EvalConfig(epochs=1, student_width=8), device="cpu", extras=loaded.extras)
    assert kd.config["protocol"] == "kd"
