"""Benchmark: the fair GPU scheduler against today's FIFO pool, in a discrete-event simulation.

    python bench/scheduler_sim.py [--gpus 8] [--studio 190] [--corp 10] [--corp-at 60] [--json]

Virtual time, real seconds: no Ray, no GPUs, no sleeping. The scheduler under test is the real
:class:`cluster.scheduler.FairScheduler`, driven through the calls the coordinator makes (submit,
next_assignment, complete); its clock is the simulation's. Every call is timed with
``time.perf_counter``, so the overhead figures are real CPU time on this machine.

Workload (the issue's): ``--gpus`` GPUs; a studio batch of ``--studio`` persons submitted at t=0 and a
corporate batch of ``--corp`` persons at ``--corp-at`` s, each person = train (≈100 s) then generate
(40 images ≈ 26 s) on one GPU, each duration drawn ±``--jitter`` around those (same draws for both
policies). The two tenants use different base models by default (``--corp-model``), so placement
matters: a worker that must load another base model pays ``--load-s`` seconds on top (an assumed
figure for an SDXL-class pipeline from local disk; the first load on each empty GPU is paid too).
CPU stages (ingest, package) are not modelled.

Policies, same run, same draws:
- ``fair``: :class:`cluster.scheduler.FairScheduler` (equal weights unless ``--corp-weight``).
- ``fifo``: what ``cluster.actors.RayWorkerPool`` does today — one asyncio.Queue of idle workers; each
  stage request takes the worker idle longest, requests served in arrival order.

Figures:
- GPU utilisation = busy seconds (stages + model loads) / (GPUs × time until the last stage ends). Goal ≥ 90%.
- Decision overhead: perf_counter time of each ``next_assignment`` call that returned a task (mean,
  p99, max). Goal ≤ 5 ms. Also all scheduler calls per task (submit + decide + complete).
- Fair share while both tenants have persons outstanding: the corporate tenant's share of GPU time,
  against its entitlement (weighted max-min share of the GPUs, capped by how many of its persons are
  outstanding, integrated over the same interval); error = |received − entitled| in share points.
- The corporate batch: time to its first finished person (first headshots) and to its last, from
  its submission; the studio batch's completion; model loads.
- ETA (fair only): the scheduler's ``eta_seconds`` for each batch right after it was submitted,
  against the simulated actual.

No ``--ray`` mode: driving real Ray actors would need the coordinator integration this module does
not own, and fake GPUs on 2 cores would measure Ray's start-up, not scheduling.
"""

from __future__ import annotations

import argparse
import heapq
import json
import platform
import random
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cluster.scheduler import FairScheduler, Task  # noqa: E402

TRAIN_S = 100.0
GENERATE_S = 26.0


@dataclass(frozen=True)
class Person:
    tenant: str
    batch_id: str
    person_id: str
    base_model: str
    submitted_at: float


class NaiveFifoPool:
    """Today's RayWorkerPool as a policy: idle workers in a FIFO queue, requests served in order."""

    def __init__(self) -> None:
        self._idle: deque[str] = deque()
        self._requests: deque[Task] = deque()

    def add_worker(self, worker_id: str) -> None:
        self._idle.append(worker_id)

    def submit(self, task: Task) -> None:
        self._requests.append(task)

    def next_assignment(self) -> tuple[str, Task] | None:
        if self._requests and self._idle:
            return self._idle.popleft(), self._requests.popleft()
        return None

    def complete(self, worker_id: str, task: Task, duration_s: float) -> None:
        self._idle.append(worker_id)

    def eta_seconds(self, tenant: str, batch_id: str) -> float | None:
        return None


