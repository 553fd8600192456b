"""Like-with-like accuracy study of the KD-family sets (``bench/accuracy.py --study``).

Each *setting* is one teacher in the pixel domain it was trained on, and the student has the
teacher's architecture (the papers' columns, METHODS.md §1.4):

- ``resnet20_exact``: the public ResNet-20 (akamaster, trained on original CIFAR-10 pixels) on the
  original-pixel files ``cifar10_exact_train_prefix.npz`` / ``cifar10_exact_test_prefix.npz``
  (5,438 / 1,017 images); student ResNet-20.
- ``convnet_jpeg``: a ConvNet-BN-3 teacher trained here (``train_teacher``) on the JPEG files
  ``cifar10_train.npz`` / ``cifar10_test.npz`` (20,000 / 10,000 images); student ConvNet-BN-3.

Per setting: the random real subset, RDED, CIDD alone (METHODS.md §4.2, each confidence reading)
and CIDD + NRR (METHODS.md §4.3) at IPC 10; on the ablation setting also two refinement iteration
counts and the label-refinement term (METHODS.md §4.5). Every set is distilled once (seed
``distill_seed``) and evaluated with the KD protocol and RandAugment (NRR-DD's student protocol,
applied to every row so that only the images differ) with three student seeds; rows give mean ±
sample std. A cross-architecture table (ResNet-20 teacher, ConvNet-BN student) is labelled apart.
``--diagnostics`` adds, per set, what :mod:`nrrdd_core.diagnostics` measures (teacher and
independent-model agreement before and after refinement, pixel change; the independent model is a
small ConvNet-BN trained on the setting's training split).

Units (teacher, distilled set, evaluation) are cached under ``bench/cache/`` keyed by their full
config; each setting writes its own ``bench/results/study_<budget>_<setting>.json`` after every
unit, so settings can run in separate processes and an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import common
from nrrdd_core.data import load_dataset
from nrrdd_core.device import resolve_device
from nrrdd_core.evaluate import EvalConfig, evaluate_student, random_real_subset
from nrrdd_core.io import atomic_torch_save, config_key, safe_torch_load
from nrrdd_core.methods import get_method, make_distiller
from nrrdd_core.models import TeacherTrainConfig, evaluate_accuracy, train_teacher

EXACT_FILES = {"train_file": "cifar10_exact_train_prefix.npz", "test_file": "cifar10_exact_test_prefix.npz"}
JPEG_FILES = dict(common.CIFAR_FILES)


@dataclass(frozen=True)
class Variant:
    """One row: a method with overrides. ``cidd_only``: stop NRR-DD after CIDD (``x~0``)."""

    name: str
    method: str                       # "random", "rded", "nrrdd"
    overrides: dict = field(default_factory=dict)
    cidd_only: bool = False


@dataclass(frozen=True)
class Setting:
    """A teacher in its own pixel domain and the student trained on its sets."""

    name: str
    label: str
    files: dict
    teacher: str | TeacherTrainConfig  # "resnet20" (pretrained) or a training recipe
    student: str
    variants: tuple[Variant, ...]
    table: str = "same_arch"          # or "cross_arch"
    core: int = 0                     # run the first ``core`` variants at every seed first (0 = all)
    eval_epochs: int = 0              # KD epochs of this setting's students (0 = the budget's)


@dataclass(frozen=True)
class StudyBudget:
    name: str
    ipc: int
    distill_seed: int
    student_seeds: tuple[int, ...]
    eval_epochs: int
    randaugment: bool
    settings: tuple[Setting, ...]
    nrrdd: dict                       # NRR-DD overrides common to every NRR-DD row
    note: str = ""


def grid(iters: tuple[int, ...], label_refine: float, confs=("true_class", "max_prob"),
         lr_iters: int | None = None) -> tuple[Variant, ...]:
    """The ablation rows: random, RDED, then per confidence reading CIDD alone and CIDD + NRR at
    the last (main) iteration count; then the other iteration counts, and CIDD + NRR + label
    refinement at ``lr_iters`` (default: the last count). Rows run in this order (most telling
    first), seed by seed."""
    main = iters[-1]
    rows = [Variant("random", "random"), Variant("RDED", "rded")]
    for c in confs:
        rows += [Variant(f"CIDD ({c})", "nrrdd", {"confidence": c, "iterations": 1}, True),
                 Variant(f"CIDD + NRR {main} ({c})", "nrrdd", {"confidence": c, "iterations": main})]
    for c in confs:
        rows += [Variant(f"CIDD + NRR {it} ({c})", "nrrdd", {"confidence": c, "iterations": it})
                 for it in iters[:-1]]
        if label_refine > 0:
            it = lr_iters or main
            rows.append(Variant(f"CIDD + NRR {it} + label refinement ({c})", "nrrdd",
                                {"confidence": c, "iterations": it, "label_refine_weight": label_refine}))
    return tuple(rows)


CPU_GRID = grid((30, 100), 1.0, confs=("max_prob", "true_class"))
STUDIES = {
    "cpu": StudyBudget(
        name="cpu", ipc=10, distill_seed=0, student_seeds=(0, 1, 2), eval_epochs=15, randaugment=True,
        nrrdd={}, settings=(
            Setting("resnet20_exact", "ResNet-20 (pretrained, akamaster) on original pixels",
                    EXACT_FILES, "resnet20", "resnet20_cifar", CPU_GRID, core=6),
            Setting("convnet_jpeg", "ConvNet-BN-3 (trained here) on JPEG pixels", JPEG_FILES,
                    TeacherTrainConfig(arch="convnet_bn", depth=3, epochs=20, seed=0), "convnet_bn",
                    tuple(v for v in CPU_GRID if v.name in (
                        "random", "RDED", "CIDD (max_prob)", "CIDD + NRR 100 (max_prob)",
                        "CIDD (true_class)", "CIDD + NRR 100 (true_class)")), core=4,
                    eval_epochs=100),
            Setting("resnet20_exact_to_convnet", "ResNet-20 (pretrained) on original pixels -> "
                    "ConvNet-BN-3 student", EXACT_FILES, "resnet20", "convnet_bn",
                    tuple(v for v in CPU_GRID if v.name in ("random", "RDED", "CIDD + NRR 100 (max_prob)")),
                    table="cross_arch")),
        note="CPU budget: IPC 10, every set distilled once (seed 0) and evaluated with 3 student "
             "seeds, KD protocol with RandAugment on every row, tested after the last epoch; "
             "NRR-DD 30 / 100 refinement iterations (published 2000); RDED and CIDD score 300 real "
             "images per class (as published; the exact files hold 523-572 per class). Students "
             "train 15 KD epochs (published 300) with the pretrained ResNet-20 as teacher; the "
             "ConvNet-BN-on-JPEG setting trains its teacher here (20 epochs, published 200) and "
             "gives its cheaper ConvNet-BN students 100 epochs (200 optimiser steps)."),
    "tiny": StudyBudget(
        name="tiny", ipc=1, distill_seed=0, student_seeds=(0, 1), eval_epochs=1, randaugment=True,
        nrrdd={"mipc": 4, "images_per_step": 4},
        settings=(Setting("shapes", "tiny ConvNet-BN on shapes", {}, common.TINY_TEACHER, "convnet_bn",
                          grid((2,), 1.0), core=2),),
        note="tiny smoke setting on the built-in shapes dataset (numbers mean nothing)"),
}


def variant_config(budget: StudyBudget, v: Variant) -> dict:
    """The full config dict of a variant's method (defaults filled in)."""
    o = {**(budget.nrrdd if v.method == "nrrdd" else {}), **v.overrides}
    if v.method == "rded" and "mipc" in budget.nrrdd:
        o = {k: budget.nrrdd[k] for k in ("mipc", "images_per_step")}
    return get_method(v.method).Config.from_dict(o).to_dict()


