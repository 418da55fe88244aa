"""Small shared helpers: user-facing errors, seeding, devices, image conversion, result files and reports.

The last section writes the reports researchers read (history.csv, plots, TensorBoard grids, summary).
"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import importlib
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch.utils.tensorboard import SummaryWriter

# torch, OpenCV and metrics (scikit-learn) are imported by the functions that use them, so that main.py's
# --help, which needs this module's errors and signal handling, answers without loading them.
LOGGER = logging.getLogger(__name__)
T = TypeVar("T")

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


# Choices of the speed options (here, not in common.py or glass.py, so that main.py's options need no torch).
CACHE_MODES = ("auto", "ram", "disk", "off")
CACHE_DTYPES = ("float32", "float16")
AMP_MODES = ("off", "bf16", "fp16")


class GlassError(Exception):
    """A mistake in the user's input or environment.

    The CLI prints its message on one line (no traceback) and exits with code 2, so the
    message must say what is wrong and how to fix it.
    """


class DeferredModule:
    """Stands for module ``name`` and imports it on the first attribute access (``DeferredModule("glass").GLASS``).

    Not registered in ``sys.modules`` (as importlib's LazyLoader modules are), so code that scans the loaded
    modules, as torch's own import does, cannot set off an import half-way through another."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)

    def __repr__(self) -> str:
        return f"<deferred module {self._name!r}>"


def check_odd_patchsize(patchsize: int) -> int:
    """``patchsize`` if it is odd, else ValueError saying why: the patches are padded by (patchsize - 1) / 2 so
    that the grid keeps its size (main.py's and pth2onnx.py's --patchsize)."""
    if patchsize % 2 == 0:
        raise ValueError(f"{patchsize} is even: the patch grid keeps the layer's size only with an odd patch size (3)")
    return patchsize


MAX_SEED = 2**32 - 1
"""The largest seed NumPy accepts (seeds run from 0 to this)."""


def fix_seeds(seed: int) -> None:
    """Seed python, NumPy and torch (and CUDA); make cuDNN deterministic; ``seed`` in 0..MAX_SEED."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def die_with_parent() -> None:
    """In a child process (``Popen(preexec_fn=...)``): on Linux, get SIGTERM when the parent dies, even by SIGKILL,
    so that no worker outlives the run that started it. Elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) turned into an interruption, so that a run records how it ended and stops its workers."""


@contextlib.contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread (elsewhere: no change). A signal
    this process ignores (SIGHUP under ``nohup``) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise Terminated(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# The handlers that each open interruptions_deferred() replaced, innermost last (main thread only).
_DEFERRED_HANDLERS: List[Dict[int, Any]] = []


@contextlib.contextmanager
def interruptions_deferred() -> Iterator[None]:
    """While inside, SIGINT, SIGTERM and SIGHUP wait: on leaving, each one that came is raised again and handled as
    it would have been (in the main thread; elsewhere no change). For steps that must not be cut in two, such as
    starting a worker process and recording that it runs. A process forked inside gets the handlers back at once
    (:func:`_restore_handlers_in_child`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: List[int] = []
    signums = [signum for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
               if signal.getsignal(signum) is not signal.SIG_IGN]
    previous = {signum: signal.signal(signum, lambda signum, frame: arrived.append(signum)) for signum in signums}
    _DEFERRED_HANDLERS.append(previous)
    try:
        yield
    finally:
        _DEFERRED_HANDLERS.pop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(arrived):
            signal.raise_signal(signum)


def _restore_handlers_in_child() -> None:
    """At-fork hook: a child forked inside :func:`interruptions_deferred` (a DataLoader worker) gets the handlers
    that it replaced, so that Ctrl-C and torch's SIGTERM still end the child. A signal that the child got before
    this hook ran is dropped there: a Ctrl-C reaches the parent too (same process group), which stops its workers."""
    for previous in reversed(_DEFERRED_HANDLERS):  # the outermost deferral's handlers last: the original ones
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    _DEFERRED_HANDLERS.clear()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_restore_handlers_in_child)


def iter_loader(loader: Iterable[T]) -> Iterator[T]:
    """``iter(loader)`` with SIGINT, SIGTERM and SIGHUP deferred until it returns (:func:`interruptions_deferred`).

    A DataLoader with workers forks them there, and Python runs its at-fork hooks (logging's) around each fork:
    a Ctrl-C that comes during a hook is raised inside it, printed as "Exception ignored" and lost (the run went on,
    or a worker died and the run failed). Deferred, it is raised once the iterator, and each worker, exists."""
    with interruptions_deferred():
        return iter(loader)