@dataclass
class Result:
    policy: str
    makespan_s: float = 0.0
    busy_s: float = 0.0
    load_s: float = 0.0
    loads: int = 0
    switches: int = 0
    decision_s: list[float] = field(default_factory=list)
    empty_calls: int = 0
    scheduler_total_s: float = 0.0
    tasks: int = 0
    first_done: dict[str, float] = field(default_factory=dict)
    last_done: dict[str, float] = field(default_factory=dict)
    eta_at_submit: dict[str, float | None] = field(default_factory=dict)
    received_gpu_s: float = 0.0
    entitled_gpu_s: float = 0.0
    window_s: float = 0.0

    def summary(self, gpus: int, submits: dict[str, float]) -> dict:
        decisions = sorted(self.decision_s)
        capacity = gpus * self.window_s
        row = {
            "policy": self.policy,
            "gpu_utilisation": self.busy_s / (gpus * self.makespan_s),
            "makespan_s": self.makespan_s,
            "model_loads": self.loads, "model_switches": self.switches, "load_s": self.load_s,
            "decisions": len(decisions),
            "decision_mean_us": statistics.fmean(decisions) * 1e6,
            "decision_p99_us": decisions[min(len(decisions) - 1, int(0.99 * len(decisions)))] * 1e6,
            "decision_max_us": decisions[-1] * 1e6,
            "scheduler_per_task_us": self.scheduler_total_s / self.tasks * 1e6,
            "fair_window_s": self.window_s,
            "corp_share_received": self.received_gpu_s / capacity if capacity else None,
            "corp_share_entitled": self.entitled_gpu_s / capacity if capacity else None,
            "fair_share_error_pts": (abs(self.received_gpu_s - self.entitled_gpu_s) / capacity * 100
                                     if capacity else None),
        }
        for batch, submitted in submits.items():
            row[f"{batch}_first_person_s"] = self.first_done[batch] - submitted
            row[f"{batch}_completion_s"] = self.last_done[batch] - submitted
            eta = self.eta_at_submit.get(batch)
            row[f"{batch}_eta_at_submit_s"] = eta
        return row


def water_fill(total: float, weights: dict[str, float], caps: dict[str, float]) -> dict[str, float]:
    """Weighted max-min split of ``total`` (an independent re-implementation, to check the scheduler)."""
    shares, remaining, weight_left = {}, total, sum(weights[name] for name in caps)
    for name in sorted(caps, key=lambda n: caps[n] / weights[n]):
        shares[name] = min(caps[name], remaining * weights[name] / weight_left)
        remaining -= shares[name]
        weight_left -= weights[name]
    return shares


def simulate(policy: str, persons: list[Person], durations: dict[tuple[str, str], float], *, gpus: int,
             load_s: float, weights: dict[str, float]) -> Result:
    now = 0.0
    clock = lambda: now  # noqa: E731 - the scheduler reads the simulation's time
    scheduler = FairScheduler(clock=clock, tenant_weights=weights) if policy == "fair" else NaiveFifoPool()
    result = Result(policy)
    workers = [f"gpu-{index}" for index in range(gpus)]
    for worker in workers:
        scheduler.add_worker(worker)
    resident: dict[str, str | None] = dict.fromkeys(workers)
    running_tenant: dict[str, str] = {}  # worker -> tenant of the stage it runs
    outstanding = {tenant: 0 for tenant in weights}  # persons submitted and not finished
    events: list = []
    sequence = 0

    def push(at: float, kind: str, payload) -> None:
        nonlocal sequence
        sequence += 1
        heapq.heappush(events, (at, sequence, kind, payload))

    for person in persons:
        push(person.submitted_at, "submit", person)

    def task_for(person: Person, stage: str) -> Task:
        return Task(tenant=person.tenant, batch_id=person.batch_id, person_id=person.person_id, stage=stage,
                    base_model=person.base_model, submitted_at=person.submitted_at)

    def timed(call, *args):
        started = time.perf_counter()
        value = call(*args)
        result.scheduler_total_s += time.perf_counter() - started
        return value

    by_key = {(p.tenant, p.batch_id, p.person_id): p for p in persons}
    submitted_batches: set[str] = set()
    while events:
        at = events[0][0]
        # Integrate the fair-share figures over [now, at): the state is constant in between.
        if all(outstanding.values()):
            span = at - now
            caps = {tenant: float(count) for tenant, count in outstanding.items()}
            entitled = water_fill(float(gpus), weights, caps)
            corp_busy = sum(1 for tenant in running_tenant.values() if tenant == "corp")
            result.received_gpu_s += corp_busy * span
            result.entitled_gpu_s += entitled["corp"] * span
            result.window_s += span
        now = at
        new_batches = []
        while events and events[0][0] == now:
            _, _, kind, payload = heapq.heappop(events)
            if kind == "submit":
                outstanding[payload.tenant] += 1
                timed(scheduler.submit, task_for(payload, "train"))
                result.tasks += 1
                if payload.batch_id not in submitted_batches:
                    submitted_batches.add(payload.batch_id)
                    new_batches.append(payload)
            else:
                worker, task, duration = payload
                timed(scheduler.complete, worker, task, duration)
                del running_tenant[worker]
                person = by_key[(task.tenant, task.batch_id, task.person_id)]
                if task.stage == "train":
                    timed(scheduler.submit, task_for(person, "generate"))
                    result.tasks += 1
                else:
                    outstanding[person.tenant] -= 1
                    result.first_done.setdefault(person.batch_id, now)
                    result.last_done[person.batch_id] = now
                    result.makespan_s = now
        while True:
            started = time.perf_counter()
            assignment = scheduler.next_assignment()
            elapsed = time.perf_counter() - started
            result.scheduler_total_s += elapsed
            if assignment is None:
                result.empty_calls += 1
                break
            result.decision_s.append(elapsed)
            worker, task = assignment
            duration = durations[(task.person_id, task.stage)]
            if resident[worker] != task.base_model:
                result.loads += 1
                result.switches += resident[worker] is not None
                result.load_s += load_s
                duration += load_s
                resident[worker] = task.base_model
            result.busy_s += duration
            running_tenant[worker] = task.tenant
            push(now + duration, "done", (worker, task, duration))
        for person in new_batches:
            result.eta_at_submit[person.batch_id] = scheduler.eta_seconds(person.tenant, person.batch_id)
    return result


