"""Golden tests: SRe2L and RDED as computed by the official code (docs/METHODS.md §1.2, §2, §3).

``../shared/reference/official_values.json`` holds values that the released SRe2L and RDED code
computed on small, fixed inputs with the public CIFAR-10 ResNet-20 (akamaster checkpoint, ImageNet
mean/std). Each test rebuilds a case's inputs from its recipe, checks the rebuilt tensor against
the stored sha256 fingerprint, runs the project's own public functions and compares with the
stored outputs at the case's suggested tolerances:

- 1a / 1b: the BN-statistics loss (19 per-layer terms, CE, weighted sum, total, input gradient)
  on seeded noise and on 10 real images (:class:`nrrdd_core.losses.BNStatsLoss`);
- 2: three recover iterations in float64 and float32 (:class:`nrrdd_core.methods.common.Refiner`
  with the default :class:`~nrrdd_core.methods.sre2l.SRe2LConfig` at 32 px, fixed roll offsets);
- 3: RDED per-crop scores, best crops, ranking, selection and stitching
  (:mod:`nrrdd_core.methods.common`), and the whole :class:`~nrrdd_core.methods.rded.RDED`
  distiller with the case's literal boxes.

The config ``source`` audit (every field names a paper equation, the official code or "ours") is
here too. Every test name contains "official": ``pytest -k official`` selects them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SHARED_DATA
from nrrdd_core.configs import ConfigBase
from nrrdd_core.data.base import DatasetBundle, ImageSplit
from nrrdd_core.device import make_generator
from nrrdd_core.losses import BNStatsLoss
from nrrdd_core.methods import common
from nrrdd_core.methods.base import make_distiller, run_distiller
from nrrdd_core.methods.common import (Refiner, candidate_boxes, count_ties, crop_patches,
                                       float64_model, patch_scores, rank, slot_batches, stitch)
from nrrdd_core.methods.sre2l import SRe2LConfig
from nrrdd_core.models import Teacher, akamaster_data_config, load_resnet_cifar_checkpoint

REFERENCE = SHARED_DATA.parent / "reference" / "official_values.json"
CHECKPOINT = SHARED_DATA / "cifar10_resnet20_akamaster.th"
TRAIN_PREFIX = SHARED_DATA / "cifar10_exact_train_prefix.npz"


# ---- fixtures and helpers -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def ref() -> dict:
    if not REFERENCE.is_file():
        pytest.skip(f"golden values not found at {REFERENCE}")
    return json.loads(REFERENCE.read_text())


def case(ref: dict, prefix: str) -> dict:
    (c,) = [c for c in ref["cases"] if c["id"].startswith(prefix)]
    return c


@pytest.fixture(scope="module")
def teacher() -> Teacher:
    if not CHECKPOINT.is_file():
        pytest.skip(f"public ResNet-20 not found at {CHECKPOINT}")
    return load_resnet_cifar_checkpoint(CHECKPOINT, "resnet20_cifar", akamaster_data_config())


@pytest.fixture(scope="module")
def train_prefix() -> dict:
    if not TRAIN_PREFIX.is_file():
        pytest.skip(f"CIFAR-10 train prefix not found at {TRAIN_PREFIX}")
    with np.load(TRAIN_PREFIX) as z:
        return {"x": z["x"], "y": z["y"]}


def assert_fingerprint(x: torch.Tensor, fp: dict) -> None:
    """The rebuilt float32 input is bit-identical to the one the official code saw."""
    assert list(x.shape) == fp["shape"]
    data = x.detach().contiguous().numpy().astype("<f4").tobytes()
    assert hashlib.sha256(data).hexdigest() == fp["sha256_f32_le"], "input differs from the recipe"
    assert math.isclose(float(x.double().sum()), fp["sum_f64"], rel_tol=1e-9)


def close(name: str, actual, expected, tol: dict) -> None:
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64),
                               np.asarray(expected, dtype=np.float64),
                               rtol=tol.get("rtol", 0.0), atol=tol.get("atol", 0.0), err_msg=name)


def real01(train_prefix: dict, idx) -> torch.Tensor:
    """Rows ``idx`` of the train prefix as ``(n,3,32,32)`` float32 in [0,1] (the README recipe)."""
    return torch.from_numpy(train_prefix["x"][list(idx)]).permute(0, 3, 1, 2).contiguous() \
        .to(torch.float32) / 255.0


def noise_1a(c: dict) -> torch.Tensor:
    x = torch.randn((10, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    assert_fingerprint(x, c["inputs"]["x_fingerprint"])
    return x


def bn_layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


# ---- the teacher --------------------------------------------------------------------------------
def test_official_teacher_loads_as_the_reference(ref, teacher, train_prefix):
    check = ref["meta"]["teacher"]["check"]
    x = teacher.data_config.normalize(real01(train_prefix, [0]))
    close("logits of file index 0", teacher(x)[0].detach(),
          check["logits_of_file_index_0_of_train_prefix"],
          check["suggested_tolerance"]["logits"])
    assert teacher.data_config.mean == (0.485, 0.456, 0.406)
    assert teacher.data_config.std == (0.229, 0.224, 0.225)


# ---- 1a / 1b: BN-statistics loss ----------------------------------------------------------------
@pytest.mark.parametrize("which", ["1a", "1b"])
def test_official_bn_statistics_loss(ref, teacher, train_prefix, which):
    """Per-layer terms, CE, weighted BN sum, total and input gradient of SRe2L's recover loss
    (METHODS.md §1.2, §2) with our default weights (r_bn, first_bn_scale) at 32 px."""
    c = case(ref, which + "_")
    out, tol = c["outputs"], c["outputs"]["suggested_tolerance"]
    if which == "1a":
        x = noise_1a(c)
    else:
        dc = teacher.data_config
        x = dc.normalize(real01(train_prefix, range(10)))
        assert_fingerprint(x, c["inputs"]["x_fingerprint"])
        assert train_prefix["y"][:10].tolist() == c["inputs"]["labels"]
    y = torch.tensor(c["inputs"]["labels"])
    cfg = SRe2LConfig().resolved(teacher.data_config.image_size)
    assert cfg.r_bn == c["inputs"]["r_bn"]
    assert cfg.first_bn_scale == c["inputs"]["first_bn_multiplier"]
    assert bn_layer_names(teacher.model) == out["bn_layer_names"]
    x = x.clone().requires_grad_(True)
    with BNStatsLoss(teacher.model, cfg.first_bn_scale) as bn, \
            BNStatsLoss(teacher.model) as bn_default:
        logits = teacher(x)
        ce = F.cross_entropy(logits, y)
        terms = bn.layer_terms()
        total = ce + cfg.r_bn * bn.value()
        total.backward()
        close("default first_scale", bn_default.value().detach(), out["bn_sum_weighted"],
              tol["bn_layer_terms, bn_sum_weighted, total"])
        t = tol["bn_layer_terms, bn_sum_weighted, total"]
        close("bn_layer_terms", [float(v.detach()) for v in terms], out["bn_layer_terms"], t)
        close("bn_sum_weighted", bn.value().detach(), out["bn_sum_weighted"], t)
    close("total", total.detach(), out["total"], t)
    close("ce", ce.detach(), out["ce"], tol["ce"])
    g = tol["grad_input_l2, grad_input_maxabs"]
    close("grad_input_l2", x.grad.norm(), out["grad_input_l2"], g)
    close("grad_input_maxabs", x.grad.abs().max(), out["grad_input_maxabs"], g)
    close("logits_sum", logits.detach().sum(), out["logits_sum"], tol["logits_sum"])


# ---- 2: three recover iterations --------------------------------------------------------------
def _recover_three(c: dict, teacher: Teacher, dtype: torch.dtype
                   ) -> tuple[Refiner, list, list, list]:
    """Run the project's Refiner for the case's 3 iterations with its literal roll offsets."""
    inp = c["inputs"]
    if dtype == torch.float64:
        teacher = Teacher(model=float64_model(teacher), arch=teacher.arch,
                          data_config=teacher.data_config, cam_layer=teacher.cam_layer)
    x0 = torch.randn((10, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    assert_fingerprint(x0, inp["x0_fingerprint_before_cast"])
    x0 = x0.to(dtype)
    cfg = SRe2LConfig(iterations=3).resolved(32)
    assert (cfg.lr, cfg.beta1, cfg.beta2) == (0.25, 0.5, 0.9)
    offsets, grads, it = inp["roll_offsets"], [], [0]

    def fixed_roll(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x_jit = torch.roll(x, shifts=tuple(offsets[it[0]]), dims=(2, 3))
        x_jit.register_hook(lambda grad: grads.append(float(grad.norm())))  # = |dL/dx|: a roll
        return x_jit

    refiner = Refiner(teacher, x0, torch.tensor(inp["targets"]), cfg, cfg.r_bn,
                      slot_batches(10, 1, cfg.batch_size), augment=fixed_roll)
    records, terms = [], []
    with BNStatsLoss(teacher.model) as spy:  # a second hook set reads each forward's terms
        for i in range(3):
            it[0] = i
            losses, info = refiner.step(i, make_generator(0),
                                        lambda d: {k: float(torch.as_tensor(v).detach())
                                                   for k, v in d.items()})
            records.append({**losses, **info})
            terms.append([float(v.detach()) for v in spy.layer_terms()])
    refiner.close()
    return refiner, records, grads, terms


@pytest.mark.parametrize("variant", ["float64", "float32"])
def test_official_sre2l_recover_three_iterations(ref, teacher, variant):
    """Adam (lr 0.25, betas (0.5, 0.9)), cosine lr, roll, CE + r_bn * L_bn, per-channel clip to
    the normalised [0,1] box, last iterate kept (METHODS.md §2)."""
    c = case(ref, "2_")
    out = c["outputs"] if variant == "float64" else c["outputs"]["float32_variant"]
    tol = (c["outputs"] if variant == "float64" else out)["suggested_tolerance"]
    t_it = tol.get("per_iteration (losses, terms, grad_input_l2)", tol.get("losses"))
    t_final = tol["final_*"]
    x0_dtype = torch.float64 if variant == "float64" else torch.float32
    refiner, records, grads, terms = _recover_three(c, teacher, x0_dtype)
    for i, (rec, want) in enumerate(zip(records, out["per_iteration"])):
        assert math.isclose(rec["lr"], want["lr"], rel_tol=1e-9), f"lr of iteration {i}"
        close(f"ce[{i}]", rec["ce"], want["ce"], t_it)
        close(f"bn[{i}]", rec["bn"], want["bn_sum_weighted"], t_it)
        close(f"total[{i}]", rec["loss"], want["total"], t_it)
        close(f"grad_input_l2[{i}]", grads[i], want["grad_input_l2"], t_it)
        if "bn_layer_terms" in want:
            close(f"bn_layer_terms[{i}]", terms[i], want["bn_layer_terms"], t_it)
    x = refiner.x.double()
    assert refiner.x.dtype == x0_dtype
    x0 = torch.randn((10, 3, 32, 32), generator=torch.Generator().manual_seed(0)).to(x0_dtype)
    dc = teacher.data_config
    x01 = dc.denormalize(refiner.x).clamp(0, 1).double()
    for name, val in (("final_normalised_sum", x.sum()), ("final_normalised_max", x.max()),
                      ("final_normalised_min", x.min()), ("final_normalised_l2", x.norm()),
                      ("final_01_sum", x01.sum()), ("final_01_max", x01.max()),
                      ("final_01_min", x01.min()),
                      ("final_minus_init_l2", (x - x0.double()).norm())):
        close(name, val, out[name], t_final)


def test_official_sre2l_distiller_three_iterations(ref, teacher, train_prefix):
    """The SRe2L Distiller itself (seed 0: its initial noise is case 1a's input, labels 0..9, one
    batch of all images) with the case's roll offsets gives the official float32 iterations and
    final [0,1] images."""
    c = case(ref, "2_")
    out = c["outputs"]["float32_variant"]
    tol = out["suggested_tolerance"]
    d = make_distiller("sre2l", {"iterations": 3}, teacher=teacher,
                       dataset=_cat_bundle(case(ref, "3_"), train_prefix), ipc=1, device="cpu",
                       seed=0)
    assert_fingerprint(d.x_init, c["inputs"]["x0_fingerprint_before_cast"])
    assert d.labels.tolist() == c["inputs"]["targets"]
    offsets = iter(c["inputs"]["roll_offsets"])
    d.refiner.augment = lambda x, g: torch.roll(x, shifts=tuple(next(offsets)), dims=(2, 3))
    run_distiller(d)
    d.close()
    for rec, want in zip(d.history, out["per_iteration"]):
        close("ce", rec.losses["ce"], want["ce"], tol["losses"])
        close("bn", rec.losses["bn"], want["bn_sum_weighted"], tol["losses"])
        close("total", rec.losses["loss"], want["total"], tol["losses"])
    x01 = d.images()[0].double()
    close("final_01 sum/max/min", [x01.sum(), x01.max(), x01.min()],
          [out["final_01_sum"], out["final_01_max"], out["final_01_min"]], tol["final_*"])


# ---- 3: RDED scoring, selection, stitching -----------------------------------------------------
def _rded_inputs(c: dict, teacher: Teacher, train_prefix: dict):
    inp = c["inputs"]
    idx = inp["file_indices"]
    assert all(train_prefix["y"][i] == inp["label"] for i in idx)
    boxes = torch.tensor(inp["boxes_ijhw"]).view(len(idx), inp["num_crop_m"], 4)
    return real01(train_prefix, idx), boxes


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_official_rded_scores_and_selection(ref, teacher, train_prefix, precision):
    """Per-crop scores CE(T(p), c), best crop per image, ranking, the ipc*factor^2 kept and the
    stitched images (METHODS.md §3), with both tie-breaks (no ties in this case)."""
    c = case(ref, "3_")
    inp, out, tol = c["inputs"], c["outputs"], c["outputs"]["suggested_tolerance"]
    x01, boxes = _rded_inputs(c, teacher, train_prefix)
    # the box sampler is the released one: seed 8 gives the case's literal boxes
    torch.testing.assert_close(candidate_boxes(20, 5, 32, make_generator(8)), boxes)
    n, m = boxes.shape[:2]
    # the released order: crop and resize [0,1] pixels, then normalise
    patches = teacher.data_config.normalize(crop_patches(x01, boxes, 32 // inp["factor"]))
    close("candidates_sum_all_normalised", patches.double().sum(),
          out["candidates_sum_all_normalised"], tol["candidates_sum_all_normalised"])
    ce, margin = patch_scores(teacher, patches, inp["label"], precision)
    assert ce.dtype == (torch.float64 if precision == "float64" else torch.float32)
    ce, margin = ce.view(n, m), margin.view(n, m)
    key = "scores_f64" if precision == "float64" else "scores_f32"
    close(key, ce, out[key], tol[key])
    assert int((ce == 0).sum()) == len(out["exact_zero_scores_f32"]) == 0
    for tie_margin in (None, margin):
        best = rank(ce, tie_margin)[:, 0]
        assert best.tolist() == out["best_candidate_per_image"]
        rows = torch.arange(n)
        order = rank(ce[rows, best], None if tie_margin is None else tie_margin[rows, best])
        assert order.tolist() == out["images_ranked_by_best_score"]
        n_keep = inp["ipc"] * inp["factor"] ** 2
        kept = order[:n_keep]
        assert [[int(i), int(best[i])] for i in kept] == out["selected_image_crop_pairs_in_order"]
        assert [inp["file_indices"][i] for i in kept] == out["selected_file_indices"]
    if precision == "float32":
        close("best_score_per_image_f32", ce[rows, best], out["best_score_per_image_f32"],
              tol["scores_f32"])
    sel = teacher.data_config.normalize(crop_patches(x01[kept], boxes[kept, best[kept]][:, None],
                                                     32 // inp["factor"]))
    img = stitch(sel, inp["ipc"], inp["factor"], 32).double()
    close("stitched sum/max/min", [img.sum(), img.max(), img.min()],
          out["stitched_images_normalised_sum_max_min"], tol["stitched_*"])


def _cat_bundle(c: dict, train_prefix: dict) -> DatasetBundle:
    idx = c["inputs"]["file_indices"]
    x = torch.from_numpy(train_prefix["x"][idx]).permute(0, 3, 1, 2).contiguous()
    split = ImageSplit(x, torch.full((len(idx),), c["inputs"]["label"], dtype=torch.long))
    return DatasetBundle(split, split, akamaster_data_config())


def _rded_run(c, teacher, train_prefix, monkeypatch, boxes, **cfg):
    """The RDED distiller on the case's 20 images in file order with literal boxes (the official
    run's random draws replaced by literals, as for the golden values)."""
    inp = c["inputs"]
    monkeypatch.setattr(common, "candidate_boxes", lambda n, m, size, g, min_scale: boxes)
    d = make_distiller("rded", {"mipc": inp["mipc"], "num_crops": inp["num_crop_m"],
                                "factor": inp["factor"], "images_per_step": 7, **cfg},
                       teacher=teacher, dataset=_cat_bundle(c, train_prefix),
                       classes=[inp["label"]], ipc=inp["ipc"], device="cpu", seed=0)
    monkeypatch.setattr(d, "real_indices",
                        lambda cls, n, *gen: torch.arange(len(inp["file_indices"])))
    run_distiller(d)
    d.close()
    return d


