"""Job bodies: thin loops around ``nrrdd_core`` calls that report to a :class:`studio.jobs.Job`.

They run in worker threads, never touch ``st.*``, and work on a private copy of the shared
teacher (methods and CAMs register hooks on it).
"""

from __future__ import annotations

import copy
import time

from nrrdd_core.data import DatasetBundle
from nrrdd_core.export import build_manifest
from nrrdd_core.methods import make_distiller
from nrrdd_core.models.teacher import Teacher

from . import diagnostics, feed
from .frames import encoded, image_rows
from .jobs import Job
from .setup import Setup

#: Minimum seconds between two display frames of a live run.
FRAME_INTERVAL = 0.25
#: Seconds a picture is made ahead of the poll that shows it, beyond two steps (its own cost).
PICTURE_LEAD = 0.03
#: Frames may cost at most this share of the worker's time: a frame is due only while the CPU
#: the worker spent on frames so far is within ``FRAME_BUDGET`` of the run's time (so drawing
#: never takes more than about 5 % of the run, however large the set or slow the machine).
FRAME_BUDGET = 0.05
#: The budget never spaces two frames more than this many seconds apart.
MAX_FRAME_WAIT = 3.0
#: While nobody watches (no page polled the job for :data:`WATCH_TIMEOUT` s) a frame is still
#: made every :data:`UNWATCHED_INTERVAL` s, so a page that reattaches finds a recent one.
WATCH_TIMEOUT = 2.0
UNWATCHED_INTERVAL = 5.0


def teacher_ref(s: Setup) -> str:
    """How a manifest says which teacher was used: the text of the setup's
    :class:`~nrrdd_core.models.ref.TeacherRef`, paths made absolute (``nrrdd evaluate RUN``
    reloads it from there)."""
    return str(s.teacher_ref.resolved())


#: Teacher-side figures of a frame (confidence, accuracy, the NRR-DD diagnostics: teacher and
#: independent-model passes) are recomputed at most every this many seconds; frames in between
#: carry the last ones, so a frame is mostly drawing and encoding and frames can come often (a
#: fresh frame of the built-in default: about 70 ms; a carried one: about 13 ms with a PNG, 4 ms
#: with the live feed's BMP).
SCORES_INTERVAL = 6.0


def snapshot(d, teacher: Teacher, class_names: list[str], previous: dict | None = None) -> dict:
    """A display frame of a live run, made in the worker: the step, the labels, the teacher's
    confidence and accuracy on the labels of the current images, the NRR-DD diagnostics, and
    the image rows encoded as PNG (:func:`studio.frames.image_rows`). With ``previous`` (the
    last frame, made less than :data:`SCORES_INTERVAL` s ago) the teacher-side figures are
    carried over from it instead of recomputed."""
    x, y = d.images()
    frame = {"labels": y, "step": d.step_index, "steps_done": d.step_index}
    fresh = previous is None or time.perf_counter() - previous.get("scored", 0.0) >= SCORES_INTERVAL
    if not fresh:
        for key in ("confidence", "accuracy", "diagnostics", "scored"):
            if key in previous:
                frame[key] = previous[key]
    else:
        diag = frame["diagnostics"] = diagnostics.frame_diagnostics(d, class_names)
        frame["scored"] = time.perf_counter()
        if diag is not None:  # the teacher on the current images, already in the diagnostics
            frame["confidence"] = diag["summary"]["teacher_prob_after"]
            frame["accuracy"] = diag["summary"]["teacher_agree_after"]
        elif len(x):
            probs = teacher.predict01(x)
            frame["confidence"] = float(probs.gather(1, y[:, None]).mean())
            frame["accuracy"] = float((probs.argmax(1) == y).float().mean())
    frame["rows"] = image_rows({"images": x, "labels": y, **d.views()}, class_names)
    return frame


def phase_plan(d) -> dict:
    """Steps of each phase of a distiller, when it says (``{"selection": 24, "refinement":
    100}`` for NRR-DD); empty otherwise."""
    select = getattr(d, "select_steps", None)
    if not isinstance(select, int):
        return {}
    return {"selection": select, "refinement": d.total_steps - select}