def quiet_tensorboard_thread_errors() -> None:
    """Keep the traceback of an OSError in TensorBoard's event-writer thread (a full disk, say) off the terminal:
    the writer raises it again in the main thread at its next use or close, where it is reported in one line.
    Every other thread error keeps Python's report. Installing it twice changes nothing."""
    previous = threading.excepthook
    if getattr(previous, "quiet_tensorboard", False):
        return

    def hook(args: "threading.ExceptHookArgs") -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard"):
            LOGGER.debug("TensorBoard's event writer stopped: %s", args.exc_value)
            return
        previous(args)

    hook.quiet_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def check_gpu_ids(gpu_ids: Sequence[int]) -> None:
    """GlassError naming the first ``--gpu`` id that this machine's CUDA devices do not have (no check without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return
    count = torch.cuda.device_count()
    absent = [g for g in gpu_ids if g >= count]
    if absent:
        raise GlassError(f"--gpu {absent[0]} is not present: this machine has {count} CUDA device(s) (ids 0..{count - 1})")


def select_device(gpu_ids: Sequence[int]) -> torch.device:
    """CUDA device ``gpu_ids[0]`` when asked for and present, else MPS, else CPU.

    ``--gpu -1`` (or no id) asks for the CPU explicitly.
    """
    import torch

    wanted = [g for g in gpu_ids if g >= 0]
    if wanted and torch.cuda.is_available():
        check_gpu_ids(wanted[:1])
        device = torch.device(f"cuda:{wanted[0]}")
        LOGGER.info("Device: %s (%s)", device, torch.cuda.get_device_name(device))
    elif wanted and torch.backends.mps.is_available():
        device = torch.device("mps")
        LOGGER.info("Device: mps (no CUDA device found)")
    else:
        device = torch.device("cpu")
        reason = "asked for with --gpu -1" if not wanted else "no CUDA or MPS device found"
        LOGGER.info("Device: cpu (%s)", reason)
        warn_if_threads_exceed_cores(torch.get_num_threads())
    return device


def warn_if_threads_exceed_cores(threads: int) -> None:
    """Warn when torch runs more threads than this process has cores (a container's CPU quota, which torch's
    default does not see): the threads then wait for each other at every operation."""
    cores = usable_cores()
    if threads > cores:
        LOGGER.warning("torch runs %d threads but this process can use %d core(s) (CPU affinity or a container's CPU "
                       "quota): OMP_NUM_THREADS=%d is likely faster (another thread count can change the last bits)",
                       threads, cores, cores)


# glibc's mallopt() parameters (<malloc.h>); a trim threshold of -1 turns trimming off (mallopt(3)).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_NEVER_TRIM = -1
# Environment variables by which the user sets glibc's malloc; keep_freed_memory then leaves it alone.
_MALLOC_ENVIRONMENT = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_")


def glibc_version() -> str:
    """'glibc 2.36' where the C library is glibc, '' elsewhere."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        return ""


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse rather than hand it back to the kernel; True if done.

    A training step allocates and frees tensors of a few MB many times. By default glibc returns such
    blocks to the kernel (it maps blocks above its adaptive mmap threshold on their own and unmaps them
    when freed, and trims the heap's free top), so the next step page-faults and zero-fills them again: at
    the CPU calibration profile 24,000-70,000 page faults per step, 5-10 % of its time. Here every block
    comes from the heap (no mmap: the threshold cannot be raised above 32 MiB, while one batch of
    EfficientNet-Lite0 maps at 288 px takes 64 MB), and the heap is never trimmed. No number changes; the
    process keeps its peak memory until it ends. Linux with glibc only; not when
    ``GLASS_MALLOC=system`` or the user set glibc's own ``MALLOC_*_`` variables or malloc tunables.
    """
    if not glibc_version():
        return False
    setting = os.environ.get("GLASS_MALLOC", "")
    if setting not in ("", "system"):
        LOGGER.warning("GLASS_MALLOC=%s is not a setting and is ignored: its one value is 'system' (glibc's own "
                       "malloc settings); unset it to keep freed memory for reuse", setting)
    if setting == "system" or any(name in os.environ for name in _MALLOC_ENVIRONMENT) \
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
        # Setting either also turns glibc's adaptive thresholds off.
        if libc.mallopt(_M_MMAP_MAX, 0) != 1:
            return False
        return libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
    except (OSError, AttributeError):
        return False


# cgroup v1 writes "no limit" as a number near 2**63.
_CGROUP_NO_LIMIT = 2**60
# Per cgroup version: limit file, usage file, and the memory.stat key of the reclaimable file cache.
_CGROUP_MEMORY_FILES = {2: ("memory.max", "memory.current", "inactive_file"),
                        1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}


def cgroup_levels(controller: str, proc_cgroup: str = "/proc/self/cgroup", mount: str = "/sys/fs/cgroup"
                  ) -> List[Tuple[str, int]]:
    """(folder, cgroup version) of this process's cgroup for ``controller`` (``memory``, ``cpu``) and of each of
    its ancestors, deepest first; [] when /proc/self/cgroup cannot be read. Folders may not exist: in a
    container the host's path is often not visible, and the mount itself is the container's cgroup."""
    try:
        with open(proc_cgroup) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    levels = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        if hierarchy == "0" and controllers == "":
            base, version = mount, 2
        elif controller in controllers.split(","):
            base, version = os.path.join(mount, controller), 1
        else:
            continue
        parts = [part for part in path.split("/") if part]
        levels += [(os.path.join(base, *parts[:depth]), version) for depth in range(len(parts), -1, -1)]
    return levels


def cgroup_memory_room(proc_cgroup: str = "/proc/self/cgroup", mount: str = "/sys/fs/cgroup") -> Optional[int]:
    """Bytes this process's memory cgroup (v1 or v2) can still grow by before a limit stops it, or None when
    no limit applies or none can be read.

    The smallest ``limit - (usage - inactive file cache)`` over the process's cgroup and its ancestors.
    ``MemAvailable`` does not see such limits: in a container started with ``--memory 8g`` it reports the
    host's memory.
    """
    rooms = [room for folder, version in cgroup_levels("memory", proc_cgroup, mount)
             if (room := _cgroup_memory_room(folder, *_CGROUP_MEMORY_FILES[version])) is not None]
    return max(0, min(rooms)) if rooms else None


def _cgroup_memory_room(folder: str, limit_file: str, usage_file: str, inactive_key: str) -> Optional[int]:
    """``limit - (usage - inactive file cache)`` of one cgroup folder; None without a limit or its files."""
    try:
        with open(os.path.join(folder, limit_file)) as handle:
            text = handle.read().strip()
        if text == "max" or int(text) >= _CGROUP_NO_LIMIT:
            return None
        limit = int(text)
        with open(os.path.join(folder, usage_file)) as handle:
            usage = int(handle.read().strip())
    except (OSError, ValueError):
        return None
    inactive = 0
    try:
        with open(os.path.join(folder, "memory.stat")) as handle:
            for line in handle:
                key, _, value = line.partition(" ")
                if key == inactive_key:
                    inactive = int(value)
                    break
    except (OSError, ValueError):
        pass
    return limit - max(0, usage - inactive)


def cgroup_cpu_limit(proc_cgroup: str = "/proc/self/cgroup", mount: str = "/sys/fs/cgroup") -> Optional[float]:
    """The cores' worth of CPU time this process's cgroup (v1 or v2) and its ancestors allow (the smallest
    quota / period: ``docker run --cpus 2`` gives 2.0), or None when no quota applies or none can be read."""
    limits = [limit for folder, version in cgroup_levels("cpu", proc_cgroup, mount)
              if (limit := _cgroup_cpu_limit(folder, version)) is not None]
    return min(limits) if limits else None


def _cgroup_cpu_limit(folder: str, version: int) -> Optional[float]:
    """quota / period of one cgroup folder; None without a quota or its files."""
    try:
        if version == 2:
            with open(os.path.join(folder, "cpu.max")) as handle:
                quota, period = handle.read().split()[:2]
            if quota == "max":
                return None
        else:
            with open(os.path.join(folder, "cpu.cfs_quota_us")) as handle:
                quota = handle.read().strip()
            with open(os.path.join(folder, "cpu.cfs_period_us")) as handle:
                period = handle.read().strip()
        quota_us, period_us = int(quota), int(period)
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def usable_cores() -> int:
    """The cores this process can use: those it may run on (CPU affinity, e.g. ``taskset``), capped by a
    cgroup CPU quota rounded up (a container's ``--cpus``); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (<malloc.h>, glibc 2.33 and later)."""
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def free_heap_bytes() -> Optional[int]:
    """Bytes that glibc's malloc holds free for this process's next allocations (``mallinfo2().fordblks``:
    freed blocks in every arena and the heaps' free tops), or None without glibc 2.33 or later.

    Resident memory the system counts as used, but this process can reuse it: after
    :func:`keep_freed_memory`, all that an earlier class of a run freed.
    """
    if not glibc_version():
        return None
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype, mallinfo2.argtypes = _MallInfo2, []
    return int(mallinfo2().fordblks)


def torch_format_2_numpy_img(img: np.ndarray) -> np.ndarray:
    """CHW array -> HWC uint8 BGR image. Three channels are ImageNet-normalised RGB; one channel is [0, 1]."""
    img = np.asarray(img)
    if img.shape[0] == 3:
        img = img.transpose(1, 2, 0) * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
        img = img[:, :, [2, 1, 0]]
    else:
        img = np.repeat(img.transpose(1, 2, 0), 3, axis=-1)
    return (np.clip(img, 0, 1) * 255).astype("uint8")


def make_writable_folder(path: str) -> None:
    """Create ``path`` if needed and prove it writable with a probe file; raises OSError otherwise.

    The probe has a name of its own, so processes checking the same folder at once (the workers of a
    parallel run) cannot remove each other's.
    """
    os.makedirs(path, exist_ok=True)
    handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
    os.close(handle)
    os.remove(probe)


@contextlib.contextmanager
def file_lock(path: str, wait: bool = True) -> Iterator[bool]:
    """Hold an advisory lock (``flock``) on the file ``path`` (created if missing) inside the block, so that runs
    sharing a results folder take turns. Yields True when held; with ``wait`` False, False at once when another
    process holds it. Where locks are not available (no ``fcntl``, a file system without them) the block runs
    unlocked (True). The lock goes with the process: a killed run leaves none behind."""
    try:
        import fcntl
    except ImportError:  # Windows
        fcntl = None
    fd = None
    held = True
    if fcntl is not None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            held = False
        except OSError:  # no such file can be made there, or no locks on this file system: go on unlocked
            pass
    try:
        yield held
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def atomic_write(path: str, write: Callable[[str], None], option: str = "--results_path") -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a kill leaves the old file intact.

    The temporary file ends with ``path``'s extension (writers such as pandas' ``to_excel`` choose the
    format by it). A failure is a GlassError whose advice names ``option``, the folder's option."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".tmp.",
                                   suffix=os.path.splitext(path)[1])
        os.close(fd)
        write(tmp)
        os.chmod(tmp, _file_mode(path))  # mkstemp makes the file private (0600); keep the usual mode
        os.replace(tmp, path)
    except OSError as exc:
        raise GlassError(f"cannot write {path} ({exc.strerror or exc}): {write_advice(exc, option)}") from None
    except RuntimeError:  # torch.save reports a full disk as a RuntimeError of its zip writer
        if not _disk_nearly_full(directory):
            raise
        raise GlassError(f"cannot write {path} (no space left on the device): {write_advice(None, option)}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def write_advice(exc: Optional[OSError], option: str = "--results_path") -> str:
    """How to get past an error writing under the folder of ``option`` (``None``: the disk is full)."""
    if exc is None or exc.errno == errno.ENOSPC:
        resumes = "; rerunning the command resumes" if option == "--results_path" else ""
        return f"free some disk space or choose another {option}{resumes}"
    if exc.errno in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST):
        return f"a file or folder of that name is in the way: move it or choose another {option}"
    return f"check that path and its permissions, or choose another {option}"


