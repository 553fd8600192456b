"""Speed and memory of one distillation step, next to its physical floor (issue 6 part 2).

For each method (sre2l, rded, nrrdd, edf) at two sizes -- ``shapes`` (the built-in dataset, 32 px,
its shipped teacher) and ``cifar10`` (the JPEG CIFAR-10 of ../shared/data, the pretrained
ResNet-20 teacher), IPC 10, each method's built-in default config -- this measures seconds per
``step()``, steps per second, peak memory, and the ratio of a step to its *physical floor*,
timed in the same process on the same shapes, interleaved with the method's steps:

- sre2l, nrrdd (refinement phase): a bare teacher forward + backward (cross-entropy, gradient
  to the images) on the same batch;
- rded: a bare teacher forward (no grad) on the same number of padded crops as one step scores;
- edf: a bare functional unroll of the same ``syn_steps`` (``torch.func.functional_call`` on the
  same student and flat parameter vector, ``create_graph=True``, no augmentation) plus the
  backward of the matching loss to the images.

Each (size, method) runs in its own process so that its peak RSS is its own. After ``--warmup``
steps, ``--reps`` method steps and floor runs alternate; medians are reported. With
``--profile`` a unit whose ratio exceeds ``--target`` is profiled (cProfile over a few steps) and
its most expensive functions are recorded.

    .venv/bin/python bench/speed.py --device cpu --out bench/results/speed_cpu.json
    .venv/bin/python bench/speed.py --tiny --out /tmp/speed_tiny.json     # seconds, for tests
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from nrrdd_core.device import resolve_device  # noqa: E402
from nrrdd_core.experts import ExpertConfig, soft_cross_entropy, train_experts  # noqa: E402
from nrrdd_core.methods import make_distiller  # noqa: E402
from nrrdd_core.methods.common import pad_center  # noqa: E402

METHODS = ("sre2l", "rded", "nrrdd", "edf")
SIZES = ("shapes", "cifar10")
#: the second EDF setting (METHODS.md §5.7: memory grows with syn_steps x batch_syn)
EDF_LONG = {"syn_steps": 20}
IPC = 10


def expert_config(tiny: bool) -> ExpertConfig:
    """A small expert buffer for timing (the trajectories' values do not change a step's cost):
    2 experts x 12 epochs (enough for EDF's default T+ = 10, M = 2) on 20 images per class."""
    return ExpertConfig(num_experts=2 if not tiny else 1, epochs=12 if not tiny else 4,
                        train_per_class=20 if not tiny else 5, width=64 if not tiny else 8)


def method_overrides(method: str, tiny: bool, bundle, device, extra: dict) -> dict:
    """Config overrides of the timed run. Not tiny: the built-in defaults, except NRR-DD's
    ``mipc`` = ``images_per_step`` (one CIDD step per class, so the refinement phase starts sooner;
    a refinement step does not depend on it) and EDF's ``buffer`` (a small timing buffer)."""
    o: dict = {}
    if method == "nrrdd":
        o["mipc"] = 50
    if method == "edf":
        o["buffer"] = str(train_experts(expert_config(tiny), bundle, device=device))
    if tiny:
        o.update({"sre2l": {"iterations": 8}, "rded": {"mipc": 20, "images_per_step": 4},
                  "nrrdd": {"mipc": 4, "images_per_step": 4, "iterations": 8},
                  "edf": {"iterations": 8, "syn_steps": 2, "batch_syn": 4, "max_start_epoch": 2,
                          "current_max_start_epoch": 1, "expansion_iterations": 2}}[method])
    o.update(extra)
    return o


# ---- floors ---------------------------------------------------------------------------------------
def make_floor(method: str, d) -> tuple[Callable[[], None], dict]:
    """The bare computation a step of ``d`` cannot avoid, and a description of its shapes."""
    dev, teacher = d.device, d.teacher
    if method in ("sre2l", "nrrdd"):
        r = d.refiner
        idx = r.batches[0]
        x0, y = r.x[idx].detach().clone(), r.labels[idx]

        def floor():
            x = x0.clone().requires_grad_(True)
            F.cross_entropy(teacher(x), y).backward()
        return floor, {"floor": "teacher forward+backward", "batch": list(x0.shape)}
    if method == "rded":
        cfg = d.config
        n = min(cfg.images_per_step, cfg.mipc) * cfg.num_crops
        crops = torch.randn(n, 3, d.side, d.side, generator=torch.Generator().manual_seed(0)).to(dev)

        @torch.no_grad()
        def floor():
            teacher(pad_center(crops, d.size))
        return floor, {"floor": "teacher forward (no grad) on the padded crops",
                       "batch": [n, 3, d.size, d.size]}
    if method == "edf":
        c, b = d.config, d.buffer
        net, layout = d.net, d.layout
        traj = b.trajectory(0)
        theta0 = traj[0].to(dev)
        target = traj[c.expert_epochs].to(dev)
        n = len(d.x_syn)
        bs = min(c.batch_syn, n)
        x0, y0 = d.x_syn.detach().clone(), d.y_logits.detach().clone()

        def floor():
            x = x0.clone().requires_grad_(True)
            y = y0.clone().requires_grad_(True)
            lr = torch.tensor(c.lr_teacher, device=dev, requires_grad=True)
            theta = theta0.clone().requires_grad_(True)
            for s in range(c.syn_steps):
                a = (s * bs) % max(n - bs + 1, 1)
                out = torch.func.functional_call(net, layout.unflatten(theta), (x[a:a + bs],))
                g = torch.autograd.grad(soft_cross_entropy(out, y[a:a + bs]), theta, create_graph=True)[0]
                theta = theta - lr * g
            (((theta - target) ** 2).sum() / ((theta0 - target) ** 2).sum()).backward()
        return floor, {"floor": f"functional unroll of {c.syn_steps} steps + backward",
                       "batch": [bs, *x0.shape[1:]],
                       "syn_steps": c.syn_steps}
    raise ValueError(method)


def _timed(fn: Callable[[], object], dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def _profile(d, steps: int, top: int = 15) -> list[dict]:
    """cProfile of ``steps`` method steps: the ``top`` functions by own time."""
    prof = cProfile.Profile()
    for _ in range(steps):
        if d.done:
            break
        prof.runcall(d.step)
    st = pstats.Stats(prof)
    rows = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": nc,
                     "own_s": round(tt / steps, 5), "cum_s": round(ct / steps, 5)})
    return sorted(rows, key=lambda r: -r["own_s"])[:top]


