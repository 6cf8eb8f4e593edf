"""Benchmark: the demo batch end to end on the local stack (embedded S3 server + Ray head).

Reports seconds per stage (median over persons), wall time, persons/hour and images/s. Each repeat
submits the same batch again to the already-warm stack, so the first repeat includes worker start-up
(model load) and later ones show steady state; both are printed.

    python bench/demo_batch.py [--repeats 3] [--persons-copies 1] [--json]

It starts its own stack under a temporary $HEADSHOTS_HOME and stops it at the end, so it never
touches a stack you are using.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--persons-copies", type=int, default=1,
                        help="repeat the demo roster this many times (distinct person ids) for a bigger batch")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="headshots-bench-")) / "home"
    os.environ["HEADSHOTS_HOME"] = str(home)
    from headshots.config import load_config
    from headshots.stack import ray_auth_environment

    config = load_config()
    os.environ.update(ray_auth_environment(config))
    from headshots import client, stack
    from headshots.cli import DEMO_MANIFEST, wait_for_batch
    from headshots.manifest import PersonSpec, load_manifest
    from pipeline.generate import load_style_presets

    started = time.perf_counter()
    stack.up(config)
    stack_up_s = time.perf_counter() - started
    resolved = stack.effective_config(config)
    runs = []
    try:
        for repeat in range(args.repeats):
            manifest = load_manifest(DEMO_MANIFEST, known_styles=load_style_presets())
            manifest.persons = [PersonSpec(f"{p.person_id}-{copy}", p.name, p.email, p.photos)
                                for copy in range(args.persons_copies) for p in manifest.persons]
            t0 = time.perf_counter()
            submitted = client.submit_batch(resolved, manifest)
            submit_s = time.perf_counter() - t0
            summary = wait_for_batch(resolved, submitted.batch_id, tenant=submitted.tenant)
            wall_s = time.perf_counter() - t0
            from storage.state import StateStore

            states = StateStore(client.store_for(resolved))
            persons = states.load_persons(states.load_batch(submitted.tenant, submitted.batch_id))
            stage_s = {stage: statistics.median(p.timings_s.get(stage, 0.0) for p in persons)
                       for stage in ("ingest", "train", "generate", "package")}
            images = sum(len(p.headshots) for p in persons)
            done = sum(p.state == "done" for p in persons)
            runs.append({"repeat": repeat, "persons": len(persons), "done": done, "images": images,
                         "submit_s": round(submit_s, 2), "wall_s": round(wall_s, 2),
                         "stage_median_s": {k: round(v, 2) for k, v in stage_s.items()},
                         "persons_per_hour": round(done / wall_s * 3600, 1),
                         "images_per_s": round(images / wall_s, 3), "batch_state": summary["state"]})
    finally:
        stack.down(config)
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}",
              "stack_up_s": round(stack_up_s, 2), "runs": runs,
              "steady_state_median_wall_s": round(statistics.median(r["wall_s"] for r in runs[1:]), 2)
              if len(runs) > 1 else None}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"machine: {result['machine']}; stack up in {result['stack_up_s']} s")
        print(f"{'run':>3} {'persons':>7} {'images':>6} {'wall s':>7} {'ingest':>7} {'train':>7} {'generate':>8} "
              f"{'package':>7} {'persons/h':>9} {'img/s':>6}")
        for run in runs:
            stages = run["stage_median_s"]
            print(f"{run['repeat']:>3} {run['persons']:>7} {run['images']:>6} {run['wall_s']:>7} {stages['ingest']:>7} "
                  f"{stages['train']:>7} {stages['generate']:>8} {stages['package']:>7} "
                  f"{run['persons_per_hour']:>9} {run['images_per_s']:>6}")
    return 0 if all(r["done"] == r["persons"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
