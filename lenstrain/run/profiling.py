"""Profiles of a window of training steps (``train.profile``, ``lenstrain train --profile``).

After step ``start_step``, ``steps`` steps run under ``torch.profiler``. Each rank then writes a
Chrome/Perfetto trace, ``RUN/profile/rank<R>.steps<A>-<B>.trace.json`` (open it in
https://ui.perfetto.dev; HolisticTraceAnalysis reads the ranks' traces together), and rank 0 prints
and logs to TensorBoard (text, ``profile/top_operators``) a table of the top operators by self time.
With ``memory: true`` on a GPU, each rank also writes a CUDA memory snapshot of the window,
``rank<R>.steps<A>-<B>.memory.pickle`` (open it in https://pytorch.org/memory_viz).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lenstrain.config.schema import ProfileConfig
from lenstrain.parallel.distributed import DistInfo
from lenstrain.run.tb import TBLogger

TOP_OPERATORS = 15
MEMORY_HISTORY_ENTRIES = 100_000


class StepProfiler:
    """Starts the profiler after step ``start_step`` and writes its outputs ``steps`` steps later."""

    def __init__(self, cfg: ProfileConfig | None, directory: Path, info: DistInfo, tb: TBLogger, log):
        self.cfg = cfg
        self.directory = Path(directory)
        self.info = info
        self.tb = tb
        self.log = log
        self._profile: profile | None = None
        self._memory = bool(cfg and cfg.memory and info.device.type == "cuda")

    def step(self, step: int) -> None:
        """Called at each step's boundary, ``step`` being the number of steps taken."""
        if self.cfg is None:
            return
        if step == self.cfg.start_step:
            self._start()
        elif self._profile is not None and step == self.cfg.start_step + self.cfg.steps:
            self._finish(step)

    def close(self) -> None:
        """Write what a run that ended inside the window traced."""
        if self._profile is not None:
            self._finish(None)

    def _start(self) -> None:
        activities = [ProfilerActivity.CPU]
        if self.info.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        if self._memory:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        self._profile = profile(activities=activities, record_shapes=True, profile_memory=self.cfg.memory)
        self._profile.__enter__()

    def _finish(self, step: int | None) -> None:
        prof, self._profile = self._profile, None
        prof.__exit__(None, None, None)
        first = self.cfg.start_step + 1
        name = f"rank{self.info.rank}.steps{first}-{step if step is not None else 'end'}"
        self.directory.mkdir(parents=True, exist_ok=True)
        trace = self.directory / f"{name}.trace.json"
        prof.export_chrome_trace(str(trace))
        if self._memory:
            torch.cuda.memory._dump_snapshot(str(self.directory / f"{name}.memory.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        by = "self_cuda_time_total" if self.info.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=by, row_limit=TOP_OPERATORS)
        self.log(f"profile of steps {first}-{step if step is not None else 'end'} written to {trace}; "
                 f"top operators by self time:\n{table}")
        self.tb.text("profile/top_operators", table, step if step is not None else first)