def run_unit(spec: dict) -> dict:
    """Time one (size, method[, overrides]) unit in this process; see the module docstring."""
    dev = resolve_device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    tiny, method = spec["tiny"], spec["method"]
    if spec["size"] == "cifar10":
        bundle, teacher = common.load_cifar10(), common.resnet20_teacher(device=str(dev))
        teacher_desc = "ResNet-20 (akamaster, pretrained)"
    else:
        bundle = common.load_shapes(tiny)
        teacher, teacher_desc = common.shapes_teacher(bundle, tiny, device=str(dev))
    ipc = 1 if tiny else IPC
    overrides = method_overrides(method, tiny, bundle, dev, spec.get("extra", {}))
    d = make_distiller(method, overrides, teacher=teacher, dataset=bundle, ipc=ipc, device=dev, seed=0)
    pre = []
    if method == "nrrdd":  # time the refinement phase; record the CIDD steps on the way
        while d.step_index < d.select_steps:
            pre.append(d.step().seconds)
    d.step()  # EDF builds its images and student on its first match step
    floor, floor_info = make_floor(method, d)
    need = spec["warmup"] + spec["reps"]
    if d.total_steps - d.step_index < need:
        raise RuntimeError(f"{method}: {d.total_steps - d.step_index} steps left, {need} needed")
    for _ in range(spec["warmup"]):
        d.step()
        floor()
    rss_before, _ = common.rss_mb()
    peak_reset = common.reset_peak_rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t_step, t_floor = [], []
    for _ in range(spec["reps"]):
        t_step.append(_timed(d.step, dev))
        t_floor.append(_timed(floor, dev))
    _, peak = common.rss_mb()
    s, f = statistics.median(t_step), statistics.median(t_floor)
    out = {"size": spec["size"], "method": method, "label": spec.get("label", method),
           "dataset": bundle.config.name, "teacher": teacher_desc, "ipc": ipc,
           "num_images": ipc * len(d.classes), "overrides": {k: v for k, v in overrides.items() if k != "buffer"},
           "phase": d.history[-1].phase, "seconds_per_step": s, "steps_per_second": 1 / s,
           "floor_seconds": f, "ratio": s / f, **floor_info,
           "step_seconds_all": t_step, "floor_seconds_all": t_floor,
           "ratio_min_over_min": min(t_step) / min(t_floor),
           "rss_before_mb": round(rss_before, 1), "peak_rss_mb": round(peak, 1),
           "peak_rss_is_since_warmup": peak_reset, "machine": common.machine_info(dev)}
    if pre:
        out["cidd_seconds_per_step"] = statistics.median(pre)
    if dev.type == "cuda":
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    if method == "edf":
        est = d.memory_estimate()
        out["edf_memory_estimate_mb"] = round(est["bytes"] / 2**20, 1)
        out["edf_mib_per_image_step"] = round(est["per_image_step"] / 2**20, 3)
    if spec.get("profile") and out["ratio"] > spec["target"] and not d.done:
        out["profile"] = _profile(d, min(3, d.total_steps - d.step_index))
    d.close()
    return out


