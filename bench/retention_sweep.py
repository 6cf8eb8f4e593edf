"""Benchmark: retention sweep throughput on the embedded S3 server.

    python bench/retention_sweep.py [--objects 100000] [--persons 1000] [--json]

Builds a store of ``--objects`` objects spread over ``--persons`` processed persons (uploads, derived,
models; 10% of objects carry 3 versions), each with its state document and expiry-index entry, then:
1. sweeps at an instant when 1% of the persons are due;
2. sweeps at an instant when all the rest are due.
Reports versions deleted per second for each, and the cost of the 1% sweep relative to the 100% one
(the index should make a sweep cost grow with what expires, not with what is stored: goal < 5%).
Goal for throughput on the local server: >= 2,000 versions/s. The same run also measures the store's own
ceiling for comparison: listing the versions and deleting them with bulk DeleteObjects (1,000 per call,
4 threads, nothing else) on a fresh store a fifth the size — the sweep can only approach that.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storage import keys  # noqa: E402
from storage.retention import file_person, format_time, load_policy  # noqa: E402
from storage.seaweed import start_embedded_s3  # noqa: E402
from storage.state import PersonState  # noqa: E402
from storage.store import ArtifactStore, make_client  # noqa: E402
from storage.sweep import run_sweep  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
CLASSES = ("uploads", "derived", "models")


def build(store: ArtifactStore, *, objects: int, persons: int, threads: int) -> tuple[int, list[datetime]]:
    """Write the synthetic store; returns (versions written, processed time per person)."""
    per_person = max(1, objects // persons)
    payload = secrets.token_bytes(512)
    processed = [T0 + timedelta(minutes=index) for index in range(persons)]

    def one_person(index: int) -> int:
        ref = keys.PersonRef("bench", "b1", f"p{index:05d}")
        state = PersonState(tenant="bench", batch_id="b1", person_id=ref.person_id, name=None, state="done",
                            processed_at=format_time(processed[index]))
        written = 0
        for number in range(per_person):
            artifact = CLASSES[number % 3]
            key = f"{ref.prefix}{artifact}/{number:04d}.bin"
            # Every tenth object has three versions (re-written checkpoints, re-uploads).
            for _ in range(3 if (index * per_person + number) % 10 == 0 else 1):
                state.record_object(store.put(artifact, key, payload))
                written += 1
        # As the run that processed it left it: written as it is (StateStore lets a new document start
        # only queued or needs_photos, storage/state.py).
        store.put_json("state", keys.person_state_key(ref), state.to_json())
        file_person(store, ref, processed[index] + timedelta(days=30), reason="bench")
        return written

    with ThreadPoolExecutor(max_workers=threads) as pool:
        total = sum(pool.map(one_person, range(persons)))
    return total, processed


def raw_delete_baseline(store: ArtifactStore, *, objects: int, persons: int, threads: int) -> dict:
    """Versions/s of bare list + bulk DeleteObjects on the same server: the ceiling for any sweep."""
    from minio.deleteobjects import DeleteObject

    from storage.deletion import list_all_versions

    build(store, objects=objects, persons=persons, threads=threads)
    started = time.perf_counter()
    work = []
    for artifact in CLASSES:
        versions = list_all_versions(store, artifact, "bench/")
        work += [(store.bucket(artifact), versions[i:i + 1000]) for i in range(0, len(versions), 1000)]

    def delete(item) -> int:
        bucket, chunk = item
        list(store.client.remove_objects(bucket, [DeleteObject(k, v) for k, v, _, _ in chunk]))
        return len(chunk)

    with ThreadPoolExecutor(max_workers=4) as pool:
        deleted = sum(pool.map(delete, work))
    seconds = time.perf_counter() - started
    return {"versions_deleted": deleted, "seconds": round(seconds, 2), "versions_per_s": round(deleted / seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--persons", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="headshots-sweep-bench-"))
    access_key, secret_key = "bench" + secrets.token_hex(4), secrets.token_urlsafe(24)
    server = start_embedded_s3(folder / "s3", access_key=access_key, secret_key=secret_key)
    try:
        client = make_client(endpoint=server.endpoint, access_key=access_key, secret_key=secret_key, secure=False)
        store = ArtifactStore(client, {a: f"bench-{a}" for a in ("uploads", "derived", "models", "outputs",
                                                                   "state", "receipts")})
        store.ensure_buckets()
        started = time.perf_counter()
        versions, processed = build(store, objects=args.objects, persons=args.persons, threads=args.threads)
        build_s = time.perf_counter() - started
        policy = load_policy()
        one_percent = max(1, args.persons // 100)
        small_now = processed[one_percent - 1] + timedelta(days=30, seconds=30)
        small = run_sweep(store, policy, now=small_now)
        large = run_sweep(store, policy, now=processed[-1] + timedelta(days=31))
        rows = []
        for label, result in (("1% due", small), ("rest due", large)):
            deleted = len(result.receipt.objects)
            rows.append({"sweep": label, "persons": len(result.receipt.persons), "versions_deleted": deleted,
                         "seconds": round(result.seconds, 2),
                         "versions_per_s": round(deleted / result.seconds, 1) if result.seconds else None,
                         "verification_listing_count": result.receipt.verification["listing_count"]})
        baseline_store = ArtifactStore(client, {a: f"base-{a}" for a in ("uploads", "derived", "models", "outputs",
                                                                         "state", "receipts")})
        baseline_store.ensure_buckets()
        baseline = raw_delete_baseline(baseline_store, objects=args.objects // 5, persons=max(1, args.persons // 5),
                                       threads=args.threads)
        report = {"machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
                  "raw_delete_baseline": baseline,
                  "sweep_vs_raw_ratio": round(rows[1]["versions_per_s"] / baseline["versions_per_s"], 2),
                  "objects": args.objects, "versions_written": versions, "persons": args.persons,
                  "build_s": round(build_s, 1), "sweeps": rows,
                  "cost_ratio_1pct_vs_rest": round(small.seconds / large.seconds, 4)}
    finally:
        server.stop()
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{report['machine']}: {versions} versions over {args.persons} persons written in {report['build_s']} s")
        for row in rows:
            print(f"  {row['sweep']:<9} {row['persons']:>5} persons {row['versions_deleted']:>7} versions "
                  f"{row['seconds']:>7} s {row['versions_per_s']:>9} versions/s "
                  f"(listing count after: {row['verification_listing_count']})")
        print(f"  1% sweep cost / rest sweep cost = {report['cost_ratio_1pct_vs_rest']}")
        print(f"  bare list + bulk delete on the same server: {baseline['versions_per_s']} versions/s; "
              f"the sweep reaches {report['sweep_vs_raw_ratio']} of it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
