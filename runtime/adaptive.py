"""One rank's side of an adaptive run (``--adaptive``): report, and obey.

After every step all ranks exchange their compute seconds, and rank 0 the number of the
newest command in the control directory (one all-gather of four numbers per rank: those,
the step time and the process id, which the first step's ``started`` event records so
that the workflow can tell which rank stopped answering). Rank 0
feeds the compute times to the monitor (runtime.monitor) and reports what it finds: one
log line, one record in metrics.jsonl and one in control/events.jsonl. Then every rank
obeys the commands it has not obeyed yet, in order (runtime.control):
- ``shares``: the plan with new shares (same stages, groups, micro-batches, global
  batch) takes over before the next step: this rank's slice of each micro-batch, whom
  it receives activations from and sends them to, and the predictions the monitor reads
  change; parameters, gradient buckets and optimizer state stay as they are;
- ``restart``: every rank saves a checkpoint at this step and the launch ends; the
  workflow relaunches the plan it chose, which resumes from that checkpoint
  (runtime.reshard);
- ``note``: nothing changes.
Every command's decision record is logged by rank 0 as it is obeyed.

Decides nothing: what to do about a straggler is the workflow's (workflows.adaptive).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from hetalloc.errors import SpecError
from hetalloc.plan import Plan, plan_from_dict

from . import control
from .control import same_layout
from .metrics import StepTimes, predicted_by_device
from .monitor import MonitorConfig, StragglerMonitor
from .plans import describe
from .rankmap import rank_map

if TYPE_CHECKING:
    from .metrics import MetricsWriter
    from .train import Trainer


def predicted_compute(plan: Plan, devices: list[str]) -> list[float]:
    """Predicted compute seconds per step of each rank's device (its 2M ops)."""
    from hetalloc.plan import plan_context
    cluster, cg = plan_context(plan)
    pred = predicted_by_device(plan, cluster, cg)
    return [pred[d]["compute_s"] for d in devices]


class AdaptiveRank:
    """Built by the Trainer when cfg.adaptive; ``after_step`` once per step."""

    def __init__(self, trainer: "Trainer"):
        self.t = trainer
        cfg = trainer.cfg
        self.dir = Path(cfg.control_dir or Path(cfg.out_dir) / "control")
        self.rank = trainer.rank
        self.devices = list(rank_map(trainer.plan, trainer.cluster).devices)
        self.monitor = StragglerMonitor(
            MonitorConfig(threshold=cfg.straggler_threshold, consecutive=cfg.straggler_steps),
            self.devices, predicted_compute(trainer.plan, self.devices), 2 * trainer.plan.num_microbatches)
        self.obeyed: int | None = None
        """The last command obeyed (None until the first step: earlier ones are history)."""
        self.writer: MetricsWriter | None = None

    def _report(self, record: dict[str, Any], line: str) -> None:
        """Rank 0: one log line, one record in metrics.jsonl and one in events.jsonl."""
        if self.rank != 0:
            return
        print(line, flush=True)
        if self.writer is not None:
            self.writer.write_record(record)
        control.append_event(self.dir, record)

    def started(self, step: int, step_s: float, pids: list[int]) -> None:
        if self.rank == 0:
            control.append_event(self.dir, {"event": "started", "step": step, "time": time.time() - step_s,
                                            "first_step_s": step_s, "world_size": len(self.devices),
                                            "layout": describe(self.t.plan), "pids": pids})

    def checkpointed(self, step: int, save_s: float) -> None:
        if self.rank == 0:
            control.append_event(self.dir, {"event": "checkpoint", "step": step, "save_s": save_s,
                                            "time": time.time()})

    def after_step(self, step: int, times: StepTimes) -> bool:
        """Exchange, monitor, obey; True when this launch must stop here (a restart)."""
        newest = control.newest_command(self.dir) if self.rank == 0 else 0
        mine = torch.tensor([times.compute_s, float(newest), times.step_s, float(os.getpid())], dtype=torch.float64)
        everyone = [torch.zeros_like(mine) for _ in self.devices]
        dist.all_gather(everyone, mine)
        computes = [float(x[0]) for x in everyone]
        newest = int(everyone[0][1])
        if self.obeyed is None:
            self.obeyed = newest
            self.started(step, times.step_s, [int(x[3]) for x in everyone])
        if self.rank == 0:
            for ev in self.monitor.observe(step, computes):
                rec = ev.to_record(self.monitor.cfg, self.monitor.levels())
                rec["step_time_s"] = float(everyone[0][2])
                rec["layout"] = describe(self.t.plan)
                self._report(rec, ev.line())
        stop = False
        while self.obeyed < newest and not stop:
            seq = self.obeyed + 1
            cmd = control.read_command(self.dir, seq)
            self.obeyed = seq
            stop = self._obey(step, cmd)
        return stop

    def _obey(self, step: int, cmd: dict[str, Any]) -> bool:
        decision = {**cmd["decision"], "event": "decision", "step": step, "seq": cmd["seq"], "command": cmd["kind"]}
        where = str(control.command_path(self.dir, cmd["seq"]))
        if cmd["kind"] == "shares":
            plan = plan_from_dict(cmd["plan"], where)
            why = same_layout(self.t.plan, plan)
            if why:
                raise SpecError(where, "plan", f"a 'shares' command must keep the stages and groups: {why}",
                                "the workflow sends other layouts as 'restart'")
            self.t.switch_shares(plan)
            self.monitor.set_predicted(predicted_compute(plan, self.devices))
            self._report(decision, control.decision_line(decision))
            return False
        self._report(decision, control.decision_line(decision))
        if cmd["kind"] == "restart":
            if self.t.last_saved != step:
                self.t.save_checkpoint(step)
            if self.rank == 0:
                control.append_event(self.dir, {"event": "stopped", "step": step, "seq": cmd["seq"],
                                                "time": time.time()})
            return True
        return False


def switched_executor(executor, role):
    """The pipeline executor of the same stage with a new role (new shares, new peers)."""
    return dataclasses.replace(executor, role=role)
