"""Where and how the model runs: device, precision, seeding, compilation.

    device  "auto" picks CUDA, then Apple's MPS, then the CPU.
    dtype   "auto" picks bfloat16 autocast on a CUDA GPU that supports it, float16 (with a
            gradient scaler) on one that does not, and float32 on MPS (its autocast is not yet
            reliable for training). On a CPU: float32 where the CPU has no bfloat16 matrix
            instructions (a bfloat16 multiply is emulated there, hundreds of times slower);
            where it has them (Intel AMX, AVX512-BF16) a large model's step can run about twice
            as fast in bfloat16 while on small models autocast's conversions cost more than they
            save, so the step is measured, robustly to the machine's load (`fastest_cpu_dtype`).
Autocast keeps the weights in float32 and runs matrix multiplies in the low-precision type, so
the optimizer's updates keep full precision.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import random
import subprocess
import time
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import psutil
import torch

from minigpt.errors import UserInputError
from minigpt.version import __version__

log = logging.getLogger("minigpt.runtime")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def select_device(name: str = "auto") -> torch.device:
    """The torch device for a --device value; an unavailable explicit choice is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device auto or cpu.")
    if name == "mps" and not mps_available():
        raise UserInputError("--device mps was asked for, but MPS is not available here; use --device auto or cpu.")
    if name not in ("cpu", "cuda", "mps"):
        raise UserInputError(f"Unknown device '{name}'; choose auto, cpu, cuda or mps.")
    return torch.device(name)


def select_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for a --dtype value on `device`."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise UserInputError(f"Unknown dtype '{name}'; choose auto, float32, bfloat16 or float16.")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise UserInputError("float16 training is not supported on the CPU; use float32 (or bfloat16 if your CPU has it).")
    return dtype


