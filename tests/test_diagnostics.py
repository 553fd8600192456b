"""NRR-DD reconstruction choices (CIDD confidence, label refinement; METHODS.md §4.2, §4.5) and the
refinement diagnostics (nrrdd_core.diagnostics, METHODS.md §4.6)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nrrdd_core.data import DataConfig
from nrrdd_core.diagnostics import diagnose, fooling_warning
from nrrdd_core.errors import ConfigError, DataError
from nrrdd_core.methods import get_method
from nrrdd_core.methods.common import patch_cross_entropy, patch_log_confidence
from nrrdd_core.methods.nrrdd import label_refine_loss
from nrrdd_core.models.teacher import Teacher

from test_methods import _bundle, _make, _teacher


@pytest.fixture(scope="module")
def bundle():
    return _bundle()


@pytest.fixture
def teacher(bundle):
    return _teacher(bundle)


class MeanColour(nn.Module):
    """Logits = a fixed linear map of the mean colour: hand-computable probabilities."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.fc = nn.Linear(3, weight.shape[0], bias=False)
        self.fc.weight.data.copy_(weight)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


def _linear_teacher(weight) -> Teacher:
    cfg = DataConfig("lin", 4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), ("a", "b", "c"))
    return Teacher(MeanColour(torch.as_tensor(weight, dtype=torch.float32)), arch="lin",
                   data_config=cfg, cam_layer="fc")


# ---- CIDD confidence -------------------------------------------------------------------------
def test_confidence_readings(teacher, bundle):
    x = teacher.data_config.normalize(bundle.train.float01()[:12])
    true = patch_log_confidence(teacher, x, 1, "true_class")
    best = patch_log_confidence(teacher, x, 1, "max_prob")
    # true_class is exactly minus the RDED score; max_prob is the top log-probability
    torch.testing.assert_close(true, -patch_cross_entropy(teacher, x, 1))
    with torch.no_grad():
        logp = torch.log_softmax(teacher(x), 1)
    torch.testing.assert_close(best, logp.max(1).values)
    assert (best >= true).all() and (best > true).any()
    with pytest.raises(ConfigError, match="confidence"):
        patch_log_confidence(teacher, x, 1, "entropy")


@pytest.mark.parametrize("confidence", ["true_class", "max_prob"])
def test_cidd_keeps_the_lowest_confidence_of_its_reading(confidence, teacher, bundle, monkeypatch):
    """The distiller's rank key is the chosen log-confidence (lower = kept first)."""
    d = _make("nrrdd", teacher, bundle, confidence=confidence, num_crops=2, top_t=1,
              images_per_step=20)
    seen = []
    rank = d._rank_chunk
    d._rank_chunk = lambda c, x, b: seen.append((c, x, b, rank(c, x, b))) or seen[-1][3]
    d.step()
    c, x, boxes, (_, kept, key, losses) = seen[0]
    from nrrdd_core.methods.common import crop_patches
    expect = patch_log_confidence(teacher, crop_patches(x, kept[:, None], d.side), c, confidence)
    torch.testing.assert_close(key, expect)
    assert losses["confidence"] == pytest.approx(float(expect.exp().mean()))
    d.close()


def test_max_prob_selection_direction(teacher, bundle):
    """max_prob (the default): select=lowest keeps patches whose top class probability is lower
    than select=highest's."""
    top = {}
    for sel in ("lowest", "highest"):
        d = _make("nrrdd", teacher, bundle, select=sel)
        assert d.config.confidence == "max_prob"
        while d.step_index < d.select_steps:
            d.step()
        top[sel] = teacher.predict01(d.images()[0]).max(1).values.mean()
        d.close()
    assert top["lowest"] < top["highest"]


def test_confidence_changes_the_selection(teacher, bundle):
    a = _make("nrrdd", teacher, bundle, confidence="true_class", iterations=1)
    b = _make("nrrdd", teacher, bundle, confidence="max_prob", iterations=1)
    for d in (a, b):
        while d.step_index < d.select_steps:
            d.step()
    assert not torch.equal(a.x0, b.x0)
    a.close(), b.close()


# ---- label refinement (Eq. 11-12 reconstruction) -------------------------------------------
def test_label_refine_two_class_mass_by_hand():
    t = _linear_teacher([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0]])
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0] = 1.0  # red: class a
    x[1, 1] = 1.0  # green: class b
    x.requires_grad_(True)
    y = torch.tensor([0, 1])
    g = torch.Generator().manual_seed(3)
    loss, terms = label_refine_loss(t, x, y, g, "two_class")
    # redo the CutMix draw by hand with the same generator state
    from nrrdd_core.augment import cutmix
    x_mix, perm, lam, _ = cutmix(x.detach(), torch.Generator().manual_seed(3))
    p = torch.softmax(t(x_mix), 1)
    y2 = y[perm]
    mass = torch.where(y == y2, p[torch.arange(2), y], p[torch.arange(2), y] + p[torch.arange(2), y2])
    assert float(loss.detach()) == pytest.approx(float(-mass.log().mean()), rel=1e-5)
    assert terms["two_class_mass"] == pytest.approx(float(mass.mean()), rel=1e-5)
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    mixed, _ = label_refine_loss(t, x, y, torch.Generator().manual_seed(3), "mixed_ce")
    want = -(lam * p[torch.arange(2), y].log() + (1 - lam) * p[torch.arange(2), y2].log()).mean()
    assert float(mixed) == pytest.approx(float(want), rel=1e-5)


