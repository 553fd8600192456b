"""EDF / DATM trajectory matching with CPD and DAE (METHODS.md §5.3-5.7) and its evaluation (5.6)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_experts import TINY, tiny_bundle

from nrrdd_core.errors import ConfigError, DataError, ResourceError
from nrrdd_core.experts import ExpertConfig, ParamLayout, seeded_model, train_experts
from nrrdd_core.methods import edf as edf_mod
from nrrdd_core.methods import make_distiller
from nrrdd_core.methods.edf import (
    DATM,
    EDFConfig,
    init_from_experts,
    matching_loss,
    unroll_student,
)
from nrrdd_core.models import build_model
from nrrdd_core.models.teacher import Teacher

FAST = {"iterations": 4, "syn_steps": 2, "batch_syn": 4, "current_max_start_epoch": 1,
        "max_start_epoch": 1, "expert_epochs": 2, "lr_img": 10.0, "dae_interval": 1}
NO_DAE_CAM = {"cam_fn": lambda *a: pytest.fail("DAE must not compute a CAM at beta = 0")}


@pytest.fixture(scope="module")
def setup():
    bundle = tiny_bundle()
    path = train_experts(ExpertConfig(**TINY), bundle, device="cpu")
    torch.manual_seed(0)
    teacher = Teacher(build_model("convnet_bn", 3, 16, depth=2, width=8), "convnet_bn",
                      bundle.config, "features", {"depth": 2, "width": 8})
    return bundle, teacher, str(path)


def make(setup, seed=0, cam_fn=None, **over):
    bundle, teacher, path = setup
    return make_distiller("edf", {**FAST, "buffer": path, **over}, teacher=teacher, dataset=bundle,
                          ipc=2, device="cpu", seed=seed, cam_fn=cam_fn)


def fixed_cam(maps, seen=None):
    """A ``cam_fn`` returning ``maps`` (recording the targets it is asked for in ``seen``)."""
    def cam_fn(model, x, targets):
        if seen is not None:
            seen.append(targets.clone())
        return maps.clone()
    return cam_fn


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
    a = run(make(setup, **DATM, **NO_DAE_CAM))
    ref_calls = []

    def plain_loss(theta_n, theta0, target, alpha):
        ref_calls.append(alpha)
        return ((theta_n - target) ** 2).sum() / ((theta0 - target) ** 2).sum(), 0

    monkeypatch.setattr(edf_mod, "matching_loss", plain_loss)
    b = run(make(setup, **DATM, **NO_DAE_CAM))
    assert ref_calls == [0.0] * 4
    assert torch.equal(a.images()[0], b.images()[0])
    assert torch.equal(a.views()["logits"], b.views()["logits"])
    assert not torch.equal(a.images()[0], a.views()["initial"])


def test_dae_scales_only_gradients_above_the_mean(setup):
    fixed = torch.rand(6, 16, 16, generator=torch.Generator().manual_seed(3))
    plain = make(setup, iterations=1, **DATM, **NO_DAE_CAM)
    plain.step()
    dae = make(setup, iterations=1, cpd_alpha=0.0, dae_beta=1.0, cam_fn=fixed_cam(fixed))
    dae.step()
    g0, g1 = plain.x_syn.grad, dae.x_syn.grad
    below = (fixed < fixed.mean((1, 2), keepdim=True))[:, None].expand_as(g0)
    assert torch.equal(g1[below], g0[below])
    scale = (fixed + 1.0)[:, None].expand_as(g0)
    assert torch.allclose(g1[~below], (g0 * scale)[~below])
    assert dae.history[-1].info["dae"] and "mask" in dae.views()


def test_init_takes_the_first_correct_images_in_the_random_order(caplog):
    # K=2 experts, n=5 candidates of class 1 (in the run's random order), C=3 classes; the final
    # expert gets candidates 1, 3 and 4 right (3 more confidently than 1: order, not confidence)
    final = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.5, 0.4], [0.0, 0.5, 3.0], [0.0, 9.0, 0.0],
                          [3.0, 4.0, 0.0]])
    first = torch.tensor([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0],
                          [5.0, 0.0, 0.0]])
    order, y = init_from_experts(torch.stack([first, final]), 1, 2)
    assert order.tolist() == [1, 3] and "only" not in caplog.text
    assert torch.equal(y[0], (first[1] + final[1]) / 2)                  # both experts correct
    order, y = init_from_experts(torch.stack([first, final]), 1, 5)
    assert order.tolist() == [1, 3, 4, 0, 2]                             # then misclassified, in order
    assert "only 3 of 5" in caplog.text
    assert torch.equal(y[2], final[4])                                   # only the final one
    assert torch.equal(y[3], first[0])                                   # only the first one
    assert torch.equal(y[4], (first[2] + final[2]) / 2)                  # none: all experts


def test_init_scans_the_whole_class_in_a_seeded_random_order(setup):
    bundle = setup[0]
    d = make(setup, seed=5)
    d._setup()
    final = d.buffer.trajectory(d.buffer.num_experts - 1)[-1]
    g = torch.Generator().manual_seed(5)
    for c in range(3):
        idx = bundle.train.indices_of(c)
        idx = idx[torch.randperm(len(idx), generator=g)]                 # the whole class
        x = d._prepare(bundle.train.float01(idx))
        ok = d._logits(final, x).argmax(1) == c
        want = torch.cat([torch.nonzero(ok).flatten(), torch.nonzero(~ok).flatten()])[:2]
        assert torch.equal(d.x_syn[d.labels == c].detach(), x[want]), c


@pytest.mark.parametrize("target", ["argmax_y", "distilled_class"])
def test_dae_cam_class(setup, target):
    seen = []
    d = make(setup, iterations=2, dae_beta=1.0, dae_target=target,
             cam_fn=fixed_cam(torch.rand(6, 16, 16, generator=torch.Generator().manual_seed(0)), seen))
    d.step()
    with torch.no_grad():                                # Y drifts to class (distilled + 1) % 3
        d.y_logits.copy_(F.one_hot((d.labels + 1) % 3, 3).float() * 10)
    d.step()
    want = d.labels if target == "distilled_class" else (d.labels + 1) % 3
    assert torch.equal(seen[-1].cpu(), want)
    assert EDFConfig().dae_target == "argmax_y"                          # METHODS.md §5.5 default


def test_dae_weight_is_applied_on_every_iteration_and_recomputed_every_interval(setup):
    """Released code: maps recomputed when it % interval == 0, the stored weight used in between.
    With all learning rates 0 the state never changes, so each iteration's gradient with DAE is
    the gradient without DAE times the weight of the last recomputed maps."""
    maps = [torch.rand(6, 16, 16, generator=torch.Generator().manual_seed(s)) for s in range(5)]
    calls = []

    def cam_fn(model, x, targets):
        calls.append(len(calls))
        return maps[len(calls) - 1].clone()

    frozen = {"iterations": 5, "dae_interval": 3, "cpd_alpha": 0.0, "lr_img": 0.0, "lr_y": 0.0,
              "lr_lr": 0.0}
    dae = make(setup, dae_beta=1.0, cam_fn=cam_fn, **frozen)
    plain = make(setup, dae_beta=0.0, **NO_DAE_CAM, **frozen)
    for it in range(5):
        rec, _ = dae.step(), plain.step()
        m = maps[0 if it < 3 else 1]
        weight = torch.where(m < m.mean((1, 2), keepdim=True), torch.ones_like(m), m + 1.0)[:, None]
        assert torch.allclose(dae.x_syn.grad, plain.x_syn.grad * weight, rtol=1e-5, atol=0), it
        assert rec.info["dae"] and rec.info["dae_recomputed"] == (it % 3 == 0), it
    assert len(calls) == 2                                              # iterations 0 and 3
    assert torch.allclose(dae.views()["mask"].amax((1, 2, 3)), torch.ones(6))
    assert not plain.history[-1].info["dae"] and "mask" not in plain.views()


def test_fixed_act_threshold(setup):
    maps = torch.rand(6, 16, 16, generator=torch.Generator().manual_seed(4))
    d = make(setup, iterations=1, dae_beta=2.0, act_threshold=0.5, cam_fn=fixed_cam(maps))
    d.step()
    want = torch.where(maps < 0.5, torch.ones_like(maps), maps + 2.0)[:, None]
    assert torch.equal(d.dae_map, want)
    mean_rule = make(setup, iterations=1, dae_beta=2.0, cam_fn=fixed_cam(maps))
    mean_rule.step()
    assert not torch.equal(mean_rule.dae_map, want)
    with pytest.raises(ConfigError):
        EDFConfig(act_threshold=1.5)


@pytest.mark.parametrize("ipc,alpha,interval", [(1, 0.0, 50), (10, 0.25, 100), (2, 0.25, 100),
                                                (50, 0.375, 100), (100, 0.375, 100)])
def test_edf_is_edf_by_default_with_the_official_values_per_ipc(ipc, alpha, interval):
    cfg = EDFConfig().for_ipc(ipc)
    assert (cfg.cpd_alpha, cfg.dae_interval, cfg.dae_beta) == (alpha, interval, 1.0)
    assert EDFConfig(cpd_alpha=0.1, dae_interval=7).for_ipc(ipc).cpd_alpha == 0.1
    assert EDFConfig(cpd_alpha=0.1, dae_interval=7).for_ipc(ipc).dae_interval == 7
    off = EDFConfig(**DATM).for_ipc(ipc)                                 # the explicit "off"
    assert off.cpd_alpha == 0.0 and off.dae_beta == 0.0
    with pytest.raises(ConfigError):
        EDFConfig(cpd_alpha=-0.5)


def test_distiller_resolves_the_ipc_defaults(setup):
    bundle, teacher, path = setup
    d = make_distiller("edf", {"buffer": path, "current_max_start_epoch": 1, "max_start_epoch": 1},
                       teacher=teacher, dataset=bundle, ipc=2, device="cpu")
    assert (d.config.cpd_alpha, d.config.dae_interval, d.config.dae_beta) == (0.25, 100, 1.0)
    assert d.state_dict()["config"]["cpd_alpha"] == 0.25


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
    d.net.to(torch.device("meta"))                     # wherever the caller keeps its module...
    e4 = d.memory_estimate()
    assert e4["per_image_step"] > 0
    assert next(d.net.parameters()).device.type == "meta"              # ...it stays there
    d8 = make(setup, syn_steps=8, batch_syn=6)
    d8._make_net()
    assert d8.memory_estimate()["bytes"] > 1.8 * (e4["bytes"] - 20 * d.layout.numel)
    tight = make(setup, memory_budget_mb=0.01)
    with pytest.raises(ResourceError, match="syn_steps"):
        tight.step()


def test_close_releases_the_buffer_through_its_own_method(setup, monkeypatch):
    d = run(make(setup, iterations=1))
    released = []
    monkeypatch.setattr(type(d.buffer), "release", lambda self: released.append(self))
    d.close()
    assert released == [d.buffer]


def test_expert_phase_then_match(setup, tmp_path, monkeypatch):
    bundle, teacher, _ = setup
    monkeypatch.setenv("NRRDD_CACHE", str(tmp_path))
    d = make_distiller("edf", {**FAST, "iterations": 1}, teacher=teacher, dataset=bundle, ipc=2,
                       device="cpu", seed=0, expert_config=ExpertConfig(**{**TINY, "num_experts": 1}))
    assert d.total_steps == 3 + 1 and d.images()[0].shape[0] == 0
    phases = [d.step().phase for _ in range(d.total_steps)]
    assert phases == ["experts"] * 3 + ["match"]
    assert d.buffer.num_experts == 1 and d.buffer.epochs == 3


def test_evaluate_edf(setup):
    from nrrdd_core.evaluate import EvalConfig, evaluate_student

    bundle, teacher, _ = setup
    d = run(make(setup, iterations=1))
    x, y = d.images()
    cfg = EvalConfig(protocol="edf", epochs=2, eval_every=1)
    res = evaluate_student(x, y, teacher, bundle, cfg, device="cpu", seed=0, **d.eval_kwargs())
    assert 0 <= res.final_acc <= 1 and len(res.history) == 2 and res.n_test == 12
    assert res.config["arch_kwargs"] == {"depth": 2, "width": 8}
    assert res.config["inputs"] == "float"
    again = evaluate_student(x, y, teacher, bundle, cfg, device="cpu", seed=0, **d.eval_kwargs())
    assert again.history[-1]["loss"] == res.history[-1]["loss"]
    hard = evaluate_student(x, y, teacher, bundle, cfg, device="cpu", seed=0)
    assert hard.config["soft_labels"] is False and hard.config["inputs"] == "images01"


def test_evaluation_trains_on_the_float_tensor(setup, monkeypatch):
    """The float images (unclipped, in the optimised space) are what the student sees."""
    from nrrdd_core.evaluate import EvalConfig, evaluate_student
    from nrrdd_core.evaluate import edf as eval_edf

    bundle, teacher, _ = setup
    d = run(make(setup, iterations=1, lr_img=1e4))
    kw = d.eval_kwargs()
    x01, y = d.images()
    assert torch.equal(kw["images_float"], d.x_syn.detach())
    assert float(bundle.config.denormalize(kw["images_float"]).amax()) > 1   # leaves [0, 1]
    seen = []
    real_dsa = eval_edf.dsa
    monkeypatch.setattr(eval_edf, "dsa", lambda x, g, s: seen.append(x.clone()) or real_dsa(x, g, s))
    cfg = EvalConfig(protocol="edf", epochs=1, eval_every=1, batch_size=6)
    evaluate_student(x01, y, teacher, bundle, cfg, device="cpu", seed=0, **kw)
    assert torch.equal(seen[0].sort(0)[0], kw["images_float"].sort(0)[0])
    seen.clear()
    evaluate_student(x01, y, teacher, bundle, cfg, device="cpu", seed=0,
                     **{k: v for k, v in kw.items() if k != "images_float"})
    assert torch.allclose(seen[0].sort(0)[0], bundle.config.normalize(x01).sort(0)[0])
    with pytest.raises(DataError, match="images_float"):
        evaluate_student(x01[:5], y[:5], teacher, bundle, cfg, device="cpu",
                         **{**kw, "label_logits": None})


def test_saved_run_keeps_the_edf_protocol_inputs(setup, tmp_path):
    from nrrdd_core.evaluate import EvalConfig, evaluate_student
    from nrrdd_core.export import load_run, save_run

    bundle, teacher, _ = setup
    d = run(make(setup, iterations=1))
    x, y = d.images()
    extras = d.export_extras()
    assert extras.keys() == d.eval_kwargs().keys() and extras["label_logits"].shape == (6, 3)
    assert extras["images_float"].shape == (6, 3, 16, 16) and extras["images_float"].dtype == torch.float32
    loaded = load_run(save_run(tmp_path, "edf", x, y, {"method": "edf"}, extras=extras))
    tensors = ("label_logits", "images_float")
    for k in tensors:
        assert torch.equal(loaded.extras[k], extras[k]), k
    assert {k: v for k, v in loaded.extras.items() if k not in tensors} == \
        {k: v for k, v in extras.items() if k not in tensors}
    cfg = EvalConfig(protocol="edf", epochs=1, eval_every=1)
    direct = evaluate_student(loaded.images01, loaded.labels, teacher, bundle, cfg, device="cpu",
                              **d.eval_kwargs())
    via_run = evaluate_student(loaded.images01, loaded.labels, teacher, bundle, cfg, device="cpu",
                               extras=loaded.extras)
    assert via_run.history == [dict(h, seconds=v["seconds"]) for h, v in
                               zip(direct.history, via_run.history)]
    assert via_run.config["lr"] == extras["syn_lr"] and via_run.config["soft_labels"]
    assert via_run.config["inputs"] == "float"
    kd = evaluate_student(loaded.images01, loaded.labels, teacher, bundle,
                          EvalConfig(epochs=1, student_width=8), device="cpu", extras=loaded.extras)
    assert kd.config["protocol"] == "kd"