@pytest.mark.parametrize("tie_break", ["margin", "index"])
def test_official_rded_distiller_end_to_end(ref, teacher, train_prefix, monkeypatch, tie_break):
    """The RDED Distiller (chunked steps, per-class ranking, stitching) gives the official
    stitched images; the step records report no ties for this case."""
    c = case(ref, "3_")
    _, boxes = _rded_inputs(c, teacher, train_prefix)
    d = _rded_run(c, teacher, train_prefix, monkeypatch, boxes, tie_break=tie_break)
    assert len(d.history) == 3 and d.history[-1].info["class_done"]
    assert d.history[-1].info["ties"] == 0 and d.history[-1].info["tie_at_cut"] is False
    img = d.x0.double()
    close("stitched sum/max/min", [img.sum(), img.max(), img.min()],
          c["outputs"]["stitched_images_normalised_sum_max_min"],
          c["outputs"]["suggested_tolerance"]["stitched_*"])


def test_official_rded_ties_margin_follows_float64(ref, teacher, train_prefix, monkeypatch):
    """The case's tied variant (boxes drawn with seed 0): three float32 scores are exactly 0.0
    and the two kept images tie. Image order keeps (3, 0), (5, 0) as the released float32 run
    did; the margin tie-break ranks the images as float64 does (5 before 3); the step record
    reports the ties and that they decided the selection."""
    c = case(ref, "3_")
    x01, _ = _rded_inputs(c, teacher, train_prefix)
    boxes = candidate_boxes(20, 5, 32, make_generator(0))
    patches = teacher.data_config.normalize(crop_patches(x01, boxes, 32))
    ce, margin = patch_scores(teacher, patches, 3)
    ce, margin = ce.view(20, 5), margin.view(20, 5)
    assert (ce == 0).nonzero().tolist() == [[3, 0], [3, 2], [5, 0]]
    ce64, _ = patch_scores(teacher, patches, 3, "float64")
    assert int((ce64.view(20, 5) == 0).sum()) == 0
    picks = {}
    for tie_break in ("index", "margin"):
        d = _rded_run(c, teacher, train_prefix, monkeypatch, boxes, tie_break=tie_break)
        rec = d.history[-1]
        assert rec.info["ties"] == 2 and rec.losses["ties"] == 2.0
        assert rec.info["tie_at_cut"] is False
        assert sum(r.losses["zero_scores"] for r in d.history) == 2
        picks[tie_break] = d.x0
    sel = {k: [int(i) for i in rank(ce[torch.arange(20), rank(ce, mg)[:, 0]],
                                    None if mg is None else
                                    margin[torch.arange(20), rank(ce, mg)[:, 0]])[:2]]
           for k, mg in (("index", None), ("margin", margin))}
    assert sel == {"index": [3, 5], "margin": [5, 3]}
    best64 = rank(ce64.view(20, 5))[:, 0]
    assert rank(ce64.view(20, 5)[torch.arange(20), best64])[:2].tolist() == [5, 3]
    assert not torch.equal(picks["index"], picks["margin"])


