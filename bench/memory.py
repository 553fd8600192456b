"""Peak memory of EDF's student unroll against syn_steps, for both unrolls (METHODS.md §5.7).

One outer EDF iteration -- the unroll of ``syn_steps`` student SGD steps with DSA, the matching
loss and its backward to the images, labels and lr -- on the CIFAR-10 IPC 10 shapes: ConvNet-3
(width 128, instance norm) at 32 px, N = 100 synthetic images, ``batch_syn`` images per step,
random data (memory does not depend on the values). Each (unroll, syn_steps) setting runs in a
FRESH subprocess; the figure is the process's peak resident set size during the iteration minus
its resident size just before it (Linux VmHWM after resetting it with ``clear_refs``; on CUDA:
``torch.cuda.max_memory_allocated`` minus the allocation before). Next to it: the estimate EDF
uses to refuse a run (:func:`nrrdd_core.methods.edf.estimate_unroll_bytes`).

    .venv/bin/python bench/memory.py --out bench/results/memory_cpu.json
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
same gradients. "Estimate" is what EDF uses to refuse a run that does not fit."""


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


def markdown(doc: dict) -> str:
    """The table of one ``memory_*.json`` document."""
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
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--unit", help=argparse.SUPPRESS)  # internal: one setting as JSON
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    common.setup_logging(args.verbose)
    if args.unit:
        print(json.dumps(run_unit(json.loads(args.unit))))
        return 0
    dev = resolve_device(args.device)
    shape = TINY if args.tiny else FULL
    out = args.out or common.RESULTS_DIR / f"memory_{dev.type}.json"
    doc = {"command": "python bench/memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "shape": shape, "machine": common.machine_info(dev), "results": []}
    for steps in args.syn_steps:
        for unroll in args.unrolls:
            spec = {"device": args.device, "shape": shape, "unroll": unroll, "syn_steps": steps,
                    "threads": args.threads}
            p = subprocess.run([sys.executable, __file__, "--unit", json.dumps(spec)],
                               capture_output=True, text=True)
            if p.returncode:
                err = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed"
                r = {"unroll": unroll, "syn_steps": steps, "error": err}
            else:
                r = json.loads(p.stdout.strip().splitlines()[-1])
            common.log.info("%s syn_steps=%d: %s", unroll, steps, r)
            doc["results"].append(r)
            common.write_json(out, doc)
    print(markdown(doc))
    print(f"\nwritten {out}")
    return 1 if any("error" in r for r in doc["results"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
