"""What each method's distilled set is worth on real CIFAR-10 (issue 6 part 1).

On ../shared/data CIFAR-10 (20,000 JPEG-decoded training images, the full 10,000-image JPEG test
set): train the ConvNet-BN-3 teacher with ``train_teacher`` (the squeeze step); distil IPC 10 with
SRe2L, RDED, NRR-DD and EDF from that teacher with the same seeds and classes (IPC 1 and 50 too,
one seed, on the CPU budget; EDF's CPD alpha per IPC as in METHODS.md §5.4); evaluate every set
with the same student (ConvNet-BN) and the KD protocol (METHODS.md §1.4), EDF also with its own protocol
(METHODS.md §5.6); the random real subset as baseline; then ablations at a small budget (NRR-DD tau and
mask mode, soft / DBR / hard labels with their label bytes, EDF alpha x beta); finally the whole
comparison again with the pretrained ResNet-20 (akamaster) as teacher.

Every unit (teacher, expert buffer, distilled set, evaluation) is cached under ``bench/cache/``
(``$NRRDD_BENCH_CACHE``) keyed by its full config, and the results JSON is rewritten after every
unit, so an interrupted run continues where it stopped and ``--report`` can render a partial run.

    .venv/bin/python bench/accuracy.py --budget cpu            # ~80 min on 2 quiet CPU cores
    .venv/bin/python bench/accuracy.py --budget cpu --no-extra-ipcs  # ~55 min: IPC 10 only
    .venv/bin/python bench/accuracy.py --budget paper --device cuda
    .venv/bin/python bench/accuracy.py --report                # docs/RESULTS.md from the JSON
    .venv/bin/python bench/accuracy.py --tiny --out /tmp/a.json  # seconds, for tests
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import report  # noqa: E402
import study  # noqa: E402

from nrrdd_core.device import resolve_device  # noqa: E402
from nrrdd_core.evaluate import EvalConfig, evaluate_student, random_real_subset  # noqa: E402
from nrrdd_core.experts import ExpertConfig, load_buffer, train_experts  # noqa: E402
from nrrdd_core.export import build_manifest, load_run, save_run  # noqa: E402
from nrrdd_core.io import atomic_torch_save, config_key, safe_torch_load  # noqa: E402
from nrrdd_core.labels import label_storage_bytes, paper_label_bytes  # noqa: E402
from nrrdd_core.methods import get_method, make_distiller, run_distiller  # noqa: E402
from nrrdd_core.models import TeacherTrainConfig, evaluate_accuracy, train_teacher  # noqa: E402

METHODS = ("sre2l", "rded", "nrrdd", "edf")


@dataclass(frozen=True)
class Budget:
    """Everything a budget fixes. Method overrides go to ``get_method(name).Config``."""

    name: str
    dataset: str                      # "cifar10" or "shapes_tiny"
    teacher: TeacherTrainConfig
    resnet20: bool                    # also the whole comparison with the pretrained ResNet-20
    ipcs: tuple[int, ...]
    seeds: tuple[int, ...]            # distillation seed s is evaluated with student seed s
    methods: dict                     # method -> config overrides
    experts: dict                     # ExpertConfig overrides (EDF)
    eval_epochs: int                  # KD protocol
    edf_eval_epochs: int              # EDF protocol
    final_only: bool                  # test only after the last epoch (else METHODS.md §1.4 schedule)
    ablation_ipc: int
    ablation_eval_epochs: int
    taus: tuple[float, ...]
    mask_modes: tuple[str, ...]
    label_modes: tuple[str, ...]
    alphas: tuple[float, ...]
    betas: tuple[float, ...]
    ablation_methods: dict = field(default_factory=dict)  # overrides on top of ``methods``
    more_ipcs: tuple[int, ...] = ()   # also these IPCs, first seed and first teacher only
    ipc_methods: dict = field(default_factory=dict)  # ipc -> method -> overrides (per-IPC values of the official code)
    student_width: int = 0
    note: str = ""


EDF_CPU = {"iterations": 40, "syn_steps": 5, "batch_syn": 20, "expert_epochs": 2,
           "min_start_epoch": 0, "current_max_start_epoch": 2, "max_start_epoch": 6,
           "expansion_iterations": 20, "cpd_alpha": 0.25, "dae_beta": 1.0, "dae_interval": 10}
#: METHODS.md §5.4 [code]: the CPD fraction alpha depends on the IPC (0.25 at IPC 10 is in the configs).
EDF_ALPHA_BY_IPC = {1: {"edf": {"cpd_alpha": 0.0}}, 50: {"edf": {"cpd_alpha": 0.375}}}
BUDGETS = {
    "cpu": Budget(
        name="cpu", dataset="cifar10",
        teacher=TeacherTrainConfig(arch="convnet_bn", depth=3, epochs=3, seed=0), resnet20=True,
        ipcs=(10,), seeds=(0, 1),
        methods={"sre2l": {"iterations": 100}, "rded": {}, "nrrdd": {"iterations": 100},
                 "edf": EDF_CPU},
        experts={"num_experts": 2, "epochs": 8, "width": 64, "train_per_class": 200, "zca": False},
        eval_epochs=40, edf_eval_epochs=100, final_only=True,
        ablation_ipc=10, ablation_eval_epochs=20,
        taus=(0.1, 0.3, 0.5, 0.7, 0.9), mask_modes=("soft", "binary", "scaled"),
        label_modes=("soft", "dbr", "hard"), alphas=(0.0, 0.25, 0.5), betas=(0.0, 1.0, 2.0),
        ablation_methods={"edf": {"iterations": 20, "expansion_iterations": 10}}, more_ipcs=(1, 50),
        ipc_methods=EDF_ALPHA_BY_IPC,
        note="CPU budget: teacher 3 epochs (published 200), SRe2L 100 iterations (1000), NRR-DD "
             "100 refinement iterations (2000), EDF 40 iterations of syn_steps 5 x batch 20 (5000 of "
             "80 x 100) with 2 experts x 8 epochs on 2,000 images, width 64, no ZCA (100 x 50 on "
             "50,000, width 128, ZCA), "
             "students 40 KD epochs (300) / 100 EDF epochs (1000), tested once after the last "
             "epoch; IPC 1 and 50 one seed, ConvNet-BN teacher only; ablations one seed, 20 "
             "student epochs, EDF grid 20 iterations."),
    "paper": Budget(
        name="paper", dataset="cifar10",
        teacher=TeacherTrainConfig(arch="convnet_bn", depth=3, epochs=200, seed=0), resnet20=True,
        ipcs=(1, 10, 50), seeds=(0, 1, 2),
        methods={"sre2l": {}, "rded": {}, "nrrdd": {},
                 "edf": {"iterations": 5000, "syn_steps": 80, "batch_syn": 100, "expert_epochs": 2,
                         "min_start_epoch": 0, "current_max_start_epoch": 10, "max_start_epoch": 20,
                         "expansion_iterations": 2000, "cpd_alpha": 0.25, "dae_beta": 1.0,
                         "dae_interval": 100}},
        experts={"num_experts": 100, "epochs": 50, "width": 128, "depth": 3, "zca": True},
        eval_epochs=300, edf_eval_epochs=1000, final_only=False,
        ablation_ipc=10, ablation_eval_epochs=300, ipc_methods=EDF_ALPHA_BY_IPC,
        taus=(0.1, 0.3, 0.5, 0.7, 0.9), mask_modes=("soft", "binary", "scaled"),
        label_modes=("soft", "dbr", "hard"), alphas=(0.0, 0.25, 0.5), betas=(0.0, 1.0, 2.0),
        note="Published budgets (METHODS.md §1.1, 0.4, 1-4): teacher 200 epochs, SRe2L 1000 iterations, "
             "NRR-DD 2000, EDF 5000 iterations with syn_steps 80 on 100 experts x 50 epochs, "
             "students 300 (KD) / 1000 (EDF) epochs."),
    "tiny": Budget(
        name="tiny", dataset="shapes_tiny", teacher=common.TINY_TEACHER, resnet20=False,
        ipcs=(1,), seeds=(0,),
        methods={"sre2l": {"iterations": 2}, "rded": {"mipc": 4, "images_per_step": 4},
                 "nrrdd": {"mipc": 4, "images_per_step": 4, "iterations": 2},
                 "edf": {"iterations": 2, "syn_steps": 2, "batch_syn": 4, "max_start_epoch": 2,
                         "current_max_start_epoch": 1, "expansion_iterations": 2,
                         "cpd_alpha": 0.25, "dae_beta": 1.0, "dae_interval": 1}},
        experts={"num_experts": 1, "epochs": 4, "width": 8, "train_per_class": 5},
        eval_epochs=1, edf_eval_epochs=2, final_only=True, ablation_ipc=1, ablation_eval_epochs=1,
        taus=(0.1, 0.5), mask_modes=("soft", "binary"), label_modes=("soft", "dbr", "hard"),
        alphas=(0.0, 0.25), betas=(0.0, 1.0), student_width=8, more_ipcs=(2,),
        ipc_methods={2: {"edf": {"cpd_alpha": 0.5}}},
        note="tiny smoke setting on the built-in shapes dataset (numbers mean nothing)"),
}

#: METHODS.md §6, CIFAR-10 rows: (method, ipc) -> [(student, top-1 %)]
PUBLISHED = {("sre2l", 10): [("ResNet-18", 29.3)], ("rded", 10): [("ConvNet", 50.2), ("ResNet-18", 37.1)],
             ("rded", 50): [("ResNet-18", 62.1)], ("nrrdd", 10): [("ConvNet", 66.7), ("ResNet-18", 72.2)],
             ("edf", 50): [("ConvNet", 77.3)]}


def published(method: str, ipc: int) -> str:
    """The METHODS.md §6 figure(s) for CIFAR-10 at this IPC, student named; ConvNet matches ours."""
    figs = PUBLISHED.get((method, ipc), [])
    return "; ".join(f"{a} ({s}{'' if s == 'ConvNet' else ', other student'})" for s, a in figs) or "-"


class Bench:
    """One accuracy run: holds the data, the teachers and the results document."""

    def __init__(self, budget: Budget, device: str, out: Path, argv: list[str], cache: bool = True):
        self.b, self.cache, self.out = budget, cache, out
        self.device = resolve_device(device)
        if budget.dataset == "cifar10":
            self.bundle = common.load_cifar10()
            self.data_desc = common.cifar_args()
        else:
            self.bundle = common.load_shapes(tiny=True)
            self.data_desc = {"name": "shapes", **common.TINY_SHAPES}
        self.data_key = {**self.data_desc, "n_train": len(self.bundle.train), "n_test": len(self.bundle.test)}
        self.teachers: dict = {}
        self.t0 = time.perf_counter()
        self.doc = {"budget": budget.name, "settings": _settings(budget), "note": budget.note,
                    "command": "python bench/accuracy.py " + " ".join(argv), "dataset": self.data_key,
                    "machine": common.machine_info(self.device), "status": "running",
                    "budget_gap": budget_gap(budget), "teachers": {}, "experts": None, "rows": []}

    # ---- bookkeeping -------------------------------------------------------------------------
    def save(self) -> None:
        self.doc["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.doc["machine"]["loadavg_now"] = common.machine_info(self.device)["loadavg"]
        common.write_json(self.out, self.doc)

    def unit(self, kind: str, spec: dict, compute):
        t0 = time.perf_counter()
        res = common.cached_unit(kind, {**spec, "data": self.data_key, "device": self.device.type},
                                 compute, cache=self.cache)
        common.log.info("[%6.0fs] %s %s done in %.1fs", time.perf_counter() - self.t0, kind,
                        {k: v for k, v in spec.items() if k in ("method", "teacher", "seed", "label",
                                                                  "overrides", "protocol")},
                        time.perf_counter() - t0)
        return res

    # ---- teachers and experts ----------------------------------------------------------------
    def trained_teacher(self):
        cfg = self.b.teacher

        def compute():
            t0 = time.perf_counter()
            t = train_teacher(cfg, self.bundle, device=self.device)
            return {"test_acc": t.test_acc, "seconds": time.perf_counter() - t0}
        info = self.unit("teacher", {"teacher": cfg.to_dict()}, compute)
        t = train_teacher(cfg, self.bundle, device=self.device)  # cache hit
        self.doc["teachers"]["convnet_bn"] = {"arch": cfg.arch, "depth": cfg.depth, "epochs": cfg.epochs,
                                              "test_acc": info["test_acc"], "train_seconds": info["seconds"],
                                              "source": "train_teacher", "config": cfg.to_dict()}
        return t

    def resnet20(self):
        t = common.resnet20_teacher(device=str(self.device))
        info = self.unit("teacher", {"teacher": "resnet20_akamaster"}, lambda: {
            "test_acc": evaluate_accuracy(t, self.bundle.test, t.data_config, self.device)})
        t.test_acc = info["test_acc"]
        self.doc["teachers"]["resnet20"] = {"arch": "resnet20_cifar", "test_acc": info["test_acc"],
                                            "source": f"pretrained {common.RESNET20} (original pixels)"}
        return t

    def expert_buffer(self) -> str:
        cfg = ExpertConfig.from_dict(self.b.experts)

        def compute():
            t0 = time.perf_counter()
            path = train_experts(cfg, self.bundle, device=self.device)
            return {"path": str(path), "seconds": time.perf_counter() - t0,
                    "test_accs": load_buffer(path, verify=False).test_accs}
        info = self.unit("experts", {"experts": cfg.to_dict()}, compute)
        if not Path(info["path"]).is_dir():  # cache folder moved: train (or reuse) again
            info["path"] = str(train_experts(cfg, self.bundle, device=self.device))
        self.doc["experts"] = {**info, "config": cfg.to_dict()}
        return info["path"]

    # ---- distillation and evaluation ---------------------------------------------------------
    def method_config(self, method: str, extra: dict | None = None) -> dict:
        o = {**self.b.methods.get(method, {}), **(extra or {})}
        if method == "edf":
            o["buffer"] = self.buffer
        return get_method(method).Config.from_dict(o).to_dict()

    def distill(self, method: str, tname: str, ipc: int, seed: int, extra: dict | None = None) -> dict:
        """A cached distilled set: ``{"run_dir", "seconds", "steps", "edf"}``."""
        teacher = self.teachers[tname]
        config = self.method_config(method, extra)
        spec = {"method": method, "teacher": tname, "ipc": ipc, "seed": seed,
                "config": {k: v for k, v in config.items() if k != "buffer"},
                "buffer": self.doc["experts"]["config"] if method == "edf" else None}

        def compute():
            t0 = time.perf_counter()
            d = make_distiller(method, get_method(method).Config.from_dict(config), teacher=teacher,
                               dataset=self.bundle, ipc=ipc, device=self.device, seed=seed)
            try:
                run_distiller(d)
                x01, y = d.images()
                edf = d.eval_kwargs() if method == "edf" else None
            finally:
                d.close()
            seconds = time.perf_counter() - t0
            root = common.bench_cache() / "runs"
            name = f"{method}_{config_key(spec)}"
            manifest = build_manifest(method=method, config=config, teacher=teacher, bundle=self.bundle,
                                      classes=d.classes, ipc=ipc, seed=seed, teacher_ref=tname,
                                      dataset_args=self.data_desc, timings={"seconds": seconds},
                                      device=str(self.device))
            run = save_run(root, name, x01, y, manifest, overwrite=True)
            if edf is not None:
                atomic_torch_save(edf, run / "edf_eval_kwargs.pt")
            return {"run_dir": str(run), "seconds": seconds, "steps": d.total_steps}
        return self.unit("distill", spec, compute)

    def evaluate(self, dset: dict | None, tname: str, seed: int, epochs: int, protocol: str = "kd",
                 label_mode: str = "soft", store_labels: bool = False, ipc: int = 10) -> dict:
        """A cached evaluation of a distilled set (``dset`` from :meth:`distill`) or, with
        ``dset=None``, of the random real subset (``ipc`` per class, drawn with ``seed``)."""
        teacher = self.teachers[tname]
        cfg = EvalConfig(protocol=protocol, student="convnet_bn", epochs=epochs, label_mode=label_mode,
                         store_labels=store_labels, student_width=self.b.student_width,
                         eval_every=epochs if self.b.final_only else 0)
        spec = {"set": Path(dset["run_dir"]).name if dset else {"random_real": ipc},
                "teacher": tname, "seed": seed, "protocol": protocol, "eval": cfg.to_dict()}

        def compute():
            kwargs = {}
            label_dir = None
            if dset is None:
                x01, y = random_real_subset(self.bundle, None, ipc, seed=seed)
            else:
                run = load_run(dset["run_dir"])
                x01, y = run.images01, run.labels
                if protocol == "edf":
                    kwargs = safe_torch_load(Path(dset["run_dir"]) / "edf_eval_kwargs.pt")
                    kwargs["epochs"] = epochs
                if store_labels:
                    label_dir = common.bench_cache() / "labels" / config_key(spec)
            res = evaluate_student(x01, y, teacher, self.bundle, cfg, device=self.device, seed=seed,
                                   label_dir=label_dir, **kwargs)
            out = {"final_acc": res.final_acc, "best_acc": res.best_acc, "seconds": res.seconds,
                   "n_test": res.n_test, "num_images": len(y)}
            if store_labels:
                out["label_bytes"] = {k: v for k, v in res.label_bytes.items() if k != "files"}
            return out
        return self.unit("eval", spec, compute)

    def add_row(self, table: str, rows: list[dict], **fields) -> dict:
        accs = [100 * r["final_acc"] for r in rows]
        row = {"table": table, **fields, "n": len(accs), "accs": accs,
               "best_accs": [100 * r["best_acc"] for r in rows],
               "mean": statistics.fmean(accs) if accs else None,
               "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
               "eval_seconds": [r["seconds"] for r in rows]}
        self.doc["rows"] = [r for r in self.doc["rows"] if not _same_row(r, row)] + [row]
        self.save()
        return row

    # ---- the run ------------------------------------------------------------------------------
    def comparison(self, tname: str, ipcs: tuple[int, ...] | None = None,
                   seeds: tuple[int, ...] | None = None) -> None:
        b = self.b
        for ipc in ipcs or b.ipcs:
            kd = {m: [] for m in (*METHODS, "random")}
            edf_own, dsec = [], {m: [] for m in METHODS}
            for seed in seeds or b.seeds:
                for m in METHODS:
                    d = self.distill(m, tname, ipc, seed, self.ipc_overrides(ipc, m))
                    dsec[m].append(d["seconds"])
                    kd[m].append(self.evaluate(d, tname, seed, b.eval_epochs, ipc=ipc))
                    self._comparison_row(tname, ipc, m, "kd", kd[m], dsec[m])
                    if m == "edf":
                        edf_own.append(self.evaluate(d, tname, seed, b.edf_eval_epochs, protocol="edf", ipc=ipc))
                        self._comparison_row(tname, ipc, m, "edf", edf_own, dsec[m])
                kd["random"].append(self.evaluate(None, tname, seed, b.eval_epochs, ipc=ipc))
                self._comparison_row(tname, ipc, "random", "kd", kd["random"], [])

    def ipc_overrides(self, ipc: int, method: str) -> dict:
        """The budget's per-IPC config overrides of ``method`` (e.g. EDF's CPD alpha)."""
        return self.b.ipc_methods.get(ipc, {}).get(method, {})

    def _comparison_row(self, tname, ipc, method, protocol, rows, dsec) -> None:
        epochs = self.b.eval_epochs if protocol == "kd" else self.b.edf_eval_epochs
        self.add_row("comparison", rows, teacher=tname, ipc=ipc, method=method, protocol=protocol,
                     student="convnet_bn" if protocol == "kd" else "convnet_in (EDF protocol)",
                     eval_epochs=epochs, distill_seconds=dsec,
                     method_budget={} if method == "random" else _budget_fields(
                         method, {**self.b.methods[method], **self.ipc_overrides(ipc, method)}),
                     published=published(method, ipc) if method != "random" else "-")

    def ablations(self, tname: str) -> None:
        b, ipc, seed, ep = self.b, self.b.ablation_ipc, self.b.seeds[0], self.b.ablation_eval_epochs
        ab = b.ablation_methods
        for tau in b.taus:
            d = self.distill("nrrdd", tname, ipc, seed, {**ab.get("nrrdd", {}), "tau": tau})
            self.add_row("nrrdd_tau", [self.evaluate(d, tname, seed, ep, ipc=ipc)], teacher=tname,
                         ipc=ipc, tau=tau, mask_mode="soft", eval_epochs=ep, distill_seconds=[d["seconds"]],
                         published={0.1: 63.2, 0.3: 65.4, 0.5: 66.2, 0.7: 65.4, 0.9: 65.4}.get(tau))
        for mode in b.mask_modes:
            if mode == "soft" and 0.5 in b.taus:  # the tau = 0.5 row above
                continue
            d = self.distill("nrrdd", tname, ipc, seed, {**ab.get("nrrdd", {}), "mask_mode": mode})
            self.add_row("nrrdd_mask", [self.evaluate(d, tname, seed, ep, ipc=ipc)], teacher=tname,
                         ipc=ipc, tau=0.5, mask_mode=mode, eval_epochs=ep, distill_seconds=[d["seconds"]])
        d = self.distill("nrrdd", tname, ipc, seed, ab.get("nrrdd"))
        for mode in b.label_modes:
            r = self.evaluate(d, tname, seed, ep, label_mode=mode, store_labels=True, ipc=ipc)
            stored = r.get("label_bytes", {})
            nbytes = stored.get(mode, 0) if mode != "hard" else \
                label_storage_bytes(d["run_dir"])["hard"]
            paper = paper_label_bytes(r["num_images"], ep, self.bundle.num_classes)
            self.add_row("labels", [r], teacher=tname, ipc=ipc, label_mode=mode, eval_epochs=ep,
                         label_bytes=nbytes, aug_param_bytes=stored.get("aug_params", 0),
                         paper_bytes=paper.get(mode) if mode != "hard" else None)
        for alpha in b.alphas:
            for beta in b.betas:
                d = self.distill("edf", tname, ipc, seed, {**ab.get("edf", {}), "cpd_alpha": alpha,
                                                           "dae_beta": beta})
                r = self.evaluate(d, tname, seed, b.edf_eval_epochs, protocol="edf", ipc=ipc)
                self.add_row("edf_grid", [r], teacher=tname, ipc=ipc, alpha=alpha, beta=beta,
                             eval_epochs=b.edf_eval_epochs, distill_seconds=[d["seconds"]],
                             iterations=self.method_config("edf", {**ab.get("edf", {})})["iterations"])

    def run(self) -> None:
        self.teachers["convnet_bn"] = self.trained_teacher()
        self.save()
        self.buffer = self.expert_buffer()
        self.save()
        self.comparison("convnet_bn")
        self.ablations("convnet_bn")
        if self.b.resnet20:
            self.teachers["resnet20"] = self.resnet20()
            self.save()
            self.comparison("resnet20")
        if self.b.more_ipcs:
            self.comparison("convnet_bn", self.b.more_ipcs, self.b.seeds[:1])
        self.doc["status"] = "complete"
        self.save()


def budget_gap(b: Budget) -> list[list]:
    """``[item, this budget, published budget, published / this]`` rows (the published column is
    the ``paper`` budget)."""
    p = BUDGETS["paper"]
    cfg = lambda bud, m, k: get_method(m).Config.from_dict(bud.methods[m]).to_dict()[k]  # noqa: E731
    items = [("teacher epochs", b.teacher.epochs, p.teacher.epochs),
             ("SRe2L iterations", cfg(b, "sre2l", "iterations"), cfg(p, "sre2l", "iterations")),
             ("RDED real images scored per class", cfg(b, "rded", "mipc"), cfg(p, "rded", "mipc")),
             ("NRR-DD refinement iterations", cfg(b, "nrrdd", "iterations"), cfg(p, "nrrdd", "iterations")),
             ("EDF iterations", cfg(b, "edf", "iterations"), cfg(p, "edf", "iterations")),
             ("EDF syn_steps", cfg(b, "edf", "syn_steps"), cfg(p, "edf", "syn_steps")),
             ("EDF expert epochs (total)", b.experts["num_experts"] * b.experts["epochs"],
              p.experts["num_experts"] * p.experts["epochs"]),
             ("student epochs, KD protocol", b.eval_epochs, p.eval_epochs),
             ("student epochs, EDF protocol", b.edf_eval_epochs, p.edf_eval_epochs),
             ("seeds", len(b.seeds), len(p.seeds))]
    return [[k, v, w, f"{w / v:.0f}x" if v else "-"] for k, v, w in items]


def _same_row(a: dict, b: dict) -> bool:
    keys = ("table", "teacher", "ipc", "method", "protocol", "tau", "mask_mode", "label_mode", "alpha", "beta")
    return all(a.get(k) == b.get(k) for k in keys)


def _budget_fields(method: str, overrides: dict) -> dict:
    """The budget-relevant fields of a method's config (defaults filled in)."""
    cfg = get_method(method).Config.from_dict(overrides).to_dict()
    keep = {"sre2l": ("iterations",), "rded": ("mipc", "num_crops"), "nrrdd": ("mipc", "iterations", "tau"),
            "edf": ("iterations", "syn_steps", "batch_syn", "cpd_alpha", "dae_beta")}[method]
    return {k: cfg[k] for k in keep}


