"""Student evaluation, KD protocol (METHODS.md §1.4): rules, determinism, label modes, store replay."""

from __future__ import annotations

import pytest
import torch

from nrrdd_core.data.base import DataConfig, DatasetBundle, ImageSplit
from nrrdd_core.device import make_generator
from nrrdd_core.errors import ConfigError, DataError, StoppedError
from nrrdd_core.evaluate import (EvalConfig, default_batch_size, eval_epochs, evaluate_student,
                                 random_real_subset, smoothing_lr)
from nrrdd_core.models import Teacher, build_model

K, S = 4, 16


@pytest.fixture(scope="module")
def bundle() -> DatasetBundle:
    g = make_generator(0)

    def split(n):
        return ImageSplit(torch.randint(0, 256, (n, 3, S, S), dtype=torch.uint8, generator=g),
                          torch.arange(n) % K)

    dc = DataConfig("rand", S, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), tuple(f"k{i}" for i in range(K)))
    return DatasetBundle(split(24), split(16), dc)


@pytest.fixture(scope="module")
def teacher(bundle) -> Teacher:
    torch.manual_seed(0)
    model = build_model("convnet_bn", K, S, width=8, depth=2)
    return Teacher(model, "convnet_bn", bundle.config, "features", {"width": 8, "depth": 2})


def tiny_cfg(**kw) -> EvalConfig:
    return EvalConfig(student="convnet_bn", student_width=8, student_depth=2, epochs=2, **kw)


def test_rules():
    assert eval_epochs(300) == list(range(249, 300, 10))
    assert eval_epochs(3) == [2] and eval_epochs(10) == [8, 9] and eval_epochs(7, every=3) == [2, 5, 6]
    assert smoothing_lr(0, 300) == 1.0 and smoothing_lr(300, 300) == pytest.approx(0.5)
    assert [default_batch_size(i, 10, 10_000) for i in (1, 10, 50)] == [10, 50, 100]
    assert default_batch_size(10, 100, 10_000) == 100 and default_batch_size(50, 10, 30) == 30


def test_epochs_default_by_protocol():
    assert EvalConfig().epochs == 0 and EvalConfig().num_epochs == 300
    assert EvalConfig(protocol="edf").num_epochs == 1000 and EvalConfig(epochs=7).num_epochs == 7


def test_random_real_subset(bundle):
    x, y = random_real_subset(bundle, ["k1", 3], ipc=2, seed=5)
    assert x.shape == (4, 3, S, S) and y.tolist() == [1, 1, 3, 3]
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    assert torch.equal(x, random_real_subset(bundle, ["k1", 3], ipc=2, seed=5)[0])
    with pytest.raises(DataError):
        random_real_subset(bundle, None, ipc=100)
    with pytest.raises(ConfigError):
        random_real_subset(bundle, None, ipc=0)


@pytest.mark.parametrize("mode", ["soft", "dbr", "hard"])
def test_label_modes_run_and_are_deterministic(bundle, teacher, mode):
    x, y = random_real_subset(bundle, [0, 2], ipc=3, seed=0)
    calls = []
    cfg = tiny_cfg(label_mode=mode, mix="mixup" if mode == "dbr" else "cutmix")
    res = evaluate_student(x, y, teacher, bundle, cfg, device="cpu", seed=1,
                           progress=lambda e, n, m: calls.append((e, n, dict(m))))
    assert [c[:2] for c in calls] == [(1, 2), (2, 2)]
    assert 0.0 <= res.final_acc <= res.best_acc <= 1.0
    assert res.n_test == 8  # test images of classes 0 and 2 only
    assert len(res.history) == 2 and "acc" in res.history[-1] and res.history[0]["lr"] == 1e-3
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    assert res.config["batch_size"] == 6 and res.label_bytes["soft"] == res.label_bytes["dbr"] == 0
    assert res.config["epochs"] == 2
    again = evaluate_student(x, y, teacher, bundle, cfg, device="cpu", seed=1)
    assert [h["loss"] for h in again.history] == [h["loss"] for h in res.history]
    assert again.final_acc == res.final_acc


def test_stored_labels_are_written_and_replayed(bundle, teacher, tmp_path):
    x, y = random_real_subset(bundle, None, ipc=2, seed=0)
    cfg = tiny_cfg(label_mode="dbr", store_labels=True, batch_size=3)
    first = evaluate_student(x, y, teacher, bundle, cfg, device="cpu", seed=0, label_dir=tmp_path)
    assert first.label_bytes["dbr"] == len(x) * 2 * 2 * 2  # N x epochs x 2 values x fp16
    assert sorted(p.name for p in (tmp_path / "labels_dbr").glob("*.f16")) == ["dbr_e0000.f16",
                                                                              "dbr_e0001.f16"]
    replay = evaluate_student(x, y, teacher, bundle, cfg, device="cpu", seed=0, label_dir=tmp_path)
    assert [h["loss"] for h in replay.history] == [h["loss"] for h in first.history]
    online = evaluate_student(x, y, teacher, bundle, cfg.replace(store_labels=False), device="cpu", seed=0)
    assert [h["loss"] for h in online.history] == pytest.approx([h["loss"] for h in first.history],
                                                                rel=1e-2)


def test_errors(bundle, teacher):
    x, y = random_real_subset(bundle, None, ipc=1)
    with pytest.raises(StoppedError):
        evaluate_student(x, y, teacher, bundle, tiny_cfg(), device="cpu", should_stop=lambda: True)
    with pytest.raises(DataError):
        evaluate_student(x, y + K, teacher, bundle, tiny_cfg(), device="cpu")
    with pytest.raises(DataError):
        evaluate_student(x[:, :, :8, :8], y, teacher, bundle, tiny_cfg(), device="cpu")
    with pytest.raises(ConfigError):
        tiny_cfg(label_mode="fuzzy")
    with pytest.raises(ConfigError):
        EvalConfig(student="no_such_net")
    with pytest.raises(ConfigError, match="takes no option"):
        evaluate_student(x, y, teacher, bundle, tiny_cfg(), device="cpu", syn_lr=0.01)


def test_no_weight_decay_on_biases_and_norm_weights(bundle, teacher, monkeypatch):
    """METHODS.md §1.4: AdamW with weight decay on conv / linear weights only."""
    made = []

    class Recorder(torch.optim.AdamW):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            made.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Recorder)
    x, y = random_real_subset(bundle, None, ipc=1)
    evaluate_student(x, y, teacher, bundle, tiny_cfg(weight_decay=0.05), device="cpu")
    opt, = made
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    student = opt.param_groups[0]["params"] + opt.param_groups[1]["params"]
    assert len(wd) == len(student) == len({id(p) for p in student})
    assert len(wd) == len(list(build_model("convnet_bn", K, S, width=8, depth=2).parameters()))
    kinds = {"decay": 0, "none": 0}
    for p in student:
        # conv kernels (4-D) and the classifier matrix (2-D) decay; biases and BN/IN weights do not
        want = 0.05 if p.ndim >= 2 else 0.0
        assert wd[id(p)] == want
        kinds["decay" if want else "none"] += 1
    assert kinds["decay"] >= 3 and kinds["none"] >= 6
