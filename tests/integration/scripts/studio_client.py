"""A studio's client in its own process: submit a batch over HTTP with photos, poll, download the ZIP.

Usage: python studio_client.py BASE_URL API_KEY PHOTO_DIR OUTPUT_ZIP  → prints a JSON summary.
Only the standard library: this is what any studio's script can do with the README's curl session.
"""

import json
import sys
import time
import urllib.request
from pathlib import Path

POLL_S = 1.0
TIMEOUT_S = 400


def call(base: str, api_key: str, method: str, path: str, body: bytes | None = None,
         content_type: str = "application/json") -> dict:
    request = urllib.request.Request(base + path, data=body, method=method,
                                     headers={"Authorization": f"Bearer {api_key}", "Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def main(base: str, api_key: str, photo_dir: str, output_zip: str) -> None:
    manifest = {"batch": "Studio team", "base_model": "tiny", "styles": ["office"], "images_per_style": 1,
                "consent": {"collected_by": "hr@studio.example", "given_at": "2026-11-20"},
                "persons": [{"name": "Grace Hopper", "id": "grace"}]}
    batch = call(base, api_key, "POST", "/v1/batches", json.dumps(manifest).encode())
    batch_id = batch["batch_id"]
    for photo in sorted(Path(photo_dir).iterdir())[:4]:
        call(base, api_key, "PUT", f"/v1/batches/{batch_id}/persons/grace/photos/{photo.name}", photo.read_bytes(),
             "image/jpeg")
    call(base, api_key, "POST", f"/v1/batches/{batch_id}/start")
    deadline = time.monotonic() + TIMEOUT_S
    polls = 0
    while True:
        status = call(base, api_key, "GET", f"/v1/batches/{batch_id}")
        polls += 1
        if status["state"] not in ("created", "running"):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"batch still {status['state']} after {TIMEOUT_S} s")
        time.sleep(POLL_S)
    download = call(base, api_key, "GET", f"/v1/batches/{batch_id}/download")
    with urllib.request.urlopen(download["zip"]["url"], timeout=120) as response:
        Path(output_zip).write_bytes(response.read())
    print(json.dumps({"batch_id": batch_id, "state": status["state"], "persons": status["persons"],
                      "polls": polls, "files": [f["path"] for f in download["files"]]}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
