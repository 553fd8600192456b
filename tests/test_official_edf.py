"""Golden values of the official EDF / DATM code (docs/METHODS.md §5.3-5.5): cases 4a (CPD loss),
4b (DAE weight), 4c (two outer iterations) and 5 (soft cross-entropy) of
``../shared/reference/official_values.json``.

Each test rebuilds the case's inputs from the recipe in the JSON (checked against its sha256
fingerprints), runs the project's own public functions in the official setting and asserts the
stored outputs within the tolerances the JSON suggests. Select them with ``pytest -k official``.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from nrrdd_core.cam import dae_weight
from nrrdd_core.data.base import DataConfig, DatasetBundle, ImageSplit
from nrrdd_core.experts import EXPERT_KIND, MANIFEST, file_sha256
from nrrdd_core.losses import soft_cross_entropy
from nrrdd_core.methods.edf import EDFConfig, EDFDistiller, matching_loss
from nrrdd_core.models import build_model
from nrrdd_core.models.teacher import Teacher

REFERENCE = SHARED_DATA.parent / "reference" / "official_values.json"


@pytest.fixture(scope="module")
def cases() -> dict:
    """The official cases by id prefix (``"4a"``, ``"4b"``...); skips when the file is absent."""
    if not REFERENCE.is_file():
        pytest.skip(f"golden reference values not found at {REFERENCE}")
    data = json.loads(REFERENCE.read_text())
    return {c["id"].split("_")[0]: c for c in data["cases"]}


def sha256_f32(t: torch.Tensor) -> str:
    """The fingerprint of the reference README: sha256 of the little-endian float32 bytes."""
    return hashlib.sha256(t.detach().contiguous().numpy().astype("<f4").tobytes()).hexdigest()


def check_fingerprint(t: torch.Tensor, fp: dict) -> None:
    assert list(t.shape) == fp["shape"]
    assert sha256_f32(t) == fp["sha256_f32_le"]
    assert math.isclose(float(t.detach().double().sum()), fp["sum_f64"], rel_tol=1e-9, abs_tol=1e-6)


def close(got: float, want: float, rtol: float, atol: float = 0.0) -> bool:
    got = got.detach() if isinstance(got, torch.Tensor) else got
    return math.isclose(float(got), float(want), rel_tol=rtol, abs_tol=atol)


def test_official_4a_cpd_matching_loss(cases):
    case = cases["4a"]
    g = torch.Generator().manual_seed(1)
    theta_n, target, theta0 = (torch.randn(1000, generator=g) for _ in range(3))
    for name, t in (("theta_N", theta_n), ("target", target), ("theta_0", theta0)):
        check_fingerprint(t, case["inputs"]["fingerprints"][name])
    tol = case["outputs"]["suggested_tolerance"]["loss, grad_*"]
    for alpha in case["inputs"]["alpha_values"]:
        want = case["outputs"]["per_alpha"][str(alpha)]
        x = theta_n.clone().requires_grad_(True)
        loss, dropped = matching_loss(x, theta0, target, alpha)
        loss.backward()
        assert dropped == want["dropped"], alpha
        assert int((x.grad != 0).sum()) == want["grad_nonzero"], alpha
        for key, got in (("loss", loss), ("grad_theta_N_l2", x.grad.norm()),
                         ("grad_theta_N_maxabs", x.grad.abs().max()),
                         ("grad_theta_N_sum", x.grad.sum())):
            assert close(got, want[key], tol["rtol"], tol["atol"]), (alpha, key, float(got), want[key])


def test_official_4b_dae_weight(cases):
    case = cases["4b"]
    maps = torch.rand((2, 1, 8, 8), generator=torch.Generator().manual_seed(2))
    check_fingerprint(maps, case["inputs"]["fingerprint"])
    assert np.allclose(maps.flatten().numpy(), case["inputs"]["maps_flat"], rtol=1e-6, atol=0)
    out = case["outputs"]
    atol = out["suggested_tolerance"]["mask"]["atol"]
    assert np.allclose(maps.view(2, -1).mean(1).numpy(), out["per_image_mean"], rtol=1e-6, atol=0)
    for beta in case["inputs"]["beta_values"]:
        want = out[f"beta{beta}"]
        w = dae_weight(maps.view(2, 8, 8), beta, threshold=case["inputs"]["threshold"])
        assert w.shape == (2, 1, 8, 8)                                # broadcasts over channels
        assert torch.allclose(w.flatten(), torch.tensor(want["mask_flat_2x1x8x8"]), rtol=0, atol=atol)
        assert int((w > 1).sum()) == want["n_boosted"]
        assert close(w.sum(), want["mask_sum"], 1e-6)


def test_official_5_soft_cross_entropy(cases):
    case = cases["5"]
    g = torch.Generator().manual_seed(3)
    inputs = torch.randn((4, 10), generator=g).requires_grad_(True)
    target = torch.randn((4, 10), generator=g).requires_grad_(True)
    fps = case["inputs"]["fingerprints"]
    check_fingerprint(inputs, fps["inputs"])
    check_fingerprint(target, fps["target"])
    out = case["outputs"]
    tol = out["suggested_tolerance"]["loss, grads"]
    loss = soft_cross_entropy(inputs, target)
    loss.backward()
    assert close(loss, out["loss"], tol["rtol"], tol["atol"])
    assert close(inputs.grad.norm(), out["grad_inputs_l2"], tol["rtol"], tol["atol"])
    assert close(target.grad.norm(), out["grad_target_l2"], tol["rtol"], tol["atol"])  # Y is learned
    loss64 = soft_cross_entropy(inputs.detach().double(), target.detach().double())
    assert close(loss64, out["loss_float64"], tol["rtol"], tol["atol"])


def _synthetic_buffer(folder, trajectory: torch.Tensor, arch_kwargs: dict, num_classes: int,
                      image_size: int, lr: float) -> str:
    """An expert buffer folder (one expert) holding ``trajectory`` ``(E+1, P)``."""
    f = folder / "expert_000.pt"
    torch.save({"kind": EXPERT_KIND, "trajectory": trajectory, "test_acc": 0.0}, f)
    manifest = {"kind": EXPERT_KIND, "config": {"lr": lr}, "epochs": len(trajectory) - 1,
                "num_params": trajectory.shape[1], "arch_kwargs": arch_kwargs,
                "num_classes": num_classes, "image_size": image_size,
                "experts": [{"file": f.name, "bytes": f.stat().st_size, "sha256": file_sha256(f),
                             "test_acc": 0.0}]}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return str(folder)


def test_official_4c_two_edf_outer_iterations(cases, shared_data, tmp_path):
    """Unrolled student, soft CE, CPD alpha 0.25, DAE weight (interval 10: recomputed only at the
    first iteration, applied on both) and the three SGD steps, through EDFDistiller."""
    case = cases["4c"]
    inp, out = case["inputs"], case["outputs"]
    tol = out["suggested_tolerance"]
    npz = np.load(shared_data / "cifar10_exact_train_prefix.npz")
    idx = inp["file_indices"]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x01 = torch.from_numpy(npz["x"][idx]).permute(0, 3, 1, 2).contiguous().to(torch.float32) / 255.0
    x = (x01 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    check_fingerprint(x, inp["image_syn_fingerprint"])
    labels = torch.from_numpy(npz["y"][idx]).long()
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]    # class-major, IPC 2
    y = 2.0 * torch.randn((20, 10), generator=torch.Generator().manual_seed(5))
    check_fingerprint(y, inp["label_syn_fingerprint"])
    p = inp["P"]
    g = torch.Generator().manual_seed(4)
    theta_start = 0.1 * torch.randn(p, generator=g)
    theta_target = theta_start + 0.01 * torch.randn(p, generator=g)
    check_fingerprint(theta_start, inp["expert_fingerprints"]["theta_start"])
    check_fingerprint(theta_target, inp["expert_fingerprints"]["theta_target"])
    maps = torch.rand((20, 32, 32), generator=torch.Generator().manual_seed(7))
    check_fingerprint(maps, inp["maps_fingerprint"])

    dc = DataConfig("cifar10_prefix", 32, mean, std, tuple(f"c{i}" for i in range(10)))
    split = ImageSplit(torch.from_numpy(npz["x"][idx]).permute(0, 3, 1, 2).contiguous(), labels)
    bundle = DatasetBundle(split, split, dc)
    torch.manual_seed(0)
    teacher = Teacher(build_model("convnet_bn", 10, 32, depth=1, width=4), "convnet_bn", dc,
                      "features", {"depth": 1, "width": 4})
    arch = {"depth": 3, "width": 16}
    # start epoch 0 -> target epoch 2 as in the case; one more snapshot so that T+ = 1 fits
    traj = torch.stack([theta_start, theta_start, theta_target, theta_target])
    buffer = _synthetic_buffer(tmp_path, traj, arch, 10, 32, 0.01)
    cfg = EDFConfig(iterations=2, syn_steps=3, batch_syn=10, expert_epochs=2,
                    current_max_start_epoch=1, max_start_epoch=1, expansion_iterations=1,
                    lr_img=1000.0, lr_lr=1e-5, lr_y=2.0, lr_teacher=0.01, max_loss=1.0,
                    cpd_alpha=0.25, dae_beta=1.0, dae_interval=10, act_threshold=0.0, dsa=False,
                    unroll="plain", buffer=buffer)
    d = EDFDistiller(cfg, teacher=teacher, dataset=bundle, ipc=2, device="cpu", seed=0,
                     cam_fn=lambda model, xs, targets: maps.clone())
    d._make_net()
    assert [(n, list(t.shape)) for n, t in d.net.named_parameters()] == \
        [(n, s) for n, s in inp["flat_param_layout"]] and d.layout.numel == p
    d._build(x, y, labels, 0.01)
    start = d.x_syn.detach().clone()
    for it, want in enumerate(out["iterations"]):
        before = d.x_syn.detach().clone()
        rec = d.match_iteration(it, theta_start, theta_target, batches=inp["batches"][it])
        grad = d.x_syn.grad                                          # after the DAE weight
        update = d.x_syn.detach() - before
        assert close(rec.losses["match"], want["grand_loss"], tol["grand_loss"]["rtol"])
        assert (not rec.info["skipped"]) == want["stepped"]
        assert p - rec.info["dropped"] == want["kept_params"]
        assert close(d.dae_map.sum(), want["mask_sum"], tol["mask_sum"]["rtol"])
        r, a = tol["grads, image_update_maxabs, image_update_l2, syn_lr_grad"].values()
        for key, got in (("image_grad_l2_before_mask", (grad / d.dae_map).norm()),
                         ("image_grad_l2_after_mask", grad.norm()),
                         ("label_grad_l2", d.y_logits.grad.norm()),
                         ("syn_lr_grad", d.syn_lr.grad),
                         ("image_update_maxabs", update.abs().max()),
                         ("image_update_l2", update.norm())):
            assert close(got, want[key], r, a), (it, key, float(got), want[key])
        r, a = tol["image_update_sum, total sum"].values()
        assert close(update.sum(), want["image_update_sum"], r, a), (it, float(update.sum()))
        assert close(d.syn_lr, want["syn_lr_after"], tol["syn_lr_after"]["rtol"])
        assert close(d.y_logits.sum(), want["label_syn_sum_after"], tol["label_syn_sum_after"]["rtol"])
    assert rec.info["dae"] and not rec.info["dae_recomputed"]         # interval 10: stored weight
    total = d.x_syn.detach() - start
    r, a = tol["image_update_sum, total sum"].values()
    assert close(total.sum(), out["total_update_after_2_iterations"]["sum"], r, a)
    assert close(total.abs().max(), out["total_update_after_2_iterations"]["maxabs"], 2e-3, 1e-8)
