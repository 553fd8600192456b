"""Peak memory of EDF's student unroll against syn_steps, for both unrolls (METHODS.md §5.7), and
of RDED against the size of an ImageFolder dataset, in memory or streamed (``--stream``).

One outer EDF iteration -- the unroll of ``syn_steps`` student SGD steps with DSA, the matching
loss and its backward to the images, labels and lr -- on the CIFAR-10 IPC 10 shapes: ConvNet-3
(width 128, instance norm) at 32 px, N = 100 synthetic images, ``batch_syn`` images per step,
random data (memory does not depend on the values). Each (unroll, syn_steps) setting runs in a
FRESH subprocess; the figure is the process's peak resident set size during the iteration minus
its resident size just before it (Linux VmHWM after resetting it with ``clear_refs``; on CUDA:
``torch.cuda.max_memory_allocated`` minus the allocation before). Next to it: the estimate EDF
uses to refuse a run (:func:`nrrdd_core.methods.edf.estimate_unroll_bytes`).

    .venv/bin/python bench/memory.py --out bench/results/memory_cpu.json
    .venv/bin/python bench/memory.py --stream --out bench/results/memory_stream_cpu.json

``--stream``: a generated 3-class ImageFolder of 128 px JPEGs with 50, 200 and 800 images per
class; each (entry, size) in a fresh process loads the dataset (``imagefolder``: every image
decoded; ``imagefolder_stream``: files listed, images decoded on demand in DataLoader workers) and
runs RDED at factor 2 (IPC 1, mipc 20) with a random ConvNet-BN teacher; the figure is the peak
resident set size minus the size before loading.
    .venv/bin/python bench/memory.py --tiny --out /tmp/memory_tiny.json     # seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from nrrdd_core.device import resolve_device  # noqa: E402
from nrrdd_core.dsa import DSA_STRATEGIES  # noqa: E402
from nrrdd_core.experts import ParamLayout, seeded_model  # noqa: E402
from nrrdd_core.methods.edf import estimate_unroll_bytes, matching_loss, unroll_student  # noqa: E402
from nrrdd_core.unroll import UNROLLS, unroll_recompute  # noqa: E402

SYN_STEPS = (8, 20, 80)
#: CIFAR-10 IPC 10 with the released depth/width; batch_syn kept small so that the plain unroll
#: at syn_steps 80 fits this machine (memory is linear in batch_syn for both unrolls)
FULL = {"num_images": 100, "num_classes": 10, "image_size": 32, "depth": 3, "width": 128, "batch_syn": 10}
TINY = {"num_images": 8, "num_classes": 3, "image_size": 16, "depth": 2, "width": 8, "batch_syn": 4}
SECTION = """## EDF memory against syn_steps

