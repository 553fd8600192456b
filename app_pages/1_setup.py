"""Setup: dataset, classes, teacher, device. Everything here is kept in the URL."""

from pathlib import Path

import streamlit as st
import torch

from nrrdd_core.cam import overlay
from nrrdd_core.data import list_datasets
from nrrdd_core.device import device_info
from nrrdd_core.errors import NrrddError
from nrrdd_core.models import TeacherTrainConfig, list_models, train_teacher
from nrrdd_core.models.ref import TeacherRef
from studio import cache, jobs, settings, setup, widgets
from studio import keys as K

DATASET_LABELS = {
    "shapes": "Built-in shapes (offline, 10 classes)",
    "npz": "NumPy .npz files (e.g. ../shared/data/cifar10_*.npz)",
    "cifar10": "CIFAR-10 (torchvision folder)",
    "cifar100": "CIFAR-100 (torchvision folder)",
    "imagefolder": "Image folder (one sub-folder per class)",
    "imagenet_subset": "ImageNet subset (ImageNette, ImageWoof, …)",
    "imagefolder_stream": "Image folder, read on demand (larger than memory)",
    "imagenet_subset_stream": "ImageNet subset, read on demand (larger than memory)",
}
TEACHER_LABELS = {
    "shipped": "Built-in teacher (ResNet-20 trained on shapes)",
    "train": "Train a teacher now on this dataset",
    "file": "NRR-DD Studio checkpoint (upload or path)",
    "resnet_cifar": "Public CIFAR ResNet checkpoint (akamaster format)",
    "pretrained": "torchvision ImageNet-pretrained",
}
CIFAR_ARCHS = ["resnet20_cifar", "resnet32_cifar", "resnet44_cifar", "resnet56_cifar"]
IMAGENET_ARCHS = ["resnet18", "resnet50", "mobilenet_v2"]
PERSIST = {"persist_state": "session"}


def keep_valid(key: str, options: list, default=None) -> None:
    """Reset a persisted widget value that is not among ``options`` (after a dataset switch)."""
    v = st.session_state.get(key)
    if isinstance(v, list):
        st.session_state[key] = [x for x in v if x in options]
    elif v not in options:
        st.session_state[key] = default if default in options else options[0]


def fitting_arch(s) -> str | None:
    """The first CIFAR ResNet depth whose architecture loads the setup's checkpoint, if any."""
    for arch in CIFAR_ARCHS:
        if arch == s.teacher_arch:
            continue
        try:
            cache.teacher((s.teacher, s.teacher_path, arch, s.device, s.data_key))
        except (NrrddError, KeyError, OSError, RuntimeError):
            continue
        return arch
    return None


st.title("Setup")
st.write("Choose the data, the classes and the teacher. Every page uses this setup, and the URL "
         "keeps it: copy the link to reopen the same view.")
left, right = st.columns([3, 2], gap="large")

