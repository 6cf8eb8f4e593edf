"""`headshots`: the command line.

Exit codes: 0 success (a batch in which some persons need photos is still a success), 2 bad input
(config, manifest, ids), 1 anything else. Errors go to stderr and say how to fix them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT = 0, 1, 2
WATCH_POLL_S = 1.0
DEMO_MANIFEST = Path(__file__).resolve().parent.parent / "examples" / "demo" / "team.yaml"
PER_PERSON_BARS_MAX = 20


class UsageError(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    from headshots.config import ConfigError, load_config
    from headshots.manifest import ManifestError
    from storage.keys import InvalidId
    from storage.store import ObjectNotFound

    try:
        config = load_config(args.config)
        if not config.ray.address:
            # Before anything imports ray: its token loader reads these once per process.
            from headshots.stack import ray_auth_environment

            os.environ.update(ray_auth_environment(config))
        return args.handler(args, config)
    except (ConfigError, ManifestError, InvalidId, UsageError) as error:
        print(f"headshots: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ObjectNotFound as error:
        print(f"headshots: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("headshots: interrupted; the batch keeps running in the stack (see `headshots status`)",
              file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:  # the last line of defence: one clear line, not a traceback
        print(f"headshots: error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headshots", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file (default: $HEADSHOTS_CONFIG or $HEADSHOTS_HOME/config.yaml)")
    commands = parser.add_subparsers(dest="command")

    up = commands.add_parser("up", help="start the local stack (embedded S3 server + Ray head) in the background")
    up.add_argument("--json", action="store_true")
    up.set_defaults(handler=cmd_up)
    down = commands.add_parser("down", help="stop the local stack")
    down.add_argument("--json", action="store_true")
    down.set_defaults(handler=cmd_down)
    env = commands.add_parser("env", help="where the stack's store, Ray and metrics are")
    env.add_argument("--json", action="store_true")
    env.set_defaults(handler=cmd_env)

    submit = commands.add_parser("submit", help="submit a batch (YAML manifest or CSV roster)")
    submit.add_argument("manifest")
    submit.add_argument("--tenant")
    submit.add_argument("--batch", help="display name of the batch")
    submit.add_argument("--base-model")
    submit.add_argument("--styles", help="comma-separated style names")
    submit.add_argument("--images-per-style", type=int)
    submit.add_argument("--watch", action="store_true", help="show live progress until the batch finishes")
    submit.add_argument("--json", action="store_true", help="print {tenant, batch_id} and return at once")
    submit.set_defaults(handler=cmd_submit)

    status = commands.add_parser("status", help="a batch's progress, or the list of batches")
    status.add_argument("batch", nargs="?")
    status.add_argument("--tenant")
    status.add_argument("--watch", action="store_true")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)

    download = commands.add_parser("download", help="download a batch's headshots, contact sheets and manifest")
    download.add_argument("batch")
    download.add_argument("-o", "--output", required=True)
    download.add_argument("--tenant")
    download.add_argument("--zip", action="store_true", help="also write OUTPUT.zip")
    download.add_argument("--json", action="store_true")
    download.set_defaults(handler=cmd_download)

    demo = commands.add_parser("demo", help="run the example batch end to end on the local stack")
    demo.add_argument("--manifest", default=str(DEMO_MANIFEST))
    demo.add_argument("-o", "--output", default="headshots-demo-output")
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(handler=cmd_demo)
    return parser


# --- stack --------------------------------------------------------------------------------------

def cmd_up(args, config) -> int:
    from headshots import stack

    info = stack.up(config)
    resolved = stack.effective_config(config, info)
    _emit(args, _env_document(resolved, info), f"stack up: store {resolved.store.endpoint}, "
          f"ray {resolved.ray.address}, metrics http://{config.metrics.host}:{info.metrics_port}/metrics")
    return EXIT_OK


def cmd_down(args, config) -> int:
    from headshots import stack

    stopped = stack.down(config)
    _emit(args, stopped, "stack stopped" if any(stopped.values()) else "stack was not running")
    return EXIT_OK


def cmd_env(args, config) -> int:
    from headshots import stack

    info = stack.load_info(config)
    resolved = stack.effective_config(config, info)
    document = _env_document(resolved, info)
    _emit(args, document, "\n".join(f"{key}={value}" for key, value in document.items()))
    return EXIT_OK


def _env_document(config, info) -> dict[str, Any]:
    port = (info.metrics_port if info else 0) or config.metrics.port
    return {"s3_endpoint": config.store.endpoint, "secure": config.store.secure,
            "access_key": config.store.access_key, "secret_key": config.store.secret_key,
            "buckets": config.store.buckets, "ray_address": config.ray.address,
            "metrics_url": f"http://{config.metrics.host}:{port}/metrics" if port else ""}


# --- batches ------------------------------------------------------------------------------------

def _load_manifest(path: str, config, overrides: dict[str, Any] | None = None):
    from headshots.manifest import load_manifest
    from pipeline.generate import load_style_presets

    presets = load_style_presets(config.generation.styles_file or None)
    return load_manifest(path, known_styles=presets, overrides=overrides)


def cmd_submit(args, config) -> int:
    from headshots import client, stack

    overrides = {"tenant": args.tenant, "batch": args.batch, "base_model": args.base_model,
                 "styles": args.styles, "images_per_style": args.images_per_style}
    if Path(args.manifest).suffix.lower() == ".csv":
        missing = [flag for flag, key in (("--tenant", "tenant"), ("--batch", "batch"), ("--styles", "styles"))
                   if not overrides[key]]
        if missing:
            raise UsageError(f"a CSV roster needs {', '.join(missing)} on the command line "
                             "(and optionally --base-model, --images-per-style)")
    manifest = _load_manifest(args.manifest, config, overrides)
    resolved = stack.connect(config, start=True)
    result = client.submit_batch(resolved, manifest)
    if args.json:
        print(json.dumps({"tenant": result.tenant, "batch_id": result.batch_id}))
        return EXIT_OK
    print(f"submitted batch {result.batch_id} (tenant {result.tenant}, {len(result.persons)} persons)")
    for person in result.persons:
        for rejected in person["photos_rejected"]:
            print(f"  {person['person_id']}: photo rejected: {rejected['message']}")
    if args.watch:
        watch(resolved, result.batch_id, tenant=result.tenant)
    return EXIT_OK


def cmd_status(args, config) -> int:
    from headshots import client, stack

    resolved = stack.connect(config)
    if not args.batch:
        rows = client.list_batches(resolved, tenant=args.tenant)
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            for row in rows:
                print(f"{row['batch_id']:<40} {row['tenant']:<16} {row['state']:<10} {row['persons']} persons")
            if not rows:
                print("no batches yet: `headshots submit team.yaml`")
        return EXIT_OK
    if args.watch:
        watch(resolved, args.batch, tenant=args.tenant)
    summary = client.batch_status(resolved, args.batch, tenant=args.tenant)
    if args.json:
        print(json.dumps({key: summary[key] for key in ("tenant", "batch_id", "state", "persons")}, indent=1))
    else:
        print(f"batch {summary['batch_id']} ({summary['tenant']}): {summary['state']}")
        for person in summary["persons"]:
            line = f"  {person['person_id']:<32} {person['state']:<13} {person['headshots']} headshots"
            print(line + (f"  — {person['error']}" if person["error"] else ""))
    return EXIT_OK


def cmd_download(args, config) -> int:
    from headshots import client, stack

    resolved = stack.connect(config)
    result = client.download_batch(resolved, args.batch, args.output, tenant=args.tenant, as_zip=args.zip)
    _emit(args, result, f"wrote {len(result['files'])} files to {result['output_dir']}"
          + (f" and {result['zip']}" if result["zip"] else ""))
    return EXIT_OK


def cmd_demo(args, config) -> int:
    from headshots import client, stack

    started = time.perf_counter()
    manifest = _load_manifest(args.manifest, config)
    resolved = stack.connect(config, start=True)
    result = client.submit_batch(resolved, manifest)
    if args.json:
        summary = wait_for_batch(resolved, result.batch_id, tenant=result.tenant)
    else:
        print(f"demo batch {result.batch_id}: {len(result.persons)} persons, built-in tiny model "
              "(its headshots are noise: see README to use a real model)")
        summary = watch(resolved, result.batch_id, tenant=result.tenant)
    download = client.download_batch(resolved, result.batch_id, args.output, tenant=result.tenant)
    accepted = {p["person_id"]: p["photos_accepted"] for p in result.persons}
    document = {"tenant": result.tenant, "batch_id": result.batch_id,
                "output_dir": str(Path(download["output_dir"]).resolve()),
                "seconds": round(time.perf_counter() - started, 2),
                "persons": [{"person_id": p["person_id"], "state": p["state"],
                             "photos_accepted": accepted.get(p["person_id"], 0), "headshots": p["headshots"]}
                            for p in summary["persons"]]}
    if args.json:
        print(json.dumps(document, indent=1))
    else:
        print(f"done in {document['seconds']} s: {len(download['files'])} files in {document['output_dir']}")
        print("the stack is still running: `headshots status`, `headshots download`, `headshots down`")
    return EXIT_OK if all(p["state"] == "done" for p in summary["persons"]) else EXIT_ERROR


# --- progress ------------------------------------------------------------------------------------

def wait_for_batch(config, batch_id: str, *, tenant: str | None = None, timeout_s: float = 3600) -> dict[str, Any]:
    from headshots import client

    deadline = time.monotonic() + timeout_s
    while True:
        summary = client.batch_status(config, batch_id, tenant=tenant)
        if summary["state"] != "running":
            return summary
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} still running after {timeout_s:.0f} s; see `headshots status`")
        time.sleep(WATCH_POLL_S)


def watch(config, batch_id: str, *, tenant: str | None = None) -> dict[str, Any]:
    """Live progress bars (per stage, and per person for small batches) until the batch finishes."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from headshots import client

    stage_order = ["ingest", "train", "generate", "package"]
    reached = {"queued": 0, "ingesting": 0, "training": 1, "generating": 2, "packaging": 3, "done": 4}
    console = Console(stderr=False)
    summary = client.batch_status(config, batch_id, tenant=tenant)
    total = len(summary["persons"])
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, transient=False) as progress:
        stage_tasks = {stage: progress.add_task(f"stage {stage}", total=total, note="") for stage in stage_order}
        person_tasks = {}
        if total <= PER_PERSON_BARS_MAX:
            person_tasks = {p["person_id"]: progress.add_task(f"  {p['person_id'][:26]}", total=4, note="")
                            for p in summary["persons"]}
        while True:
            for stage_index, stage in enumerate(stage_order):
                finished = sum(1 for p in summary["persons"]
                               if p["state"] in ("needs_photos", "failed", "cancelled")
                               or reached.get(p["state"], 0) > stage_index)
                progress.update(stage_tasks[stage], completed=finished)
            for person in summary["persons"]:
                task = person_tasks.get(person["person_id"])
                if task is None:
                    continue
                final = person["state"] in ("done", "needs_photos", "failed", "cancelled")
                progress.update(task, completed=4 if final else reached.get(person["state"], 0),
                                note=person["state"] + (f" ({person['headshots']} headshots)" if person["headshots"] else ""))
            if summary["state"] != "running":
                break
            time.sleep(WATCH_POLL_S)
            summary = client.batch_status(config, batch_id, tenant=tenant)
    for person in summary["persons"]:
        if person["error"]:
            console.print(f"{person['person_id']}: {person['state']}: {person['error']}")
    console.print(f"batch {batch_id}: {summary['state']}")
    return summary


def _emit(args, document: dict[str, Any], text: str) -> None:
    print(json.dumps(document, indent=1) if getattr(args, "json", False) else text)


if __name__ == "__main__":
    sys.exit(main())