def units(args) -> list[dict]:
    out = []
    for size in args.sizes:
        for method in args.methods:
            base = {"size": size, "method": method, "device": args.device, "tiny": args.tiny,
                    "warmup": args.warmup, "reps": args.reps, "threads": args.threads,
                    "profile": args.profile, "target": args.target}
            out.append(base)
            if method == "edf" and not args.tiny:
                out.append({**base, "extra": EDF_LONG, "label": "edf (syn_steps=20)"})
    return out


def markdown(results: list[dict], target: float) -> str:
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["size"], "", "", r.get("label", r["method"]), "error: " + r["error"]] + [""] * 8)
            continue
        mem = f"{r['peak_rss_mb']:.0f}"
        if "cuda_max_allocated_mb" in r:
            mem += f" (CUDA {r['cuda_max_allocated_mb']:.0f})"
        ok = "yes" if r["ratio"] <= target else "**no**"
        rows.append([r["size"], r["teacher"], r["num_images"], r["label"], r["phase"], f"{r['seconds_per_step']:.4f}",
                     f"{r['steps_per_second']:.2f}", f"{r['floor_seconds']:.4f}", r["floor"],
                     f"{r['ratio']:.2f}", f"{r['ratio_min_over_min']:.2f}", ok, mem])
    return common.md_table(["size", "teacher", "images", "method", "phase", "s/step", "steps/s", "floor s", "floor",
                            "ratio (medians)", "ratio (minima)", f"<= {target}", "peak RSS MiB"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes setting (seconds; for tests)")
    ap.add_argument("--sizes", nargs="+", choices=SIZES, default=None)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--target", type=float, default=1.15)
    ap.add_argument("--profile", action="store_true", help="profile units above --target")
    ap.add_argument("--in-process", action="store_true",
                    help="run every unit in this process (peak RSS then covers earlier units)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--unit", help=argparse.SUPPRESS)  # internal: one unit as JSON
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    common.setup_logging(args.verbose)
    if args.unit:
        print(json.dumps(run_unit(json.loads(args.unit))))
        return 0
    args.sizes = args.sizes or (["shapes"] if args.tiny else list(SIZES))
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    args.reps = args.reps if args.reps is not None else (3 if args.tiny else 7)
    in_process = args.in_process or args.tiny
    out = args.out or common.RESULTS_DIR / f"speed_{resolve_device(args.device).type}.json"
    results = []
    doc = {"command": "python bench/speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "target_ratio": args.target, "machine": common.machine_info(resolve_device(args.device)),
           "results": results}
    for spec in units(args):
        label = f"{spec['size']}/{spec.get('label', spec['method'])}"
        common.log.info("timing %s", label)
        try:
            if in_process:
                r = run_unit(spec)
            else:
                cmd = [sys.executable, __file__, "--unit", json.dumps(spec)] + (["-v"] if args.verbose else [])
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode:
                    raise RuntimeError(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed")
                r = json.loads(p.stdout.strip().splitlines()[-1])
        except Exception as exc:  # noqa: BLE001 - record and go on with the other units
            common.log.error("%s failed: %s", label, exc)
            r = {"size": spec["size"], "method": spec["method"], "label": spec.get("label", spec["method"]),
                 "error": f"{type(exc).__name__}: {exc}"}
        common.log.info("%s: %s", label, {k: r.get(k) for k in ("seconds_per_step", "ratio", "peak_rss_mb")})
        results.append(r)
        doc["results"] = results
        common.write_json(out, doc)  # after every unit: a long run can be read while it goes
    print(markdown(results, args.target))
    print(f"\nwritten {out}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