def picture_due(job: Job, made: float, step_s: float) -> bool:
    """Whether the worker should make a picture now for the page that polls ``job`` (its fast
    fragment, every ``job.poll_interval`` s, last at ``job.polled``, ``time.monotonic()``): one
    picture per poll, made just before it, so that every poll shows a new picture and none is
    made that no poll shows. Due when no picture was made since the last poll (``made``, the
    monotonic time of the last one) and the next poll comes within two more steps of
    ``step_s`` s (steps vary: with one step's margin a poll in three found no new picture)
    plus :data:`PICTURE_LEAD` s. Without a recent poll (none yet, or the page polls late) it
    is due."""
    every = job.poll_interval
    if every <= 0 or not job.polled:
        return True
    now = time.monotonic()
    if now - job.polled > 2 * every:  # late polls: keep making pictures
        return True
    return made <= job.polled and job.polled + every - now <= 2 * step_s + PICTURE_LEAD


class FeedPublisher:
    """Publishes a job's progress and latest picture to the live feed a page set on it
    (``job.feed``, :mod:`studio.feed`); does nothing while none is set. Call it after every
    step: it writes the state at most every :data:`studio.feed.STATE_EVERY_S` s, and a picture
    (numbered ``job.frames``) as soon as the job has one the feed has not shown."""

    def __init__(self, job: Job) -> None:
        self.job, self.shown, self.at = job, 0, 0.0

    def __call__(self, force: bool = False) -> None:
        job = self.job
        out = job.feed
        if out is None:
            return
        now = time.monotonic()
        frame, n = job.frame, job.frames
        rows = frame.get("rows") if frame else None
        new = bool(rows) and n != self.shown
        if not (new or force or now - self.at >= feed.STATE_EVERY_S):
            return
        row = rows[0] if rows else {}
        state = feed.job_state(job, picture=n if new else self.shown,
                               title=row.get("title", ""), width=row.get("width", 0),
                               tile=row.get("tile", 0), rate=steps_per_second(
                                   job.history_tail(20)))
        out.publish(job.id, state, encoded(row, feed.PICTURE_FORMAT) if new else None)
        self.shown, self.at = (n if new else self.shown), now