def cpu_bfloat16_units() -> str | None:
    """The bfloat16 matrix instructions this CPU has ("AMX" or "AVX512-BF16"), or None where a
    bfloat16 multiply is emulated (a multiply of a training step's size would then take minutes).
    Asked of the CPU, not timed: the answer is the same however busy the machine is."""
    for name, supported in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
        check = getattr(torch.cpu, supported, None)
        if check is not None and check():
            return name
    return None


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (`cpu_bfloat16_units`)."""
    return cpu_bfloat16_units() is not None


PROBE_TOKENS = 1024  # enough for realistic matrix shapes, few enough for a probe of seconds
PROBE_ROUNDS = (4, 20)  # timed steps per precision, alternating (after one warm-up step each): at least, at most
REPEATED_WITHIN = 1.1  # a fastest time counts once two more steps come within 10% of it
BFLOAT16_MARGIN = 0.75  # bfloat16 must take under this share of float32's time: a clear win, not noise
PROBE_SECONDS = 10.0  # past this, a probe stops as soon as the answer is far from the margin (a big model's steps take seconds)
CLEAR_RATIOS = (0.5, 1.0)  # bfloat16 under half of float32's time, or slower than it: far from the margin, whatever the load


def fastest_cpu_dtype(
    model: torch.nn.Module, loss_of: Callable[[torch.nn.Module], torch.Tensor], margin: float = BFLOAT16_MARGIN
) -> torch.dtype:
    """bfloat16 if a forward and backward pass of this model runs in under `margin` of its
    float32 time on this CPU, else float32. `loss_of(model)` computes the loss of an example
    batch; the model leaves the probe as it came (its mode, no gradients).

    The example batch should be the training batch's shape, capped at about PROBE_TOKENS tokens:
    which precision wins depends on the matrix shapes (small ones lose to the cost of
    converting), so they must be the real ones.

    The same command must get the same precision on a busy machine as on an idle one (else the
    same seed gives other weights), so the timing is made robust to load: the two precisions
    alternate step by step (a load that starts or ends during the probe slows both alike), each
    counts its fastest step (other processes only ever add time) once two more steps have come
    within 10% of it (a burst of load could otherwise slow every step of a short probe), and bfloat16 must
    win by a clear margin. A probe of a big model, whose steps take seconds, stops after about
    PROBE_SECONDS once bfloat16 takes under half of float32's time or more than all of it: no load
    moves a ratio that far. The run records the choice in config.json; --resume keeps it.
    """
    units = cpu_bfloat16_units()
    if units is None:
        log.info("CPU precision: float32 (this CPU has no bfloat16 matrix instructions, AMX or AVX512-BF16).")
        return torch.float32
    was_training = model.training
    model.train(False)  # no dropout: the probe draws no random numbers

    def step_seconds(dtype: torch.dtype) -> float:
        start = time.perf_counter()
        with autocast(torch.device("cpu"), dtype):
            loss = loss_of(model)
        loss.backward()
        return time.perf_counter() - start

    try:
        warm_float32, warm_bfloat16 = step_seconds(torch.float32), step_seconds(torch.bfloat16)  # first calls allocate and pick kernels
        times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
        if warm_float32 > PROBE_SECONDS and warm_bfloat16 < CLEAR_RATIOS[0] * warm_float32:
            # A step of many seconds: bfloat16 won by 2x even with its own first-call costs. More rounds would say the same.
            times = {torch.float32: [warm_float32], torch.bfloat16: [warm_bfloat16]}

        def repeated(steps: list[float]) -> bool:
            fastest, _, third = sorted(steps)[:3]
            return third <= REPEATED_WITHIN * fastest

        def clear() -> bool:  # a long probe may stop once the ratio is far from the margin: noise cannot move it that far
            ratio = min(times[torch.bfloat16]) / min(times[torch.float32])
            return sum(map(sum, times.values())) > PROBE_SECONDS and not CLEAR_RATIOS[0] <= ratio <= CLEAR_RATIOS[1]

        least, most = PROBE_ROUNDS
        while not (times[torch.float32] and clear()) and len(times[torch.float32]) < most and not (
                len(times[torch.float32]) >= least and all(map(repeated, times.values()))):
            for dtype in times:
                times[dtype].append(step_seconds(dtype))
    finally:  # the model leaves the probe as it came: its mode, and no gradients (the copy the probe once made cost a whole model)
        model.train(was_training)
        for parameter in model.parameters():
            parameter.grad = None
    float32, bfloat16 = min(times[torch.float32]), min(times[torch.bfloat16])
    choice = torch.bfloat16 if bfloat16 < margin * float32 else torch.float32
    log.info("CPU precision: %s (this CPU has %s; the fastest of %d alternating steps took %.0f ms in float32 and %.0f ms in bfloat16 "
             "autocast, and bfloat16 is chosen only under %.0f%% of float32's time). Recorded in config.json; --resume keeps it.",
             str(choice).replace("torch.", ""), units, len(times[torch.float32]), 1000 * float32, 1000 * bfloat16, 100 * margin)
    return choice


def autocast(device: torch.device, dtype: torch.dtype) -> ContextManager:
    """Mixed-precision context for the forward pass (a no-op for float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def software_versions() -> dict[str, str]:
    """What a run was made with, recorded next to its results."""
    return {"minigpt": __version__, "torch": torch.__version__, "python": platform.python_version()}


def seed_everything(seed: int) -> None:
    """Seed every random number generator a run touches."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA and MPS


def rng_state() -> dict:
    """The global RNG states (for an exact resume), as tensors and plain values only."""
    _, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [torch.from_numpy(numpy_keys.astype(np.int64)), int(numpy_position), int(numpy_has_gauss), float(numpy_gauss)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = state["numpy"]
    np.random.set_state(("MT19937", numpy_keys.numpy().astype(np.uint32), numpy_position, numpy_has_gauss, numpy_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def compile_mode(device: torch.device, requested: str = "auto") -> str:
    """torch.compile's mode: on CUDA "max-autotune" tries several kernels per matrix shape and keeps
    the fastest (a longer first compile, faster steps after); elsewhere the default mode."""
    if requested != "auto":
        return requested
    return "max-autotune" if device.type == "cuda" else "default"


def compile_model(
    model: torch.nn.Module, example_loss: Callable[[torch.nn.Module], torch.Tensor], mode: str = "default"
) -> torch.nn.Module:
    """torch.compile the model, or return it unchanged with one warning if compilation fails.

    Compilation happens lazily, at the first call, and the graph is specialised to that call:
    its arguments, their shapes and memory layout, the autocast state. A later call that differs
    compiles again. So the check runs `example_loss(compiled_model)`, which should make the very
    call training makes, on an example batch, and then its backward pass (the gradients are
    cleared afterwards).
    """
    compiled = torch.compile(model, mode=mode)
    try:
        example_loss(compiled).backward()
    except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
        log.warning("torch.compile failed (%s); continuing without compilation.", str(error).splitlines()[0])
        compiled = model
    model.zero_grad(set_to_none=True)
    return compiled


def _container_cpu_quota() -> float | None:
    """CPUs a container may use (cgroup v2 `cpu.max`), or None without a limit."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def available_cpu_cores() -> int:
    """Physical cores this process may use, honouring CPU affinity and a container's CPU quota.

    Physical, not logical: two hyper-threads share one core's matrix units, so a thread per
    hyper-thread only adds contention to matrix-multiply-bound training.
    """
    logical = psutil.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    cores = max(1, allowed * physical // logical)
    quota = _container_cpu_quota()
    return max(1, min(cores, int(quota))) if quota else cores


def configure_threads(num_threads: int = 0) -> int:
    """Use `num_threads` CPU threads (0 = the available physical cores); return the number used."""
    threads = num_threads or available_cpu_cores()
    # Worker processes started from here read these when their OpenMP/MKL runtimes start.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(threads)
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(max(1, threads // 2))
    except RuntimeError:  # only possible before the first inter-op parallel work of the process
        pass
    return threads


GLIBC_MMAP_THRESHOLD, GLIBC_TRIM_THRESHOLD = -3, -1  # mallopt() parameter numbers, from glibc's malloc.h
MMAP_THRESHOLD_BYTES = 32 * 2**20  # the largest glibc accepts
TRIM_THRESHOLD_BYTES = 256 * 2**20


def keep_freed_memory_for_reuse() -> bool:
    """Tune glibc's malloc to keep freed blocks in the process for the next training step.

    A step allocates and frees the same activation buffers again and again. By default glibc
    gives every block over 128 KB its own fresh pages from the OS (each one faulted in and zeroed
    on first touch) and returns them on free, and it returns the free top of its heap too; with
    both thresholds raised, the next step reuses the same memory. Measured on a 2-core CPU: the
    baby shape's compiled bfloat16 step fell from 16.9-18.7 ms to 14.3-15.5 ms. Raising only one
    threshold makes it slower. Returns False where the C library is not glibc (macOS, Windows).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(GLIBC_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and libc.mallopt(GLIBC_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def synchronize(device: torch.device) -> None:
    """Wait for the accelerator to finish queued work (so a timer measures the work, not its launch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def accelerator_memory_bytes(device: torch.device) -> int | None:
    """Memory the accelerator holds for tensors now (None on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    if device.type == "mps":
        return torch.mps.current_allocated_memory()
    return None


def accelerator_utilisation(device: torch.device) -> float | None:
    """Percent of the last sample period the CUDA GPU was busy (None elsewhere, or without the
    NVIDIA management library that PyTorch reads it through)."""
    if device.type != "cuda":
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # noqa: BLE001 - pynvml missing or the driver does not say
        return None


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of a large matrix multiply on this machine: the yardstick for model FLOPs utilisation.

    A multiply of two n x n matrices is 2 n^3 FLOPs. Measured, not looked up, so MFU compares a
    run against what this very machine (its cores, its threads, its other load) can do.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm up
    synchronize(device)
    repeats, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        repeats += 1
        synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def machine_description() -> dict[str, object]:
    """The machine and software a run uses, for its report card: CPU and GPU models, memory, the
    versions, and the git commit when MiniGPT runs from a checkout."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:  # not Linux: platform's answer stands
        pass
    description: dict[str, object] = {
        "cpu": cpu, "cpu_cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else ("Apple MPS" if torch.backends.mps.is_available() else None),
        "platform": platform.platform(), **software_versions(),
    }
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
            dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10)
            if commit.returncode == 0:
                description["git_commit"] = commit.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
        except (OSError, subprocess.TimeoutExpired):  # no git on the machine
            pass
    return description
