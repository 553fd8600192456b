"""docs/RESULTS.md from the benchmark JSON files in bench/results/ (``bench/accuracy.py --report``)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import common

RESULTS_MD = common.REPO / "docs" / "RESULTS.md"


def _pm(row: dict) -> str:
    if row.get("mean") is None:
        return "-"
    s = f"{row['mean']:.1f}"
    if row["n"] > 1:
        s += f" ± {row['std']:.1f}"
    return s + f" (n={row['n']})"


def _secs(v) -> str:
    return f"{sum(v) / len(v):.0f}" if v else "-"


def _cmd(doc: dict) -> str:
    return "`" + doc["command"].replace("python ", "") + "`"


def _machine(m: dict) -> str:
    s = f"device {m['device']}, torch {m['torch']}, {m['torch_threads']} torch threads on {m['cpu_count']} CPUs"
    if m.get("gpu"):
        s += f" ({m['gpu']})"
    if m.get("loadavg"):
        s += f", load average {m['loadavg'][0]:.1f} at start"
    if m.get("loadavg_now"):
        s += f", {m['loadavg_now'][0]:.1f} at the last update"
    return s


def compute_seconds(doc: dict) -> float:
    """Seconds of compute of every unit in ``doc`` (teacher training, experts, each distilled set
    once, each evaluation), cached or not: what a run from an empty cache costs on that machine."""
    total = sum(t.get("train_seconds") or 0 for t in doc.get("teachers", {}).values())
    total += (doc.get("experts") or {}).get("seconds", 0)
    for r in doc.get("rows", []):
        total += sum(r.get("eval_seconds") or [])
        if not (r["table"] == "comparison" and r.get("protocol") == "edf"):  # same sets as KD
            total += sum(r.get("distill_seconds") or [])
    return total


def accuracy_markdown(doc: dict) -> str:
    """The accuracy tables of one ``accuracy_<budget>.json`` document."""
    cmd = f"{_cmd(doc)} on {doc['machine']['device']}"  # each row says how and where it was made
    out = [f"### Budget `{doc['budget']}` ({doc['status']})", "",
           f"Command: {_cmd(doc)}. Machine: {_machine(doc['machine'])}. Wall time of the "
           f"last invocation: {doc.get('elapsed_s', 0) / 60:.0f} min (units found in the cache cost "
           f"nothing); compute of all its units as measured (a run from an empty cache): "
           f"{compute_seconds(doc) / 60:.0f} min.", "", doc.get("note", ""), ""]
    if doc.get("budget_gap") and doc["budget"] != "paper":
        out += ["How far this budget is below the published one:", "",
                common.md_table(["item", "this budget", "published", "published / this"],
                                doc["budget_gap"]), ""]
    teachers = doc.get("teachers", {})
    if teachers:
        out += ["Teachers (top-1 on the full JPEG test split):", "",
                common.md_table(["teacher", "how", "epochs", "test top-1 %", "train s"],
                                [[k, v["source"], v.get("epochs", "-"), f"{100 * v['test_acc']:.2f}",
                                  f"{v['train_seconds']:.0f}" if v.get("train_seconds") else "-"]
                                 for k, v in teachers.items()]), ""]
    if doc.get("experts"):
        e = doc["experts"]
        c = e["config"]
        out += [f"EDF experts: {c['num_experts']} ConvNet-IN (width {c['width']}) x {c['epochs']} epochs "
                f"on {c['train_per_class'] or 'all'} images per class, ZCA {c['zca']}; expert test "
                f"top-1 {', '.join(f'{100 * a:.1f}' for a in e['test_accs'])} %; {e['seconds']:.0f} s.", ""]
    rows = doc.get("rows", [])
    comp = [r for r in rows if r["table"] == "comparison"]
    if comp:
        out += ["**Comparison** (same teacher, classes and seeds; distillation seed s evaluated with "
                "student seed s; top-1 % on the 10,000 JPEG test images, mean ± sample std over seeds):", "",
                common.md_table(
                    ["command, device", "teacher", "IPC", "method", "budget", "protocol / student",
                     "student epochs", "top-1 % (ours)", "per seed", "distill s", "published (METHODS.md §6)"],
                    [[cmd, r["teacher"], r["ipc"], r["method"],
                      ", ".join(f"{k} {v}" for k, v in r.get("method_budget", {}).items()) or "-",
                      f"{r['protocol']} / {r['student']}", r["eval_epochs"], _pm(r),
                      " / ".join(f"{a:.1f}" for a in r["accs"]), _secs(r.get("distill_seconds")),
                      r.get("published", "-")] for r in comp]), ""]
    tau = [r for r in rows if r["table"] in ("nrrdd_tau", "nrrdd_mask")]
    if tau:
        out += ["**NRR-DD threshold and mask mode** (KD protocol, one seed; published column: "
                "ImageNette IPC 10, ResNet-18, NRR-DD paper):", "",
                common.md_table(["command, device", "teacher", "IPC", "tau", "mask", "student epochs", "top-1 %",
                                 "published"],
                                [[cmd, r["teacher"], r["ipc"], r["tau"], r["mask_mode"], r["eval_epochs"],
                                  _pm(r), r.get("published") or "-"] for r in tau]), ""]
    lab = [r for r in rows if r["table"] == "labels"]
    if lab:
        out += ["**NRR-DD labels** (KD protocol, one seed; bytes of the label files actually written "
                "for all student epochs; crop/mix parameters, needed by soft and DBR replay alike, "
                "counted apart; paper arithmetic N x epochs x C or x 2 values in fp16):", "",
                common.md_table(["command, device", "teacher", "IPC", "labels", "student epochs", "top-1 %",
                                 "label bytes", "aug-param bytes", "paper arithmetic bytes"],
                                [[cmd, r["teacher"], r["ipc"], r["label_mode"], r["eval_epochs"], _pm(r),
                                  r["label_bytes"], r["aug_param_bytes"], r.get("paper_bytes") or "-"]
                                 for r in lab]), ""]
    grid = [r for r in rows if r["table"] == "edf_grid"]
    if grid:
        out += ["**EDF alpha (CPD) x beta (DAE)** (EDF protocol, one seed; alpha = beta = 0 is plain DATM):", "",
                common.md_table(["command, device", "teacher (DAE CAM)", "IPC", "iterations", "alpha", "beta",
                                 "student epochs", "top-1 %"],
                                [[cmd, r["teacher"], r["ipc"], r["iterations"], r["alpha"], r["beta"],
                                  r["eval_epochs"], _pm(r)] for r in grid]), ""]
    return "\n".join(out)


def study_markdown(docs: list[dict]) -> str:
    """The like-with-like study tables (``bench/accuracy.py --study``) of the settings in
    ``docs`` (one ``study_<budget>_<setting>.json`` each): same-architecture settings first, then
    the cross-architecture ones, each with its teacher, data and rows."""
    out = []
    for table, title in (("same_arch", "Same architecture (student = teacher's architecture)"),
                         ("cross_arch", "Cross-architecture (a separate table, as NRR-DD's Table 3)")):
        part = [d for d in docs if d.get("table") == table]
        if not part:
            continue
        out += [f"**{title}**", ""]
        for d in part:
            t, ds = d.get("teacher") or {}, d["dataset"]
            ev = d.get("eval") or {}
            out += [f"*{d['label']}* ({d['status']}): train `{ds.get('train_file', ds['name'])}` "
                    f"({ds['n_train']} images), test `{ds.get('test_file', ds['name'])}` "
                    f"({ds['n_test']} images); teacher {t.get('source', '-')}, "
                    f"test top-1 {100 * t['test_acc']:.2f} %"
                    + (f", trained {t['epochs']} epochs in {t['train_seconds'] / 60:.0f} min"
                       if t.get("train_seconds") else "")
                    + f"; student {d['student']}, KD {ev.get('epochs', '?')} epochs"
                    + (" + RandAugment" if ev.get("randaugment") else "")
                    + f", student seeds {', '.join(map(str, d['student_seeds']))}. Command"
                    + ("s: " + "; ".join(f"`{c.replace('python ', '')}`" for c in d["commands"])
                       if len(d.get("commands", [])) > 1 else f": {_cmd(d)}") + ", "
                    f"{_machine(d['machine'])}.", "",
                    common.md_table(["set", "top-1 % (mean ± std)", "per student seed", "vs random",
                                     "teacher agrees %", "independent agrees %", "mean change /255",
                                     "distill s"],
                                    [_study_row(d, r) for r in d["rows"]]), ""]
            if d.get("independent"):
                ind = d["independent"]
                out += [f"Agreement = share of the set's images whose top-1 class is their label "
                        f"(before -> after refinement, before = the CIDD set of the same confidence "
                        f"reading); independent model: ConvNet-BN width {ind['recipe'].get('width', 32)}, "
                        f"{ind['recipe']['epochs']} epochs on the same training split, test top-1 "
                        f"{100 * ind['test_acc']:.1f} % (METHODS.md §4.6). A ⚠ marks a set whose "
                        "refinement raised the teacher's agreement but not the independent model's.", ""]
    return "\n".join(out)


def _study_row(doc: dict, r: dict) -> list:
    rand = next((x for x in doc["rows"] if x["method"] == "random"), None)
    diag = (doc.get("diagnostics") or {}).get(r["variant"])

    def agree(key: str) -> str:
        if not diag or f"{key}_agree_after" not in diag:
            return "-"
        b, a = 100 * diag[f"{key}_agree_before"], 100 * diag[f"{key}_agree_after"]
        return f"{a:.0f}" if diag.get("before") == "itself" else f"{b:.0f} -> {a:.0f}"
    delta = f"{r['mean'] - rand['mean']:+.1f}" if rand and r is not rand and r["mean"] is not None else "-"
    change = f"{255 * diag['change_mean']:.1f}" if diag and diag.get("before") == "CIDD" else "-"
    warn = " ⚠" if diag and diag.get("warning") else ""
    return [r["variant"], _pm(r), " / ".join(f"{a:.1f}" for a in r["accs"]), delta,
            agree("teacher"), agree("independent") + warn, change,
            f"{r['distill_seconds']:.0f}" if r["method"] != "random" else "-"]


def speed_markdown(doc: dict) -> str:
    import speed

    out = [f"Command: {_cmd(doc)}. Machine: {_machine(doc['machine'])}.", "",
           speed.markdown(doc["results"], doc["target_ratio"]), ""]
    prof = [r for r in doc["results"] if r.get("profile")]
    if prof:
        out += ["Where the time goes (cProfile over 3 steps of each unit above the target; own time "
                "per step, profiler overhead included):", ""]
    for r in prof:
        top = ", ".join(f"`{_fn(p['function'])}` {1000 * p['own_s']:.0f} ms" for p in r["profile"][:7])
        out += [f"- {r['size']}/{r['label']} (ratio {r['ratio']:.2f}): {top}."]
    if doc.get("notes"):
        out += ["", "Findings:", ""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(out + [""])


def _fn(name: str) -> str:
    """``~:0(<method 'var' of 'torch._C.TensorBase' objects>)`` -> ``Tensor.var``."""
    if name.startswith("~:0(<method '"):
        return "Tensor." + name.split("'")[1]
    if name.startswith("~:0(<built-in method "):
        return name.removeprefix("~:0(<built-in method ").rstrip(">)")
    return name


HEADER = """# Benchmark results