def distill(job: Job, method: str, config: dict, teacher: Teacher, bundle: DatasetBundle,
            classes: list[int], s: Setup, every: int = 1, frames: bool = True) -> dict:
    """Run one method step by step. With ``frames`` (the Refine page) it records every step
    (with ``phase_step``, the step within its phase, from 0) and makes a display frame
    (:func:`snapshot`) every ``every`` steps, at most every :data:`FRAME_INTERVAL` s, one per
    poll of the watching page (:func:`picture_due`), within the :data:`FRAME_BUDGET` share of
    its time, only while a page watches (else every
    :data:`UNWATCHED_INTERVAL` s) and only when a step was done since the last one; without
    (Compare) it only updates the job's message. Stops between steps on request and returns
    what it has: ``images``, ``labels``, ``config``, ``seconds``, ``steps``, ``manifest``
    (export manifest), ``extras`` (``Distiller.export_extras()``, for ``save_run(...,
    extras=)``)."""
    t = copy.deepcopy(teacher)
    names = list(bundle.config.class_names)
    t0 = time.perf_counter()
    with make_distiller(method, config, teacher=t, dataset=bundle, classes=classes, ipc=s.ipc,
                        device=s.device, seed=s.seed) as d:
        if hasattr(d, "independent"):  # NRR-DD's diagnostics (METHODS.md §4.6)
            job.progress(message="independent model for the diagnostics (trained once)")
            d.independent = diagnostics.independent_for(bundle, s.device)
        if frames:
            job.progress(total=d.total_steps, message="starting", frame=snapshot(d, t, names))
            with job.lock:
                job.params["phases"] = phase_plan(d)
        # frame timing on the clock of Job.polled (time.monotonic), so picture_due compares them
        last, spent, since, frame = time.monotonic(), 0.0, 0, None
        start, publish = last, FeedPublisher(job)
        phase, phase_start = None, 0
        if frames:
            publish(force=True)
        while not d.done:
            if frames and since and job.pause_event.is_set():
                job.progress(frame=snapshot(d, t, names))  # the paused state is on screen
                last, since = time.monotonic(), 0
                publish(force=True)
            if job.should_stop():
                break
            rec = d.step()
            since += 1
            if rec.phase != phase:
                phase, phase_start = rec.phase, rec.step
            if frames:
                job.progress(step=d.step_index, message=rec.phase, record={
                    "step": rec.step + 1, "phase": rec.phase, "phase_step": rec.step - phase_start,
                    "seconds": rec.seconds, **rec.losses})
            else:
                job.progress(message=f"{method}: {rec.phase} {d.step_index}/{d.total_steps}")
            now = time.monotonic()
            watched = job.watched_recently(max(WATCH_TIMEOUT, job.watch_within))
            # a page that polls (Job.polled) gets one picture per poll; the live feed one per
            # poll_interval; nobody watching, one every UNWATCHED_INTERVAL
            gap = (FRAME_INTERVAL if job.polled else max(FRAME_INTERVAL, job.poll_interval)) \
                if watched else UNWATCHED_INTERVAL
            due = now - last >= gap and (spent <= FRAME_BUDGET * (now - start)
                                         or now - last >= max(gap, MAX_FRAME_WAIT))
            if due and watched:
                due = picture_due(job, last, rec.seconds)
            if frames and (d.done or (since >= every and due)):
                cpu = time.thread_time()
                frame = snapshot(d, t, names, previous=frame)
                job.progress(frame=frame)
                if frame["rows"] and job.film_due():
                    job.add_film(encoded(frame["rows"][0]))
                spent += time.thread_time() - cpu  # own CPU: waits for the GIL or a core excluded
                last, since = time.monotonic(), 0
            if frames:
                publish()
        x, y = d.images()
        extras = d.export_extras()
        seconds = time.perf_counter() - t0
        diag = diagnostics.set_diagnostics(t, x, y, d.independent, d.views()["initial"]) \
            if hasattr(d, "independent") else None
        manifest = build_manifest(
            method=method, config=d.config.to_dict(), teacher=t, bundle=bundle,
            classes=d.classes, ipc=s.ipc, seed=s.seed, teacher_ref=teacher_ref(s),
            dataset_args=dict(s.dataset_kwargs), steps=d.step_index, total_steps=d.total_steps,
            timings={"seconds": seconds, "seconds_per_step": seconds / max(1, d.step_index)},
            device=str(d.device), complete=d.done)
    return {"images": x, "labels": y, "config": d.config.to_dict(), "seconds": seconds,
            "steps": d.step_index, "manifest": manifest, "extras": extras, "diagnostics": diag}


#: Fewer optimiser steps than this in a quick student check cannot rank the sets.
MIN_RANKING_STEPS = 200