def test_label_refine_weight_adds_the_term(teacher, bundle):
    off = _make("nrrdd", teacher, bundle)
    on = _make("nrrdd", teacher, bundle, label_refine_weight=0.5)
    recs = {}
    for name, d in (("off", off), ("on", on)):
        while not d.done:
            rec = d.step()
        recs[name] = rec.losses
        d.close()
    assert "label_refine" not in recs["off"]
    r = recs["on"]
    assert r["loss"] == pytest.approx(r["ce"] + 0.01 * r["bn"] + 0.5 * r["label_refine"], rel=1e-5)
    assert 0 < r["two_class_mass"] <= 1
    assert not torch.equal(off.images()[0], on.images()[0])


def test_knobs_are_listed_with_sources():
    fields = {f["name"]: f for f in get_method("nrrdd").Config.describe()}
    assert list(fields["confidence"]["choices"]) == ["true_class", "max_prob"]
    for name in ("confidence", "label_refine_weight", "label_refine_form"):
        assert "paper" in fields[name]["source"]
    assert fields["label_refine_weight"]["default"] == 0.0


# ---- diagnostics -------------------------------------------------------------------------------
def test_diagnose_by_hand():
    t = _linear_teacher([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 4.0]])
    other = _linear_teacher([[0, 0, 4.0], [0, 4.0, 0], [4.0, 0, 0]])  # swaps a and c
    x0 = torch.zeros(2, 3, 4, 4)
    x0[:, 1] = 0.5  # both look like b
    x = x0.clone()
    x[0, 0, :3] = 1.0  # image 0 (label a): three of four rows of the red channel raised to 1
    labels = torch.tensor([0, 1])
    mask = torch.ones(2, 1, 4, 4)
    mask[1, :, 0] = 0  # image 1: one of four rows frozen
    d = diagnose(t, x0, x, labels, independent=other, mask=mask)
    p = lambda m, im: torch.softmax(m.model(im.mean((2, 3))[:, :, None, None]), 1)  # noqa: E731
    torch.testing.assert_close(d.teacher_prob_before, p(t, x0)[torch.arange(2), labels])
    torch.testing.assert_close(d.teacher_prob_after, p(t, x)[torch.arange(2), labels])
    assert d.teacher_agree_before.tolist() == [False, True]
    assert d.teacher_agree_after.tolist() == [True, True]  # red mean 0.75 > green 0.5
    assert d.independent_agree_after.tolist() == [False, True]  # the other model reads red as c
    torch.testing.assert_close(d.change_mean, torch.tensor([12 / 48, 0.0]))
    torch.testing.assert_close(d.change_max, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(d.frozen_share, torch.tensor([0.0, 0.25]))
    s = d.summary()
    assert s["teacher_agree_before"] == 0.5 and s["teacher_agree_after"] == 1.0
    assert s["independent_agree_before"] == s["independent_agree_after"] == 0.5
    assert d.warning() is not None and "fooling the teacher" in d.warning()
    rows = d.rows(["a", "b", "c"])
    assert rows[0]["class"] == "a" and rows[1]["frozen share"] == 0.25
    with pytest.raises(DataError):
        diagnose(t, x0, x[:1], labels)


def test_fooling_warning_rules():
    base = {"teacher_agree_before": 0.2, "teacher_agree_after": 0.9, "teacher_prob_before": 0.1,
            "teacher_prob_after": 0.95, "change_mean": 2 / 255}
    flat = {**base, "independent_agree_before": 0.3, "independent_agree_after": 0.35}
    rising = {**base, "independent_agree_before": 0.3, "independent_agree_after": 0.8}
    assert fooling_warning(flat) is not None
    assert fooling_warning(rising) is None          # the independent model sees the features too
    assert fooling_warning(base) is not None        # no independent model: big gain, tiny change
    assert fooling_warning({**base, "change_mean": 20 / 255}) is None
    assert fooling_warning({**flat, "teacher_agree_after": 0.25}) is None  # no real rise


def test_distiller_diagnostics(teacher, bundle):
    other = _teacher(_bundle(seed=1))
    d = _make("nrrdd", teacher, bundle, iterations=3, tau=0.5)
    while d.step_index < d.select_steps:
        d.step()
    first = d.diagnostics(other)
    assert first.change_mean.abs().max() == 0 and first.has_independent
    torch.testing.assert_close(first.teacher_prob_before, first.teacher_prob_after)
    while not d.done:
        d.step()
    diag = d.diagnostics(other)
    n = len(d.labels)
    assert diag.teacher_prob_after.shape == (n,) and diag.frozen_share.shape == (n,)
    torch.testing.assert_close(diag.frozen_share,
                               (d.refiner.mask == 0).flatten(1).float().mean(1).cpu())
    x, _ = d.images()
    x0 = d.views()["initial"]
    torch.testing.assert_close(diag.change_mean, (x - x0).abs().mean((1, 2, 3)))
    assert not math.isnan(diag.summary()["independent_agree_after"])
    d.close()
