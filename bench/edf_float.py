"""EDF evaluated on its float tensor vs on its 8-bit images (docs/METHODS.md §5.6).

The official code trains the EDF student on the distilled tensor as optimised (normalised,
ZCA-whitened when the experts are, unclipped). A saved run also keeps 8-bit PNGs (clipped to
[0, 1] and rounded), which lose whatever the optimisation pushed outside [0, 1]. This script
distils CIFAR-10 with EDF on a CPU budget (one distilled set per ``lr_img``), then trains the
EDF-protocol student on both forms with the same seeds and reports the accuracies, the share of
pixel values outside [0, 1] and how far outside they go.

Usage::

    python bench/edf_float.py                        # CPU budget, writes bench/results/edf_float_cpu.json
    python bench/edf_float.py --tiny                 # a few seconds on the built-in shapes (smoke)

Each distilled set and each evaluation is cached under ``bench/cache/edf_float/`` (resumable).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import common  # noqa: F401  (puts the repository on sys.path)
from nrrdd_core.data.base import to_float01, to_uint8  # noqa: E402
from nrrdd_core.evaluate import EvalConfig, evaluate_student  # noqa: E402
from nrrdd_core.experts import ExpertConfig  # noqa: E402
from nrrdd_core.io import atomic_torch_save, config_key, safe_torch_load  # noqa: E402
from nrrdd_core.methods import make_distiller, run_distiller  # noqa: E402

#: EDF on the CPU budget of bench/accuracy.py (40 iterations of 5 x 20, 2 experts x 8 epochs)
EDF_CPU = {"iterations": 40, "syn_steps": 5, "batch_syn": 20, "expert_epochs": 2,
           "min_start_epoch": 0, "current_max_start_epoch": 2, "max_start_epoch": 6,
           "expansion_iterations": 20, "dae_interval": 10}
EXPERTS_CPU = {"num_experts": 2, "epochs": 8, "width": 64, "train_per_class": 200, "zca": False}
TINY = {"edf": {"iterations": 2, "syn_steps": 2, "batch_syn": 4, "max_start_epoch": 2,
                "current_max_start_epoch": 1, "expansion_iterations": 2, "dae_interval": 1},
        "experts": {"num_experts": 1, "epochs": 4, "width": 8, "train_per_class": 5}}


def outside01(x01_unclipped: torch.Tensor) -> dict:
    """Share of pixel values outside [0, 1] and the largest distance to [0, 1]."""
    below, above = (-x01_unclipped).clamp(min=0), (x01_unclipped - 1).clamp(min=0)
    return {"fraction_outside_01": float(((below > 0) | (above > 0)).float().mean()),
            "max_outside_01": float(torch.maximum(below, above).max())}


def distil(args, bundle, teacher, lr_img: float, cache: Path) -> dict:
    """The distilled set of one ``lr_img`` (cached): 8-bit images, labels, extras, statistics."""
    edf = {**(TINY["edf"] if args.tiny else EDF_CPU), "lr_img": lr_img}
    experts = ExpertConfig(**(TINY["experts"] if args.tiny else EXPERTS_CPU))
    f = cache / f"set_{config_key({'edf': edf, 'experts': experts.to_dict(), 'ipc': args.ipc, 'tiny': args.tiny})}.pt"
    if f.is_file():
        return safe_torch_load(f)
    t0 = time.perf_counter()
    d = make_distiller("edf", edf, teacher=teacher, dataset=bundle, ipc=args.ipc, device="cpu",
                       seed=0, expert_config=experts)
    run_distiller(d)
    x01, y = d.images()
    extras = d.export_extras()
    raw = bundle.config.denormalize(d._unwhiten(extras["images_float"]))   # unclipped [0,1] space
    out = {"images8": to_uint8(x01), "labels": y, "extras": extras, "config": d.config.to_dict(),
           "seconds": time.perf_counter() - t0, **outside01(raw)}
    d.close()
    atomic_torch_save(out, f)
    return out


def evaluate(args, bundle, teacher, dset: dict, form: str, seed: int, cache: Path) -> float:
    """Top-1 accuracy of the EDF protocol on the ``"float"`` tensor or the ``"png8"`` images."""
    cfg = EvalConfig(protocol="edf", epochs=args.eval_epochs, eval_every=args.eval_epochs)
    extras = dict(dset["extras"])
    if form == "png8":
        extras.pop("images_float")
    key = config_key({"set": float(dset["extras"]["images_float"].double().sum()), "form": form,
                      "seed": seed, "cfg": cfg.to_dict()})
    f = cache / f"eval_{key}.json"
    if f.is_file():
        return json.loads(f.read_text())["acc"]
    res = evaluate_student(to_float01(dset["images8"]), dset["labels"], teacher, bundle, cfg,
                           device="cpu", seed=seed, extras=extras)
    assert res.config["inputs"] == ("float" if form == "float" else "images01")
    f.write_text(json.dumps({"acc": res.final_acc, "seconds": res.seconds}))
    return res.final_acc


SECTION = """## EDF evaluated on its float tensor

