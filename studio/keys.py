"""Every ``st.session_state`` key and URL query parameter name used by the app, in one place.

Setup keys double as URL query parameter names (``?ds=npz&root=...``) so a link reopens the
same view; :mod:`studio.setup` keeps the two in sync. Widget keys of the other pages are built
with the helpers at the bottom so that two pages never share a key by accident.
"""

# ---- setup (Setup page widgets; mirrored in the URL) ---------------------------------------
DATASET = "ds"                 # dataset registry entry: shapes | npz | cifar10 | ...
DS_ROOT = "root"               # folder of the dataset files
DS_TRAIN_FILE = "train_file"   # npz: training file name inside root
DS_TEST_FILE = "test_file"     # npz: test file name inside root
DS_CLASSES_FILE = "classes_file"  # npz: optional JSON list of class names
DS_IMAGE_SIZE = "size"         # shapes / imagefolder / imagenet_subset: image side in px
DS_SUBSET = "subset"           # imagenet_subset: imagenette, imagewoof, ...
DS_MAX_PER_CLASS = "max_per_class"  # imagefolder / imagenet_subset: cap per class (0 = all)
CLASSES = "classes"            # class names chosen for exploring / distilling
TEACHER = "teacher"            # shipped | file | resnet_cifar | pretrained
TEACHER_PATH = "teacher_path"  # checkpoint path on the server (file, resnet_cifar)
TEACHER_ARCH = "teacher_arch"  # architecture (resnet_cifar, pretrained)
DEVICE = "device"              # auto | cpu | cuda
IPC = "ipc"                    # images per class of the distilled set
SEED = "seed"                  # seed of every run started from the app

#: The setup keys, in URL order.
SETUP_KEYS = (DATASET, DS_ROOT, DS_TRAIN_FILE, DS_TEST_FILE, DS_CLASSES_FILE, DS_IMAGE_SIZE,
              DS_SUBSET, DS_MAX_PER_CLASS, CLASSES, TEACHER, TEACHER_PATH, TEACHER_ARCH, DEVICE,
              IPC, SEED)

# ---- app bookkeeping -------------------------------------------------------------------------
URL_LOADED = "_url_loaded"     # the setup was read from the URL once in this session
JOB_PARAM = "job"              # URL parameter: id of the job shown by a job page (Refine,
#                                Compare, Evaluate); a reload reattaches to it
TEACHER_JOB = "teacher_job"    # id of this session's teacher-training job
REFINE_JOB = "refine_job"      # id of this session's refinement job
LOSS_FIG = "loss_fig"           # (job id, records, data) of the live loss chart
LIVE_BUSY = "live_busy"        # the machine's CPU was contended at the last live poll
TILE_PX = "tile_px"            # side of one image on screen in the live view and grids [px]
COMPARE_JOB = "compare_job"    # id of this session's Compare job
EVAL_JOB = "eval_job"          # id of this session's evaluation job
OPEN_RUN = "open_run"          # path of a saved run to show in Refine (set by the Runs page)
OPEN_RUN_APPLIED = "open_run_applied"  # the reopened run whose settings were loaded into knobs
CLOSE_RUN = "close_run"        # button closing the reopened run
EVAL_RUNS = "eval_runs"        # saved run paths preselected on Evaluate (set by the Runs page)
UPLOAD = "teacher_upload"      # file uploader of a teacher checkpoint
TRAIN_ARCH = "train_arch"      # teacher training: architecture
TRAIN_EPOCHS = "train_epochs"  # teacher training: epochs
TRAIN_START = "train_start"    # teacher training: start button
TRAIN_STOP = "train_stop"      # teacher training: stop button
TRAIN_CURVE = "train_curve"    # teacher training: accuracy chart
TEACHER_SUGGEST = "teacher_suggest"  # button: use the architecture that fits the checkpoint

# ---- Grad-CAM explorer -----------------------------------------------------------------------
CAM_METHOD = "cam_method"
CAM_LAYER = "cam_layer"
CAM_ALPHA = "cam_alpha"        # overlay opacity
CAM_CMAP = "cam_cmap"          # colour map
TAU = "tau"                    # critical-region threshold (URL-bound)
PER_CLASS = "per_class"        # images per class in the grid
FILTER = "filter"              # all | correct | incorrect
TOPK = "topk"
CIDD_IMAGE = "cidd_image"      # index (in the grid) of the image whose CIDD candidates are shown
CIDD_CANDIDATES = "cidd_m"     # candidate crops per image
CIDD_TOP_T = "cidd_t"          # candidates kept by CAM ratio
COMPLEXITY_CHART = "complexity_hist"
EXPLORER_TAB = "explorer_tab"  # the explorer's open tab (only its content is computed)
SCORECAM_OK = "scorecam_ok"    # explicit go-ahead for the slow ScoreCAM
CAM_LAST_GOOD = "cam_last_good"  # (method, layer) of the last CAM that worked (shown on error)
CAM_URL_READ = "_cam_url_read"  # the explorer read its method, layer and colour map from the URL

# ---- Refine live -----------------------------------------------------------------------------
METHOD = "method"
REFINE_START = "refine_start"
REFINE_PAUSE = "refine_pause"
REFINE_STOP = "refine_stop"
REFINE_EVERY = "refine_every"  # draw every k steps
RUN_NAME = "run_name"
SAVE_RUN = "save_run"
LOSS_CHART = "refine_losses"
REFINE_GIF = "refine_gif"      # download of the run's pictures as an animated GIF

# ---- Compare / Evaluate / Runs ---------------------------------------------------------------
COMPARE_METHODS = "compare_methods"
COMPARE_EPOCHS = "compare_epochs"
COMPARE_BUDGET = "compare_budget"  # quick | standard | paper
COMPARE_START = "compare_start"
COMPARE_STOP = "compare_stop"
COMPARE_SAVE = "compare_save"
COMPARE_RECOMPUTE = "compare_recompute"
COMPARE_CHART = "compare_bars"
COMPARE_FIGURE = "compare_figure"  # download of the grid as one PNG
COMPARE_CELLS = "compare_cells"  # {(job id, set, row, n): (PNG, width)}: encoded grid cells
EVAL_PROTOCOL = "eval_protocol"
EVAL_STUDENT = "eval_student"
EVAL_LABELS = "eval_labels"
EVAL_EPOCHS = "eval_epochs"
EVAL_START = "eval_start"
EVAL_STOP = "eval_stop"
EVAL_CHART = "eval_curves"


def knob(method: str, field: str) -> str:
    """Widget key of a method config knob (``knob.nrrdd.tau``)."""
    return f"knob.{method}.{field}"


def applied(kind: str) -> str:
    """Session key: id of the ``kind`` job whose settings were put into the page's widgets."""
    return f"_applied.{kind}"


def run_key(action: str, run_name: str) -> str:
    """Widget key of a per-run button on the Runs page (``run.delete.<name>``)."""
    return f"run.{action}.{run_name}"


def live_feed(job_id: str) -> str:
    """Element key of a job's live feed view (``live_feed.<job id>``)."""
    return f"live_feed.{job_id}"
