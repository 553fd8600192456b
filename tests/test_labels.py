"""Relabelling (METHODS.md §1.3, 0.4, 3.4): DBR values, losses, label store replay, storage accounting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nrrdd_core.data.base import DataConfig
from nrrdd_core.device import make_generator
from nrrdd_core.errors import CheckpointError, ConfigError
from nrrdd_core.labels import (AugSpec, LossSpec, SoftLabelStore, dbr_distances, draw_batch,
                               epoch_batches, label_storage_bytes, mixed_ce, paper_label_bytes,
                               replay_batch, soft_kd_loss, student_loss)
from nrrdd_core.models.teacher import Teacher

C, S, N = 5, 16, 12


def tiny_teacher(num_classes: int = C, seed: int = 0) -> Teacher:
    """A tiny GAP net wrapped as a Teacher (no registry needed)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
    dc = DataConfig("tiny", S, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25),
                    tuple(f"c{i}" for i in range(num_classes)))
    return Teacher(net, arch="tiny", data_config=dc, cam_layer="0")


def tiny_set(n: int = N, seed: int = 1):
    g = make_generator(seed)
    return torch.rand(n, 3, S, S, generator=g), torch.arange(n) % C


@pytest.mark.parametrize("mix", ["cutmix", "mixup"])
def test_replay_batch_is_bit_identical(mix):
    x, _ = tiny_set()
    spec = AugSpec(mix=mix, factor=2)
    x_mix, aug = draw_batch(x, torch.arange(N), spec, make_generator(3))
    assert torch.equal(replay_batch(x, aug, spec), x_mix)
    assert 0.0 <= aug.lam <= 1.0 and sorted(aug.perm.tolist()) == list(range(N))
    assert (aug.box is None) == (mix == "mixup")


def test_dbr_stored_values_equal_direct_ces(tmp_path):
    teacher, (x, y) = tiny_teacher(), tiny_set()
    spec = LossSpec(mode="dbr")
    store = SoftLabelStore(tmp_path / "labels_dbr", "dbr", num_values=2, num_images=N, key="k")
    batches = list(epoch_batches(x, y, 5, make_generator(0), AugSpec(), spec, teacher, store, epoch=0))
    augs, values = store.read_epoch(0)
    assert values.shape == (N, 2) and len(augs) == 3
    start = 0
    for aug, b in zip(augs, batches):
        x_mix = replay_batch(x, aug, AugSpec())
        with torch.no_grad():
            logp = F.log_softmax(teacher(teacher.data_config.normalize(x_mix)), 1)
        yb = y[aug.idx]
        direct = torch.stack([F.nll_loss(logp, yb, reduction="none"),
                              F.nll_loss(logp, yb[aug.perm], reduction="none")], 1)
        stored = values[start:start + len(aug.idx)]
        start += len(aug.idx)
        assert torch.allclose(stored, direct, rtol=2e-3, atol=1e-3)
        assert torch.equal(b.values, stored)  # training sees exactly the stored values


def test_soft_replay_equals_online(tmp_path):
    teacher, (x, y) = tiny_teacher(), tiny_set()
    spec = LossSpec(mode="soft")
    online = list(epoch_batches(x, y, 5, make_generator(7), AugSpec(), spec, teacher))
    store = SoftLabelStore(tmp_path / "s", "soft", num_values=C, num_images=N, key="k")
    first = list(epoch_batches(x, y, 5, make_generator(7), AugSpec(), spec, teacher, store, 0))
    g = make_generator(99)
    state = g.get_state()
    replay = list(epoch_batches(x, y, 5, g, AugSpec(), spec, teacher, store, 0))
    assert torch.equal(g.get_state(), state)  # a stored epoch draws nothing
    for a, b, c in zip(online, first, replay):
        assert torch.equal(a.x_mix01, b.x_mix01) and torch.equal(b.x_mix01, c.x_mix01)
        assert torch.equal(a.y, c.y) and torch.equal(a.y_perm, c.y_perm) and a.lam == c.lam
        assert torch.allclose(a.values, c.values, rtol=1e-3, atol=1e-3)  # fp16 storage
        assert torch.equal(b.values, c.values)


def test_store_discards_epochs_of_other_settings(tmp_path, caplog):
    teacher, (x, y) = tiny_teacher(), tiny_set()
    store = SoftLabelStore(tmp_path, "soft", num_values=C, num_images=N, key="a")
    list(epoch_batches(x, y, 6, make_generator(0), AugSpec(), LossSpec(), teacher, store, 0))
    assert SoftLabelStore(tmp_path, "soft", num_values=C, num_images=N, key="a").has_epoch(0)
    other = SoftLabelStore(tmp_path, "soft", num_values=C, num_images=N, key="b")
    assert not other.has_epoch(0) and "discarding" in caplog.text
    with pytest.raises(CheckpointError):
        other.read_epoch(0)
    with pytest.raises(ConfigError):
        SoftLabelStore(tmp_path / "h", "hard", num_values=1, num_images=N)