# ---- dataset --------------------------------------------------------------------------------
with left:
    st.subheader("1 · Dataset")
    names = [n for n in DATASET_LABELS if n in list_datasets()] or list_datasets()
    keep_valid(K.DATASET, names, "shapes")
    ds = st.selectbox("Dataset", names, key=K.DATASET,
                      format_func=lambda n: DATASET_LABELS.get(n, n),
                      **PERSIST)
    fields = setup.DATASET_FIELDS.get(ds, ())
    c1, c2 = st.columns(2)
    if K.DS_ROOT in fields:
        c1.text_input("Folder", key=K.DS_ROOT, help="Folder holding the dataset files (relative "
                      "paths start at the folder the app was started in).", **PERSIST)
    if K.DS_TRAIN_FILE in fields:
        c2.text_input("Training file", key=K.DS_TRAIN_FILE, **PERSIST)
        c1.text_input("Test file", key=K.DS_TEST_FILE, **PERSIST)
        c2.text_input("Class names file (JSON list, optional)", key=K.DS_CLASSES_FILE, **PERSIST)
    if K.DS_SUBSET in fields:
        c2.selectbox("Subset", ["imagenette", "imagewoof", "imagemeow", "imagesquawk",
                                "imageyellow", "imagefruit"], key=K.DS_SUBSET, **PERSIST)
    if K.DS_IMAGE_SIZE in fields:
        sizes = [32, 64] if ds == "shapes" else [32, 64, 128, 224]
        keep_valid(K.DS_IMAGE_SIZE, sizes, 32)
        c1.selectbox("Image size [px]", sizes, key=K.DS_IMAGE_SIZE, **PERSIST)
    if K.DS_MAX_PER_CLASS in fields:
        c2.number_input("Images per class (0 = all)", min_value=0, step=50,
                        key=K.DS_MAX_PER_CLASS, **PERSIST)
    s = setup.current()
    try:
        bundle = cache.bundle(s.data_key)
    except (NrrddError, OSError) as exc:
        st.error(f"Cannot load this dataset: {exc}")
        if ds == "npz":  # a wrong file name: say which .npz files the folder has
            folder = Path(st.session_state.get(K.DS_ROOT) or ".").expanduser()
            found = sorted(p.name for p in folder.glob("*.npz")) if folder.is_dir() else []
            st.info(f"The .npz files in `{folder}`: {', '.join(found)}." if found else
                    f"No .npz files in `{folder}`" + ("" if folder.is_dir() else
                                                      " (no such folder)") + ".")
        st.stop()
    cfg = bundle.config
    st.caption(f"{cfg.num_classes} classes · {len(bundle.train):,} training and "
               f"{len(bundle.test):,} test images · {cfg.image_size} px")

    st.subheader("2 · Classes")
    keep_valid(K.CLASSES, list(cfg.class_names))
    chosen = st.multiselect(
        "Classes to explore and distil", list(cfg.class_names), key=K.CLASSES,
        placeholder=f"all classes (first {min(cfg.num_classes, setup.DEFAULT_CLASS_CAP)})",
        help="Leave empty for the first ten classes.", **PERSIST)
    used = set(chosen or cfg.class_names[:setup.DEFAULT_CLASS_CAP])
    show = list(cfg.class_names[:20]) if cfg.num_classes <= 20 else sorted(used)[:20]
    thumbs = [widgets.to_hwc(bundle.train.float01(bundle.train.indices_of(
        cfg.class_names.index(n))[:1])[0]) for n in show]
    widgets.image_grid(thumbs, [f"✓ {n}" if n in used else n for n in show], px=72)
    st.caption("One training image per class; ✓ marks the classes in use.")
    c1, c2 = st.columns(2)
    c1.number_input("Images per class (IPC) of distilled sets", 1, 100, key=K.IPC, **PERSIST)
    c2.number_input("Seed of every run", 0, 2**31 - 1, key=K.SEED, **PERSIST)