def is_utf8(text: str) -> bool:
    """Whether ``text`` (a path or name, possibly holding the undecodable bytes of a file name) is valid UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def escape_undecodable_output() -> None:
    """Print file names that are not valid UTF-8 with their odd bytes escaped (``\\udce9`` for the byte 0xe9)
    instead of failing on them."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def live_terminal() -> bool:
    """Whether progress bars can be drawn: stderr is a terminal with a width (some, such as `docker run -t`
    without a size, report 0 columns, where a bar that fits its width draws nothing)."""
    try:
        return sys.stderr.isatty() and os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):  # no descriptor (a replaced stream), or not a terminal
        return False


def write_png(path: str, image: np.ndarray, option: str = "--results_path") -> None:
    """Write a uint8 BGR (or grey) image as a PNG file; a failure is a GlassError naming the file.

    Encoded by OpenCV and written by Python: ``cv2.imwrite`` only returns False when it cannot write, and
    crashes the process on a path that is not valid UTF-8."""
    import cv2

    encoded, data = cv2.imencode(".png", image)
    if not encoded:
        raise GlassError(f"OpenCV cannot encode the image {path} as PNG (shape {np.shape(image)})")
    try:
        with open(path, "wb") as handle:
            handle.write(data.tobytes())
    except OSError as exc:
        raise GlassError(f"cannot write {path} ({exc.strerror or exc}): {write_advice(exc, option)}") from None


def _disk_nearly_full(directory: str) -> bool:
    try:
        return shutil.disk_usage(directory).free < 16 * 2**20
    except OSError:
        return False


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _read_umask()  # read once, at import, while no other thread can be creating files


def _file_mode(path: str) -> int:
    """The mode of the file being replaced, or that of a new file under the process's umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        return 0o666 & ~_UMASK


def write_json(path: str, data: dict) -> None:
    """JSON with sorted keys and indentation (values that JSON lacks are written as strings)."""
    import json

    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)


def read_json(path: str, fix: str = "train the class again") -> dict:
    """The JSON object in ``path``; GlassError (saying ``fix``) when it cannot be read or is not an object."""
    import json

    try:
        with open(path) as handle:
            record = json.load(handle)
    except (OSError, ValueError) as exc:
        raise GlassError(f"cannot read {path} ({exc}): the file is damaged; {fix}") from None
    if not isinstance(record, dict):
        raise GlassError(f"{path} holds a JSON {type(record).__name__}, not an object: the file is damaged; {fix}")
    return record


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` through a temporary file and a rename. Saved through a file object, so that the archive's
    inner folder is torch's fixed ``archive/`` rather than the random temporary name: equal contents, equal bytes."""
    import torch

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)

    atomic_write(path, write)


# --------------------------------------------------------------------------------------------------
# The results folder: where each output lives (the one place that spells these paths).

RESULTS_CSV = "results.csv"  # <results>/results.csv: one row per class and backbone, and the Mean
PREDICTIONS_CSV = "predictions.csv"  # predict's table, in its output folder
METRIC_NAMES = ["image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_pro", "best_epoch"]  # results.csv's columns


def models_dir(results_path: str, backbone_index: int) -> str:
    """``<results>/models/backbone_<i>``: the class folders of the i-th ``-b`` backbone."""
    return os.path.join(results_path, "models", f"backbone_{backbone_index}")


def class_dir(results_path: str, class_key: str, backbone_index: int = 0) -> str:
    """``<results>/models/backbone_<i>/<name>_<class>``: a class's checkpoints, config.json and TensorBoard logs."""
    return os.path.join(models_dir(results_path, backbone_index), class_key)


def excel_dir(results_path: str) -> str:
    """``<results>/datasets/excel``: the distribution tables that runs on this results folder judged."""
    return os.path.join(results_path, "datasets", "excel")


def output_name(class_key: str, backbone_index: int) -> str:
    """The name of a class's outputs outside its class folder (results.csv row, ``eval/``, ``plots/``,
    ``predict/``): ``<name>_<class>`` for backbone_0, ``<name>_<class>_backbone_<i>`` for the others."""
    return class_key if backbone_index == 0 else f"{class_key}_backbone_{backbone_index}"


def class_output_name(class_dir: str) -> str:
    """:func:`output_name` of a class folder ``.../backbone_<i>/<name>_<class>``."""
    class_dir = class_dir.rstrip(os.sep)
    backbone = os.path.basename(os.path.dirname(class_dir))
    index = backbone[len("backbone_"):] if backbone.startswith("backbone_") else ""
    return output_name(os.path.basename(class_dir), int(index) if index.isdigit() else 0)


def read_result_rows(path: str) -> List[Tuple[str, List[Any]]]:
    """(row name, metrics) of a results.csv, Mean left out: fractions, NaN for an empty cell, best_epoch an int.

    ValueError when its columns are not :data:`METRIC_NAMES`; OSError or IndexError when it cannot be read.
    """
    header, rows = read_results(path)
    if header[1:] != METRIC_NAMES:
        raise ValueError(f"its columns are {', '.join(header)}")
    earlier = []
    for row in rows:
        if row[0] != "Mean":
            values: List[Any] = [float(v) if v != "" else float("nan") for v in row[1:]]
            values[-1] = int(values[-1]) if math.isfinite(values[-1]) else values[-1]  # best_epoch
            earlier.append((row[0], values))
    return earlier