Peak memory of one outer EDF iteration (unroll with DSA, matching loss, backward), each setting in
a fresh process (`bench/memory.py`): the plain unroll keeps the graph of every student step, so its
memory grows linearly with syn_steps; `unroll=recompute` (METHODS.md §5.7, after TESLA) recomputes
each step in the backward pass and keeps only the parameter iterates (4 P bytes a step), with the
same gradients. "Estimate" is what EDF uses to refuse a run that does not fit. The recompute unroll
does one more forward and backward per step; the seconds were measured on a shared machine under
heavy load (load average in the line above each table) and are no fair time comparison."""


def run_unit(spec: dict) -> dict:
    """One (unroll, syn_steps) setting in this process; see the module docstring."""
    dev = resolve_device(spec["device"])
    torch.set_num_threads(int(spec.get("threads") or 2))
    s = spec["shape"]
    g = torch.Generator().manual_seed(0)
    net = seeded_model(s["num_classes"], s["image_size"], {"depth": s["depth"], "width": s["width"]},
                       g).to(dev)
    layout = ParamLayout(net)
    theta0 = layout.flatten(net).to(dev)
    target = theta0 + 0.01 * torch.randn(layout.numel, generator=g).to(dev)
    x = torch.randn(s["num_images"], 3, s["image_size"], s["image_size"], generator=g).to(dev)
    x.requires_grad_(True)
    y = torch.randn(s["num_images"], s["num_classes"], generator=g).to(dev).requires_grad_(True)
    lr = torch.tensor(0.01, device=dev, requires_grad=True)
    fn = unroll_student if spec["unroll"] == "plain" else unroll_recompute
    est = estimate_unroll_bytes(net, layout, s["image_size"], s["num_classes"], spec["syn_steps"],
                                s["batch_syn"], spec["unroll"], s["num_images"])
    net.to(dev)
    before, _ = common.rss_mb()
    reset = common.reset_peak_rss()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        cuda_before = torch.cuda.memory_allocated(dev)
    t0 = time.perf_counter()
    theta_n = fn(net, layout, theta0, x, y, lr, spec["syn_steps"], s["batch_syn"],
                 torch.Generator().manual_seed(1), DSA_STRATEGIES)
    loss, _ = matching_loss(theta_n, theta0, target, 0.0)
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    _, peak = common.rss_mb()
    out = {"unroll": spec["unroll"], "syn_steps": spec["syn_steps"], **s, "params": layout.numel,
           "seconds": round(seconds, 3), "rss_before_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
           "peak_minus_before_mb": round(peak - before, 1), "peak_reset": reset,
           "estimate_mb": round(est["bytes"] / 2**20, 1), "loss": float(loss.detach()),
           "grad_norm_x": float(x.grad.norm())}
    if dev.type == "cuda":
        out["cuda_peak_minus_before_mb"] = round(
            (torch.cuda.max_memory_allocated(dev) - cuda_before) / 2**20, 1)
    return out


STREAM_SIZES = (50, 200, 800)
STREAM_SECTION = """RDED at factor 2 from a generated ImageFolder (3 classes, 128 px JPEGs), each setting in a
fresh process: peak resident memory minus the size before loading the dataset. The in-memory
entry decodes every image when loading, so its memory grows with the dataset; the streamed entry
(`imagefolder_stream`, METHODS.md §7) decodes only the images RDED scores (`mipc` per class, plus
the stitched ones), so its memory does not. Not counted: the streamed entry's 2 DataLoader worker
processes (forked; each holds at most one batch of 16 decoded images). The streamed entry's step
from 150 to 600 images is its mean/std sample, capped at 256 images."""


def make_folder(root: Path, per_class: int, size: int = 128, classes: int = 3) -> Path:
    """``root/class<k>/<i>.jpg`` smooth ramps with noise (idempotent: existing files are kept)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 1, size)[None, :, None]
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            f = d / f"{i:04d}.jpg"
            base = 40 + 60 * c + 80 * ramp * rng.random(3)[None, None, :]
            img = np.broadcast_to(base, (size, size, 3)) + rng.normal(0, 8, (size, size, 3))
            if not f.exists():
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(f, quality=85)
    return root


def run_stream_unit(spec: dict) -> dict:
    """One (entry, dataset size) setting in this process; see ``--stream`` in the docstring."""
    from nrrdd_core.data import load_dataset
    from nrrdd_core.methods import make_distiller, run_distiller
    from nrrdd_core.models import build_model
    from nrrdd_core.models.teacher import Teacher

    import torchvision.datasets.folder  # noqa: F401  (imports before the baseline)

    torch.set_num_threads(int(spec.get("threads") or 2))
    torch.manual_seed(0)
    model = build_model("convnet_bn", 3, 128, depth=3, width=16)
    with torch.no_grad():
        model.eval()(torch.zeros(25, 3, 128, 128))
    before, _ = common.rss_mb()
    reset = common.reset_peak_rss()
    t0 = time.perf_counter()
    kw = {"workers": 2} if spec["entry"] == "imagefolder_stream" else {}
    bundle = load_dataset(spec["entry"], root=spec["root"], image_size=128, test_fraction=0.0, **kw)
    teacher = Teacher(model, "convnet_bn", bundle.config, "features", {"depth": 3, "width": 16})
    d = make_distiller("rded", {"mipc": 20, "images_per_step": 5, "factor": 2}, teacher=teacher,
                       dataset=bundle, ipc=1, device="cpu", seed=0)
    run_distiller(d)
    _, peak = common.rss_mb()
    return {"entry": spec["entry"], "per_class": spec["per_class"], "images": len(bundle.train),
            "decoded_mib": round(len(bundle.train) * 3 * 128 * 128 / 2**20, 1),
            "images_decoded": getattr(bundle.train, "decoded", len(bundle.train)),
            "seconds": round(time.perf_counter() - t0, 2), "rss_before_mb": round(before, 1),
            "peak_minus_before_mb": round(peak - before, 1), "peak_reset": reset}


def stream_markdown(doc: dict) -> str:
    """The table of one ``memory_stream_*.json`` document."""
    rows = [[r["entry"], r.get("images", ""), r.get("decoded_mib", ""), "error: " + r["error"], "", ""]
            if "error" in r else
            [r["entry"], r["images"], f"{r['decoded_mib']:.0f}", f"{r['peak_minus_before_mb']:.0f}",
             r["images_decoded"], f"{r['seconds']:.1f}"] for r in doc["results"]]
    m = doc["machine"]
    return "\n".join([f"Command: `{doc['command']}`. Machine: device {m['device']}, torch {m['torch']}, "
                      f"{m['torch_threads']} threads.", "", common.md_table(
                          ["entry", "train images", "decoded size (MiB)", "peak - before (MiB)",
                           "images decoded", "seconds"], rows), ""])