def quick_check(config: dict, n_images: int, n_classes: int) -> dict:
    """What a quick student check was: ``opt_steps`` (optimiser updates: epochs x batches per
    epoch, from the evaluation's ``config``: ``epochs``, ``batch_size``), ``chance`` (top-1 of
    guessing among ``n_classes``), and ``too_short`` (fewer than :data:`MIN_RANKING_STEPS`
    updates: an accuracy near chance says nothing about the set)."""
    batch = int(config.get("batch_size") or n_images) or 1
    steps = int(config.get("epochs") or 0) * -(-n_images // batch)
    return {"opt_steps": steps, "chance": 1.0 / max(1, n_classes),
            "too_short": steps < MIN_RANKING_STEPS}


def steps_per_second(history: list[dict], window: int = 20) -> float:
    """Compute rate of the last ``window`` steps (1 / mean step time)."""
    secs = [r["seconds"] for r in history[-window:] if r.get("seconds")]
    return len(secs) / sum(secs) if secs else float("nan")


#: Compare budgets: name -> (share of each method's published step counts
#: :data:`SCALED_FIELDS`, student epochs of the quick check).
BUDGETS = {"quick": (0.1, 10), "standard": (0.3, 30), "paper": (1.0, 300)}
#: Config fields scaled by a budget: optimisation steps and candidate images per class
#: (the selection phase).
SCALED_FIELDS = ("iterations", "mipc")


def budget_config(fields: list[dict], share: float) -> dict:
    """Config overrides of a method for a Compare budget: :data:`SCALED_FIELDS` at ``share`` of
    their default (at least their lower bound, and never above the tiny-mode value)."""
    from .settings import method_overrides

    out = method_overrides(fields)
    for f in fields:
        if f["name"] in SCALED_FIELDS and isinstance(f["default"], int) \
                and not isinstance(f["default"], bool):
            base = out.get(f["name"], f["default"])
            out[f["name"]] = min(base, max(int(f.get("lo") or 1), round(f["default"] * share)))
    return out


def compare_estimate(store: dict, s: Setup, classes: list[int], methods: list[str],
                     share: float) -> float | None:
    """Seconds a comparison of ``methods`` at budget ``share`` should take, from the times of
    earlier results in ``store`` on the same setup (distillation scaled by the budget ratio, the
    student check as it took); None when a method has none yet."""
    total = 0.0
    for name in methods:
        times = [(r["seconds"] * share / key[-1] + r.get("eval_seconds", 0.0))
                 for key, r in store.items() if len(key) == 7 and key[:4] == (
                     s.teacher_key, tuple(classes), s.ipc, s.seed) and key[4] == name
                 and key[-1]]
        if not times:
            return None
        total += min(times)
    return total


def compare(job: Job, methods: list[str], teacher: Teacher, bundle: DatasetBundle,
            classes: list[int], s: Setup, eval_cfg: dict, store: dict,
            recompute: bool = False, budget: float = 1.0) -> dict:
    """Distil the chosen classes with each method (published defaults, same teacher and seed), add the
    random real subset of the same size (:func:`nrrdd_core.compare.compare_methods`, with one
    quick student protocol for every set), and measure each set
    (:func:`nrrdd_core.metrics.set_metrics`), a quick student evaluation (``eval_cfg``), time and
    label storage. Results already in ``store`` (same setup, method and evaluation settings) are
    reused unless ``recompute``.

    Returns ``{name: result}`` with ``"random"`` first; partial results are also in
    ``job.frame["results"]`` while it runs."""
    from nrrdd_core.compare import DistilledSet, SetResult, compare_methods
    from nrrdd_core.evaluate import EvalConfig
    from nrrdd_core.labels import paper_label_bytes
    from nrrdd_core.methods import get_method
    from nrrdd_core.metrics import set_metrics

    t = copy.deepcopy(teacher)
    ecfg = EvalConfig.from_dict(eval_cfg)
    results: dict = {}
    job.progress(total=len(methods) + 1)

    def key(name: str) -> tuple:
        return (s.teacher_key, tuple(classes), s.ipc, s.seed, name,
                tuple(sorted(eval_cfg.items())), budget)

    def distil(name: str, config: dict) -> DistilledSet | None:
        r = distill(job, name, config, teacher, bundle, classes, s, frames=False)
        if r["steps"] == 0 or job.stop_event.is_set():
            return None
        return DistilledSet(r["images"], r["labels"], r["seconds"], r["steps"], r["extras"],
                            {"manifest": r["manifest"], "diagnostics": r.get("diagnostics")})

    def cached(name: str) -> SetResult | None:
        row = None if recompute else store.get(key(name))
        return None if row is None else SetResult(name, DistilledSet(row["images"], row["labels"],
                                                                     info={"row": row}))

    def on_result(r: SetResult) -> None:
        if r.reused:
            results[r.name] = {**r.distilled.info["row"], "reused": True}
        else:
            x, y, ev = r.distilled.images01, r.distilled.labels, r.evals[ecfg.protocol]
            diag = r.distilled.info.get("diagnostics")
            if diag is None:  # agreement of the teacher and the independent model with the labels
                diag = diagnostics.set_diagnostics(t, x, y, diagnostics.independent_for(bundle, s.device))
            results[r.name] = store[key(r.name)] = {
                "images": x, "labels": y, "seconds": r.distilled.seconds,
                "manifest": r.distilled.info.get("manifest"), "extras": r.distilled.extras,
                **set_metrics(t, x, y), "student_acc": ev.final_acc, "student_best": ev.best_acc,
                "eval_seconds": ev.seconds,
                "label_bytes": paper_label_bytes(len(x), 300, bundle.num_classes),
                "diagnostics": diag, **quick_check(ev.config, len(x), len(classes))}
        job.progress(step=len(results), frame={"results": dict(results)})

    def stage(name: str, what: str) -> None:
        if what == "evaluate":
            job.progress(message=f"{name}: measuring and training a student ({ecfg.epochs} epochs)")

    configs = {m: budget_config(get_method(m).Config.describe(), budget) for m in methods}
    # the app's policy: one quick student protocol for every set (EDF's own protocol is on the
    # Evaluate page)
    compare_methods(methods, t, bundle, classes, s.ipc, s.seed, ecfg, s.device, configs=configs,
                    own_protocol=False, distill=distil, cached=cached, on_result=on_result,
                    should_stop=job.should_stop, progress=stage)
    return results


def evaluate_runs(job: Job, paths: list[str], teacher: Teacher, bundle: DatasetBundle,
                  eval_cfg: dict, s: Setup) -> list[dict]:
    """Train a student on each saved run with ``eval_cfg`` (its ``protocol``: ``kd``, METHODS.md §1.4,
    or ``edf``, METHODS.md §5.6, which uses the run's extras: learned labels, lr, architecture, ZCA),
    recording one history row per epoch (``run``, ``epoch``, ``acc`` on evaluated epochs...) and
    saving each result into its run folder. A run that cannot be evaluated (other dataset...)
    gets an ``error`` row and the others go on."""
    from nrrdd_core.errors import NrrddError, StoppedError
    from nrrdd_core.evaluate import EvalConfig, evaluate_student
    from nrrdd_core.export import load_run, save_eval

    from .reference import published

    t = copy.deepcopy(teacher)
    cfg = EvalConfig.from_dict(eval_cfg)
    rows: list[dict] = []
    epochs = cfg.num_epochs
    job.progress(total=len(paths) * epochs)
    for k, path in enumerate(paths):
        if job.should_stop():
            break
        row = {"run": str(path).rstrip("/").split("/")[-1], "protocol": cfg.protocol}
        try:
            run = load_run(path)
            mf = run.manifest
            row.update(method=mf.get("method"), dataset=mf["dataset"]["name"], ipc=mf.get("ipc"))
            if list(mf["dataset"]["all_class_names"]) != list(bundle.config.class_names):
                raise NrrddError(f"the run was distilled on {mf['dataset']['name']} with other "
                                 "classes than the current setup: choose its dataset on Setup")
            res = evaluate_student(
                run.images01, run.labels, t, bundle, cfg, device=s.device, seed=s.seed,
                classes=mf["dataset"]["classes"], should_stop=job.should_stop, extras=run.extras,
                progress=lambda e, n, m, k=k, name=row["run"]: job.progress(
                    step=k * epochs + e, message=f"{name}: epoch {e}/{n}",
                    record={"run": name, "epoch": e, **m}))
            save_eval(path, res.to_dict())
            pub = published(mf, res.config.get("student", cfg.student))
            row.update(final_acc=100 * res.final_acc, best_acc=100 * res.best_acc,
                       published=pub, seconds=res.seconds)
        except StoppedError:
            raise
        except NrrddError as exc:
            row["error"] = str(exc)
        rows.append(row)
        job.progress(frame={"rows": list(rows)})
    return rows