def test_official_rank_and_count_ties():
    key = torch.tensor([0.0, 0.3, 0.0, 0.1, 0.0])
    assert rank(key).tolist() == [0, 2, 4, 3, 1]  # stable: exact ties keep index order
    margin = torch.tensor([1.0, 0.0, 5.0, 0.0, 3.0])
    assert rank(key, margin).tolist() == [2, 4, 0, 3, 1]  # ties: larger margin first
    assert count_ties(key) == 3 and count_ties(torch.tensor([1.0, 2.0])) == 0
    rows = torch.stack([key, key.flip(0)])
    assert rank(rows, torch.stack([margin, margin.flip(0)]))[1].tolist() == [2, 0, 4, 1, 3]


# ---- config source audit -----------------------------------------------------------------------
SOURCE = re.compile(r"^(paper \([^)]+\)|code \([^)]+\)|ours( \([^)]+\))?)"
                    r"( / (paper \([^)]+\)|code \([^)]+\)|ours( \([^)]+\))?))*$")


def _config_classes() -> list[type]:
    import nrrdd_core.cli  # noqa: F401  (imports every module that declares a config)
    import nrrdd_core.evaluate.kd  # noqa: F401
    import nrrdd_core.experts  # noqa: F401
    import nrrdd_core.models.train  # noqa: F401
    from nrrdd_core.methods.base import get_method, list_methods

    for name in list_methods():
        get_method(name)
    seen, todo = [], list(ConfigBase.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return [c for c in seen if c.__module__.startswith("nrrdd_core")]


def test_official_every_config_field_names_its_source():
    """Every config field's ``source`` is ``paper (...)``, ``code (...)`` or ``ours`` (optionally
    ``ours (...)``), possibly several joined by `` / ``; never empty."""
    classes = _config_classes()
    assert {"SRe2LConfig", "RDEDConfig", "NRRDDConfig", "EDFConfig", "EvalConfig",
            "ExpertConfig", "TeacherTrainConfig"} <= {c.__name__ for c in classes}
    bad = [f"{cls.__name__}.{f.name}: {f.metadata.get('source')!r}" for cls in classes
           for f in dataclasses.fields(cls) if not SOURCE.match(str(f.metadata.get("source")))]
    assert not bad, "fields without a paper / code / ours source:\n" + "\n".join(bad)
    assert not SOURCE.match("code") and not SOURCE.match("paper") and SOURCE.match("ours")


# ---- SRe2L's released per-resolution settings ------------------------------------------------
def _roll_shift(out: torch.Tensor, size: int) -> tuple[int, int]:
    dy, dx = (out[0, 0] == 0).nonzero()[0].tolist()
    return dy, dx


@pytest.mark.parametrize("size,max_roll,symmetric", [(32, 4, False), (64, 4, True),
                                                     (224, 32, False)])
def test_official_sre2l_jitter_per_resolution(size, max_roll, symmetric):
    """Roll offsets as the released recover scripts draw them (METHODS.md §2): {0..4} per axis
    at 32 px, {-4..4} at 64 px, {0..32} at 224 px; lr 0.1 and r_bn 1.0 at 64 px only."""
    from nrrdd_core.augment import random_roll, recover_jitter

    assert recover_jitter(size) == (max_roll, symmetric)
    cfg = SRe2LConfig().resolved(size)
    assert (cfg.jitter, cfg.jitter_mode) == (max_roll, "symmetric" if symmetric else "nonnegative")
    assert (cfg.lr, cfg.r_bn) == ((0.1, 1.0) if size == 64 else (0.25, 0.01))
    x = torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size)
    g = make_generator(0)
    shifts = set()
    for _ in range(300):
        dy, dx = _roll_shift(random_roll(x, g, *cfg.roll_settings(size)), size)
        shifts.add(((dy + max_roll) % size - max_roll, (dx + max_roll) % size - max_roll))
    values = {v for s in shifts for v in s}
    assert values == set(range(-max_roll if symmetric else 0, max_roll + 1))


def test_official_sre2l_explicit_values_win():
    """A user's explicit lr / r_bn / jitter replace the per-resolution defaults; -1 and "auto" mean
    the released value; other negative values are refused."""
    from nrrdd_core.errors import ConfigError

    cfg = SRe2LConfig(lr=0.05, r_bn=0.0, jitter=2, jitter_mode="symmetric").resolved(64)
    assert (cfg.lr, cfg.r_bn, cfg.jitter, cfg.jitter_mode) == (0.05, 0.0, 2, "symmetric")
    assert SRe2LConfig(jitter=0).resolved(224).jitter == 0
    for bad in ({"lr": -0.5}, {"r_bn": -0.1}, {"lr": 0.0}):
        with pytest.raises(ConfigError):
            SRe2LConfig(**bad)


def test_official_sre2l_distiller_runs_the_resolved_config(ref, teacher, train_prefix):
    c = case(ref, "3_")
    d = make_distiller("sre2l", {"iterations": 1}, teacher=teacher,
                       dataset=_cat_bundle(c, train_prefix), classes=[3], ipc=1, device="cpu")
    assert (d.config.lr, d.config.r_bn, d.config.jitter, d.config.jitter_mode) == \
        (0.25, 0.01, 4, "nonnegative")
    d.close()
