"""Benchmark: the studios' HTTP API on the local store (embedded SeaweedFS), loopback.

    python bench/api.py [--seconds 8] [--threads 8] [--rounds 3] [--json]

Starts an embedded S3 server and the API (uvicorn, one process), makes a tenant, then drives load
from a second process (httpx, ``--threads`` concurrent connections, ``--seconds`` per run):
- status: ``GET /v1/batches/{id}`` of a 4-person batch (reads the batch, 4 person documents, progress);
- submit: ``POST /v1/batches`` of a 4-person batch (validation, the open-batch limit, 4 person documents,
  batch document);
  submit here is batch creation: starting it is one actor call more and needs Ray;
- upload: ``PUT .../photos/{file}`` of the demo photos (40-55 KB JPEGs: decoded, stripped, re-encoded,
  encrypted with the person's key, stored), in MB/s of photo bytes received.
Each runs ``--rounds`` times; medians are reported (requests/s, p50/p99 latency in ms).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PHOTOS = REPO / "examples" / "demo" / "photos"


def manifest(name: str, persons: int = 4) -> dict:
    return {"batch": name, "base_model": "tiny", "styles": ["office"], "images_per_style": 1,
            "consent": {"collected_by": "hr@bench.example", "given_at": "2026-11-20"},
            "persons": [{"name": f"Person {i}", "id": f"p{i}"} for i in range(persons)]}


def load(url: str, api_key: str, kind: str, seconds: float, threads: int, batch_id: str) -> dict:
    """The load generator (runs in its own process): latencies of every request for ``seconds``."""
    import httpx

    photos = [(p.name, p.read_bytes()) for folder in sorted(PHOTOS.iterdir()) for p in sorted(folder.iterdir())]
    stop_at = time.monotonic() + seconds
    results: list[list[float]] = [[] for _ in range(threads)]
    failures = [0] * threads
    sent_bytes = [0] * threads

    def worker(index: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=60) as http:
            upload_batch = None
            count = 0
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                if kind == "status":
                    response = http.get(f"/v1/batches/{batch_id}")
                elif kind == "submit":
                    response = http.post("/v1/batches", json=manifest(f"bench {index}"))
                else:
                    # A fresh 8-person batch per worker, filled 6 photos per person (the per-person cap is 50).
                    if upload_batch is None or count >= 48:
                        upload_batch = http.post("/v1/batches", json=manifest(f"upload {index}", 8)).json()["batch_id"]
                        count = 0
                    name, data = photos[count % len(photos)]
                    started = time.perf_counter()
                    response = http.put(f"/v1/batches/{upload_batch}/persons/p{count // 6}/photos/{count}-{name}",
                                        content=data, headers={"Content-Type": "image/jpeg"})
                    sent_bytes[index] += len(data)
                    count += 1
                elapsed = time.perf_counter() - started
                if response.status_code >= 300:
                    failures[index] += 1
                results[index].append(elapsed)

    wall = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(worker, range(threads)))
    wall = time.perf_counter() - wall
    latencies = sorted(x for per in results for x in per)
    return {"requests": len(latencies), "failures": sum(failures), "seconds": wall,
            "requests_per_s": len(latencies) / wall, "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "mb_per_s": sum(sent_bytes) / wall / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--load", nargs=5, metavar=("URL", "KEY", "KIND", "THREADS", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        url, api_key, kind, threads, batch_id = args.load
        print(json.dumps(load(url, api_key, kind, args.seconds, int(threads), batch_id)))
        return

    import base64
    import secrets

    import uvicorn

    from headshots import tenants
    from headshots.api.app import create_app
    from headshots.config import Config
    from storage.seaweed import start_embedded_s3
    from storage.store import ArtifactStore
    from tests.integration.api_fixtures import free_port

    with tempfile.TemporaryDirectory() as folder:
        server = start_embedded_s3(Path(folder) / "s3", access_key="bench" + secrets.token_hex(4),
                                   secret_key=secrets.token_urlsafe(24))
        try:
            config = Config.from_dict({
                "home": str(Path(folder) / "home"),
                "store": {"endpoint": server.endpoint, "access_key": server.access_key,
                          "secret_key": server.secret_key, "server_side_encryption": True},
                "security": {"master_key": base64.b64encode(secrets.token_bytes(32)).decode()},
                "api": {"max_page_size": 200}})
            store = ArtifactStore.from_config(config.store)
            store.ensure_buckets()
            _, api_key = tenants.create_tenant(store, "Bench Studio", rate_limit_per_s=100_000,
                                               max_concurrent_batches=100_000)
            port = free_port()
            api = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning"))
            threading.Thread(target=api.run, daemon=True).start()
            while not api.started:
                time.sleep(0.05)
            url = f"http://127.0.0.1:{port}"
            import httpx

            batch_id = httpx.post(f"{url}/v1/batches", json=manifest("status target"),
                                  headers={"Authorization": f"Bearer {api_key}"}, timeout=60).json()["batch_id"]
            report = {"machine": f"{platform.node()} ({os.cpu_count()} cores, {platform.machine()})",
                      "threads": args.threads, "seconds_per_run": args.seconds, "rounds": args.rounds}
            for kind in ("status", "submit", "upload"):
                runs = []
                for _ in range(args.rounds):
                    completed = subprocess.run(
                        [sys.executable, __file__, "--seconds", str(args.seconds), "--load", url, api_key, kind,
                         str(args.threads), batch_id], capture_output=True, text=True, check=True)
                    runs.append(json.loads(completed.stdout))
                report[kind] = {name: round(statistics.median(r[name] for r in runs), 2)
                                for name in ("requests_per_s", "p50_ms", "p99_ms", "mb_per_s", "failures")}
                report[kind]["requests"] = sum(r["requests"] for r in runs)
            api.should_exit = True
        finally:
            server.stop()
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"machine: {report['machine']}; {args.threads} client threads, {args.rounds} × {args.seconds:g} s")
        for kind in ("status", "submit", "upload"):
            row = report[kind]
            extra = f", {row['mb_per_s']} MB/s" if kind == "upload" else ""
            print(f"{kind:<7} {row['requests_per_s']:>8} req/s  p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms"
                  f"{extra}  ({row['requests']} requests, {row['failures']} failed, median run)")


if __name__ == "__main__":
    main()