def build_workload(args) -> tuple[list[Person], dict[tuple[str, str], float]]:
    rng = random.Random(args.seed)
    persons = [Person("studio", "studio", f"s{index:04d}", args.studio_model, 0.0) for index in range(args.studio)]
    persons += [Person("corp", "corp", f"c{index:04d}", args.corp_model, args.corp_at) for index in range(args.corp)]
    durations = {}
    for person in persons:
        for stage, base in (("train", TRAIN_S), ("generate", GENERATE_S)):
            durations[(person.person_id, stage)] = base * rng.uniform(1 - args.jitter, 1 + args.jitter)
    return persons, durations


def scale_probe(*, tenants: int, persons_per_tenant: int, workers: int, rounds: int) -> dict:
    """Decision cost far beyond the issue's size: many tenants, a long queue, many workers, 4 models."""
    now = 0.0
    scheduler = FairScheduler(clock=lambda: now)
    for index in range(workers):
        scheduler.add_worker(f"gpu-{index}")
    for tenant in range(tenants):
        for person in range(persons_per_tenant):
            scheduler.submit(Task(tenant=f"t{tenant}", batch_id="b", person_id=f"p{person}", stage="train",
                                  base_model=f"m{tenant % 4}", submitted_at=0.0))
    running = []
    while (assignment := scheduler.next_assignment()) is not None:
        running.append(assignment)
    samples = []
    for index in range(rounds):
        now += 1.0
        worker, task = running.pop(index % len(running))
        scheduler.complete(worker, task, 100.0)
        started = time.perf_counter()
        assignment = scheduler.next_assignment()
        samples.append(time.perf_counter() - started)
        if assignment is not None:
            running.append(assignment)
    samples.sort()
    return {"tenants": tenants, "queued_tasks": tenants * persons_per_tenant, "workers": workers,
            "decisions": len(samples), "decision_mean_us": statistics.fmean(samples) * 1e6,
            "decision_p99_us": samples[int(0.99 * (len(samples) - 1))] * 1e6, "decision_max_us": samples[-1] * 1e6}


