"""The ``nrrdd`` console command (issue 3 section 6).

::

    nrrdd methods [--json]
    nrrdd teacher train --dataset shapes --out teacher.pt [--arch ... --epochs ...]
    nrrdd distill --method nrrdd --dataset shapes --classes circle,star --ipc 10 \\
        --teacher shipped --out runs --name demo [--tau 0.5 ...]
    nrrdd evaluate runs/demo --student resnet18_small --label-mode dbr --epochs 300
    nrrdd experts ...            (EDF expert trajectories)
    nrrdd ui [--server.port 8502 ...]   (the Streamlit app; flags go to streamlit run)
    nrrdd distill --method edf ...; nrrdd evaluate runs/edf_run --protocol edf
    nrrdd distill ... --teacher resnet20_cifar:cifar10_resnet20_akamaster.th   (public checkpoint)

Every field of a config dataclass (the chosen method's ``Config``, ``TeacherTrainConfig``,
``EvalConfig``, ``ExpertConfig``) is a flag generated from its metadata: ``--field-name VALUE``
(``--flag`` / ``--no-flag`` for booleans); ``nrrdd distill --method M --help`` lists M's flags.
A user error (:class:`~nrrdd_core.errors.NrrddError`: bad value, unknown class, missing file) prints
one ``error: ...`` line on stderr and exits with code 2, like argparse's own errors.
This module is the console front end, so it writes results to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from . import __version__
from .configs import ConfigBase, describe_range
from .errors import ConfigError, NrrddError

log = logging.getLogger(__name__)


# ---- generated flags ----------------------------------------------------------------------------
def _field_help(row: dict) -> str:
    parts = [row["doc"] or ""]
    extra = [f"default {row['default']}"]
    if row["unit"]:
        extra.append(f"unit {row['unit']}")
    if row["choices"]:
        extra.append("one of " + ", ".join(str(c) for c in row["choices"]))
    elif row["lo"] is not None or row["hi"] is not None:
        extra.append("range " + describe_range(row))
    if row["source"]:
        extra.append(f"source {row['source']}")
    parts.append(f"[{'; '.join(extra)}]")
    return " ".join(parts).replace("%", "%%")


def add_config_args(parser: argparse.ArgumentParser, cls: type[ConfigBase]) -> None:
    """Add one flag per field of ``cls`` (``--field-name``; booleans ``--x`` / ``--no-x``), default
    None (= keep the dataclass default). A field whose flag already exists (e.g. ``--seed``) is set
    by that option."""
    group = parser.add_argument_group(f"{cls.__name__} (generated from the dataclass)")
    for row in cls.describe():
        flag = "--" + row["name"].replace("_", "-")
        if flag in parser._option_string_actions:
            continue
        if row["type"] == "bool":
            group.add_argument(flag, dest=row["name"], action=argparse.BooleanOptionalAction,
                               default=None, help=_field_help(row))
        else:
            group.add_argument(flag, dest=row["name"], default=None, metavar=row["type"].upper(),
                               help=_field_help(row))


def config_from_args(cls: type[ConfigBase], args: argparse.Namespace) -> ConfigBase:
    """Build ``cls`` from the flags given on the command line (the others keep their defaults).

    Raises:
        ConfigError: a value that cannot be read or is out of range (names the field).
    """
    given = {row["name"]: getattr(args, row["name"]) for row in cls.describe()
             if getattr(args, row["name"], None) is not None}
    return cls.from_dict(given)


# ---- datasets and teachers ----------------------------------------------------------------------
def _add_dataset_args(p: argparse.ArgumentParser, default: str | None = "shapes") -> None:
    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default=default,
                   help="dataset entry (shapes, npz, cifar10, cifar100, imagefolder, ...)"
                        + (f" [default {default}]" if default else " [default: the run's dataset]"))
    g.add_argument("--data-root", help="dataset folder (npz, cifar10, imagefolder ...)")
    g.add_argument("--train-file", help="npz: training file name inside --data-root")
    g.add_argument("--test-file", help="npz: test file name inside --data-root")
    g.add_argument("--image-size", type=int, help="image side in pixels, for entries that take it")
    g.add_argument("--classes", help="comma-separated class names or indices (default: all)")
    g.add_argument("--dataset-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword of the dataset entry, e.g. train_per_class=20 (repeatable)")


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def dataset_kwargs(args: argparse.Namespace) -> dict:
    """``load_dataset`` keyword arguments from the dataset flags (only those given; ``root``
    made absolute, so that a run's manifest rebuilds the dataset from any folder).

    Raises:
        ConfigError: a ``--dataset-opt`` without ``=``.
    """
    root = str(Path(args.data_root).resolve()) if args.data_root else None
    kw = {k: v for k, v in (("root", root), ("train_file", args.train_file),
                            ("test_file", args.test_file), ("image_size", args.image_size))
          if v is not None}
    for opt in args.dataset_opt:
        key, sep, value = opt.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--dataset-opt {opt!r}: expected KEY=VALUE")
        kw[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return kw


def _classes(text: str | None) -> list[str] | None:
    if not text:
        return None
    return [c.strip() for c in text.split(",") if c.strip()]


def load_bundle(name: str, kwargs: dict, classes: list | None = None):
    """``load_dataset(name, classes, **kwargs)``, turning an option the entry does not take into a
    :class:`ConfigError`."""
    from .data import load_dataset

    try:
        return load_dataset(name, classes=classes, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"dataset {name!r} does not take option(s) {sorted(kwargs)}: {exc}") from exc


def teacher_ref(ref: str) -> str:
    """``ref`` (a :class:`~nrrdd_core.models.ref.TeacherRef` text) with its checkpoint path made
    absolute: what a run records to reload it.

    Raises:
        ConfigError: ``ref`` does not follow the teacher-reference grammar.
    """
    from .models.ref import TeacherRef

    return str(TeacherRef.parse(ref).resolved())


def load_teacher(ref: str, device, class_names: Sequence[str] | None = None):
    """The teacher named by ``ref`` (:meth:`TeacherRef.parse <nrrdd_core.models.ref.TeacherRef>`
    grammar: ``shipped``, a checkpoint path or ``file:PATH``, ``resnet20_cifar:PATH`` for a public
    akamaster-format checkpoint (ImageNet mean/std; ``class_names`` or the CIFAR-10 names),
    ``pretrained:ARCH``, ``train:KEY``, ``upload:KEY``).

    Raises:
        CheckpointError: missing or unreadable checkpoint, or weights that do not fit.
        ConfigError: a bad reference or an unknown architecture.
    """
    from .models.ref import TeacherRef

    return TeacherRef.parse(ref).load(device, class_names)


def match_teacher(bundle, teacher):
    """The dataset restricted to the teacher's classes when the teacher was trained on a subset
    of them (same names, dataset order); else ``bundle`` unchanged."""
    names = teacher.data_config.class_names
    if names != bundle.config.class_names and set(names) <= set(bundle.config.class_names):
        return bundle.subset(list(names))
    return bundle


def teacher_and_bundle(ref: str, device, dataset: str, kwargs: dict):
    """``(teacher, bundle)``: the teacher of ``ref`` (:func:`load_teacher`) and the dataset
    restricted to its classes (:func:`match_teacher`). A public checkpoint takes the dataset's
    class names, so the dataset is built first; otherwise the teacher is loaded first, so that a
    bad path fails before a dataset is built."""
    from .models.ref import TeacherRef

    full = load_bundle(dataset, kwargs) if TeacherRef.parse(ref).takes_class_names else None
    teacher = load_teacher(ref, device, full.config.class_names if full else None)
    return teacher, match_teacher(full or load_bundle(dataset, kwargs), teacher)


class _Bar:
    """tqdm bar usable as a ``progress(done, total, metrics)`` callback (disabled off a terminal)."""

    #: A run whose estimate exceeds this many seconds gets an "estimated duration" line.
    LONG_S = 60.0

    def __init__(self, desc: str, total: int | None = None) -> None:
        self.bar = tqdm(total=total, desc=desc, file=sys.stderr, disable=None, dynamic_ncols=True)
        self.desc = desc
        self.first: tuple[int, float] | None = None  # (done, time) after the first (warm-up) step
        self.estimated = False

    def estimate(self, done: int, total: int | None) -> str | None:
        """``"estimated duration ..."`` once the steps after the first one give a rate (3 steps
        or 5 s) and the run would take over :attr:`LONG_S` seconds; None otherwise."""
        now = time.perf_counter()
        if self.first is None:
            self.first = (done, now)
            return None
        steps, secs = done - self.first[0], now - self.first[1]
        if self.estimated or not total or steps <= 0 or (steps < 3 and secs < 5):
            return None
        self.estimated = True
        left = (total - done) * secs / steps
        if left < self.LONG_S:
            return None
        return (f"{self.desc}: estimated duration {_duration(left)} more ({total - done} steps "
                f"at {secs / steps:.3g} s each); Ctrl-C stops and keeps what is done")

    def __call__(self, done: int, total: int | None = None, metrics: dict | None = None) -> None:
        if total is not None:
            self.bar.total = total
        msg = self.estimate(done, self.bar.total)
        if msg:
            self.bar.write(msg, file=sys.stderr)
        self.bar.n = done
        if metrics:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()
                                  if isinstance(v, (int, float))}, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    """``"3 h 05 min"``, ``"12 min"`` or ``"45 s"``."""
    m = round(seconds / 60)
    if m >= 60:
        return f"{m // 60} h {m % 60:02d} min"
    return f"{m} min" if m >= 1 else f"{seconds:.0f} s"


# ---- commands -----------------------------------------------------------------------------------
def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import get_method, list_methods

    table = {m: get_method(m).Config.describe() for m in list_methods()}
    if args.json:
        print(json.dumps(table, indent=2, default=str))
        return 0
    for m, rows in table.items():
        doc = (get_method(m).__doc__ or "").strip().splitlines()
        print(f"{m}: {doc[0] if doc else ''}")
        for r in rows:
            rng = ("one of " + ", ".join(map(str, r["choices"]))) if r["choices"] else describe_range(r)
            unit = f" {r['unit']}" if r["unit"] not in (None, "1") else ""
            default = repr(r["default"]) if isinstance(r["default"], str) else r["default"]
            print(f"  {r['name']} = {default}{unit}  " + (f"{rng}  " if rng else "") + r["doc"])
        print()
    return 0


def cmd_teacher_train(args: argparse.Namespace) -> int:
    from .models import TeacherTrainConfig, train_teacher

    from .export import check_output_file

    cfg = config_from_args(TeacherTrainConfig, args)
    check_output_file(args.out)  # before the training, not after it
    bundle = load_bundle(args.dataset, dataset_kwargs(args), _classes(args.classes))
    bar = _Bar("teacher", cfg.epochs)
    try:
        teacher = train_teacher(cfg, bundle, device=args.device, progress=bar)
    finally:
        bar.close()
    path = teacher.save(args.out, extra={"train_config": cfg.to_dict(), "dataset": args.dataset,
                                         "dataset_args": dataset_kwargs(args)})
    acc = "n/a" if teacher.test_acc is None else f"{teacher.test_acc:.4f}"
    print(f"teacher {cfg.arch} test_acc {acc} saved to {path}")
    return 0


def _peek_method(argv: Sequence[str]) -> str | None:
    if not argv or argv[0] != "distill":
        return None
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--method")
    return p.parse_known_args(list(argv[1:]))[0].method


def cmd_distill(args: argparse.Namespace) -> int:
    from .distributed import from_env
    from .export import check_name, default_runs_root, release_run, reserve_run

    if args.ipc < 1:
        raise ConfigError(f"--ipc must be >= 1, got {args.ipc}")
    dist = from_env(args.device)  # under torchrun: this rank's process group and device
    try:
        if dist.world > 1:
            args.device = str(dist.device)
        if not dist.writes:  # rank > 0: selects its share of the classes, rank 0 writes the run
            return _distill(args, None, "", dist)
        name = check_name(args.name or f"{args.method}_{args.dataset}_ipc{args.ipc}_s{args.seed}")
        root = Path(args.out) if args.out else default_runs_root()
        reserve_run(root, name, args.overwrite)  # output folder and name checked before any work
        try:
            return _distill(args, root, name, dist)
        finally:
            release_run(root, name)
    finally:
        dist.close()


def _distill(args: argparse.Namespace, root: Path | None, name: str, dist) -> int:
    """``nrrdd distill`` once the output is reserved. Ctrl-C or a non-finite loss still saves
    the images so far as a run marked ``complete: false`` with the reason in ``stopped``."""
    from .errors import NonFiniteLossError
    from .export import build_manifest, save_run
    from .methods import get_method, make_distiller

    cfg = config_from_args(get_method(args.method).Config, args)
    kw = dataset_kwargs(args)
    teacher, bundle = teacher_and_bundle(args.teacher, args.device, args.dataset, kw)
    teacher = teacher.with_pass_options(args.bf16, args.channels_last)
    if dist.world > 1 and args.method == "edf" and not cfg.buffer:  # experts shared over ranks
        from .experts import ExpertConfig

        dist.train_experts(ExpertConfig(), bundle)
    classes = bundle.resolve_classes(_classes(args.classes))
    t0 = time.perf_counter()
    d = make_distiller(args.method, cfg, teacher=teacher, dataset=bundle, classes=classes,
                       ipc=args.ipc, device=args.device, seed=args.seed)
    bar = _Bar(args.method)
    failure: NonFiniteLossError | KeyboardInterrupt | None = None
    try:
        try:
            dist.run(d, callback=lambda rec: bar(rec.step + 1, rec.total, rec.losses))
        except (KeyboardInterrupt, NonFiniteLossError) as exc:
            failure = exc
        images, labels = d.images()
        extras = d.export_extras()
    finally:
        bar.close()
        d.close()
    if root is None:
        return 0
    seconds = time.perf_counter() - t0
    steps = [r.seconds for r in d.history]
    progress = f"{d.step_index} of {d.total_steps} steps"
    status = {} if failure is None else {"complete": False, "stopped": (
        f"interrupted (Ctrl-C or kill) after {progress}" if isinstance(failure, KeyboardInterrupt)
        else f"{' '.join(str(failure).split())} ({progress})")}
    manifest = build_manifest(
        method=args.method, config=d.config.to_dict(), teacher=teacher, bundle=bundle, classes=classes,
        ipc=args.ipc, seed=args.seed, teacher_ref=teacher_ref(args.teacher), dataset_args=kw,
        device=str(d.device), **status,
        timings={"seconds": seconds, "steps": len(steps), "processes": dist.world,
                 "seconds_per_step": sum(steps) / len(steps) if steps else None})
    path = None
    if len(images):
        path = save_run(root, name, images, labels, manifest, fmt=args.format,
                        overwrite=args.overwrite, extras=extras)
    if failure is None:
        print(f"{args.method}: {len(images)} images in {seconds:.1f} s -> {path}")
        return 0
    kept = f"the images so far are saved as a stopped run in {path}" if path else \
        "no images yet, nothing saved"
    if isinstance(failure, KeyboardInterrupt):
        print(f"interrupted after {progress}: {kept}", file=sys.stderr)
        return 130
    print(f"error: {' '.join(str(failure).split())}; {kept}", file=sys.stderr)
    return 2


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .distributed import from_env

    dist = from_env(args.device)  # under torchrun: the student trains with DDP, rank 0 writes
    try:
        if dist.world > 1:
            args.device = str(dist.device)
        return _evaluate(args, dist.writes)
    finally:
        dist.close()


def _evaluate(args: argparse.Namespace, writes: bool) -> int:
    from .evaluate import EvalConfig, evaluate_student
    from .export import EVALS_DIR, check_output_dir, load_run, run_test_classes, save_eval
    from .models.ref import TeacherRef

    cfg = config_from_args(EvalConfig, args)
    run = load_run(args.run_dir)
    check_output_dir(run.path / EVALS_DIR)  # the result can be written: checked before training
    m = run.manifest
    ds = m.get("dataset", {})
    kw = {**ds.get("args", {}), **dataset_kwargs(args)}
    ref = teacher_ref(args.teacher) if args.teacher else str(TeacherRef.of_manifest(m))
    entry = args.dataset or ds.get("source", {}).get("dataset") or ds.get("name", "shapes")
    teacher, bundle = teacher_and_bundle(ref, args.device, entry, kw)
    classes = run_test_classes(m, bundle, _classes(args.classes))  # only the run's classes
    bar = _Bar(f"student ({cfg.protocol})", cfg.num_epochs)
    try:
        res = evaluate_student(run.images01, run.labels, teacher, bundle, cfg, device=args.device,
                               seed=args.seed, progress=bar, classes=classes,
                               label_dir=run.path if writes else None, extras=run.extras)
    finally:
        bar.close()
    if not writes:
        return 0
    out = save_eval(run.path, {**res.to_dict(), "teacher_ref": ref},
                    dataset={"name": bundle.config.name, "entry": entry, "args": kw},
                    test_classes=[bundle.config.class_names[c] for c in classes])
    print(f"final_acc {res.final_acc:.4f} best_acc {res.best_acc:.4f} ({cfg.protocol} protocol, "
          f"{res.config['epochs']} epochs, {res.n_test} test images, {res.seconds:.1f} s) -> {out}")
    lb = res.label_bytes
    if lb.get(cfg.label_mode):
        print(f"stored {cfg.label_mode} labels: {lb[cfg.label_mode]} bytes")
    return 0


def cmd_experts(args: argparse.Namespace) -> int:
    from .experts import ExpertConfig, train_experts

    from .distributed import from_env

    cfg = config_from_args(ExpertConfig, args)
    bundle = load_bundle(args.dataset, dataset_kwargs(args), _classes(args.classes))
    dist = from_env(args.device)  # under torchrun: expert i on rank i mod world
    bar = _Bar("experts")
    try:
        path = dist.train_experts(cfg, bundle, progress=bar) if dist.world > 1 else \
            train_experts(cfg, bundle, device=args.device, progress=bar)
    finally:
        bar.close()
        dist.close()
    if dist.writes:
        print(f"expert buffer: {path}")
    return 0


# ---- parser -------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, seed: bool = True) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch default) [default 0]")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="seed of the run's generator [default 0]")


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The full parser; ``argv`` is peeked at for ``distill --method M`` so that M's config flags
    are added."""
    from .evaluate import EvalConfig
    from .export import FORMATS
    from .methods import get_method, list_methods
    from .models import TeacherTrainConfig

    ap = argparse.ArgumentParser(prog="nrrdd", description="Dataset distillation from the command line "
                                 "(SRe2L, RDED, NRR-DD, EDF).")
    ap.add_argument("--version", action="version", version=f"nrrdd {__version__}")
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("methods", help="list the methods and their config fields")
    p.add_argument("--json", action="store_true", help="print Config.describe() of every method as JSON")
    p.set_defaults(func=cmd_methods)

    tp = sub.add_parser("teacher", help="teacher commands")
    tsub = tp.add_subparsers(dest="teacher_command", required=True, metavar="SUBCOMMAND")
    p = tsub.add_parser("train", help="train a teacher on a dataset and save it")
    _add_dataset_args(p)
    p.add_argument("--out", required=True, help="checkpoint path to write (.pt)")
    _common(p)
    add_config_args(p, TeacherTrainConfig)
    p.set_defaults(func=cmd_teacher_train)

    methods = list_methods()
    p = sub.add_parser("distill", help="distil a dataset with a method and save the run",
                       description="nrrdd distill --method M ... (M's config flags: "
                                   "nrrdd distill --method M --help)")
    p.add_argument("--method", required=True, choices=methods, help="distillation method")
    _add_dataset_args(p)
    p.add_argument("--ipc", type=int, default=10, help="images per class [default 10]")
    p.add_argument("--teacher", default="shipped", help="teacher reference: 'shipped' (the "
                   "built-in dataset's teacher), a checkpoint PATH (or file:PATH), ARCH:PATH for a "
                   "public CIFAR ResNet checkpoint (e.g. resnet20_cifar:cifar10_resnet20_akamaster"
                   ".th), pretrained:ARCH (torchvision ImageNet), train:KEY or upload:KEY (the "
                   "app's teacher cache) [default shipped]")
    p.add_argument("--out", help="runs root folder [default $NRRDD_RUNS or ./runs]")
    p.add_argument("--name", help="run folder name [default <method>_<dataset>_ipc<N>_s<seed>]")
    p.add_argument("--format", default="png", choices=list(FORMATS), help="image files [default png]")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run of that name")
    _common(p)
    p.add_argument("--bf16", action="store_true", help="teacher passes under bf16 autocast (CUDA "
                   "only; no-op on CPU) [source ours]")
    p.add_argument("--channels-last", action="store_true", help="teacher passes in channels_last "
                   "layout (CUDA only; no-op on CPU) [source ours]")
    method = _peek_method(argv)
    if method in methods:
        add_config_args(p, get_method(method).Config)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("evaluate", help="train a student on a saved run and report top-1 accuracy")
    p.add_argument("run_dir", help="run folder written by nrrdd distill")
    p.add_argument("--teacher", help="teacher reference (see distill) [default: the run's "
                   "teacher, as its manifest records it]")
    _add_dataset_args(p, default=None)
    _common(p)
    add_config_args(p, EvalConfig)
    p.set_defaults(func=cmd_evaluate)

    from .experts import ExpertConfig

    p = sub.add_parser("experts", help="train expert trajectories (EDF buffer)")
    _add_dataset_args(p)
    _common(p)
    add_config_args(p, ExpertConfig)
    p.set_defaults(func=cmd_experts)

    p = sub.add_parser("ui", help="start the Streamlit app (needs the 'app' extra)",
                       description="Start the NRR-DD Studio app in the browser: `python -m studio`, "
                       "i.e. `streamlit run app.py` with a start-up warm-up. Every other flag goes "
                       "to `streamlit run` unchanged, e.g. `nrrdd ui --server.port 8502 "
                       "--server.headless true` (see `streamlit run --help`).")
    p.add_argument("streamlit_flags", nargs="*", metavar="STREAMLIT_FLAG",
                   help="flags for `streamlit run`")
    p.set_defaults(func=lambda a: cmd_ui(a.streamlit_flags))
    return ap


def cmd_ui(streamlit_flags: Sequence[str]) -> int:
    """Start the app (``python -m studio [flags]``; its script and pages are installed with the
    package). The library does not import the app: it is looked up by module name here only.

    Raises:
        ConfigError: Streamlit (the ``app`` extra) is not installed.
    """
    try:
        importlib.import_module("streamlit")
    except ModuleNotFoundError as exc:
        raise ConfigError("`nrrdd ui` needs the app's dependencies: pip install "
                          "'nrrdd-studio[app]'") from exc
    return importlib.import_module("studio.__main__").main(list(streamlit_flags))


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _stop_on_sigterm():
    """``kill`` (SIGTERM, what job schedulers and ``timeout`` send first) stops like Ctrl-C: the
    partial run is saved. Returns the previous handler (None off the main thread, where nothing
    is changed)."""
    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, _interrupt)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``nrrdd`` command; returns the exit code (0 ok, 2 user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ui"] and not {"-h", "--help"} & set(argv[1:]):
        try:  # Streamlit's own flags, untouched (argparse would take --server.port for its own)
            return cmd_ui(argv[1:])
        except NrrddError as exc:
            print("error: " + " ".join(str(exc).split()), file=sys.stderr)
            return 2
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as exc:  # --help, --version, argparse errors (already printed)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    previous = _stop_on_sigterm()
    try:
        if getattr(args, "threads", 0):
            if args.threads < 0:
                raise ConfigError(f"--threads must be >= 0, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        return args.func(args)
    except NrrddError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
