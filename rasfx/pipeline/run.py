"""One pipeline call, from the first transformer call after ``set_timesteps`` to the last step.

:class:`Run` holds what the controller (:mod:`rasfx.pipeline.controller`) decides and records
during one run: the step kinds and the plan, the sampler, the per-step skip decision, which steps
bypass rasfx (the model's own forward), and the step records that :mod:`rasfx.pipeline.reporting`
turns into ``RunStats``. :class:`StepTimer` times steps without a per-step synchronisation.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Optional

import torch

from ..config import RASConfig
from ..errors import UsageError
from ..sampler import RegionSampler, StepPlan, step_kinds
from ..steps import StepSparsity


class StepTimer:
    """Wall time of a span: CUDA events on a GPU (read after the run, no synchronisation per step),
    ``time.perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.start: Any = None
        self.end: Any = None

    def begin(self) -> None:
        if self.cuda:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()

    def finish(self) -> None:
        if self.cuda:
            self.end = torch.cuda.Event(enable_timing=True)
            self.end.record()
        else:
            self.end = time.perf_counter()

    def seconds(self) -> float:
        if self.start is None or self.end is None:
            return 0.0
        if self.cuda:
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        return self.end - self.start


class Run:
    """One pipeline call: from the first transformer call after ``set_timesteps`` to the last step."""

    def __init__(self, config: RASConfig, num_steps: int, work_before: dict, ran_before: Counter) -> None:
        """``work_before`` / ``ran_before``: rasfx's work and the runners' calls so far (summed
        over the transformed models), subtracted from the counts at the end of the run."""
        self.config = config
        self.num_steps = num_steps
        self.kinds = step_kinds(config, num_steps)  # raises on explicit resets out of range
        # No RAS step can happen: the transformer runs unmodified (no capture, no caches).
        self.all_dense = config.ratio >= 1.0 or not any(self.kinds)
        self.plan: Optional[StepPlan] = None
        self.sampler: Optional[RegionSampler] = None
        self.token_map: Optional[torch.Tensor] = None
        self.num_tokens: Optional[int] = None
        self.fallback: Optional[str] = None
        # Step sparsity (skipped steps, extrapolated noise): None when the config asks for none.
        self.steps = StepSparsity(config, self.kinds) if config.step_sparsity else None
        self.outputs: dict[tuple[str, str], Any] = {}  # last computed output per slot (returned on skips)
        self.step = 0
        self.finished = False
        # (step, dense, active tokens, timer, skipped: bool or a 0-dim device tensor)
        self.records: list[tuple[int, bool, int, StepTimer, Any]] = []
        self.unpack_call: Optional[tuple[tuple, dict]] = None  # args of the pipeline's _unpack_latents
        self.notes: list[str] = []
        self.work_before = work_before  # rasfx's work (exports, graph captures, compiles) so far
        self.work: Optional[dict] = None  # ... done during this run, once it finished
        self.mode: Optional[str] = None  # the execution mode the runner resolves to (routes dense steps)
        self.ran_before = ran_before  # what the runners ran so far: (graph, mode) -> calls
        self.ran: Optional[Counter] = None  # ... during this run, once it finished
        self.original_forwards = 0  # transformer calls that ran the model's own forward
        self.capture: Any = None  # the PlannedCapture the plan was built from (for the FLOP model)
        self.run_timer: Optional[StepTimer] = None  # first transformer call -> last scheduler step
        self.forward_timers: list[StepTimer] = []  # one per transformer call
        self.parallel_records: Optional[list] = None  # context parallelism: this run's forwards (rasfx.parallel)
        self._reset_step()

    def advance(self) -> None:
        """The scheduler stepped: the next step begins."""
        self.step += 1
        self._reset_step()

    def _reset_step(self) -> None:
        self.forwards = 0
        self.step_dense = True
        self.step_ras_forwards = 0
        self.calls: dict[tuple[str, str], int] = {}
        self.timer: Optional[StepTimer] = None
        self.skip: Any = None  # this step skipped: None (not decided yet), a bool, or a 0-dim device tensor
        self.step_work = False  # a forward of this step ran the model

    def skip_decision(self, step: int) -> Any:
        """Whether ``step`` is skipped, decided once at its first transformer call: a scheduled skip
        (``True``), the adaptive rule's decision (a 0-dim device tensor, or read on the host with
        ``skip_sync``), else ``False``."""
        if self.skip is None:
            steps = self.steps
            skip: Any = False
            if steps is not None:
                if steps.scheduled_skip(step):
                    skip = True
                elif (decision := steps.decision(step)) is not None:
                    skip = bool(decision) if self.config.skip_sync else decision  # skip_sync: one host read
            self.skip = skip
        return self.skip

    def bypass(self, step: int, eager: bool) -> bool:
        """Whether ``step`` runs the original forward and writes no caches: every step of an
        all-dense run; a dense step after which no RAS step follows; with an ``eager`` runner
        also a dense step whose next step is dense (the next one rewrites every cache)."""
        if self.all_dense or (self.fallback is not None and self.plan is not None):
            return True
        if self.plan is None or not self.plan.is_dense(step):
            return False
        return not self.plan.ras_step_after(step) or (eager and not self.plan.needs_cache_after(step))


def num_steps(scheduler: Any) -> int:
    """Transformer evaluations of the run the scheduler was set up for: ``len(timesteps)`` minus
    the scheduler's begin index (one ``step`` per evaluation)."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None:
        raise UsageError(
            "rasfx: the scheduler has no timesteps; call scheduler.set_timesteps(...) before the "
            "first transformer call of a run"
        )
    begin = getattr(scheduler, "begin_index", None)
    n = len(timesteps) - (int(begin) if isinstance(begin, int) else 0)
    return max(1, n)