def results_markdown(paths: list[Path]) -> str:
    """The RESULTS.md section of the ``memory_*.json`` documents at ``paths``: EDF tables under
    :data:`SECTION`, ImageFolder tables under :data:`STREAM_SECTION`."""
    docs = [json.loads(p.read_text()) for p in paths]
    edf = [markdown(d) for d in docs if d.get("kind") != "stream"]
    stream = [markdown(d) for d in docs if d.get("kind") == "stream"]
    parts = ([SECTION, ""] + edf if edf else []) + \
        (["## Memory against dataset size (ImageFolder)", "", STREAM_SECTION, ""] + stream if stream else [])
    return "\n".join(parts)


def markdown(doc: dict) -> str:
    """The table of one ``memory_*.json`` document."""
    if doc.get("kind") == "stream":
        return stream_markdown(doc)
    rows = []
    for r in doc["results"]:
        if "error" in r:
            rows.append([r["unroll"], r["syn_steps"], "error: " + r["error"], "", "", ""])
            continue
        mem = f"{r['peak_minus_before_mb']:.0f}"
        if "cuda_peak_minus_before_mb" in r:
            mem += f" (CUDA {r['cuda_peak_minus_before_mb']:.0f})"
        rows.append([r["unroll"], r["syn_steps"], mem, f"{r['estimate_mb']:.0f}", f"{r['seconds']:.2f}",
                     f"{r['grad_norm_x']:.6g}"])
    s = doc["shape"]
    m = doc["machine"]
    head = (f"Command: `{doc['command']}`. ConvNet-{s['depth']} width {s['width']} at "
            f"{s['image_size']} px, N = {s['num_images']} images, batch_syn = {s['batch_syn']}, DSA on. "
            f"Machine: device {m['device']}, torch {m['torch']}, {m['torch_threads']} threads, "
            f"load average {m['loadavg'][0] if m.get('loadavg') else 'n/a'} at start.")
    return "\n".join([head, "", common.md_table(
        ["unroll", "syn_steps", "peak - before (MiB)", "estimate (MiB)", "seconds",
         "‖dL/dx~‖ (same up to float32 rounding)"], rows), ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (seconds; for tests)")
    ap.add_argument("--syn-steps", type=int, nargs="+", default=list(SYN_STEPS))
    ap.add_argument("--unrolls", nargs="+", choices=UNROLLS, default=list(UNROLLS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stream", action="store_true", help="RDED memory vs ImageFolder size instead")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(STREAM_SIZES),
                    help="--stream: images per class")
    ap.add_argument("--folder", type=Path, default=common.bench_cache() / "memory_folder",
                    help="--stream: where the generated folders are kept")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--unit", help=argparse.SUPPRESS)  # internal: one setting as JSON
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    common.setup_logging(args.verbose)
    if args.unit:
        spec = json.loads(args.unit)
        print(json.dumps(run_stream_unit(spec) if "entry" in spec else run_unit(spec)))
        return 0
    if args.stream:
        return stream_main(args, argv)
    dev = resolve_device(args.device)
    shape = TINY if args.tiny else FULL
    out = args.out or common.RESULTS_DIR / f"memory_{dev.type}.json"
    doc = {"command": "python bench/memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "shape": shape, "machine": common.machine_info(dev), "results": []}
    for steps in args.syn_steps:
        for unroll in args.unrolls:
            r = {"unroll": unroll, "syn_steps": steps, **_subprocess_unit(
                {"device": args.device, "shape": shape, "unroll": unroll, "syn_steps": steps,
                 "threads": args.threads})}
            common.log.info("%s syn_steps=%d: %s", unroll, steps, r)
            doc["results"].append(r)
            common.write_json(out, doc)
    print(markdown(doc))
    print(f"\nwritten {out}")
    return 1 if any("error" in r for r in doc["results"]) else 0


def _subprocess_unit(spec: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--unit", json.dumps(spec)], capture_output=True,
                       text=True)
    if p.returncode:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def stream_main(args, argv) -> int:
    dev = resolve_device("cpu")
    out = args.out or common.RESULTS_DIR / "memory_stream_cpu.json"
    doc = {"kind": "stream", "command": "python bench/memory.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "machine": common.machine_info(dev),
        "results": []}
    for n in args.sizes:
        root = make_folder(args.folder / f"per_class_{n}", n)
        for entry in ("imagefolder", "imagefolder_stream"):
            r = {"entry": entry, "per_class": n, **_subprocess_unit(
                {"entry": entry, "root": str(root), "per_class": n, "threads": args.threads})}
            common.log.info("%s %d per class: %s", entry, n, r)
            doc["results"].append(r)
            common.write_json(out, doc)
    print(stream_markdown(doc))
    print(f"\nwritten {out}")
    return 1 if any("error" in r for r in doc["results"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