class Study:
    """One setting of a study budget: data, teacher, sets, evaluations, results document."""

    def __init__(self, budget: StudyBudget, setting: Setting, device: str, out: Path, argv: list[str],
                 cache: bool = True):
        self.b, self.s, self.out, self.cache = budget, setting, out, cache
        self.device = resolve_device(device)
        if setting.files:
            self.bundle = load_dataset("npz", root=str(common.SHARED_DATA), **setting.files)
            self.data_key = {"name": "npz", "root": str(common.SHARED_DATA), **setting.files,
                             "n_train": len(self.bundle.train), "n_test": len(self.bundle.test)}
        else:
            self.bundle = common.load_shapes(tiny=True)
            self.data_key = {"name": "shapes", **common.TINY_SHAPES, "n_train": len(self.bundle.train),
                             "n_test": len(self.bundle.test)}
        self.t0 = time.perf_counter()
        self.doc = {"study": budget.name, "setting": setting.name, "label": setting.label,
                    "table": setting.table, "note": budget.note, "student": setting.student,
                    "command": "python bench/accuracy.py " + " ".join(argv), "dataset": self.data_key,
                    "machine": common.machine_info(self.device), "status": "running",
                    "eval": self.eval_config().to_dict(),
                    "student_seeds": list(budget.student_seeds), "distill_seed": budget.distill_seed,
                    "teacher": None, "rows": []}
        self.teacher = None

    # ---- bookkeeping -------------------------------------------------------------------------
    def save(self) -> None:
        self.doc["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.doc["machine"]["loadavg_now"] = common.machine_info(self.device)["loadavg"]
        common.write_json(self.out, self.doc)

    def unit(self, kind: str, spec: dict, compute):
        t0 = time.perf_counter()
        res = common.cached_unit(kind, {**spec, "data": self.data_key, "device": self.device.type},
                                 compute, cache=self.cache)
        common.log.info("[%6.0fs] %s %s %s done in %.1fs", time.perf_counter() - self.t0, self.s.name,
                        kind, spec.get("seed", ""), time.perf_counter() - t0)
        return res

    # ---- teacher -------------------------------------------------------------------------------
    def load_teacher(self):
        if self.s.teacher == "resnet20":
            t = common.resnet20_teacher(device=str(self.device))
            info = self.unit("teacher", {"teacher": "resnet20_akamaster"}, lambda: {
                "test_acc": evaluate_accuracy(t, self.bundle.test, t.data_config, self.device)})
            self.doc["teacher"] = {"name": "resnet20", "source": f"pretrained {common.RESNET20}",
                                   "test_acc": info["test_acc"]}
        else:
            cfg = self.s.teacher

            def compute():
                t0 = time.perf_counter()
                t = train_teacher(cfg, self.bundle, device=self.device)
                return {"test_acc": t.test_acc, "seconds": time.perf_counter() - t0}
            info = self.unit("teacher", {"teacher": cfg.to_dict()}, compute)
            t = train_teacher(cfg, self.bundle, device=self.device)  # cache hit
            self.doc["teacher"] = {"name": cfg.arch, "source": "train_teacher", "config": cfg.to_dict(),
                                   "epochs": cfg.epochs, "test_acc": info["test_acc"],
                                   "train_seconds": info["seconds"]}
        self.teacher = t
        self.save()
        return t

    # ---- sets and evaluations -----------------------------------------------------------------
    def distill(self, v: Variant) -> dict:
        """A cached distilled set of ``v``: ``{"path", "seconds", "steps"}`` (uint8 images +
        labels in a ``.pt`` file; the random subset included)."""
        b = self.b
        config = None if v.method == "random" else variant_config(b, v)
        spec = {"variant": v.name, "method": v.method, "config": config, "cidd_only": v.cidd_only,
                "teacher": self.doc["teacher"]["name"] if self.doc["teacher"] else None,
                "teacher_cfg": self.doc["teacher"].get("config"), "ipc": b.ipc, "seed": b.distill_seed}
        del spec["variant"]  # the row's name is a label, not part of the key

        def compute():
            t0 = time.perf_counter()
            steps = 0
            if v.method == "random":
                x01, y = random_real_subset(self.bundle, None, b.ipc, seed=b.distill_seed)
            else:
                d = make_distiller(v.method, get_method(v.method).Config.from_dict(config),
                                   teacher=self.teacher, dataset=self.bundle, ipc=b.ipc,
                                   device=self.device, seed=b.distill_seed)
                try:
                    end = d.select_steps if v.cidd_only else d.total_steps
                    while d.step_index < end:
                        d.step()
                    x01, y = d.images()
                    steps = d.step_index
                finally:
                    d.close()
            path = common.bench_cache() / "sets" / f"{config_key(spec)}.pt"
            atomic_torch_save({"x_u8": (x01.clamp(0, 1) * 255).round().to(torch.uint8), "labels": y}, path)
            return {"path": str(path), "seconds": time.perf_counter() - t0, "steps": steps}
        return self.unit("set", spec, compute)

    def eval_config(self) -> EvalConfig:
        epochs = self.s.eval_epochs or self.b.eval_epochs
        return EvalConfig(protocol="kd", student=self.s.student, epochs=epochs,
                          randaugment=self.b.randaugment, eval_every=epochs,
                          student_width=8 if self.b.name == "tiny" else 0)

    def evaluate(self, dset: dict, seed: int) -> dict:
        cfg = self.eval_config()
        spec = {"set": Path(dset["path"]).name, "teacher": self.doc["teacher"]["name"],
                "teacher_cfg": self.doc["teacher"].get("config"), "seed": seed, "eval": cfg.to_dict()}

        def compute():
            data = safe_torch_load(dset["path"])
            res = evaluate_student(data["x_u8"].float() / 255, data["labels"], self.teacher, self.bundle,
                                   cfg, device=self.device, seed=seed)
            return {"final_acc": res.final_acc, "best_acc": res.best_acc, "seconds": res.seconds,
                    "n_test": res.n_test}
        return self.unit("eval", spec, compute)

    def add_row(self, v: Variant, dset: dict, evals: list[dict]) -> None:
        accs = [100 * r["final_acc"] for r in evals]
        row = {"table": self.s.table, "setting": self.s.name, "variant": v.name, "method": v.method,
               "overrides": v.overrides, "cidd_only": v.cidd_only, "n": len(accs), "accs": accs,
               "mean": statistics.fmean(accs) if accs else None,
               "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
               "distill_seconds": dset["seconds"], "steps": dset["steps"], "set_path": dset["path"],
               "eval_seconds": [r["seconds"] for r in evals], "n_test": evals[0]["n_test"] if evals else None}
        self.doc["rows"] = [r for r in self.doc["rows"] if r["variant"] != v.name] + [row]
        self.save()

    def run(self) -> None:
        """The core rows (the first :attr:`Setting.core` variants) seed by seed, then the
        others seed by seed: a run stopped early has the core rows at the most seeds."""
        self.load_teacher()
        evals: dict[str, list] = {v.name: [] for v in self.s.variants}
        sets: dict[str, dict] = {}
        k = self.s.core or len(self.s.variants)
        for group in (self.s.variants[:k], self.s.variants[k:]):
            for seed in self.b.student_seeds:
                for v in group:
                    if v.name not in sets:
                        sets[v.name] = self.distill(v)
                    evals[v.name].append(self.evaluate(sets[v.name], seed))
                    self.add_row(v, sets[v.name], evals[v.name])
        self.doc["status"] = "complete"
        self.save()


def add_diagnostics(paths: list[Path], device: str = "cpu", recipe: dict | None = None) -> dict:
    """Refinement diagnostics (:func:`nrrdd_core.diagnostics.diagnose`, METHODS.md §4.6) of every
    row of one setting (its result file and part files, ``paths``), written to
    ``diagnostics_<budget>_<setting>.json`` beside them (so running study processes do not
    overwrite them): ``"diagnostics"`` (``{variant: summary + warning}``) and ``"independent"``;
    :func:`load_docs` merges it. Each CIDD + NRR
    set against the CIDD set of the same confidence reading (its ``x~0``: same seed, same
    selection), every other set against itself (agreement only). The independent model is
    :func:`~nrrdd_core.diagnostics.independent_model` trained on the setting's training split
    (``recipe`` overrides; cached). Returns the merged document."""
    import json

    from nrrdd_core.diagnostics import diagnose, independent_model

    docs = [json.loads(Path(p).read_text()) for p in paths]
    doc = merge(docs)
    budget = STUDIES[doc["study"]]
    setting = next(s for s in budget.settings if s.name == doc["setting"])
    st = Study(budget, setting, device, Path(paths[0]), [])
    st.doc = dict(doc)
    st.save = lambda: None  # the files are written below
    st.load_teacher()
    rec = {"epochs": 10, **(recipe or {})}
    t0 = time.perf_counter()
    ind = independent_model(st.bundle, st.device, rec)
    independent = {"recipe": rec, "seconds": time.perf_counter() - t0,
                   "test_acc": evaluate_accuracy(ind, st.bundle.test, ind.data_config, st.device)}
    sets = {r["variant"]: r["set_path"] for r in doc["rows"]}
    out = {}
    for r in doc["rows"]:
        x = before = safe_torch_load(r["set_path"])
        conf = r["overrides"].get("confidence")
        if r["method"] == "nrrdd" and not r["cidd_only"] and f"CIDD ({conf})" in sets:
            before = safe_torch_load(sets[f"CIDD ({conf})"])
        d = diagnose(st.teacher, before["x_u8"].float() / 255, x["x_u8"].float() / 255, x["labels"], ind)
        out[r["variant"]] = {**d.summary(), "warning": d.warning(),
                             "before": "CIDD" if before is not x else "itself"}
    common.write_json(Path(paths[0]).parent / f"diagnostics_{doc['study']}_{doc['setting']}.json",
                      {"diagnostics": out, "independent": independent})
    return {**doc, "diagnostics": out, "independent": independent}


def out_path(budget: str, setting: str, results_dir: Path = common.RESULTS_DIR, part: str = "") -> Path:
    """``study_<budget>_<setting>[.<part>].json`` (a part holds some of the setting's rows, run
    by another process)."""
    return results_dir / f"study_{budget}_{setting}{'.' + part if part else ''}.json"


def merge(docs: list[dict]) -> dict:
    """One document of a setting from its result file and part files: the rows of all (in the
    setting's variant order), the status ``complete`` only if every part is, the machine and
    command of the main file."""
    docs = sorted(docs, key=lambda d: bool(d.get("part")))
    out = dict(docs[0])
    setting = next((s for s in STUDIES[out["study"]].settings if s.name == out["setting"]), None)
    order = {v.name: i for i, v in enumerate(setting.variants)} if setting else {}
    rows: dict[str, dict] = {}
    for d in docs:  # a row run by several processes: the one with the most student seeds
        for r in d["rows"]:
            if r["variant"] not in rows or r["n"] > rows[r["variant"]]["n"]:
                rows[r["variant"]] = r
    out["rows"] = sorted(rows.values(), key=lambda r: order.get(r["variant"], len(order)))
    seeds = len(out.get("student_seeds") or [])
    done = setting is not None and all(v.name in rows and rows[v.name]["n"] >= seeds for v in setting.variants)
    out["status"] = "complete" if done or all(d["status"] == "complete" for d in docs) else "partial"
    out["commands"] = [d["command"] for d in docs]
    diag = {k: v for d in docs for k, v in (d.get("diagnostics") or {}).items()}
    if diag:
        out["diagnostics"] = diag
    return out


def load_docs(results_dir: Path = common.RESULTS_DIR) -> list[dict]:
    """Every setting's merged document (:func:`merge`) found in ``results_dir``."""
    import json

    groups: dict[tuple, list[dict]] = {}
    for p in sorted(results_dir.glob("study_*.json")):
        d = json.loads(p.read_text())
        groups.setdefault((d["study"], d["setting"]), []).append(d)
    docs = [merge(g) for g in groups.values()]
    for d in docs:
        p = results_dir / f"diagnostics_{d['study']}_{d['setting']}.json"
        if p.is_file():
            d.update(json.loads(p.read_text()))
    return docs


def setting_paths(budget: str, setting: str, results_dir: Path = common.RESULTS_DIR) -> list[Path]:
    """The result file and part files of a setting that exist."""
    return sorted(p for p in results_dir.glob(f"study_{budget}_{setting}*.json")
                  if p.name.split(".")[0] == f"study_{budget}_{setting}")


def main(budget_name: str, settings: list[str] | None, device: str, argv: list[str], cache: bool = True,
         results_dir: Path | None = None, variants: list[str] | None = None, part: str = "") -> list[dict]:
    """Run the chosen settings (default: all) of a study budget, one after another; with
    ``variants`` only those rows (written to the part file ``part``)."""
    budget = STUDIES[budget_name]
    docs = []
    for s in budget.settings:
        if settings and s.name not in settings:
            continue
        if variants:
            s = dataclasses.replace(s, variants=tuple(v for v in s.variants if v.name in variants), core=0)
        st = Study(budget, s, device, out_path(budget.name, s.name, results_dir or common.RESULTS_DIR, part),
                   argv, cache=cache)
        if part:
            st.doc["part"] = part
        st.run()
        docs.append(st.doc)
    return docs