Measured by the project's own scripts (`bench/speed.py`, `bench/ui_speed.py`,
`bench/accuracy.py`); this file is generated from `bench/results/*.json` (and the hand-written
`*.notes.md` beside them) by `python bench/accuracy.py --report`.

**Data.** CIFAR-10 from `../shared/data`: 20,000 training images (2,000 per class, a
class-balanced subset of the 50,000) and the full 10,000-image test set, both decoded from a JPEG
copy (quality 75; mean absolute error 5.8/255 against the original pixels). Teachers and students
are trained and tested within that JPEG domain. The published figures (METHODS.md §6) were
obtained on the original 50,000 training images at full budgets, so they are an orientation, not
a target for the reduced budgets below. The pretrained ResNet-20 was trained on original pixels
(91.6 % there, about 81 % on the JPEG test set), so the like-with-like study uses it only on the
original-pixel files (`cifar10_exact_train_prefix.npz`, 5,438 images, 523-572 per class;
`cifar10_exact_test_prefix.npz`, the first 1,017 test images).
"""


def ui_markdown(doc: dict) -> str:
    """The table of one ``ui_speed_*.json`` document (``bench/ui_speed.py --out``)."""
    st, tau, live = doc["start_to_explorer_s"], doc["tau_redraw_40_images_s"], doc["live_refinement"]
    def other(key, what):  # a start-up figure without a target of its own
        d = doc.get(key)
        return [[what, f"{d['median']:.2f} s (median of {len(d['runs'])})", "-", "-"]] if d else []

    rows = [["server start to the explorer's CAM grid (browser already open; its view stored "
             "by an earlier start)",
             f"{st['median']:.2f} s (median of {len(st['runs'])}; server ready after "
             f"{statistics.median(st['server_ready_s']):.2f} s)", "<= 5 s",
             "yes" if st["median"] <= 5 else "no"],
            *other("start_to_explorer_cold_s", "the same, first start of the setup (no stored "
                   "view: computed with torch, then stored)"),
            *other("start_to_explorer_plain_s", "the same with plain `streamlit run app.py`"),
            *other("start_to_setup_s", "server start to the Setup page (teacher accuracy and "
                   "class thumbnails shown)"),
            ["explorer redraw after a tau change, 40 images", f"{tau['median']:.2f} s (median of "
             f"{len(tau['runs'])})", "<= 0.5 s", "yes" if tau["median"] <= 0.5 else "no"],
            ["UI updates during live NRR-DD refinement", f"{live['updates_per_s']:.1f} per s over "
             f"{live.get('window_s', 10):.0f} s, at {live['steps_per_s']:.1f} refinement steps per s",
             ">= 2 per s", "yes" if live["updates_per_s"] >= 2 else "no"],
            *([["refinement steps per s with Refine live open / closed (worst of default and "
                "4 classes x IPC 2, quiet and with competing busy processes)",
                f"{doc['live_view_throughput_ratio']:.2f}", ">= 0.8",
                "yes" if doc["live_view_throughput_ratio"] >= 0.8 else "no"]]
              if "live_view_throughput_ratio" in doc else [])]
    cases = []
    for name in ("default", "small"):
        for load, c in (doc.get(f"live_view_{name}") or {}).get("cases", {}).items():
            o, cl = c["open"], c["closed"]
            cases.append([name, load, f"{o['steps_per_s']:.1f} ({', '.join(map(str, o.get('windows', [])))})",
                          f"{cl['steps_per_s']:.1f} ({', '.join(map(str, cl.get('windows', [])))})",
                          f"{c['ratio']:.2f}", f"{o.get('updates_per_s', float('nan')):.1f}",
                          f"{o.get('slowed_windows', '-')} of {len(o.get('windows', [])) or '-'}"])
    detail = ["Live view, per case (steps per s pooled over the alternating windows, each "
              "window's figure in brackets; slowed = windows at whose end the page said it "
              "polled less often because the CPU was contended):", "",
              common.md_table(["setting", "machine", "open steps/s", "closed steps/s", "ratio",
                               "updates/s open", "slowed"], cases), ""] if cases else []
    return "\n".join([f"Command: `{doc['command']}` (real Chromium via Playwright, built-in defaults, "
                      f"shipped teacher). Load average {doc['load_avg_before'][0]:.1f} at start, "
                      f"{doc['cpu_count']} CPUs.", "",
                      common.md_table(["measure", "ours", "target", "met"], rows), "", *detail])


def write_results_md(results_dir: Path = common.RESULTS_DIR, path: Path = RESULTS_MD) -> Path:
    """Regenerate ``docs/RESULTS.md`` from every ``speed_*.json``, ``ui_speed_*.json`` and
    ``accuracy_*.json``."""
    parts = [HEADER]
    speeds = sorted(results_dir.glob("speed_*.json"))
    if speeds:
        parts += ["## Speed and memory per step", "",
                  "Seconds per `step()` (median of interleaved repetitions after warm-up), next to "
                  "the physical floor measured in the same process on the same shapes: a bare "
                  "teacher forward + backward on the same batch (SRe2L, NRR-DD refinement), a bare "
                  "teacher forward on the same number of padded crops (RDED), a bare functional "
                  "unroll of the same syn_steps + its backward (EDF). Target ratio <= 1.15. Peak "
                  "RSS is the process's peak during the timed steps (data, teacher and torch "
                  "included). Timings on a shared machine are noisy: the load average is given.", ""]
        for p in speeds:
            parts.append(speed_markdown(json.loads(p.read_text())))
    mems = sorted(results_dir.glob("memory_*.json"))
    if mems:
        import memory  # bench/memory.py: EDF memory against syn_steps, ImageFolder against size

        parts.append(memory.results_markdown(mems))
    floats = sorted(results_dir.glob("edf_float_*.json"))
    if floats:
        import edf_float  # bench/edf_float.py: EDF evaluated on its float tensor vs its PNGs

        parts += [edf_float.SECTION, ""] + [edf_float.markdown(json.loads(p.read_text()))
                                            for p in floats]
    uis = sorted(results_dir.glob("ui_speed_*.json"))
    if uis:
        parts += ["## The app", ""]
        for p in uis:
            parts.append(ui_markdown(json.loads(p.read_text())))
            notes = p.with_suffix(".notes.md")  # a person's notes on that run, if any
            if notes.is_file():
                parts.append(notes.read_text().strip() + "\n")
    import study

    studies = [d for d in study.load_docs(results_dir) if d.get("study") != "tiny"]
    if studies:
        parts += ["## Accuracy, like with like (each teacher in its own pixel domain)", "",
                  getattr(study.STUDIES.get(studies[0]["study"]), "note", studies[0]["note"]), "",
                  study_markdown(studies)]
        notes = results_dir / f"study_{studies[0]['study']}.notes.md"  # a person's notes
        if notes.is_file():
            parts.append(notes.read_text().strip() + "\n")
    accs = sorted(results_dir.glob("accuracy_*.json"))
    if accs:
        parts += ["## Accuracy of the distilled sets" + (
            ": an earlier run on the JPEG files only" if studies else ""), ""]
        if studies:
            parts += ["Kept for its ablations (tau, mask mode, label storage, EDF). Its ResNet-20 "
                      "rows use the pretrained teacher outside its pixel domain (JPEG) and a "
                      "ConvNet-BN student (cross-architecture); the like-with-like tables above "
                      "supersede them.", ""]
        for p in accs:
            doc = json.loads(p.read_text())
            if doc["budget"] != "tiny":
                parts.append(accuracy_markdown(doc))
                notes = p.with_suffix(".notes.md")  # a person's notes on that run, if any
                if notes.is_file():
                    parts.append(notes.read_text().strip() + "\n")
    return common.write_text(path, "\n".join(parts).rstrip() + "\n")