def format_metric(value: float) -> str:
    """Percent with two decimals, or 'n/a' for a metric that could not be computed."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value * 100:.2f}"


def compute_and_store_final_results(
    results_path: str,
    results: Sequence[Sequence[float]],
    column_names: Sequence[str],
    row_names: Sequence[str],
) -> Dict[str, float]:
    """Write ``<results_path>/results.csv``: one row per class and a ``Mean`` row (values as fractions).

    Metrics that are not available (NaN) are written as empty cells and left out of the mean. Returns the
    means as ``{"mean_<column>": value}``.
    """
    if len(row_names) != len(results):
        raise ValueError("one row name per result row is needed")
    means = {}
    for i, key in enumerate(column_names):
        values = np.array([row[i] for row in results], dtype=float)
        values = values[np.isfinite(values)]
        means[key] = float(values.mean()) if len(values) else float("nan")

    def cell(value):
        return "" if isinstance(value, float) and not np.isfinite(value) else value

    def write(tmp):
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["Row Names", *column_names])
            for name, row in zip(row_names, results):
                writer.writerow([name, *(cell(v) for v in row)])
            writer.writerow(["Mean", *(cell(v) for v in means.values())])

    atomic_write(os.path.join(results_path, RESULTS_CSV), write)
    return {f"mean_{key}": value for key, value in means.items()}


# --------------------------------------------------------------------------------------------------
# Distribution judgement: manifold (svd 0) or hypersphere (svd 1) hypothesis per class.

def distribution_judge(img: np.ndarray, name: str, output_dir: str | None = None) -> int:
    """Judge a class from its mean training image (HWC uint8 BGR): 1 = hypersphere, 0 = manifold.

    The image is resized to 289x289, turned grey, box-blurred (39x39) and Fourier-transformed; the
    log magnitude ``20 ln|F|`` is thresholded at 170. From the lit points: their maximal L1 extents
    from the centre, maximal radius and count. Hypersphere when either density exceeds 0.21 and the
    radius exceeds 12 and there are more than 60 points. With ``output_dir`` the image and its
    thresholded spectrum are written to ``<output_dir>/<flag>/<name>.png``.
    """
    import cv2

    resized = cv2.resize(img, (289, 289))
    gray = cv2.blur(cv2.cvtColor(resized, cv2.COLOR_BGR2GRAY), (39, 39))
    spectrum = np.fft.fftshift(cv2.dft(np.float32(gray), flags=cv2.DFT_COMPLEX_OUTPUT))
    with np.errstate(divide="ignore"):
        magnitude = 20 * np.log(cv2.magnitude(spectrum[:, :, 0], spectrum[:, :, 1]))
    magnitude = np.where(magnitude > 170, 255.0, 0.0).astype(np.float32)

    height, width = magnitude.shape
    cy, cx = height // 2, width // 2
    ys, xs = np.nonzero(magnitude == 255)
    count = len(ys)
    side_x = int(np.abs(xs - cx).max()) if count else 0
    side_y = int(np.abs(ys - cy).max()) if count else 0
    radius = float(np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2).max()) if count else 0.0
    # Grid points within `radius` of the centre, counted on a (2h, 2w) grid as the reference does.
    yy, xx = np.indices((2 * height, 2 * width))
    disc_area = np.sum(np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) <= radius)
    l1_density = count / (4 * max(side_x, 1) * max(side_y, 1))
    l2_density = count / (disc_area + 1e-10)
    flag = int((l1_density > 0.21 or l2_density > 0.21) and radius > 12 and count > 60)
    LOGGER.info("Distribution of %s: %d (%s)", name, flag, "hypersphere" if flag else "manifold")

    if output_dir is not None:
        panel = np.hstack([resized, np.repeat(magnitude, 3).reshape(height, width, 3).astype(np.uint8)])
        path = os.path.join(output_dir, str(flag), f"{name}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_png(path, panel)
    return flag


DISTRIBUTION_COLUMNS = ["Class", "Distribution", "Foreground"]


def excel_path(excel_dir: str, dataset_name: str) -> str:
    """``<excel_dir>/<dataset>_distribution.xlsx``."""
    return os.path.join(excel_dir, f"{dataset_name}_distribution.xlsx")


def keep_unreadable(path: str, exc: BaseException, then: str) -> str:
    """Copy a file that could not be read to ``<path>.old`` (``.old.1``, ``.old.2``, ... when that exists) before it
    is replaced, so that nothing already written is lost; warn saying what happens ``then``; returns the copy's path."""
    kept, number = path + ".old", 0
    while os.path.lexists(kept):
        number += 1
        kept = f"{path}.old.{number}"
    shutil.copyfile(path, kept)
    LOGGER.warning("Could not read %s (%s): kept as %s, %s", path, exception_summary(exc), kept, then)
    return kept


def exception_summary(exc: BaseException, limit: int = 160) -> str:
    """An exception's first sentence, cut at a word before ``limit`` characters (its type when it has no text,
    and before a KeyError's, which is only the key), for one-line messages: library errors often go on for
    paragraphs."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    text = lines[0].strip()
    if isinstance(exc, KeyError):
        text = f"{type(exc).__name__}: {text}"
    end = text.find(". ")
    if end > 0:
        text = text[:end + 1]
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " ..."
    return text


def lookup_distribution(excel_dirs: Iterable[str], dataset_name: str, class_key: str) -> tuple[int, int] | None:
    """(Distribution, Foreground) of ``class_key`` (``<dataset>_<class>``) from the first xlsx that lists it."""
    import pandas as pd

    for directory in excel_dirs:
        path = excel_path(directory, dataset_name)
        if not os.path.isfile(path):
            continue
        try:
            table = pd.read_excel(path)
        except Exception as exc:  # pandas/openpyxl raise many kinds for a file that is not an xlsx table
            raise GlassError(f"cannot read {path} ({exception_summary(exc)}): fix the table or delete it") from None
        missing = [column for column in DISTRIBUTION_COLUMNS if column not in table.columns]
        if missing:
            raise GlassError(f"{path} has no column {', '.join(missing)} (it needs {', '.join(DISTRIBUTION_COLUMNS)}): "
                             "fix the table or delete it")
        rows = table.loc[table["Class"] == class_key]
        if len(rows):
            values = [rows[column].values[0] for column in DISTRIBUTION_COLUMNS[1:]]
            if any(value not in (0, 1) for value in values):  # NaN (an empty cell) is not either
                raise GlassError(f"{path}: the row {class_key} has Distribution, Foreground = {values[0]}, {values[1]}, "
                                 "not 0 or 1 each: fix the row or delete it")
            return int(values[0]), int(values[1])
    return None


def record_distributions(excel_dir: str, dataset_name: str, judged: dict[str, int]) -> str:
    """Merge judged ``{class_key: flag}`` into ``<excel_dir>/<dataset>_distribution.xlsx`` (atomic)."""
    import pandas as pd

    path = excel_path(excel_dir, dataset_name)
    table = pd.DataFrame(columns=DISTRIBUTION_COLUMNS)
    if os.path.isfile(path):
        try:
            table = pd.read_excel(path)[DISTRIBUTION_COLUMNS]
        except Exception as exc:  # pandas/openpyxl raise many kinds for a file that is not an xlsx table
            keep_unreadable(path, exc, "writing a new table")
    table = table[~table["Class"].isin(list(judged))]
    new_rows = pd.DataFrame(
        {"Class": list(judged), "Distribution": list(judged.values()), "Foreground": list(judged.values())}
    )
    table = new_rows if table.empty else pd.concat([table, new_rows], ignore_index=True)
    atomic_write(path, lambda tmp: table.to_excel(tmp, index=False, engine="openpyxl"))
    return path


# --------------------------------------------------------------------------------------------------
# Error messages and the record of a run

def error_message(exc: BaseException) -> str:
    """One line for the user from an exception, unwrapping DataLoader workers' re-raised errors.

    A worker's exception comes back as ``Caught GlassError in DataLoader worker process 0.`` plus the
    worker's traceback, all in the message; the original message is the traceback's last line.
    """
    text = str(exc).strip()
    if "\n" in text and "Traceback" in text:
        last = text.splitlines()[-1].strip()
        name = type(exc).__name__
        text = last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return " ".join(text.split())


# What torch says when a DataLoader worker process dies (a signal, most often SIGBUS for want of shared memory,
# or the kernel's out-of-memory killer), or when a worker or the main process cannot get shared memory.
LOADER_FAILURES = re.compile(r"DataLoader worker \(pid|shared memory\(shm\)|shared memory object|</torch_")


def rerun_advice(trains: bool) -> str:
    """How a rerun goes on after the machine ran short: a training command resumes, another one starts again."""
    return ("the same command then resumes training after its last finished epoch" if trains
            else "then run the same command again")


def loader_failure_message(exc: BaseException, trains: bool = True) -> Optional[str]:
    """The one line to print when ``exc`` says that data loading ran out of shared memory or lost a worker
    process; None for any other error. ``trains``: whether the command trains (see :func:`rerun_advice`)."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or not LOADER_FAILURES.search(text):
        return None
    return (f"data loading failed ({error_message(exc)}): DataLoader worker processes need memory and shared memory "
            "(/dev/shm: Docker gives 64 MB unless started with --shm-size=8g, say); give the machine more, or load in "
            f"the main process with `dataset --num_workers 0` (or use fewer workers); {rerun_advice(trains)}")


