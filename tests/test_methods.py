"""KD-family methods (SRe2L, RDED, NRR-DD) behind the step-wise Distiller protocol.

A tiny BN teacher (GAP net, widths 8-16) and a tiny random dataset (16 px, 3 classes, 20 train
images per class) keep every test fast and independent of trained teachers.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from nrrdd_core.data.base import DataConfig, DatasetBundle, ImageSplit
from nrrdd_core.device import class_generator, make_generator
from nrrdd_core.errors import ConfigError, DataError, NonFiniteLossError, TeacherMismatchError
from nrrdd_core.methods import list_methods, make_distiller, run_distiller
from nrrdd_core.models.teacher import Teacher

SIZE, PER_CLASS, NAMES = 16, 20, ("a", "b", "c")
METHODS = ["sre2l", "rded", "nrrdd"]
# tiny settings: a few steps each; rded/nrrdd select in 3 chunks per class
TINY = {"sre2l": {"iterations": 4},
        "rded": {"num_crops": 3, "images_per_step": 8},
        "nrrdd": {"num_crops": 3, "images_per_step": 8, "iterations": 4}}


class TinyNet(nn.Module):
    """conv 3->8, BN, ReLU, conv 8->16, BN, ReLU, GAP, Linear; ``poison`` makes it output NaN."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)
        self.poison = False

    def forward(self, x):
        out = self.fc(self.pool(self.features(x)).flatten(1))
        return out * float("nan") if self.poison else out


def _bundle(names=NAMES, seed=0) -> DatasetBundle:
    g = make_generator(seed)
    k = len(names)

    def split(n):
        x = torch.randint(0, 256, (k * n, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
        # a class-dependent tint so the teacher has something to learn
        x[:, 0] = (x[:, 0].float() * 0.5 + 100 * (torch.arange(k * n) // n % 3)[:, None, None]
                   ).clamp(0, 255).to(torch.uint8)
        return ImageSplit(x, torch.arange(k).repeat_interleave(n))

    cfg = DataConfig("tiny", SIZE, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), tuple(names))
    return DatasetBundle(split(PER_CLASS), split(4), cfg)


def _teacher(bundle: DatasetBundle) -> Teacher:
    """A briefly trained tiny teacher whose data config has OTHER mean/std than the dataset."""
    torch.manual_seed(0)
    model = TinyNet(bundle.num_classes)
    tcfg = DataConfig("tiny", SIZE, (0.4, 0.45, 0.5), (0.2, 0.25, 0.3), bundle.config.class_names)
    x = tcfg.normalize(bundle.train.float01())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    for _ in range(15):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), bundle.train.y).backward()
        opt.step()
    return Teacher(model, arch="tiny", data_config=tcfg, cam_layer="features")


@pytest.fixture(scope="module")
def bundle():
    return _bundle()


@pytest.fixture
def teacher(bundle):
    return _teacher(bundle)


def _make(method, teacher, bundle, ipc=2, seed=0, **cfg):
    return make_distiller(method, {**TINY[method], **cfg}, teacher=teacher, dataset=bundle,
                          ipc=ipc, device="cpu", seed=seed)


def _run(method, teacher, bundle, **kw):
    d = _make(method, teacher, bundle, **kw)
    run_distiller(d)
    d.close()
    return d


def _hooks(teacher) -> int:
    return sum(len(m._forward_hooks) for m in teacher.model.modules())


def test_every_kd_method_is_registered():
    assert set(METHODS) | {"edf"} == set(list_methods())


@pytest.mark.parametrize("method", METHODS)
def test_protocol(method, teacher, bundle):
    d = _make(method, teacher, bundle, ipc=2)
    x, y = d.images()
    assert x.shape == (6, 3, SIZE, SIZE) and y.tolist() == [0, 0, 1, 1, 2, 2]
    recs = []
    run_distiller(d, callback=recs.append)
    assert d.done and [r.step for r in recs] == list(range(d.total_steps))
    assert all(r.total == d.total_steps for r in recs)
    for r in recs:
        assert all(torch.isfinite(torch.tensor(v)) for v in r.losses.values()), r
    x, y = d.images()
    assert x.dtype == torch.float32 and x.device.type == "cpu" and x.shape == (6, 3, SIZE, SIZE)
    assert 0 <= float(x.min()) and float(x.max()) <= 1 and x.std() > 0
    assert y.dtype == torch.int64 and y.tolist() == [0, 0, 1, 1, 2, 2]
    v = d.views()
    assert v["initial"].shape == x.shape
    if "change" in v:
        assert v["change"].shape == (6, SIZE, SIZE) and float(v["change"].min()) >= 0
    if method == "nrrdd":
        assert v["mask"].shape == (6, 1, SIZE, SIZE) and v["cam"].shape == (6, SIZE, SIZE)
        assert 0 <= float(v["mask"].min()) and float(v["mask"].max()) <= 1
    with pytest.raises(RuntimeError):
        d.step()
    d.close()
    assert _hooks(teacher) == 0


