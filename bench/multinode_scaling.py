"""Benchmark (#12): the same batch on a cluster with 1 GPU worker node and with 2, no faults.

Uses the multi-node test cluster (tests/integration/multinode.py: one network namespace per host, a
Ray head without GPUs, worker nodes with one fake GPU each, the S3 server on a host of its own). Both
clusters are up for the whole run and the batches alternate between them (1, 2, 2, 1, 1, 2, ...), so
load from other work on the machine falls on both alike. Each cluster first runs a warm-up batch (a
person per node: worker start, model build, face models), which is not counted.

Per batch it reports the wall time (submit to the batch's ``finished_at``) and, per worker node, the
GPU stages it ran (each worker's ``running`` field sampled every 0.1 s; the total is checked against
the stages the batch needed) and its GPU-busy fraction (the worker's ``busy_s`` over the batch / wall
time). It exits 1, loudly, if a 2-node batch did not run GPU stages on both nodes, or a person did not
finish.

    sudo python bench/multinode_scaling.py [--persons 6] [--images 2] [--steps 30] [--repeats 3]

Needs root (network namespaces) and iproute2. The "GPUs" are fake: each worker node's stages run on
the CPU with one torch thread, and every host shares the machine's cores, so the 2-node/1-node ratio
is bounded by the cores left over from the head's CPU stages and the S3 server, not by GPUs.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import os
import platform
import secrets
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHOTO_DIRS = [REPO / "examples" / "demo" / "photos" / name for name in ("eileen-collins", "grace-hopper")]
GPU_STAGES = ("train", "generate")
X509_FLAKE = b"x509: certificate signed by unknown authority"


def machine() -> dict:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"nproc": os.cpu_count(), "memory_gib": round(memory_gib, 1), "cpu": model,
            "python": platform.python_version(), "loadavg_at_start": os.getloadavg()}


class Bench:
    """One multi-node cluster with the stack on it: ``nodes`` worker nodes, one GPU worker each."""

    def __init__(self, nodes: int, args):
        self.keep_root = args.keep_root
        from headshots.config import Config
        from storage.store import ArtifactStore
        from tests.integration import multinode

        self.nodes = nodes
        # A short root: Ray's unix socket paths under it must stay under ~107 characters.
        self.root = Path("/tmp") / f"hsb-{secrets.token_hex(3)}"
        self.cluster = multinode.up(self.root, workers=nodes)
        self._log_offset = 0
        self.driver = None
        try:
            suffix = uuid.uuid4().hex[:6]
            self.home = Path(f"/tmp/hsb-home-{suffix}")
            self.home.mkdir(mode=0o700)
            self.settings = {
                "home": str(self.home),
                "store": {**self.cluster.store_settings(),
                          **{f"bucket_{a}": f"mnb-{suffix}-{a}" for a in
                             ("uploads", "derived", "models", "outputs", "state", "receipts")}},
                "training": {"steps": args.steps, "rank": 4, "learning_rate": 1e-3,
                             "checkpoint_every": args.checkpoint_every},
                "generation": {"batch_size": args.images, "steps_override": args.denoise_steps},
                "ingest": {"min_photos": args.photos},
                "security": {"master_key": base64.b64encode(secrets.token_bytes(32)).decode()},
                "ray": {"address": self.cluster.ray_address, "namespace": f"mnb-{suffix}"},
            }
            self.config = Config.from_dict(self.settings)
            self.store = ArtifactStore.from_config(self.config.store)
            self.store.ensure_buckets()
            self.driver = multinode.Driver(self.cluster, namespace=self.config.ray.namespace)
            self.driver.call("start_stack", self.settings)
            workers = self.driver.call("wait_gpu_workers", nodes)
            placed = sorted(info["node_ip"] for info in workers)
            expected = sorted(host.address for host in self.cluster.workers)
            if placed != expected:
                raise SystemExit(f"GPU workers on {placed}, expected one on each worker node {expected}")
            self.node_names = {host.address: host.name for host in self.cluster.workers}
        except BaseException:
            self.close()
            raise

    def run(self, persons: int, args, label: str) -> dict:
        """One batch. Refused loudly if the S3 server's internal gRPC TLS broke meanwhile: that was two
        clusters' servers sharing their gRPC unix sockets in /tmp, fixed by ports of each cluster's own
        (tests/integration/multinode.py, ``s3_ports``); seen again, the figures would be of a broken store."""
        result = self._run_once(persons, args, label)
        if result["s3_tls_broke_during"]:
            raise SystemExit(f"{label} on {self.nodes} node(s): the S3 server's gRPC TLS broke "
                             f"(see {Path(self.root) / 's3' / 'weed.log'}); the figures are not usable")
        return result

    def _s3_tls_broke(self) -> bool:
        with open(Path(self.root) / "s3" / "weed.log", "rb") as handle:
            handle.seek(self._log_offset)
            return X509_FLAKE in handle.read()

    def _run_once(self, persons: int, args, label: str) -> dict:
        from headshots import client
        from headshots.manifest import BatchManifest, Consent, PersonSpec
        from storage.state import StateStore

        specs = []
        for index in range(persons):
            photos = sorted(PHOTO_DIRS[index % len(PHOTO_DIRS)].iterdir())[:args.photos]
            specs.append(PersonSpec(f"p{index}", f"Person {index}", None, photos))
        manifest = BatchManifest(tenant="bench", name=f"Scaling {label}", base_model="tiny", styles=["office"],
                                 images_per_style=args.images,
                                 consent=Consent(collected_by="bench", given_at="2026-12-03"), persons=specs)
        submitted = client.submit_batch(self.config, manifest, start=False)  # uploads: not in the wall time
        watched = self.driver.call("run_batch_watched", submitted.tenant, submitted.batch_id, timeout_s=1800)
        loadavg = os.getloadavg()
        s3_tls_broke = self._s3_tls_broke()
        states = StateStore(self.store)
        batch = states.load_batch(submitted.tenant, submitted.batch_id)
        person_states = states.load_persons(batch)
        finished = datetime.datetime.fromisoformat(batch.finished_at.replace("Z", "+00:00")).timestamp()
        wall_s = finished - watched["submitted_at"]
        prefix = f"{submitted.tenant}/{submitted.batch_id}/"
        nodes = {}
        for worker in watched["workers"]:
            stages = [entry.split(" ", 1)[0] for entry in worker["seen"] if entry.split(" ", 1)[1].startswith(prefix)]
            busy_s = worker["busy_s_after"] - worker["busy_s_before"]
            nodes[self.node_names.get(worker["node_ip"], worker["node_ip"])] = {
                "worker_id": worker["worker_id"], "node_ip": worker["node_ip"],
                **{stage: stages.count(stage) for stage in GPU_STAGES},
                "busy_s": round(busy_s, 2), "busy_fraction": round(busy_s / wall_s, 3)}
        # The persons' stage timings include the wait for a free GPU, so they exceed the workers' busy_s.
        gpu_stage_s = sum(p.timings_s.get(stage, 0.0) for p in person_states for stage in GPU_STAGES)
        return {"label": label, "nodes_in_cluster": self.nodes, "batch_id": submitted.batch_id,
                "state": batch.state, "persons": len(person_states),
                "done": sum(p.state == "done" for p in person_states),
                "images": sum(len(p.headshots) for p in person_states),
                "wall_s": round(wall_s, 2), "polled_wall_s": round(watched["polled_wall_s"], 2),
                "stages_needed": len(person_states) * len(GPU_STAGES),
                "stages_seen": sum(node[stage] for node in nodes.values() for stage in GPU_STAGES),
                "gpu_stage_s_from_states_incl_queue": round(gpu_stage_s, 2),
                "ingest_median_s": round(statistics.median(p.timings_s.get("ingest", 0.0) for p in person_states), 2),
                "nodes": nodes, "loadavg_after": [round(x, 2) for x in loadavg],
                "s3_tls_broke_during": s3_tls_broke}

    def close(self) -> None:
        from tests.integration import multinode

        if self.driver is not None:
            with contextlib.suppress(Exception):
                self.driver.call("remove_stack", timeout_s=120)
            with contextlib.suppress(Exception):
                self.driver.close()
        try:
            multinode.down(self.cluster)
        finally:
            if self.keep_root:
                print(f"cluster files (logs) kept in {self.root}", file=sys.stderr)
            else:
                shutil.rmtree(self.root, ignore_errors=True)
            if getattr(self, "home", None):
                shutil.rmtree(self.home, ignore_errors=True)


def print_run(run: dict) -> None:
    nodes = "  ".join(f"{name}: train {n['train']} gen {n['generate']} busy {n['busy_s']:.1f} s "
                      f"({n['busy_fraction']:.0%})" for name, n in sorted(run["nodes"].items()))
    print(f"  {run['label']:>10} {run['nodes_in_cluster']} node(s): {run['done']}/{run['persons']} done, "
          f"wall {run['wall_s']:.2f} s, stages seen {run['stages_seen']}/{run['stages_needed']}, "
          f"load {run['loadavg_after'][0]:.2f} | {nodes}", flush=True)


def summarise(runs: list[dict], sizes: list[int]) -> dict:
    summary = {}
    for size in sizes:
        mine = [run for run in runs if run["nodes_in_cluster"] == size]
        names = sorted({name for run in mine for name in run["nodes"]})
        summary[str(size)] = {
            "batches": len(mine),
            "wall_s_median": round(statistics.median(run["wall_s"] for run in mine), 2),
            "wall_s_all": [run["wall_s"] for run in mine],
            "nodes": {name: {key: statistics.median(run["nodes"][name][key] for run in mine)
                             for key in ("train", "generate", "busy_s", "busy_fraction")} for name in names},
        }
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--persons", type=int, default=6)
    parser.add_argument("--images", type=int, default=2, help="headshots per person (one style)")
    parser.add_argument("--photos", type=int, default=2, help="photos per person (ingest.min_photos too)")
    parser.add_argument("--steps", type=int, default=30, help="LoRA fine-tune steps per person")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--denoise-steps", type=int, default=4, help="generation.steps_override")
    parser.add_argument("--repeats", type=int, default=3, help="counted batches per cluster size")
    parser.add_argument("--keep-root", action="store_true",
                        help="keep each cluster's folder (Ray, S3 server and driver logs) after it is down")
    args = parser.parse_args()

    from tests.integration import multinode

    problem = multinode.require_root_and_iproute()
    if problem:
        print(f"cannot run the multi-node cluster: {problem}", file=sys.stderr)
        return 2
    info = machine()
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(f"machine: {info}", flush=True)
    sizes = [1, 2]
    benches: dict[int, Bench] = {}
    runs: list[dict] = []
    try:
        for size in sizes:
            t0 = time.perf_counter()
            benches[size] = Bench(size, args)
            print(f"cluster with {size} worker node(s) up, stack started: {time.perf_counter() - t0:.1f} s",
                  flush=True)
        for size in sizes:
            warm = benches[size].run(max(2, size), args, "warm-up")
            print_run(warm)
        for repeat in range(args.repeats):
            for size in (sizes if repeat % 2 == 0 else list(reversed(sizes))):
                run = benches[size].run(args.persons, args, f"repeat {repeat}")
                print_run(run)
                runs.append(run)
    finally:
        for bench in benches.values():
            bench.close()

    summary = summarise(runs, sizes)
    one, two = summary["1"], summary["2"]
    ratio = two["wall_s_median"] / one["wall_s_median"]
    # Paired by repeat: the two batches of a repeat ran back to back, under the same outside load.
    paired = [b["wall_s"] / a["wall_s"] for a, b in zip([r for r in runs if r["nodes_in_cluster"] == 1],
                                                          [r for r in runs if r["nodes_in_cluster"] == 2])]
    print()
    print(f"{'cluster':>9} {'batches':>7} {'wall s (median)':>15} | {'node':>8} {'train':>5} {'generate':>8} "
          f"{'GPU busy s':>10} {'busy fraction':>13}")
    for size in sizes:
        entry = summary[str(size)]
        for position, (name, node) in enumerate(sorted(entry["nodes"].items())):
            lead = (f"{size} node{'s' if size > 1 else ' '}", entry["batches"], entry["wall_s_median"]) \
                if position == 0 else ("", "", "")
            print(f"{lead[0]:>9} {lead[1]:>7} {lead[2]:>15} | {name:>8} {node['train']:>5g} {node['generate']:>8g} "
                  f"{node['busy_s']:>10.2f} {node['busy_fraction']:>13.1%}")
    print(f"ratio 2-node/1-node wall time (medians): {ratio:.3f}; paired per repeat: "
          f"{', '.join(f'{r:.3f}' for r in paired)} (median {statistics.median(paired):.3f})")

    problems = []
    for run in runs:
        if run["done"] != run["persons"] or run["state"] != "done":
            problems.append(f"{run['label']} on {run['nodes_in_cluster']} node(s): {run['done']} of "
                            f"{run['persons']} persons done, batch {run['state']}")
        if run["s3_tls_broke_during"]:
            problems.append(f"{run['label']} on {run['nodes_in_cluster']} node(s): the S3 server's gRPC TLS broke "
                            "during the batch (its figures are not comparable)")
        if run["nodes_in_cluster"] == 2:
            idle = [name for name, node in run["nodes"].items()
                    if node["train"] + node["generate"] == 0 or node["busy_s"] <= 0]
            if len(run["nodes"]) < 2 or idle:
                problems.append(f"{run['label']} on 2 nodes did not use both nodes: idle {idle or 'one missing'}, "
                                f"nodes {run['nodes']}")
    result = {"bench": "multinode_scaling", "started_at": started_at, "machine": info,
              "loadavg_at_end": os.getloadavg(),
              "args": vars(args), "summary": summary, "ratio_2_over_1_wall_median": round(ratio, 3),
              "ratio_paired": [round(r, 3) for r in paired], "runs": runs, "problems": problems}
    print(json.dumps(result))
    if problems:
        print("\nFAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