def print_table(rows: list[dict], probe: dict, args) -> None:
    def fmt(value, spec):
        return "—" if value is None else format(value, spec)

    lines = [
        ("GPU utilisation (goal ≥ 90%)", "gpu_utilisation", ".1%"),
        ("time until last stage ends, s", "makespan_s", ".0f"),
        ("model loads (of which switches)", None, None),
        ("decision overhead mean / p99 / max, µs (goal ≤ 5000)", None, None),
        ("all scheduler calls per task, µs", "scheduler_per_task_us", ".1f"),
        ("corp share of GPU time while both active (entitled)", None, None),
        ("fair-share error, share points", "fair_share_error_pts", ".1f"),
        ("corp: first person done after submit, s", "corp_first_person_s", ".0f"),
        ("corp: batch done after submit, s", "corp_completion_s", ".0f"),
        ("corp: ETA at submit, s", "corp_eta_at_submit_s", ".0f"),
        ("studio: first person done, s", "studio_first_person_s", ".0f"),
        ("studio: batch done, s", "studio_completion_s", ".0f"),
        ("studio: ETA at submit, s", "studio_eta_at_submit_s", ".0f"),
    ]
    width = max(len(label) for label, _, _ in lines)
    print(f"{args.gpus} GPUs; studio {args.studio} persons ({args.studio_model}) at t=0, corp {args.corp} persons "
          f"({args.corp_model}) at t={args.corp_at:g} s; train {TRAIN_S:g} s, generate {GENERATE_S:g} s "
          f"±{args.jitter:.0%}; model load {args.load_s:g} s; seed {args.seed}")
    print(f"{'':{width}}  " + "  ".join(f"{row['policy']:>24}" for row in rows))
    for label, key, spec in lines:
        cells = []
        for row in rows:
            if key is not None:
                cells.append(fmt(row[key], spec))
            elif label.startswith("model loads"):
                cells.append(f"{row['model_loads']} ({row['model_switches']})")
            elif label.startswith("decision"):
                cells.append(f"{row['decision_mean_us']:.1f} / {row['decision_p99_us']:.1f} / "
                             f"{row['decision_max_us']:.0f}")
            else:
                cells.append(f"{fmt(row['corp_share_received'], '.1%')} ({fmt(row['corp_share_entitled'], '.1%')})")
        print(f"{label:{width}}  " + "  ".join(f"{cell:>24}" for cell in cells))
    print(f"scale probe: {probe['tenants']} tenants, {probe['queued_tasks']} queued tasks, {probe['workers']} workers: "
          f"decision mean {probe['decision_mean_us']:.1f} µs, p99 {probe['decision_p99_us']:.1f} µs, "
          f"max {probe['decision_max_us']:.0f} µs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--studio", type=int, default=190, help="persons in the studio batch (t=0)")
    parser.add_argument("--corp", type=int, default=10, help="persons in the corporate batch")
    parser.add_argument("--corp-at", type=float, default=60.0, help="corporate batch submit time, s")
    parser.add_argument("--corp-weight", type=float, default=1.0, help="corporate tenant's weight (studio: 1)")
    parser.add_argument("--studio-model", default="sdxl")
    parser.add_argument("--corp-model", default="sd15", help="same as --studio-model: one base model for all")
    parser.add_argument("--load-s", type=float, default=5.0, help="seconds to load another base model (assumed)")
    parser.add_argument("--jitter", type=float, default=0.1, help="stage durations vary ± this fraction")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    if args.gpus < 1 or args.studio < 1 or args.corp < 1:
        parser.error("--gpus, --studio and --corp must be >= 1")
    if not 0 <= args.jitter < 1:
        parser.error(f"--jitter must be in [0, 1) but is {args.jitter}")

    persons, durations = build_workload(args)
    weights = {"studio": 1.0, "corp": args.corp_weight}
    submits = {"studio": 0.0, "corp": args.corp_at}
    rows = [simulate(policy, persons, durations, gpus=args.gpus, load_s=args.load_s, weights=weights)
            .summary(args.gpus, submits) for policy in ("fair", "fifo")]
    probe = scale_probe(tenants=50, persons_per_tenant=200, workers=256, rounds=5000)
    if args.json:
        print(json.dumps({"machine": f"{platform.machine()}, {platform.python_implementation()} "
                                     f"{platform.python_version()}", "args": vars(args), "policies": rows,
                          "scale_probe": probe}, indent=2))
    else:
        print_table(rows, probe, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
