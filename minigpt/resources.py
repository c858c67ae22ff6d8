"""Keeping a run from taking the whole machine down with it.

    --max-cpu PERCENT     hold this process at or below PERCENT of the machine's CPU time. After a
                          step, if the process used more than its share since the last check, it
                          sleeps just long enough to bring the share back down (a duty cycle).
    --max-memory PERCENT  watch system memory: warn as it approaches the limit; past it, free what
                          can be freed and pause; if it stays past, ask the trainer to save a
                          checkpoint and stop, instead of being killed by the operating system.

The clock, the sleep and the two measurements are parameters, so the control logic can be
tested with a fake clock; by default they are the real ones from `time` and `psutil`.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil
import torch

from minigpt.distributed import PER_PROCESS

log = logging.getLogger("minigpt.resources")

WARNING_MARGIN_PERCENT = 5.0  # warn this far below the memory limit
MEMORY_PAUSE_SECONDS = 2.0
MEMORY_PAUSES = 3  # pauses to wait for memory to come back under the limit before stopping


def process_cpu_seconds(process: psutil.Process = psutil.Process()) -> float:
    times = process.cpu_times()
    return times.user + times.system


def system_memory_percent() -> float:
    return psutil.virtual_memory().percent


def free_memory() -> None:
    """Give back what Python and PyTorch hold but no longer use."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.empty_cache()


@dataclass
class ResourceGovernor:
    max_cpu_percent: float = 0.0  # share of the whole machine (all cores); 0 = no limit
    max_memory_percent: float = 0.0  # system memory; 0 = no limit
    cpu_count: int = field(default_factory=lambda: psutil.cpu_count() or 1)
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    cpu_seconds: Callable[[], float] = process_cpu_seconds
    memory_percent: Callable[[], float] = system_memory_percent
    release_memory: Callable[[], None] = free_memory
    window_seconds: float = 1.0  # the CPU share is measured over at least this much wall time

    def __post_init__(self) -> None:
        self.window_start = self.clock()
        self.window_cpu_start = self.cpu_seconds()
        self.paused_seconds = 0.0
        self.memory_warned = False

    def after_step(self) -> bool:
        """Throttle if needed; return False when the run must stop to stay within memory."""
        if self.max_cpu_percent:
            self._hold_cpu_share()
        if self.max_memory_percent:
            return self._memory_ok()
        return True

    def _hold_cpu_share(self) -> None:
        wall = self.clock() - self.window_start
        if wall < self.window_seconds:
            return
        used = self.cpu_seconds() - self.window_cpu_start
        # CPU time `used` is within the limit if it took at least this much wall time:
        needed_wall = used / (self.max_cpu_percent / 100.0 * self.cpu_count)
        if needed_wall > wall:
            self.sleep(needed_wall - wall)
            self.paused_seconds += needed_wall - wall
        self.window_start = self.clock()
        self.window_cpu_start = self.cpu_seconds()

    def _memory_ok(self) -> bool:
        percent = self.memory_percent()
        if percent < self.max_memory_percent:
            if percent >= self.max_memory_percent - WARNING_MARGIN_PERCENT and not self.memory_warned:
                log.warning("System memory is %.0f%% used, close to the --max-memory limit of %.0f%%.", percent, self.max_memory_percent,
                            extra=PER_PROCESS)
                self.memory_warned = True
            return True
        log.warning("System memory is %.0f%% used, over the %.0f%% limit: freeing caches and pausing.", percent, self.max_memory_percent,
                    extra=PER_PROCESS)
        for _ in range(MEMORY_PAUSES):
            self.release_memory()
            self.sleep(MEMORY_PAUSE_SECONDS)
            self.paused_seconds += MEMORY_PAUSE_SECONDS
            if self.memory_percent() < self.max_memory_percent:
                return True
        return False