# The first sentences of torch's out-of-memory errors on CUDA, MPS and the CPU (the rest is allocator advice).
OUT_OF_MEMORY = re.compile(r"(CUDA out of memory\.(?: Tried to allocate [^ ]+ [A-Za-z]+\.)?"
                           r"|MPS backend out of memory \([^)]*\)\.(?: Tried to allocate [^ ]+ [A-Za-z]+)?"
                           r"|DefaultCPUAllocator: (?:can't allocate memory|not enough memory): [^.]*\.)")


def out_of_memory_message(exc: BaseException, trains: bool = True) -> Optional[str]:
    """The one line to print when ``exc`` is torch's out-of-memory error or a MemoryError; None for any other.
    ``trains``: whether the command trains (see :func:`rerun_advice`)."""
    if isinstance(exc, MemoryError):
        what = error_message(exc) or "MemoryError"
    else:
        # A DataLoader worker's error: its message, not its traceback (which may quote the raising line).
        found = OUT_OF_MEMORY.search(error_message(exc)) if isinstance(exc, RuntimeError) else None
        if found is None:
            return None
        what = found.group(1).rstrip(".")
    return (f"out of memory ({what}): use a smaller `dataset --batch_size` or smaller images "
            f"(`dataset --resize --imagesize`; both change the results) or a device with more memory; {rerun_advice(trains)}")


PACKAGES = (
    "torch", "torchvision", "timm", "numpy", "scipy", "scikit-learn", "scikit-image", "pillow",
    "opencv-python", "opencv-python-headless", "pandas", "openpyxl", "click", "tensorboard", "tqdm",
)


def package_versions(names: Sequence[str] = PACKAGES) -> dict:
    """Installed version of each distribution (those not installed are left out)."""
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(directory: str) -> str:
    """The commit checked out in ``directory`` (``+dirty`` with local changes), or ``unknown``."""
    import subprocess

    def git(*args: str) -> str:
        # --no-optional-locks: a read that never writes the index.
        return subprocess.run(["git", "--no-optional-locks", "-C", directory, *args], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "") if commit else "unknown"


# --------------------------------------------------------------------------------------------------
# Reports
#
# Reports researchers read: per-epoch history, plots per class, TensorBoard image grids, the run's summary.
#
# Per class (``<class folder>`` is ``<results>/models/backbone_<i>/<dataset>_<class>/``):
#
# * ``<class folder>/history.csv``: one row per finished epoch (epoch means of the training statistics, and
#   image/pixel AUROC where the epoch was evaluated), rewritten atomically after every epoch; a resumed run
#   keeps the rows before the epoch it resumes with.
# * ``<results>/plots/<dataset>_<class>/`` (``.../<dataset>_<class>_backbone_<i>/`` for a second backbone),
#   drawn when the best checkpoint is tested: ``training_curves.png`` (from history.csv), ``roc.png`` and
#   ``pr.png`` (image level and pixel level side by side; the pixel panel says why when there are no
#   masks), ``score_histogram.png`` (image scores of good and defective test images with the threshold).
# * TensorBoard, beside the scalars: ``eval/samples`` (test images | ground truth | anomaly map) at
#   evaluations and ``train/las`` (image | LAS image | Perlin mask of the first batch) once per epoch,
#   thinned to at most :data:`IMAGE_LOGS_PER_RUN` grids per tag and run.
#
# Per run: ``<results>/summary.md`` and ``summary.csv``, the numbers of results.csv in percent.
#
# Nothing here draws from the random generators, so reports never change a training run. A report
# that cannot be drawn is logged as a warning and never stops training or testing.

HISTORY_NAME = "history.csv"
HISTORY_COLUMNS = ("epoch", "step", "loss", "p_true", "p_fake", "r_t", "r_g", "r_f", "image_auroc", "pixel_auroc")
PLOTS_FOLDER = "plots"
TRAINING_CURVES_PNG, ROC_PNG, PR_PNG, HISTOGRAM_PNG = PLOT_NAMES = (
    "training_curves.png", "roc.png", "pr.png", "score_histogram.png")
TB_SAMPLES_TAG = "eval/samples"
TB_LAS_TAG = "train/las"
GRID_SAMPLES = 8  # images per TensorBoard grid
GRID_TILE = 128  # side of one tile of a grid, in pixels
IMAGE_LOGS_PER_RUN = 64  # at most this many grids per tag and run (the event file stays small)
PIXEL_CURVE_BINS = 2000  # score bins of the pixel-level curves
SUMMARY_MD = "summary.md"
SUMMARY_CSV = "summary.csv"


@contextlib.contextmanager
def never_fatal(what: str) -> Iterator[None]:
    """Log a failure to draw a report as a warning instead of raising it."""
    try:
        yield
    except Exception as exc:  # a report must never cost the run its results
        LOGGER.warning("Could not write %s (%s: %s)", what, type(exc).__name__, exc)


# --------------------------------------------------------------------------------------------------
# history.csv

def history_row(epoch: int, step: int, stats: Mapping[str, float], evaluation: Optional[Sequence[float]]) -> Dict[str, float]:
    """One history row: the epoch's mean statistics and, when it was evaluated, image and pixel AUROC."""
    nan = float("nan")
    row: Dict[str, float] = {"epoch": int(epoch), "step": int(step)}
    row.update({key: float(stats.get(key, nan)) for key in HISTORY_COLUMNS[2:8]})
    row["image_auroc"] = float(evaluation[0]) if evaluation is not None else nan
    row["pixel_auroc"] = float(evaluation[2]) if evaluation is not None else nan
    return row


def read_history(path: str) -> List[Dict[str, float]]:
    """The rows of a history.csv (empty cells as NaN; a damaged row left out); no file, no rows. ValueError when
    the file is not such a table (not text, no ``epoch`` column)."""
    if not os.path.isfile(path):
        return []
    rows = []
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if "epoch" not in (reader.fieldnames or []):
                raise ValueError(f"its columns are not {', '.join(HISTORY_COLUMNS)}")
            for raw in reader:
                try:
                    row = {key: float(raw[key]) if raw.get(key) not in (None, "") else float("nan")
                           for key in HISTORY_COLUMNS}
                except ValueError:
                    continue
                if not np.isfinite(row["epoch"]):
                    continue
                row["epoch"], row["step"] = int(row["epoch"]), int(row["step"]) if np.isfinite(row["step"]) else 0
                rows.append(row)
    except csv.Error as exc:  # UnicodeDecodeError, the other way it fails, is a ValueError already
        raise ValueError(str(exc)) from exc
    return rows


def write_history(path: str, rows: Sequence[Mapping[str, float]]) -> None:
    """Write history.csv atomically (NaN as an empty cell, floats with full precision)."""
    def cell(value: float) -> str:
        return "" if isinstance(value, float) and not np.isfinite(value) else repr(value)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(HISTORY_COLUMNS)
            for row in rows:
                writer.writerow([cell(row[key]) for key in HISTORY_COLUMNS])

    atomic_write(path, write)


