"""Adaptive runs: watch a training run, and when a device's speed or the number of devices
changes, move the work (``hetalloc run --adaptive``).

The runtime reports and obeys (runtime.adaptive, through runtime.control); this module
decides, cheapest first:
1. a rank is reported slower or faster than its plan predicts (runtime.monitor): the
   measured factors go into a copy of the plan's cluster and cost graph
   (simulator.speeds), and the plan's micro-batch shares are re-balanced for them
   (workflows.rebalance). When the simulator predicts a step at least ``min_gain``
   shorter, the runtime switches between two steps (command ``shares``, no restart);
2. with policy ``replan``, the allocator then plans afresh for the measured speeds
   (``allocator.make_plan``). The switch (checkpoint, restart, warm-up) is made when the
   predicted gain over the horizon (``horizon_steps``, at most the steps left: the
   relative gain the simulator predicts times the measured step time) exceeds its
   measured cost (command ``restart``; the relaunch resumes from that checkpoint under
   the new plan, runtime.reshard);
3. a rank lost: its process killed by a signal (runtime.torchrun reports it), or a
   rank that stops answering: no step for ``stall_timeout_s`` while its process is
   stopped, gone or a zombie (the ranks' process ids come with the first step; a
   stopped rank is then killed, so that torchrun ends the others). The allocator plans
   for the devices that remain and the run continues from the last checkpoint. A run
   that stalls with every rank alive is ended with an error.
A report that changes no measured speed (a rank reported faster than its calibrated
speed is taken to be at speed) leads to no decision. Every decision (what triggered
it, the predicted step times, the gain against the switch cost, what was done and why)
is one log line and one record in metrics.jsonl
(``"event": "decision"``). The same ``decide_shares`` / ``decide_replan`` /
``decide_lost`` drive simulated episodes (workflows.episode).

The measured switch cost: the first launch's start-up (launch to its first step) plus
its first step's excess over the steady step time, plus saving (and, as much again,
loading) a checkpoint; after a restart, that restart's start-up. Never imports torch
(the runs are torchrun subprocesses).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from allocator import make_plan
from hetalloc.checks import output_dir
from hetalloc.cluster import Cluster
from hetalloc.costgraph import CostGraph
from hetalloc.errors import InfeasibleError, SpecError
from hetalloc.fileio import atomic_write_json
from hetalloc.plan import Plan, plan_context
from runtime import control
from runtime.control import same_layout
from runtime.launch import RunFailed, check_run, local_command, local_env, train_args
from runtime.plans import describe
from runtime.rankmap import rank_map
from simulator import simulate
from simulator.speeds import SAME, in_context, speed_case

from .rebalance import rebalance_shares

POLICIES = ("none", "shares", "replan")
POLL_S = 0.05
"""How often the live controller reads the runtime's events (a report waits half of it
on average before it is decided on)."""


@dataclass(kw_only=True, slots=True)
class AdaptOptions:
    policy: str = "replan"
    """'none' (report only), 'shares' (re-balance shares), 'replan' (shares, then a full
    re-plan when it pays)."""
    horizon_steps: int = 200
    """Steps over which a re-plan's predicted gain must exceed the switch cost (at most
    the steps left)."""
    min_gain: float = 0.05
    """A shares change is made when predicted to shorten the step by this fraction."""
    switch_cost_s: float | None = None
    """Cost of a restart under another plan, seconds; None: measured."""
    planner: str = "ilp"
    """'ilp' (hetalloc's planner) or a baseline name, for re-plans."""
    time_limit_s: float = 10.0
    """Planner time limit per re-plan, seconds."""
    straggler_threshold: float = 0.10
    """The runtime monitor's threshold (runtime.monitor)."""
    straggler_steps: int = 3
    """The runtime monitor's consecutive steps."""
    stall_timeout_s: float | None = None
    """No step for this long (after the first) is a stall; None: 30 median steps, at
    least 60 s."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got '{self.policy}'.")
        if self.horizon_steps < 1:
            raise ValueError("horizon_steps must be at least 1.")
        if not 0.0 <= self.min_gain < 1.0:
            raise ValueError("min_gain must be in [0, 1).")
        if self.switch_cost_s is not None and self.switch_cost_s < 0:
            raise ValueError("switch_cost_s must be >= 0.")
        if self.time_limit_s <= 0:
            raise ValueError("time_limit_s must be greater than 0.")
        if self.stall_timeout_s is not None and self.stall_timeout_s <= 0:
            raise ValueError("stall_timeout_s must be greater than 0.")


@dataclass
class Beliefs:
    """What the workflow knows: the (cluster, cost graph) the run was planned on, each
    device's measured compute factor against it, and the devices lost."""

    cluster: Cluster
    cg: CostGraph
    factors: dict[str, float] = field(default_factory=dict)
    lost: set[str] = field(default_factory=set)

    def case(self) -> tuple[Cluster, CostGraph]:
        return speed_case(self.cluster, self.cg, self.factors, frozenset(self.lost))


@dataclass
class Decision:
    kind: str
    """'shares', 'restart' or 'note' (runtime.control)."""
    record: dict[str, Any]
    plan: Plan | None = None


def take_reports(beliefs: Beliefs, reports: list[dict[str, Any]], embedded: dict[str, float]) -> bool:
    """The monitor's reports (levels against a plan whose context embeds the factors
    `embedded`) become the measured factors against the base. A device is never taken
    to be faster than its calibrated speed: a rank measured faster than that is either
    noise or its peers leaving it more of a shared host; it is back at speed (factor 1).
    Returns whether any factor changed (by more than 2 %): else there is nothing to decide."""
    changed = False
    for e in reports:
        new = max(1.0, embedded.get(e["device"], 1.0) * e["level"])
        old = beliefs.factors.get(e["device"], 1.0)
        changed = changed or abs(new / old - 1.0) > SAME
        beliefs.factors[e["device"]] = new
    return changed


def _sim(plan: Plan, cluster: Cluster, cg: CostGraph) -> float:
    return simulate(plan, cluster, cg, compare=False).iteration_time_s


def _record(trigger: str, action: str, why: str, **kw: Any) -> dict[str, Any]:
    return {"trigger": trigger, "action": action, "why": why, **kw}


def decide_shares(plan: Plan, beliefs: Beliefs, opts: AdaptOptions, trigger: str) -> Decision:
    """Step 1 (module doc): re-balance the shares for the measured speeds, or not."""
    if opts.policy == "none":
        return Decision("note", _record(trigger, "none", "policy none: report only"))
    cluster, cg = beliefs.case()
    current = in_context(plan, cluster, cg)
    cur_s = _sim(current, cluster, cg)
    try:
        new = rebalance_shares(plan, cluster, cg)
    except InfeasibleError as e:
        return Decision("note", _record(trigger, "none", f"no re-balanced shares: {e}",
                                        predicted_s={"current": cur_s}))
    new_s = _sim(new, cluster, cg)
    pred = {"current": cur_s, "shares": new_s}
    layout = describe(new)
    if describe(plan) == layout:
        return Decision("note", _record(trigger, "none", "the shares are already balanced for the measured speeds",
                                        predicted_s=pred))
    if new_s > cur_s * (1.0 - opts.min_gain):
        return Decision("note", _record(trigger, "none", f"re-balanced shares ({layout}) predicted "
                                        f"{100 * (1 - new_s / cur_s):.1f}% faster, below {100 * opts.min_gain:g}%",
                                        predicted_s=pred))
    return Decision("shares", _record(trigger, "shares", f"{layout}: predicted {100 * (1 - new_s / cur_s):.1f}% "
                                      "faster, switched between two steps", predicted_s=pred, layout=layout), new)


def replan_for(beliefs: Beliefs, like: Plan, opts: AdaptOptions) -> tuple[Plan, Cluster, CostGraph]:
    """A new plan for the measured case (allocator.make_plan), with `like`'s batch,
    schedule and optimizer."""
    cluster, cg = beliefs.case()
    baseline = None if opts.planner == "ilp" else opts.planner
    new = make_plan(cluster, cg, like.global_batch, schedule=like.schedule, optimizer=like.optimizer,
                    time_limit=opts.time_limit_s, baseline=baseline, compare_baselines=baseline is None)
    return new, cluster, cg


def decide_replan(plan: Plan, beliefs: Beliefs, opts: AdaptOptions, trigger: str, *, steps_left: int,
                  step_time_s: float, switch_cost_s: float) -> Decision:
    """Step 2 (module doc): re-plan and restart when the gain over the horizon exceeds
    the switch cost."""
    if opts.policy != "replan":
        return Decision("note", _record(trigger, "none", f"policy {opts.policy}: no re-plan"))
    horizon = max(0, min(opts.horizon_steps, steps_left))
    if horizon * step_time_s <= switch_cost_s:  # not even a plan that took no time at all would pay
        return Decision("note", _record(trigger, "none", f"the {horizon} steps left in the horizon take "
                                        f"{horizon * step_time_s:.3g} s, less than the switch costs: no re-plan",
                                        gain_s=horizon * step_time_s, switch_cost_s=switch_cost_s,
                                        horizon_steps=horizon))
    try:
        new, cluster, cg = replan_for(beliefs, plan, opts)
    except (InfeasibleError, SpecError) as e:
        return Decision("note", _record(trigger, "none", f"no re-plan: {e}"))
    keep_s = _sim(in_context(plan, cluster, cg), cluster, cg)
    new_s = _sim(new, cluster, cg)
    gain_s = max(0.0, (keep_s - new_s) / keep_s) * step_time_s * horizon
    pred = {"current": keep_s, "replan": new_s}
    common = dict(predicted_s=pred, gain_s=gain_s, switch_cost_s=switch_cost_s, horizon_steps=horizon,
                  layout=describe(new))
    if same_layout(plan, new):  # other stages or groups: a restart
        if gain_s > switch_cost_s:
            return Decision("restart", _record(trigger, "replan", f"{describe(new)}: the gain exceeds the cost of "
                                               "the switch; checkpoint, restart, resume", **common), new)
        return Decision("note", _record(trigger, "none", f"re-plan {describe(new)} would gain less than the switch "
                                        "costs", **common))
    if new_s < keep_s * (1.0 - opts.min_gain) and describe(new) != describe(plan):
        return Decision("shares", _record(trigger, "shares", f"the re-plan keeps the stages and groups: its shares "
                                          f"({describe(new)}) switched between two steps", **common), new)
    return Decision("note", _record(trigger, "none", "the re-plan is the current layout", **common))


def decide_lost(plan: Plan, beliefs: Beliefs, opts: AdaptOptions, trigger: str) -> Decision:
    """A lost device (beliefs.lost): plan for the devices that remain; the run goes on
    from its last checkpoint."""
    if opts.policy == "none":
        return Decision("note", _record(trigger, "stop", "policy none: a lost device ends the run"))
    new, cluster, cg = replan_for(beliefs, plan, opts)
    return Decision("restart", _record(trigger, "replan", f"{describe(new)} on the {len(new.device_ids())} devices "
                                       "left; resume from the last checkpoint",
                                       predicted_s={"replan": _sim(new, cluster, cg)}, layout=describe(new)), new)


# ---- the live controller -----------------------------------------------------------------

def lost_ranks(failures_file: Path) -> list[int]:
    """Ranks killed by a signal other than the SIGTERM torchrun sends the others
    (runtime.torchrun's report)."""
    try:
        d = json.loads(failures_file.read_text())
    except (OSError, ValueError):
        return []
    return sorted(f["rank"] for f in d.get("failures", [])
                  if isinstance(f.get("exitcode"), int) and f["exitcode"] < 0 and -f["exitcode"] != signal.SIGTERM)


def not_answering(pids: list[int]) -> list[int]:
    """Indices of the processes that cannot answer: stopped (a SIGSTOP, a debugger),
    zombies, or gone (Linux /proc; elsewhere only 'gone' is seen)."""
    out = []
    for k, pid in enumerate(pids):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            state = stat[stat.rindex(")") + 2]
        except FileNotFoundError:
            out.append(k)
            continue
        except OSError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                out.append(k)
            continue
        if state in "TtZX":
            out.append(k)
    return out


def _signal_of(failures_file: Path, rank: int) -> str:
    d = json.loads(failures_file.read_text())
    return next((f.get("signal") or f"exit code {f['exitcode']}") for f in d["failures"] if f["rank"] == rank)


def device_keyed(items: list[str] | None, devices: tuple[str, ...]) -> list[str]:
    """--slowdown items keyed by rank become keyed by device id (of the first plan), so
    they follow the device whatever rank a later plan gives it."""
    out = []
    for item in items or []:
        key, sep, rest = item.partition("=")
        if sep and key.isdigit() and int(key) < len(devices):
            item = f"{devices[int(key)]}={rest}"
        out.append(item)
    return out


def _step_records(out_dir: Path) -> list[dict[str, Any]]:
    """The step records of metrics.jsonl so far (rank 0 appends one per step)."""
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    recs = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and "event" not in r and "step_time_s" in r:
            recs.append(r)
    return recs


def _step_times(out_dir: Path, last: int = 5) -> list[float]:
    return [r["step_time_s"] for r in _step_records(out_dir)[-last:]]


@dataclass
class Launch:
    plan_path: str
    world_size: int
    first_step: int
    started_s: float
    returncode: int | None = None
    lost: list[str] = field(default_factory=list)


@dataclass
class Controller:
    """The state of one adaptive run (``run_adaptive``)."""

    plan: Plan
    beliefs: Beliefs
    opts: AdaptOptions
    out: Path
    control_dir: Path
    steps: int
    say: Callable[[str], None]
    seq: int = 0
    obeyed: int = 0
    restart: Plan | None = None
    startup_s: float | None = None
    first_step_s: float = 0.0
    pids: list[int] = field(default_factory=list)
    """The running launch's rank process ids (from its first step)."""
    silenced: dict[int, str] = field(default_factory=dict)
    stall_s: float = 0.0
    """Ranks of the running launch killed for not answering, and why."""
    save_s: float = 0.0
    decisions: list[dict[str, Any]] = field(default_factory=list)
    unobeyed: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Commands of the running launch not obeyed yet, by number."""
    plan_factors: dict[str, dict[str, float]] = field(default_factory=dict)
    """layout (runtime.plans.describe) -> the factors its context embeds (what the
    monitor's levels are read against)."""
    last_step: int = 0
    last_checkpoint: int = 0
    """The newest checkpoint step (the runtime reports each after every rank saved it)."""

    def switch_cost(self) -> float:
        """Module doc: start-up, the first step's excess, saving and loading a checkpoint."""
        if self.opts.switch_cost_s is not None:
            return self.opts.switch_cost_s
        steady = _step_times(self.out)
        excess = max(0.0, self.first_step_s - statistics.median(steady)) if steady else 0.0
        return (self.startup_s or 0.0) + excess + 2 * self.save_s

    def adopt(self, plan: Plan) -> None:
        """`plan` becomes the current one; its context embeds the current factors."""
        self.plan = plan
        self.plan_factors[describe(plan)] = dict(self.beliefs.factors)

    def command(self, d: Decision, step: int) -> None:
        self.seq += 1
        rec = {**d.record, "decided_at_step": step}
        self.decisions.append(rec)
        self.unobeyed[self.seq] = rec
        control.write_command(self.control_dir, self.seq, d.kind, rec, d.plan.to_dict() if d.plan else None)
        if d.kind == "restart":
            self.restart = d.plan
        elif d.kind == "shares":
            self.adopt(d.plan)  # type: ignore[arg-type]

    def stalled(self, timeout_s: float | None) -> bool:
        """No step record for the stall timeout, once the launch has made its first step."""
        path = self.out / "metrics.jsonl"
        if not self.pids or not path.exists():
            return False
        if timeout_s is None:
            times = _step_times(self.out)
            timeout_s = max(60.0, 30 * statistics.median(times)) if times else 60.0
        self.stall_s = timeout_s
        return time.time() - path.stat().st_mtime > timeout_s

    def launch_ended(self) -> None:
        """Commands the launch ended before obeying (decided after its last step, or as it
        failed) are logged as such: no runtime will log them."""
        for seq, d in sorted(self.unobeyed.items()):
            rec = {"event": "decision", "step": d["decided_at_step"], "seq": seq, **d, "obeyed": False,
                   "why": d["why"] + " (the launch ended before obeying it)"}
            append_record(self.out, rec)
            self.say(control.decision_line(rec))
        self.unobeyed.clear()

    def on_events(self, events: list[dict[str, Any]], launch: Launch) -> None:
        stragglers = []
        for e in events:
            kind = e.get("event")
            if kind == "started":
                self.startup_s = max(0.0, e["time"] - launch.started_s)
                self.first_step_s = e["first_step_s"]
                self.pids = list(e.get("pids", []))
            elif kind == "checkpoint":
                self.save_s = e["save_s"]
                self.last_checkpoint = e["step"]
            elif kind == "decision":
                self.obeyed = max(self.obeyed, e.get("seq", 0))
                self.unobeyed.pop(e.get("seq", 0), None)
            elif kind == "straggler":
                stragglers.append(e)
            if isinstance(e.get("step"), int):
                self.last_step = max(self.last_step, e["step"])
        if not stragglers or self.restart is not None:
            return
        layout = describe(self.plan)
        changed = False
        known = []
        for e in stragglers:  # a report about a layout switched from since is read against that layout
            embedded = self.plan_factors.get(e.get("layout", layout))
            if embedded is not None:
                changed = take_reports(self.beliefs, [e], embedded) or changed
                known.append(e)
        if not changed:
            return  # no measured speed changed (a rank faster than calibrated): nothing to decide
        stragglers = known
        step = max(e["step"] for e in stragglers)
        trigger = "; ".join(f"rank {e['rank']} ({e['device']}) {e['direction']}, {e['level']:.2f}x predicted"
                            for e in stragglers)
        self.command(decide_shares(self.plan, self.beliefs, self.opts, trigger), step)
        if self.opts.policy == "replan":
            times = _step_times(self.out)
            step_s = statistics.median(times) if times else 0.0
            d2 = decide_replan(self.plan, self.beliefs, self.opts, trigger, steps_left=self.steps - step,
                               step_time_s=step_s, switch_cost_s=self.switch_cost())
            self.command(d2, step)


def append_record(out_dir: Path, record: dict[str, Any]) -> None:
    """A record into metrics.jsonl while no launch runs (the only writer then)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def run_adaptive(plan_path: str | Path, *, steps: int, out_dir: str | Path, checkpoint_dir: str | Path | None = None,
                 checkpoint_every: int = 0, resume: bool = False, slowdown: list[str] | None = None,
                 model: str | None = None, extra: list[str] | None = None, first_launch_extra: list[str] | None = None,
                 opts: AdaptOptions | None = None, say: Callable[[str], None] = print, capture: bool = False,
                 max_launches: int = 8, timeout_s: float | None = None) -> dict[str, Any]:
    """Train `plan_path` for `steps` steps on this machine with adaptation (module doc);
    returns summary.json's content plus the decisions and launches. first_launch_extra:
    runtime arguments for the first launch only (test aids such as --fail-at-step).
    Checks everything runtime.launch.check_run does first (SpecError, nothing launched)."""
    opts = opts or AdaptOptions()
    out = Path(out_dir)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else out / "checkpoints"
    plan, rm = check_run(plan_path, steps=steps, slowdown=slowdown, checkpoint_dir=ckpt,
                         checkpoint_every=checkpoint_every, resume=resume, model=model)
    if len(rm.nodes) > 1:
        raise SpecError(str(plan_path), "replicas", f"uses {len(rm.nodes)} nodes",
                        "adaptive runs start on one machine; run multi-node plans without --adaptive")
    cluster, cg = plan_context(plan, str(plan_path))
    output_dir(out, "--out")
    output_dir(ckpt, "--checkpoint-dir")
    extra = list(extra or []) + (["--model", model] if model else [])
    control_dir = out / "control"
    if not resume:
        for p in list(control_dir.glob("command_*.json")) + [control_dir / control.EVENTS]:
            p.unlink(missing_ok=True)
    (out / "plans").mkdir(parents=True, exist_ok=True)
    ctl = Controller(plan, Beliefs(cluster, cg), opts, out, control_dir, steps, say,
                     seq=control.newest_command(control_dir))
    ctl.obeyed = ctl.seq
    ctl.adopt(plan)
    slowdown = device_keyed(slowdown, rm.devices)
    monitor_args = ["--adaptive", "--control-dir", str(control_dir), "--straggler-threshold",
                    str(opts.straggler_threshold), "--straggler-steps", str(opts.straggler_steps)]
    reader = control.EventReader(control_dir)
    for e in reader.read():  # earlier launches' events (when resuming) are history
        if e.get("event") == "checkpoint":
            ctl.last_checkpoint = e["step"]
    launches: list[Launch] = []
    outputs: list[str] = []
    current_path = str(plan_path)
    if checkpoint_every == 0:
        say("adapt: note: no --checkpoint-every: a lost rank restarts the run from step 1")
    while True:
        if len(launches) >= max_launches:
            raise RunFailed(f"training failed: {max_launches} launches without finishing")
        failures = out / f"failures.{len(launches)}.json"
        failures.unlink(missing_ok=True)
        args = train_args(current_path, steps=steps, slowdown=slowdown, out_dir=out, checkpoint_dir=ckpt,
                          checkpoint_every=checkpoint_every, resume=resume or bool(launches),
                          extra=list(extra or []) + monitor_args + (list(first_launch_extra or []) if not launches
                                                                    else []))
        world = len(ctl.plan.device_ids())
        env = local_env(world)
        env["HETALLOC_FAILURES"] = str(failures)
        launch = Launch(current_path, world, ctl.last_step + 1, time.time())
        launches.append(launch)
        proc = subprocess.Popen(local_command(world, args), env=env, text=True,
                                stdout=subprocess.PIPE if capture else None,
                                stderr=subprocess.STDOUT if capture else None)
        ctl.restart = None
        deadline = None if timeout_s is None else time.time() + timeout_s
        chunks: list[str] = []
        if capture:
            import threading
            t = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)  # type: ignore[union-attr]
            t.start()
        ctl.pids, ctl.silenced = [], {}
        while proc.poll() is None:
            ctl.on_events(reader.read(), launch)
            if deadline is not None and time.time() > deadline:
                proc.kill()
                raise RunFailed(f"training failed: no end after {timeout_s:g} s")
            if ctl.stalled(opts.stall_timeout_s):
                silent = not_answering(ctl.pids)
                if not silent:
                    proc.kill()
                    raise RunFailed("training failed: no step for the stall timeout while every rank is alive "
                                    "(a deadlock?); the last checkpoint is kept")
                for k in silent:  # torchrun sees it killed by a signal: lost, below
                    ctl.silenced[k] = f"stopped answering: no step for {ctl.stall_s:.3g} s, its process stopped or gone"
                    say(f"adapt: rank {k} stopped answering (process {ctl.pids[k]}); killing it")
                    try:
                        os.kill(ctl.pids[k], signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                ctl.pids = []
            time.sleep(POLL_S)
        if capture:
            t.join()
            outputs.append("".join(chunks))
        ctl.on_events(reader.read(), launch)
        ctl.launch_ended()
        launch.returncode = proc.returncode
        if proc.returncode == 0 and ctl.restart is not None:
            new = ctl.restart
            current_path = str(out / "plans" / f"plan_{ctl.seq:05d}.json")
            new.save(current_path)
            ctl.adopt(new)
            say(f"adapt: relaunching {len(new.device_ids())} ranks under {describe(new)}")
            continue
        if proc.returncode == 0:
            break
        lost = lost_ranks(failures)
        if not lost:
            why = f"torchrun exited with code {proc.returncode}"
            raise RunFailed(f"training failed: {why}" + ("" if capture else " (output above)"))
        devices = rank_map(ctl.plan, plan_context(ctl.plan)[0]).devices
        launch.lost = [devices[r] for r in lost]
        ctl.beliefs.lost |= set(launch.lost)
        trigger = ", ".join(f"rank {r} ({devices[r]}) lost ("
                            + (ctl.silenced.get(r) or f"killed by {_signal_of(failures, r)}") + ")" for r in lost)
        d = decide_lost(ctl.plan, ctl.beliefs, opts, trigger)
        resume_step = ctl.last_checkpoint
        done = max([r["step"] for r in _step_records(out)] + [ctl.last_step])
        rec = {"event": "decision", "step": done, "resume_step": resume_step, **d.record}
        ctl.decisions.append(rec)
        append_record(out, rec)
        say(control.decision_line(rec))
        if d.kind != "restart":
            raise RunFailed(f"training failed: {trigger} (policy none)")
        ctl.adopt(d.plan)  # type: ignore[arg-type]
        current_path = str(out / "plans" / f"lost_{len(launches):02d}.json")
        ctl.plan.save(current_path)
        ctl.last_step = resume_step
    summary = json.loads((out / "summary.json").read_text())
    summary["decisions"] = ctl.decisions
    summary["launches"] = [{"plan": l.plan_path, "world_size": l.world_size, "first_step": l.first_step,
                            "returncode": l.returncode, "lost": l.lost} for l in launches]
    if capture:
        summary["output"] = "\n".join(outputs)
    atomic_write_json(out / "adaptive.json", {k: v for k, v in summary.items() if k != "output"})
    return summary