def test_sce_hinge_and_dbr_loss_by_hand():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    y, yp, lam = torch.tensor([0, 1]), torch.tensor([0, 2]), 0.75
    ce = mixed_ce(logits, y, yp, lam)
    logp = F.log_softmax(logits, 1)
    assert torch.allclose(ce, -(0.75 * logp[[0, 1], [0, 1]] + 0.25 * logp[[0, 1], [0, 2]]))
    assert torch.allclose(ce, F.cross_entropy(logits, torch.tensor([[1.0, 0, 0], [0, .75, .25]]),
                                              reduction="none"))
    d_t = torch.tensor([[0.5, 2.0], [1.0, 1.0]])
    for norm, r in (("l1", 0.4), ("l2", 5.0)):
        spec = LossSpec(mode="dbr", dbr_radius=r, dbr_norm=norm, alpha_dbr=2.0)
        loss, terms = student_loss(logits, d_t, y, yp, lam, spec)
        sce = torch.relu(ce - r).mean()
        d_s = -torch.stack([logp[[0, 1], y], logp[[0, 1], yp]], 1)   # CE to y and to y_pi, by hand
        diff = d_s - d_t
        dbr = (diff.abs() if norm == "l1" else diff ** 2).sum(1).mean()
        assert torch.allclose(loss, sce + 2.0 * dbr)
        assert terms["sce"] == pytest.approx(float(sce)) and terms["dbr"] == pytest.approx(float(dbr))
    lg, a, b = torch.tensor([[1.0, 2.0, -1.0]]), torch.tensor([0]), torch.tensor([1])
    z = torch.log(torch.exp(lg).sum())                                  # [d_org, d_aug] by hand
    torch.testing.assert_close(dbr_distances(lg, a, b), torch.stack([z - 1.0, z - 2.0])[None])
    z2 = torch.log(torch.exp(lg / 2).sum())                             # tau_d divides the logits
    torch.testing.assert_close(dbr_distances(lg, a, b, temperature=2.0),
                               torch.stack([z2 - 0.5, z2 - 1.0])[None])
    # hinge: a sample whose mixed CE is below r contributes nothing
    assert float(ce[0]) < 0.4 < float(ce[1])
    assert student_loss(logits, d_t, y, yp, lam, LossSpec(mode="dbr", alpha_dbr=0.0))[0] == \
        pytest.approx(float(ce[1] - 0.4) / 2)


def test_soft_and_hard_losses_by_hand():
    s, t = torch.randn(4, C), torch.randn(4, C)
    tau = 4.0
    p_t = torch.softmax(t / tau, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / tau, 1))).sum() / 4
    assert torch.allclose(soft_kd_loss(s, t, tau), kl, atol=1e-6)
    y, yp = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 1, 0, 4])
    hard, _ = student_loss(s, None, y, yp, 0.3, LossSpec(mode="hard"))
    target = 0.3 * F.one_hot(y, C) + 0.7 * F.one_hot(yp, C)
    assert torch.allclose(hard, F.cross_entropy(s, target.float()))


def test_storage_bytes_from_written_files(tmp_path):
    teacher, (x, y) = tiny_teacher(num_classes=C), tiny_set()
    epochs = 2
    for mode, v in (("soft", C), ("dbr", 2)):
        store = SoftLabelStore(tmp_path / f"labels_{mode}", mode, num_values=v, num_images=N, key="k")
        g = make_generator(0)
        for e in range(epochs):
            list(epoch_batches(x, y, 6, g, AugSpec(), LossSpec(mode=mode), teacher, store, e))
    torch.save(y, tmp_path / "labels_hard.pt")
    b = label_storage_bytes(tmp_path)
    assert b["soft"] == N * epochs * C * 2 and b["dbr"] == N * epochs * 2 * 2
    assert b["soft_over_dbr"] == pytest.approx(C / 2)
    assert b["hard"] > 0 and b["aug_params"] > 0 and len(b["files"]) == 2 * 2 * epochs + 1
    assert label_storage_bytes([tmp_path / "labels_dbr" / "dbr_e0000.f16"])["dbr"] == N * 2 * 2
    paper = paper_label_bytes(200_000, 300, 1000)  # ImageNet-1k IPC200 (METHODS.md §4.4)
    assert paper["soft"] == 120_000_000_000 and paper["dbr"] == 240_000_000
    assert paper["soft_over_dbr"] == 500


def test_bad_specs():
    with pytest.raises(ConfigError):
        AugSpec(mix="blend")
    with pytest.raises(ConfigError):
        LossSpec(mode="fuzzy")
    with pytest.raises(ConfigError):
        LossSpec(mode="dbr", dbr_norm="l3")