def record_epoch(class_dir: str, epoch: int, step: int, stats: Mapping[str, float],
                 evaluation: Optional[Sequence[float]]) -> None:
    """Trainer hook after each epoch: keep the rows of the epochs before ``epoch`` in ``<class_dir>/history.csv``
    and add this one (its last training ``step``, the epoch's mean ``stats`` and its ``evaluation``, if any).

    Rows of ``epoch`` and later come from an interrupted run that is now resumed (or from an earlier
    run trained again from the start) and are replaced.
    """
    with never_fatal(f"{HISTORY_NAME} of epoch {epoch}"):
        path = os.path.join(class_dir, HISTORY_NAME)
        try:
            earlier = read_history(path)
        except ValueError as exc:
            keep_unreadable(path, exc, "starting a new one")
            earlier = []
        rows = [row for row in earlier if row["epoch"] < epoch]
        rows.append(history_row(epoch, step, stats, evaluation))
        write_history(path, rows)


# --------------------------------------------------------------------------------------------------
# TensorBoard image grids

def thinned(index: int, total: int, limit: int = IMAGE_LOGS_PER_RUN) -> bool:
    """Whether event ``index`` of ``total`` is logged when at most about ``limit`` may be (every k-th, and the last)."""
    every = max(1, math.ceil(total / max(limit, 1)))
    return index % every == 0 or index == total - 1


def image_tile(image: np.ndarray, side: int = GRID_TILE) -> np.ndarray:
    """An ImageNet-normalised CHW image as an RGB uint8 tile (side x side)."""
    import cv2

    image = np.asarray(image, dtype=np.float32)
    rgb = image.transpose(1, 2, 0) * np.array(IMAGENET_STD, dtype=np.float32) + np.array(IMAGENET_MEAN, dtype=np.float32)
    rgb = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    return cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA)


def mask_tile(mask: Optional[np.ndarray], side: int = GRID_TILE) -> np.ndarray:
    """A mask (any 2-D or 1xHxW array in [0, 1]) as a grey RGB tile; unknown (NaN) pixels mid-grey, none black."""
    import cv2

    if mask is None:
        return np.zeros((side, side, 3), dtype=np.uint8)
    mask = np.nan_to_num(np.asarray(mask, dtype=np.float32).squeeze(), nan=0.5)
    grey = (np.clip(mask, 0, 1) * 255).round().astype(np.uint8)
    grey = cv2.resize(grey, (side, side), interpolation=cv2.INTER_NEAREST)
    return np.repeat(grey[:, :, None], 3, axis=2)