# ---- teacher --------------------------------------------------------------------------------
with right:
    st.subheader("3 · Teacher")
    keep_valid(K.TEACHER, list(TEACHER_LABELS), "shipped")
    kind = st.radio("Teacher", list(TEACHER_LABELS), key=K.TEACHER,
                    format_func=TEACHER_LABELS.get, label_visibility="collapsed", **PERSIST)

    if kind == "train":
        job = jobs.get(st.session_state.get(K.TEACHER_JOB))
        if job is not None and job.status == "done" and job.result:
            st.session_state[K.TEACHER_PATH] = job.result
        archs = list_models()
        keep_valid(K.TRAIN_ARCH, archs, "resnet20_cifar" if cfg.image_size <= 64 else "resnet18")
        c1, c2 = st.columns(2)
        arch = c1.selectbox("Architecture", archs, key=K.TRAIN_ARCH, **PERSIST)
        if K.TRAIN_EPOCHS not in st.session_state:
            st.session_state[K.TRAIN_EPOCHS] = 1 if settings.tiny() else 15
        epochs = c2.number_input("Epochs", 1, 1000, key=K.TRAIN_EPOCHS, **PERSIST)
        running = job is not None and job.active
        b = st.container(horizontal=True)
        if b.button("Train teacher", key=K.TRAIN_START, type="primary", disabled=running):
            tcfg = TeacherTrainConfig(arch=arch, epochs=int(epochs), seed=s.seed)
            dev = s.device

            def work(j: jobs.Job, tcfg=tcfg, bundle=bundle, dev=dev) -> str:
                j.progress(total=tcfg.epochs, message="training")
                train_teacher(tcfg, bundle, dev, should_stop=j.should_stop,
                              progress=lambda e, n, m: j.progress(step=e, record={"epoch": e, **m}))
                return str(TeacherRef.trained(tcfg, bundle))  # train:KEY, in the teacher cache

            job = jobs.start("teacher", work, {"arch": arch, "epochs": int(epochs)})
            st.session_state[K.TEACHER_JOB] = job.id
            st.rerun()
        if b.button("Stop training", key=K.TRAIN_STOP, disabled=not running):
            job.request_stop()

        def render(j):
            if j is None:
                st.caption("Trained teachers are cached: the same recipe on the same data loads "
                           "instantly the next time.")
                return
            v = j.view()
            widgets.job_status(v, "epochs")
            if v["history"]:
                st.plotly_chart(widgets.curves(v["history"], "epoch", ["train_acc", "test_acc"],
                                               yaxis="accuracy"), key=K.TRAIN_CURVE)

        widgets.live(st.session_state.get(K.TEACHER_JOB), render)
    elif kind == "file":
        up = st.file_uploader("Upload a checkpoint (.pt), loaded with weights_only=True",
                              type=["pt", "pth", "th"], key=K.UPLOAD)
        if up is not None:  # stored in the cache folder as upload:KEY (KEY: its SHA-256)
            st.session_state[K.TEACHER_PATH] = str(TeacherRef.store_upload(up.getvalue()))
        st.text_input("…or a checkpoint path on this machine", key=K.TEACHER_PATH, **PERSIST)
    elif kind == "resnet_cifar":
        st.text_input("Checkpoint path", key=K.TEACHER_PATH,
                      placeholder="not set: type the path of a .th or .pt file", **PERSIST)
        keep_valid(K.TEACHER_ARCH, CIFAR_ARCHS)
        st.selectbox("Architecture", CIFAR_ARCHS, key=K.TEACHER_ARCH, **PERSIST)
    elif kind == "pretrained":
        keep_valid(K.TEACHER_ARCH, IMAGENET_ARCHS)
        st.selectbox("Architecture", IMAGENET_ARCHS, key=K.TEACHER_ARCH, **PERSIST)
        st.caption("1000 ImageNet classes at 224 px: it only fits a dataset with the same classes.")

    s = setup.current()
    teacher = None
    teacher_ok = False
    if kind in ("train", "file", "resnet_cifar") and not s.teacher_path:
        st.info("No checkpoint yet: " + ("train one above." if kind == "train" else
                                          "upload one or give its path."))
    else:
        try:
            teacher = cache.teacher(s.teacher_key)
        except (NrrddError, KeyError, OSError) as exc:
            st.error(f"Cannot load the teacher: {exc}")
            if kind == "resnet_cifar":  # another depth may fit the checkpoint: say which
                fits = fitting_arch(s)
                if fits:
                    st.info(f"This checkpoint fits **{fits}**.")
                    st.button(f"Use {fits}", key=K.TEACHER_SUGGEST, icon=":material/check:",
                              on_click=lambda a=fits: st.session_state.__setitem__(
                                  K.TEACHER_ARCH, a))
    if teacher is not None:
        n_params = sum(p.numel() for p in teacher.model.parameters())
        try:
            teacher.check_compatible(cfg)
        except NrrddError as exc:
            st.error(f"Refused: {exc}")
        else:
            acc, n = cache.teacher_accuracy(s.teacher_key, 200 if settings.tiny() else 2000,
                                            teacher, bundle)
            m1, m2 = st.columns(2)
            m1.metric("Test accuracy", f"{100 * acc:.1f} %", help=f"top-1 on {n} test images "
                      f"of {cfg.name} (an even stride through the test split)")
            m2.metric("Parameters", f"{n_params / 1e6:.2f} M" if n_params >= 1e5 else
                      f"{n_params / 1e3:.1f} k")
            st.success(f"Matches the dataset: {cfg.num_classes} classes in the same order, "
                       f"{cfg.image_size} px.", icon=":material/check_circle:")
            teacher_ok = True
        st.caption(f"{teacher.arch} · CAM layer `{teacher.cam_layer}` · "
                   f"{teacher.source or 'unknown source'}")

    st.subheader("4 · Device")
    options = ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    keep_valid(K.DEVICE, options, "auto")
    dev = st.selectbox("Device", options, key=K.DEVICE, **PERSIST)
    info = device_info(dev)
    if info["type"] == "cuda":
        st.caption(f"{info['name']} · {info['free_bytes'] / 2**30:.1f} GiB free of "
                   f"{info['total_bytes'] / 2**30:.1f} GiB")
    else:
        st.caption(f"CPU · {torch.get_num_threads()} threads · no CUDA device in use")

if teacher_ok:
    st.subheader("The teacher's view")
    class_ids = [cfg.class_names.index(n) for n in cfg.class_names if n in used][:10]
    idx = tuple(cache.pool_indices(s.data_key, tuple(class_ids), 1).tolist())
    cams = cache.cam_maps(s.teacher_key, "cam", teacher.cam_layer, idx, teacher, bundle)
    x01 = bundle.train.float01(list(idx))
    widgets.image_grid([overlay(x01[i], cams[i], 0.5, "jet") for i in range(len(idx))],
                       [cfg.class_names[c] for c in class_ids], px=96)
    st.caption("Class activation map (CAM, METHODS.md §4.1) of the teacher for the true class of one "
               "training image per class in use: red = the critical region the teacher looks "
               "at. The Grad-CAM explorer shows many more, with the tau threshold.")

st.divider()
st.page_link("app_pages/2_explorer.py", label="Next: look at the teacher's CAMs in the Grad-CAM "
             "explorer", icon=":material/arrow_forward:")