The EDF protocol (METHODS.md §5.6) trains its student on the distilled tensor as optimised, as the
official code does (normalised, ZCA-whitened when the experts are, unclipped); the 8-bit PNGs of a
run are for viewing. Both forms of the same distilled sets, same student seeds:"""


def markdown(doc: dict) -> str:
    """The table of one ``edf_float_*.json`` document (``bench/edf_float.py``)."""
    rows = [[f"{r['lr_img']:g}", f"{100 * r['fraction_outside_01']:.1f} %",
             f"{r['max_outside_01']:.2f}",
             f"{100 * r['mean_acc_float']:.2f} ({' / '.join(f'{100 * a:.1f}' for a in r['acc_float'])})",
             f"{100 * r['mean_acc_png8']:.2f} ({' / '.join(f'{100 * a:.1f}' for a in r['acc_png8'])})",
             f"{100 * r['float_minus_png8']:+.2f}"] for r in doc["rows"]]
    m, e, ex = doc["machine"], doc["rows"][0]["edf_config"], doc["experts"]
    return "\n".join([
        f"Command: `{doc['command']}`; {doc['dataset']}, {doc['classes']} classes, IPC "
        f"{doc['ipc']}; EDF {e['iterations']} iterations of syn_steps {e['syn_steps']} x batch "
        f"{e['batch_syn']} (CPD alpha {e['cpd_alpha']}, DAE beta {e['dae_beta']} every "
        f"{e['dae_interval']}) on {ex['num_experts']} experts x {ex['epochs']} epochs (width "
        f"{ex['width']}, ZCA {'on' if ex.get('zca') else 'off'}); students {doc['eval_epochs']} "
        f"EDF epochs, seeds {', '.join(map(str, doc['student_seeds']))}; {m.get('device', 'cpu')}, "
        f"load average {(m.get('loadavg') or ['?'])[0]}.", "",
        common.md_table(["lr_img", "pixel values outside [0,1]", "max distance to [0,1]",
                         "top-1 % float tensor (per seed)", "top-1 % 8-bit PNG (per seed)",
                         "float - PNG (points)"], rows), ""]
        + ([*(f"- {n}" for n in doc["notes"]), ""] if doc.get("notes") else []))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lr-img", default="100,1000", help="comma-separated lr_img values")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--seeds", default="0,1,2", help="student seeds (same for both forms)")
    p.add_argument("--eval-epochs", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tiny", action="store_true", help="built-in shapes, a few seconds (smoke)")
    p.add_argument("--out", default=str(common.RESULTS_DIR / "edf_float_cpu.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = common.bench_cache() / "edf_float"
    cache.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        bundle = common.load_shapes(tiny=True)
        teacher, _ = common.shapes_teacher(bundle, tiny=True)
        args.ipc, args.eval_epochs = 1, 2
    else:
        bundle, teacher = common.load_cifar10(), common.resnet20_teacher()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for lr in (float(v) for v in args.lr_img.split(",")):
        dset = distil(args, bundle, teacher, lr, cache)
        acc = {form: [evaluate(args, bundle, teacher, dset, form, s, cache) for s in seeds]
               for form in ("float", "png8")}
        mean = {k: sum(v) / len(v) for k, v in acc.items()}
        rows.append({"lr_img": lr, "fraction_outside_01": dset["fraction_outside_01"],
                     "max_outside_01": dset["max_outside_01"], "acc_float": acc["float"],
                     "acc_png8": acc["png8"], "mean_acc_float": mean["float"],
                     "mean_acc_png8": mean["png8"], "float_minus_png8": mean["float"] - mean["png8"],
                     "distil_seconds": dset["seconds"], "edf_config": dset["config"]})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "edf_config"}), flush=True)
    result = {"what": "EDF protocol accuracy on the float tensor vs the 8-bit PNG images of the "
                      "same distilled set (METHODS.md §5.6)",
              "command": "python bench/edf_float.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "dataset": "shapes (tiny)" if args.tiny else "cifar10 (../shared/data, 20k train / 10k test)",
              "teacher": "shapes tiny ConvNet-BN" if args.tiny else "ResNet-20 (akamaster), DAE CAM model",
              "ipc": args.ipc, "classes": bundle.config.num_classes, "student_seeds": seeds,
              "eval_epochs": args.eval_epochs,
              "experts": TINY["experts"] if args.tiny else EXPERTS_CPU,
              "machine": common.machine_info(torch.device("cpu")), "rows": rows}
    if not args.tiny or args.out != str(common.RESULTS_DIR / "edf_float_cpu.json"):
        common.write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