def map_tile(anomaly_map: np.ndarray, low: float, high: float, side: int = GRID_TILE) -> np.ndarray:
    """An anomaly map as a jet-coloured RGB tile, scaled from [low, high] (all maps of an evaluation share it)."""
    import cv2

    scaled = (np.asarray(anomaly_map, dtype=np.float32) - low) / (high - low + 1e-10)
    heat = cv2.applyColorMap((np.clip(scaled, 0, 1) * 255).round().astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.resize(cv2.cvtColor(heat, cv2.COLOR_BGR2RGB), (side, side), interpolation=cv2.INTER_LINEAR)


def tile_grid(rows: Sequence[Sequence[np.ndarray]], gap: int = 2) -> np.ndarray:
    """HWC tiles arranged in rows (white gaps between them) as one CHW uint8 image for ``add_image``."""
    height, width = rows[0][0].shape[:2]
    columns = max(len(row) for row in rows)
    grid = np.full((len(rows) * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            y, x = r * (height + gap), c * (width + gap)
            grid[y:y + height, x:x + width] = tile
    return grid.transpose(2, 0, 1)


def sample_indices(labels: Sequence[int], limit: int = GRID_SAMPLES) -> List[int]:
    """Up to ``limit`` test images to show, half defective and half good where possible, evenly spread.

    Depends on the labels only, so every evaluation shows the same images.
    """
    labels = np.asarray(labels).astype(int).ravel()
    defective, good = np.flatnonzero(labels == 1), np.flatnonzero(labels != 1)
    n_defective = min(len(defective), max(limit - len(good), limit // 2))
    n_good = min(len(good), limit - n_defective)

    def spread(indices: np.ndarray, count: int) -> List[int]:
        if count <= 0:
            return []
        return [int(indices[i]) for i in np.linspace(0, len(indices) - 1, count).round().astype(int)]

    return sorted(set(spread(defective, n_defective) + spread(good, n_good)))


def eval_grid(images: Sequence[np.ndarray], segmentations: np.ndarray, labels: Sequence[int], masks: np.ndarray,
              limit: int = GRID_SAMPLES, side: int = GRID_TILE) -> np.ndarray:
    """CHW grid, one row per shown test image: image | ground truth | anomaly map (shared colour scale)."""
    segmentations = np.asarray(segmentations)
    masks = np.asarray(masks)
    low, high = float(np.min(segmentations)), float(np.max(segmentations))
    rows = []
    for i in sample_indices(labels, limit):
        mask = masks[i] if masks.ndim >= 3 and len(masks) == len(segmentations) else None
        rows.append([image_tile(images[i], side), mask_tile(mask, side), map_tile(segmentations[i], low, high, side)])
    return tile_grid(rows)


def las_grid(batch: Mapping[str, Any], limit: int = GRID_SAMPLES, side: int = GRID_TILE) -> Optional[np.ndarray]:
    """CHW grid of a training batch, one row per item: image | LAS image | Perlin mask; None without LAS images."""
    aug = batch.get("aug")
    if aug is None or np.ndim(aug) != 4:
        return None
    aug = np.asarray(aug.detach().cpu() if hasattr(aug, "detach") else aug, dtype=np.float32)
    images = batch.get("image")
    images = None if images is None else np.asarray(images.detach().cpu() if hasattr(images, "detach") else images)
    masks = batch.get("mask_s")
    masks = None if masks is None else np.asarray(masks.detach().cpu() if hasattr(masks, "detach") else masks)
    rows = []
    for i in range(min(limit, len(aug))):
        row = [image_tile(images[i], side)] if images is not None and images.ndim == 4 else []
        row += [image_tile(aug[i], side), mask_tile(masks[i] if masks is not None and masks.ndim >= 3 else None, side)]
        rows.append(row)
    return tile_grid(rows)


def log_eval_samples(writer: Optional["SummaryWriter"], epoch: int, meta_epochs: int, eval_epochs: int,
                     images: Sequence[np.ndarray], segmentations: np.ndarray, labels: Sequence[int],
                     masks: np.ndarray) -> None:
    """Trainer hook at an evaluation: the ``eval/samples`` grid (thinned, see :func:`thinned`) of a run of
    ``meta_epochs`` epochs that evaluates every ``eval_epochs``."""
    evaluations = max(1, meta_epochs // eval_epochs)
    if writer is None or not thinned((epoch + 1) // eval_epochs - 1, evaluations):
        return
    with never_fatal(f"the TensorBoard grid {TB_SAMPLES_TAG} of epoch {epoch}"):
        writer.add_image(TB_SAMPLES_TAG, eval_grid(images, segmentations, labels, masks), epoch, dataformats="CHW")


def log_las_batch(writer: Optional["SummaryWriter"], epoch: int, meta_epochs: int, step: int,
                  batch: Mapping[str, Any]) -> None:
    """Trainer hook at an epoch's first batch (training ``step``): the ``train/las`` grid (thinned, see
    :func:`thinned`)."""
    if writer is None or not thinned(epoch, meta_epochs):
        return
    with never_fatal(f"the TensorBoard grid {TB_LAS_TAG} of epoch {epoch}"):
        grid = las_grid(batch)
        if grid is not None:
            writer.add_image(TB_LAS_TAG, grid, step, dataformats="CHW")


# --------------------------------------------------------------------------------------------------
# Curves

def binned_curves(scores: Sequence[np.ndarray], positives: Sequence[np.ndarray], bins: int = PIXEL_CURVE_BINS
                  ) -> Dict[str, np.ndarray]:
    """ROC and PR curves of many values from score histograms (thresholds at ``bins`` even steps).

    ``scores`` and ``positives`` are chunks (e.g. one per image) of the same shapes; the chunks are
    counted one by one, so memory stays that of one chunk. Returns ``fpr``, ``tpr``, ``precision``,
    ``recall`` from the highest threshold down (ROC from (0, 0) to (1, 1)).
    """
    low = min(float(np.min(chunk)) for chunk in scores)
    high = max(float(np.max(chunk)) for chunk in scores)
    span = high - low if high > low else 1.0
    pos = np.zeros(bins, dtype=np.int64)
    neg = np.zeros(bins, dtype=np.int64)
    for chunk, positive in zip(scores, positives):
        index = np.clip(((np.asarray(chunk, dtype=np.float64) - low) / span * bins).astype(np.int64), 0, bins - 1).ravel()
        positive = np.asarray(positive, dtype=bool).ravel()
        pos += np.bincount(index[positive], minlength=bins)
        neg += np.bincount(index[~positive], minlength=bins)
    tp, fp = np.cumsum(pos[::-1]), np.cumsum(neg[::-1])
    tpr = tp / max(int(tp[-1]), 1)
    fpr = fp / max(int(fp[-1]), 1)
    flagged = tp + fp
    precision = np.divide(tp, flagged, out=np.ones(bins), where=flagged > 0)
    return {"fpr": np.concatenate([[0.0], fpr]), "tpr": np.concatenate([[0.0], tpr]), "precision": precision, "recall": tpr,
            "base_rate": float(tp[-1]) / max(float(tp[-1] + fp[-1]), 1.0)}


def image_curves(scores: Sequence[float], labels: Sequence[int]) -> Optional[Dict[str, np.ndarray]]:
    """Exact image-level ROC and PR curves (sklearn); None unless both good and defective images exist."""
    from sklearn import metrics as skm

    labels = np.asarray(labels).astype(int).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.size == 0 or labels.min() == labels.max():
        return None
    fpr, tpr, _ = skm.roc_curve(labels, scores)
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    return {"fpr": fpr, "tpr": tpr, "precision": precision, "recall": recall, "base_rate": float(labels.mean())}


def pixel_curves(segmentations: np.ndarray, masks: np.ndarray) -> Tuple[Optional[Dict[str, np.ndarray]], str]:
    """Pixel-level curves over the test images whose ground truth is known, or (None, why not).

    As the metrics: images with an unknown mask (NaN) are left out and a mask pixel counts as
    defective when its value cast to int is 1 (the reference's resized masks).
    """
    masks = np.asarray(masks)
    segmentations = np.asarray(segmentations)
    if masks.size == 0 or masks.ndim < 3 or len(masks) != len(segmentations):
        return None, "no ground-truth masks"
    known = [i for i in range(len(masks)) if not np.isnan(masks[i]).any()]
    positives = [np.asarray(masks[i]).astype(int).reshape(segmentations[i].shape) == 1 for i in known]
    if not known or not any(p.any() for p in positives):
        return None, "no defective pixel in the known masks"
    return binned_curves([segmentations[i] for i in known], positives), ""


def _figure(columns: int, rows: int = 1, size: Tuple[float, float] = (4.6, 4.0)):
    """A matplotlib Figure without pyplot (no global state, works with any backend setting)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(size[0] * columns, size[1] * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    return figure, axes


def save_figure(figure, path: str) -> str:
    """Write a figure as PNG atomically; returns the path."""
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return path


def _note(axis, title: str, text: str) -> None:
    axis.set_title(title)
    axis.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=axis.transAxes, color="0.3")
    axis.set_xticks([])
    axis.set_yticks([])


def plot_curves(kind: str, image: Optional[Dict[str, np.ndarray]], pixel: Optional[Dict[str, np.ndarray]],
                pixel_note: str, values: Sequence[float], name: str, path: str) -> str:
    """``roc.png`` (kind "roc") or ``pr.png`` (kind "pr"): image level | pixel level, with AUROC or AP in the legend.

    ``values`` is the tester's record (i_auroc, i_ap, p_auroc, p_ap, ...), so the legends read as results.csv.
    """
    figure, axes = _figure(2)
    for axis, level, curve, value, note in ((axes[0, 0], "image", image, values[0 if kind == "roc" else 1], "both good and defective images needed"),
                                            (axes[0, 1], "pixel", pixel, values[2 if kind == "roc" else 3], pixel_note)):
        title = f"{name}: {level}-level {'ROC' if kind == 'roc' else 'precision-recall'}"
        if curve is None:
            _note(axis, title, f"{level} curves not available:\n{note}")
            continue
        label = f"{'AUROC' if kind == 'roc' else 'AP'} {format_metric(value)}%"
        if kind == "roc":
            axis.plot(curve["fpr"], curve["tpr"], label=label, color="tab:blue")
            axis.plot([0, 1], [0, 1], linestyle="--", color="0.6", label="chance")
            axis.set_xlabel("false positive rate")
            axis.set_ylabel("true positive rate")
        else:
            axis.plot(curve["recall"], curve["precision"], drawstyle="steps-post", label=label, color="tab:orange")
            axis.axhline(curve["base_rate"], linestyle="--", color="0.6", label=f"chance ({curve['base_rate'] * 100:.2g}%)")
            axis.set_xlabel("recall")
            axis.set_ylabel("precision")
        axis.set_xlim(-0.01, 1.01)
        axis.set_ylim(-0.01, 1.01)
        axis.grid(alpha=0.3)
        axis.set_title(title)
        axis.legend(loc="lower right" if kind == "roc" else "upper right")
    return save_figure(figure, path)


def plot_score_histogram(scores: Sequence[float], labels: Sequence[int], threshold: Optional[float], source: str,
                         name: str, path: str) -> str:
    """``score_histogram.png``: image scores of good and defective test images, and the decision threshold."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(int).ravel()
    edges = np.histogram_bin_edges(scores, bins="auto")
    if len(edges) - 1 > 40:
        edges = np.histogram_bin_edges(scores, bins=40)
    from matplotlib.ticker import MaxNLocator

    figure, axes = _figure(1, size=(6.4, 4.0))
    axis = axes[0, 0]
    for value, label, colour in ((0, "good", "tab:green"), (1, "defective", "tab:red")):
        chosen = scores[labels == value]
        if chosen.size:
            axis.hist(chosen, bins=edges, alpha=0.55, color=colour, label=f"{label} ({chosen.size})")
    if threshold is not None:
        axis.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g} ({source})")
    axis.set_xlabel("image score (max patch score; anomalous at or above the threshold)")
    axis.set_ylabel("test images")
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_title(f"{name}: image scores")
    axis.legend(fontsize=8, framealpha=0.8)
    return save_figure(figure, path)


def plot_training_curves(rows: Sequence[Mapping[str, float]], best_epoch: Optional[int], name: str, path: str) -> str:
    """``training_curves.png``: loss; p_true and p_fake; r_t, r_g, r_f; image and pixel AUROC, per epoch."""
    epochs = np.array([row["epoch"] for row in rows], dtype=float)

    def series(key: str) -> np.ndarray:
        return np.array([row[key] for row in rows], dtype=float)

    figure, axes = _figure(2, 2, size=(5.2, 3.4))
    panels = (
        (axes[0, 0], "loss (epoch mean)", [("loss", "loss", 1.0)], None),
        (axes[0, 1], "share of scores on the right side of the margin (%)", [("p_true", "p_true", 100.0), ("p_fake", "p_fake", 100.0)], None),
        (axes[1, 0], "radii (epoch mean)", [("r_t", "r_t", 1.0), ("r_g", "r_g", 1.0), ("r_f", "r_f", 1.0)], None),
        (axes[1, 1], "evaluation (%)", [("image_auroc", "I-AUROC", 100.0), ("pixel_auroc", "P-AUROC", 100.0)], best_epoch),
    )
    marker = "o" if len(rows) <= 20 else None
    for axis, title, lines, best in panels:
        for key, label, scale in lines:
            values = series(key) * scale
            shown = np.isfinite(values)
            if shown.any():
                axis.plot(epochs[shown], values[shown], marker=marker, markersize=3, label=label)
        if best is not None:
            axis.axvline(best, color="0.4", linestyle=":", label=f"best epoch {best}")
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.suptitle(f"{name}: training")
    return save_figure(figure, path)


# --------------------------------------------------------------------------------------------------
# The class report (after the best checkpoint is tested)

def plots_dir(results_path: str, class_dir: str) -> str:
    """``<results>/plots/<name>`` for backbone_0, ``<results>/plots/<name>_backbone_<i>`` for the others."""
    return os.path.join(results_path, PLOTS_FOLDER, class_output_name(class_dir))


THRESHOLD_NAME = "threshold.json"


def read_threshold_file(path: str) -> Dict[str, Any]:
    """The record in a ``threshold.json`` (``method`` filled in when missing); GlassError, saying how to fix it,
    when it is damaged or its ``threshold`` is not a finite number."""
    fix = "delete it or rerun with --calibrate"
    record = read_json(path, fix)
    if "threshold" not in record:
        return record
    value = record["threshold"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise GlassError(f"{path}: the threshold {value!r} is not a finite number: fix it, {fix}")
    return {"method": f"from {THRESHOLD_NAME}", **record, "threshold": float(value)}


def stored_threshold(class_dir: str, checkpoint: str) -> Optional[Dict[str, Any]]:
    """The ``<class_dir>/threshold.json`` record if it applies to ``checkpoint`` (a path or file name): it has a
    threshold and was chosen for that checkpoint, or names none (written by hand). None otherwise.

    The one rule for predict, the class report and the ONNX export.
    """
    path = os.path.join(class_dir, THRESHOLD_NAME)
    if not os.path.isfile(path):
        return None
    record = read_threshold_file(path)
    name = os.path.basename(checkpoint)
    if "threshold" not in record or record.get("checkpoint", name) != name:
        return None
    return record


def report_threshold(class_dir: str, checkpoint: str, scores: Sequence[float], labels: Sequence[int]
                     ) -> Tuple[Optional[float], str]:
    """The threshold to draw: ``threshold.json`` when it was chosen for ``checkpoint``, else the F1-best one."""
    import metrics

    with never_fatal(os.path.join(class_dir, THRESHOLD_NAME)):
        record = stored_threshold(class_dir, checkpoint)
        if record is not None:
            return record["threshold"], THRESHOLD_NAME
    labels = np.asarray(labels).astype(int)
    if labels.size == 0 or labels.min() == labels.max():
        return None, "no threshold: one kind of test image only"
    return float(metrics.compute_best_threshold(labels, scores)), "F1-best on the test set"


def write_class_report(results_path: str, class_dir: str, name: str, checkpoint: str, best_epoch: int,
                       scores: Sequence[float], segmentations: np.ndarray, labels: Sequence[int], masks: np.ndarray,
                       result: Sequence[float]) -> List[str]:
    """Tester hook: every plot of a class (folder ``class_dir``) from the predictions of its best checkpoint
    (``checkpoint``, the file name, saved at ``best_epoch``), under ``results_path``; returns the files written."""
    folder = plots_dir(results_path, class_dir)
    written: List[str] = []
    with never_fatal(f"the plots of {name}"):
        os.makedirs(folder, exist_ok=True)
        history_path = os.path.join(class_dir, HISTORY_NAME)
        try:
            history = read_history(history_path)
        except ValueError as exc:
            LOGGER.warning("Could not read %s (%s), so no training curves are drawn", history_path,
                           exception_summary(exc))
            history = None
        if history:
            written.append(plot_training_curves(history, best_epoch, name, os.path.join(folder, TRAINING_CURVES_PNG)))
        elif history is not None:
            LOGGER.info("%s: no %s in %s (trained elsewhere?), so no training curves", name, HISTORY_NAME, class_dir)
        image = image_curves(scores, labels)
        pixel, why = pixel_curves(segmentations, masks)
        if pixel is None:
            LOGGER.info("%s: pixel-level ROC/PR curves not drawn (%s)", name, why)
        written.append(plot_curves("roc", image, pixel, why, result, name, os.path.join(folder, ROC_PNG)))
        written.append(plot_curves("pr", image, pixel, why, result, name, os.path.join(folder, PR_PNG)))
        threshold, source = report_threshold(class_dir, checkpoint, scores, labels)
        written.append(plot_score_histogram(scores, labels, threshold, source, name, os.path.join(folder, HISTOGRAM_PNG)))
        LOGGER.info("%s: plots written to %s", name, folder)
    return written


# --------------------------------------------------------------------------------------------------
# The run's summary (from results.csv, so that the numbers are the same)

def read_results(path: str) -> Tuple[List[str], List[List[str]]]:
    """The header and rows of a results.csv, as text; blank lines (an editor's trailing newline) are left out."""
    with open(path, newline="") as handle:
        table = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    return table[0], table[1:]


def summary_rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[List[str]]:
    """results.csv rows in percent with two decimals (empty = not available); the Mean row has no epoch."""
    names = list(header)
    out = [["class", *names[1:]]]
    for row in rows:
        cells = [row[0]]
        for key, value in zip(names[1:], row[1:]):
            if value == "":
                cells.append("")
            elif key == "best_epoch":
                cells.append("" if row[0] == "Mean" else str(int(float(value))))
            else:
                cells.append(f"{float(value) * 100:.2f}")
        out.append(cells)
    return out


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (first row the header, numbers right-aligned, columns padded to line up); empty metric
    cells read ``n/a``, an empty ``best_epoch`` (the Mean row) stays empty."""
    header = list(rows[0])
    shown = [header] + [[cell if cell != "" or header[i] == "best_epoch" else "n/a" for i, cell in enumerate(row)]
                        for row in rows[1:]]
    widths = [max(3, *(len(row[i]) for row in shown)) for i in range(len(shown[0]))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + "-") if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(shown[0]), rule, *(line(row) for row in shown[1:])])


def write_summary(results_path: str) -> str:
    """``summary.md`` and ``summary.csv`` from ``<results>/results.csv``; returns the Markdown table."""
    header, rows = read_results(os.path.join(results_path, "results.csv"))
    table = summary_rows(header, rows)
    markdown = markdown_table(table)

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            csv.writer(handle).writerows(table)

    def write_md(tmp: str) -> None:
        with open(tmp, "w") as handle:
            handle.write("Results in percent (image/pixel AUROC, AP, PRO) of the best checkpoint of each class; "
                         "n/a = not available.\n\n" + markdown + "\n")

    atomic_write(os.path.join(results_path, SUMMARY_CSV), write_csv)
    atomic_write(os.path.join(results_path, SUMMARY_MD), write_md)
    return markdown