def _settings(b: Budget) -> dict:
    d = dataclasses.asdict(b)
    d["teacher"] = b.teacher.to_dict()
    return d


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    ap.add_argument("--tiny", action="store_true", help="same as --budget tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-cache", action="store_true", help="recompute every unit")
    ap.add_argument("--report", action="store_true",
                    help="only regenerate docs/RESULTS.md from bench/results/*.json")
    ap.add_argument("--no-extra-ipcs", action="store_true",
                    help="skip the budget's one-seed extra IPCs (cpu: IPC 1 and 50, ~24 min)")
    ap.add_argument("--study", choices=sorted(study.STUDIES), default=None,
                    help="run the like-with-like study (bench/study.py) of this budget instead")
    ap.add_argument("--diagnostics", action="store_true",
                    help="with --study: add the refinement diagnostics to its result files")
    ap.add_argument("--variants", default="",
                    help="with --study: semicolon-separated row names to run (default: all)")
    ap.add_argument("--part", default="",
                    help="with --study --variants: write these rows to the part file "
                         "study_<budget>_<setting>.<part>.json (for a second process)")
    ap.add_argument("--settings", default="",
                    help="with --study: comma-separated settings to run (default: all)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    common.setup_logging(args.verbose)
    if args.report:
        print(f"written {report.write_results_md()}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.study and args.diagnostics:
        for s in study.STUDIES[args.study].settings:
            paths = study.setting_paths(args.study, s.name, args.out or common.RESULTS_DIR)
            if paths and (not args.settings or s.name in args.settings.split(",")):
                study.add_diagnostics(paths, args.device)
                print(f"diagnostics added to {', '.join(map(str, paths))}")
        return 0
    if args.study:
        docs = study.main(args.study, [s for s in args.settings.split(",") if s], args.device, argv,
                          cache=not args.no_cache, results_dir=args.out,
                          variants=[v for v in args.variants.split(";") if v], part=args.part)
        for doc in docs:
            print(report.study_markdown([doc]))
        return 0
    budget = BUDGETS["tiny" if args.tiny else args.budget]
    if args.no_extra_ipcs:
        budget = dataclasses.replace(budget, more_ipcs=())
    out = args.out or common.RESULTS_DIR / f"accuracy_{budget.name}.json"
    bench = Bench(budget, args.device, out, argv, cache=not args.no_cache)
    bench.run()
    print(report.accuracy_markdown(bench.doc))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