@pytest.mark.parametrize("method", METHODS)
def test_determinism(method, teacher, bundle):
    a = _run(method, teacher, bundle, seed=3).images()[0]
    b = _run(method, teacher, bundle, seed=3).images()[0]
    c = _run(method, teacher, bundle, seed=4).images()[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


RESUME = [("sre2l", 2, {}), ("sre2l", 5, {"batch_size": 4}), ("rded", 4, {}),
          ("rded", 1, {"factor": 2}), ("nrrdd", 4, {}),
          ("nrrdd", 11, {"mask_recompute_every": 2, "cam_method": "gradcam_torch", "factor": 2})]


@pytest.mark.parametrize("method,k,cfg", [r for r in RESUME if r[0] in METHODS])
def test_exact_resume(method, k, cfg, teacher, bundle):
    full = _run(method, teacher, bundle, **cfg)
    d = _make(method, teacher, bundle, **cfg)
    for _ in range(k):
        d.step()
    state = d.state_dict()
    d.step()  # going on must not change the saved state
    d.close()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    e = _make(method, teacher, bundle, **cfg)
    e.load_state_dict(torch.load(buf, weights_only=True))
    assert e.step_index == k
    run_distiller(e)
    e.close()
    assert torch.equal(e.images()[0], full.images()[0])
    assert [r.losses for r in e.history] == [r.losses for r in full.history]


@pytest.mark.parametrize("method", METHODS)
def test_argument_errors(method, teacher, bundle):
    with pytest.raises(ConfigError):
        _make(method, teacher, bundle, ipc=0)
    with pytest.raises(TeacherMismatchError):
        _make(method, teacher, _bundle(names=("a", "b", "c", "d")))
    if method == "sre2l":  # recover needs no real images: any ipc is fine
        _make(method, teacher, bundle, ipc=PER_CLASS + 1).close()
    else:
        with pytest.raises(DataError):
            _make(method, teacher, bundle, ipc=PER_CLASS + 1)
        with pytest.raises(ConfigError):
            _make(method, teacher, bundle, ipc=4, mipc=3)


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_loss_keeps_last_good_images(method, teacher, bundle):
    d = _make(method, teacher, bundle)
    k = d.total_steps - 2
    for _ in range(k):
        d.step()
    before = d.images()[0]
    teacher.model.poison = True
    with pytest.raises(NonFiniteLossError) as exc:
        d.step()
    assert exc.value.step == k and f"step {k}" in str(exc.value)
    assert torch.equal(d.images()[0], before) and d.step_index == k
    d.close()
    assert _hooks(teacher) == 0


def test_infinite_lr_keeps_images(teacher, bundle):
    d = _make("sre2l", teacher, bundle, lr=1e308)  # finite, but Adam's step overflows
    before = d.images()[0]
    with pytest.raises(NonFiniteLossError) as exc:
        d.step()
    assert exc.value.step == 0 and exc.value.term == "update"
    assert torch.equal(d.images()[0], before)
    d.close()


# ---- shared pieces --------------------------------------------------------------------------
def test_stitch_layout():
    from nrrdd_core.methods.common import stitch

    ipc, factor, s = 2, 2, 4
    patches = torch.arange(ipc * factor ** 2, dtype=torch.float).view(-1, 1, 1, 1)
    patches = patches.expand(-1, 3, s, s)
    out = stitch(patches, ipc, factor, 2 * s)
    # image j holds ranks j, j+ipc, j+2ipc, j+3ipc in row-major slots
    for j in range(ipc):
        grid = out[j, 0, ::s, ::s]
        assert grid.tolist() == [[j, j + ipc], [j + 2 * ipc, j + 3 * ipc]]
    odd = stitch(patches, ipc, factor, 2 * s + 1)
    assert odd.shape == (ipc, 3, 9, 9) and odd[1, 0, 0, 0] == 1 and odd[1, 0, 8, 8] == 7


def test_masked_update_scales_with_mask(teacher, bundle):
    """Two copies of one image under identical gradients: mask 2a moves exactly twice as far as a;
    mask 0 does not move."""
    from nrrdd_core.methods.common import RefineConfig, Refiner

    x1 = teacher.data_config.normalize(bundle.train.float01([0]))
    x = torch.cat([x1, x1, x1]) * 0.5  # away from the clipping box
    mask = torch.tensor([0.2, 0.4, 0.0]).view(3, 1, 1, 1).expand(3, 1, SIZE, SIZE).clone()
    r = Refiner(teacher, x, torch.zeros(3, dtype=torch.long), RefineConfig(lr=1e-3, iterations=3),
                0.01, [torch.arange(3)], mask)
    r.step(0, make_generator(0), lambda v: {k: float(t.detach()) for k, t in v.items()})
    r.close()
    d = r.x - x
    assert d[0].abs().min() > 0
    torch.testing.assert_close(d[1], 2 * d[0], rtol=1e-4, atol=1e-6)
    assert torch.equal(r.x[2], x[2])


def test_rded_keeps_lowest_ce_crop(teacher, bundle):
    """With ipc = #images every image contributes its lowest-CE crop, in CE order."""
    from nrrdd_core.augment import apply_crops, random_resized_crop_params

    m = 3
    d = make_distiller("rded", {"num_crops": m}, teacher=teacher, dataset=bundle, classes=[1],
                       ipc=PER_CLASS, device="cpu", seed=5)
    run_distiller(d)
    got = d.images()[0]
    g = class_generator(5, 1)  # each class draws from its own generator
    idx = bundle.train.indices_of(1)[torch.randperm(PER_CLASS, generator=g)]
    boxes = random_resized_crop_params(PER_CLASS * m, SIZE, (0.08, 1.0), (1.0, 1.0), g)
    tc = teacher.data_config
    best = []
    for a in range(PER_CLASS):
        xa = tc.normalize(bundle.train.float01(idx[a:a + 1]))
        crops = [apply_crops(xa, boxes[a * m + b:a * m + b + 1], SIZE) for b in range(m)]
        ce = [float(nn.functional.cross_entropy(teacher(p), torch.tensor([1]))) for p in crops]
        b = min(range(m), key=ce.__getitem__)
        best.append((ce[b], crops[b]))
    best.sort(key=lambda t: t[0])
    want = torch.cat([tc.denormalize(p).clamp(0, 1) for _, p in best])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ---- NRR-DD invariants ----------------------------------------------------------------------
def test_nrrdd_frozen_pixels_never_change(teacher, bundle):
    d = _make("nrrdd", teacher, bundle, iterations=6, lr=0.2)
    while d.step_index < d.select_steps:
        d.step()
    frozen = (d.views()["mask"] == 0).expand(-1, 3, -1, -1)
    x0 = d.images()[0]
    assert frozen.any() and not frozen.all()
    while not d.done:
        d.step()
        assert torch.equal(d.images()[0][frozen], x0[frozen])
    assert not torch.equal(d.images()[0], x0)
    d.close()


def test_nrrdd_tau_zero_freezes_everything(teacher, bundle):
    d = _run("nrrdd", teacher, bundle, tau=0.0, lr=0.2)
    assert torch.equal(d.images()[0], d.views()["initial"])
    assert float(d.views()["mask"].max()) == 0


def test_nrrdd_tau_one_binary_moves_every_pixel(teacher, bundle):
    d = _run("nrrdd", teacher, bundle, tau=1.0, mask_mode="binary", lr=0.2)
    v = d.views()
    # every pixel is free except where C reaches 1 exactly (an image's CAM maximum, at most)
    assert torch.equal(v["mask"], (v["cam"][:, None] < 1).float())
    assert float(v["mask"].mean()) > 0.99
    free = v["mask"].expand(-1, 3, -1, -1) > 0
    assert bool((d.images()[0] != v["initial"])[free].float().mean() > 0.95)


def test_nrrdd_selection_direction(teacher, bundle):
    """select=lowest picks harder (higher-CE) patches than select=highest (true-class reading;
    the max_prob reading: tests/test_diagnostics.py)."""
    lo = _make("nrrdd", teacher, bundle, select="lowest", confidence="true_class")
    hi = _make("nrrdd", teacher, bundle, select="highest", confidence="true_class")
    ce = {}
    for name, d in (("lo", lo), ("hi", hi)):
        while d.step_index < d.select_steps:
            d.step()
        p = teacher.predict01(d.images()[0])
        ce[name] = -torch.log(p[torch.arange(6), d.images()[1]]).mean()
        d.close()
    assert ce["lo"] > ce["hi"]
