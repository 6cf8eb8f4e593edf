"""Benchmark: what the deletion barrier costs a writer, on the embedded S3 server.

    python bench/deletion_barrier.py [--writes 300] [--size-kib 256] [--repeats 3] [--json]

Every person write checks the person's deletion barrier after writing (storage/barrier.py): one
HEAD request more per write. In one run, against one server, this measures per-write medians of
1. a plain ``ArtifactStore.put`` of ``--size-kib`` (the baseline: no barrier),
2. ``PersonScope.put`` of the same bytes (the write plus its barrier check),
3. a person-state save (``StateStore.save_person``, compare-and-swap plus the check),
   against a plain ``put_json`` of the same document,
and the early deletion of a person with 40 objects (barrier, purge, tombstone, receipt).
Ratios are against the baseline of the same round; absolute times on a shared machine are noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storage import keys  # noqa: E402
from storage.retention import load_policy  # noqa: E402
from storage.scoped import PersonScope  # noqa: E402
from storage.seaweed import start_embedded_s3  # noqa: E402
from storage.state import PersonState, StateStore  # noqa: E402
from storage.store import ArtifactStore, make_client  # noqa: E402
from storage.sweep import delete_on_request  # noqa: E402


def _median_ms(call, count: int) -> float:
    times = []
    for index in range(count):
        started = time.perf_counter()
        call(index)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000.0


def one_round(store: ArtifactStore, *, writes: int, size: int, round_number: int) -> dict:
    payload = secrets.token_bytes(size)
    person = keys.PersonRef("bench", f"r{round_number}", "writer")
    scope = PersonScope(store, person)
    plain_ms = _median_ms(lambda i: store.put("models", f"{person.prefix}plain/{i:04d}.bin", payload), writes)
    scoped_ms = _median_ms(lambda i: scope.put("models", f"{person.prefix}scoped/{i:04d}.bin", payload), writes)
    states = StateStore(store)
    state = PersonState(tenant="bench", batch_id=f"r{round_number}", person_id="writer", name="Bench Writer")
    states.save_person(state)
    document = state.to_json()
    json_ms = _median_ms(lambda i: store.put_json("state", f"{person.prefix}plain-state.json", document), writes)

    def save(index: int) -> None:
        state.timings_s["bench"] = float(index)
        states.save_person(state)

    save_ms = _median_ms(save, writes)
    doomed = keys.PersonRef("bench", f"r{round_number}", "doomed")
    for index in range(40):
        store.put("uploads", f"{doomed.prefix}uploads/{index:03d}.jpg", payload[:4096])
    states.save_person(PersonState(tenant="bench", batch_id=f"r{round_number}", person_id="doomed", name="D"))
    started = time.perf_counter()
    receipt = delete_on_request(store, load_policy(None), [doomed], include_outputs=True, requested_by="bench")
    deletion_s = time.perf_counter() - started
    assert receipt.verification["listing_count"] == 0
    return {"plain_put_ms": plain_ms, "scoped_put_ms": scoped_ms, "put_ratio": scoped_ms / plain_ms,
            "plain_put_json_ms": json_ms, "save_person_ms": save_ms, "save_ratio": save_ms / json_ms,
            "delete_40_objects_s": deletion_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=300)
    parser.add_argument("--size-kib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        server = start_embedded_s3(Path(folder), access_key="bench" + secrets.token_hex(4),
                                   secret_key=secrets.token_urlsafe(24))
        try:
            client = make_client(endpoint=server.endpoint, access_key=server.access_key,
                                 secret_key=server.secret_key, secure=False)
            store = ArtifactStore(client, {a: f"bench-{a}" for a in
                                           ("uploads", "derived", "models", "outputs", "state", "receipts")})
            store.ensure_buckets()
            rounds = [one_round(store, writes=args.writes, size=args.size_kib * 1024, round_number=n)
                      for n in range(args.repeats)]
        finally:
            server.stop()
    summary = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
              "writes": args.writes, "size_kib": args.size_kib, "repeats": args.repeats, "rounds": rounds,
              "median": summary}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"machine: {result['machine']}; {args.writes} writes of {args.size_kib} KiB per round, "
          f"{args.repeats} rounds (medians of rounds)")
    print(f"put: plain {summary['plain_put_ms']:.2f} ms, with barrier check {summary['scoped_put_ms']:.2f} ms "
          f"(x{summary['put_ratio']:.2f})")
    print(f"state: plain put_json {summary['plain_put_json_ms']:.2f} ms, save_person {summary['save_person_ms']:.2f} ms "
          f"(x{summary['save_ratio']:.2f})")
    print(f"early deletion of a person with 40 objects: {summary['delete_40_objects_s']:.3f} s")


if __name__ == "__main__":
    main()
