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
# Display names in `status` lines are cut to this many characters.
NAME_WIDTH = 32


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

    up = commands.add_parser("up", help="start the local stack (embedded S3 server + Ray head) in the background, "
                             "or restart what of it is missing or dead; with a supervisor that keeps it running")
    up.add_argument("--json", action="store_true")
    up.add_argument("--no-supervisor", dest="supervise", action="store_false",
                    help="do not start the supervisor (one already running is left alone)")
    up.add_argument("--supervise-interval", type=_positive_seconds, metavar="SECONDS",
                    help="seconds between the supervisor's checks (default 5)")
    # The supervisor's own restarts: do nothing unless it is still the stack's supervisor, never start the store.
    up.add_argument("--for-supervisor", type=int, metavar="PID", help=argparse.SUPPRESS)
    up.set_defaults(handler=cmd_up)

    supervise = commands.add_parser("supervise", help="keep the local stack running: check it every few seconds "
                                    "and restart what is missing (started by `up`, stopped by `down`)")
    supervise.add_argument("--interval", type=_positive_seconds, metavar="SECONDS",
                           help="seconds between checks (default 5)")
    supervise.set_defaults(handler=cmd_supervise)
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
    submit.add_argument("--priority", type=int, help="-100..100: within the tenant, higher runs first (default 0)")
    submit.add_argument("--consent-collected-by", help="who collected the team's consent (CSV rosters)")
    submit.add_argument("--consent-given-at", help="when consent was given, ISO-8601 (CSV rosters)")
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

    cancel = commands.add_parser("cancel", help="cancel a batch, or one person of it")
    cancel.add_argument("--tenant", required=True)
    cancel.add_argument("--batch", required=True)
    cancel.add_argument("--person")
    cancel.add_argument("--json", action="store_true")
    cancel.set_defaults(handler=cmd_cancel)

    retry = commands.add_parser("retry", help="run a person in needs_photos, failed or cancelled again")
    retry.add_argument("--tenant", required=True)
    retry.add_argument("--batch", required=True)
    retry.add_argument("--person", required=True)
    retry.add_argument("--json", action="store_true")
    retry.set_defaults(handler=cmd_retry)

    more = commands.add_parser("more", help="generate more headshots from a done person's stored model "
                                            "(no retraining; while the model is retained)")
    more.add_argument("--tenant", required=True)
    more.add_argument("--batch", required=True)
    more.add_argument("--person", required=True)
    more.add_argument("--style", help="one of the batch's styles (default: every style)")
    more.add_argument("--count", type=int, required=True, help="headshots to add per style (1-64)")
    more.add_argument("--watch", action="store_true", help="show progress until the batch is done again")
    more.add_argument("--json", action="store_true")
    more.set_defaults(handler=cmd_more)

    add_photos = commands.add_parser("add-photos", help="add photos to a person waiting for them")
    add_photos.add_argument("--tenant", required=True)
    add_photos.add_argument("--batch", required=True)
    add_photos.add_argument("--person", required=True)
    add_photos.add_argument("files", nargs="+")
    add_photos.add_argument("--json", action="store_true")
    add_photos.set_defaults(handler=cmd_add_photos)

    check = commands.add_parser("check", help="run the upload checks on photos (treated as one person's)")
    check.add_argument("photos", nargs="+", metavar="PHOTO_OR_DIR")
    check.add_argument("--json", action="store_true", help="a JSON array of {file, accepted, reason, message, scores}")
    check.set_defaults(handler=cmd_check)

    delete = commands.add_parser("delete", help="delete a person's, batch's or tenant's photos and models now")
    delete.add_argument("--tenant", required=True)
    delete.add_argument("--batch")
    delete.add_argument("--person", help="a person id (unique within its batch: needs --batch)")
    delete.add_argument("--include-outputs", action="store_true", help="delete the generated headshots too")
    delete.add_argument("--requested-by", default="operator", help="who asked (recorded in the receipt; ids only)")
    delete.add_argument("--json", action="store_true")
    delete.set_defaults(handler=cmd_delete)

    receipts = commands.add_parser("receipts", help="list deletion receipts, or verify one against the store")
    receipts.add_argument("--tenant")
    receipts.add_argument("--batch")
    receipts.add_argument("--person")
    receipts.add_argument("--verify", metavar="RECEIPT_ID", help="list the store again: is everything still gone?")
    receipts.add_argument("--json", action="store_true")
    receipts.set_defaults(handler=cmd_receipts)

    retention = commands.add_parser("retention", help="retention sweeps")
    retention_commands = retention.add_subparsers(dest="retention_command", required=True)
    sweep = retention_commands.add_parser("sweep", help="run one sweep now (or as of --now)")
    sweep.add_argument("--dry-run", action="store_true", help="list what would be deleted; delete nothing")
    sweep.add_argument("--now", help="ISO-8601 instant to judge expiry by (simulated time)")
    sweep.add_argument("--json", action="store_true")
    sweep.set_defaults(handler=cmd_retention_sweep)

    serve = commands.add_parser("serve", help="serve the studios' HTTP API (/v1, OpenAPI at /openapi.json)")
    serve.add_argument("--host", help="address to listen on (default: api.host, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: api.port, 8080; 0 picks a free one)")
    serve.set_defaults(handler=cmd_serve)

    tenants = commands.add_parser("tenants", help="tenants of the HTTP API and their API keys")
    tenant_commands = tenants.add_subparsers(dest="tenants_command", required=True)
    tenant_create = tenant_commands.add_parser("create", help="create a tenant; prints its API key once")
    tenant_create.add_argument("name", help="display name (the tenant id is its slug unless --id)")
    tenant_create.add_argument("--id", dest="tenant_id", help="tenant id (lowercase letters, digits, '-')")
    tenant_create.add_argument("--rate-limit", type=float, help="requests per second (default: api.default_rate_limit_per_s)")
    tenant_create.add_argument("--max-concurrent-batches", type=int,
                               help="batches created or running at once (default: api.default_max_concurrent_batches)")
    tenant_create.add_argument("--json", action="store_true", help="print {tenant, api_key, webhook_secret}")
    tenant_create.set_defaults(handler=cmd_tenants_create)
    tenant_list = tenant_commands.add_parser("list", help="tenants, their limits and key ids (never keys)")
    tenant_list.add_argument("--json", action="store_true")
    tenant_list.set_defaults(handler=cmd_tenants_list)
    tenant_add_key = tenant_commands.add_parser("add-key", help="another API key for a tenant (to rotate keys)")
    tenant_add_key.add_argument("tenant")
    tenant_add_key.add_argument("--json", action="store_true")
    tenant_add_key.set_defaults(handler=cmd_tenants_add_key)
    tenant_revoke = tenant_commands.add_parser("revoke", help="revoke an API key (tenant or admin) by its id")
    tenant_revoke.add_argument("key_id")
    tenant_revoke.add_argument("--json", action="store_true")
    tenant_revoke.set_defaults(handler=cmd_tenants_revoke)
    tenant_limits = tenant_commands.add_parser("limits", help="change a tenant's rate limit or batch limit")
    tenant_limits.add_argument("tenant")
    tenant_limits.add_argument("--rate-limit", type=float)
    tenant_limits.add_argument("--max-concurrent-batches", type=int)
    tenant_limits.add_argument("--json", action="store_true")
    tenant_limits.set_defaults(handler=cmd_tenants_limits)
    tenant_admin = tenant_commands.add_parser("create-admin-key",
                                              help="an operator key that acts on any tenant (X-Headshots-Tenant)")
    tenant_admin.add_argument("--json", action="store_true")
    tenant_admin.set_defaults(handler=cmd_tenants_create_admin_key)

    demo = commands.add_parser("demo", help="run the example batch end to end on the local stack")
    demo.add_argument("--manifest", default=str(DEMO_MANIFEST))
    demo.add_argument("-o", "--output", default="headshots-demo-output")
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(handler=cmd_demo)
    return parser


# --- stack --------------------------------------------------------------------------------------

def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be between 0.1 and 3600 seconds, not {text}")
    return value


def cmd_up(args, config) -> int:
    from headshots import stack

    options = {"supervise": args.supervise, "for_supervisor": args.for_supervisor}
    if args.supervise_interval:
        options["supervise_interval_s"] = args.supervise_interval
    result = stack.start_or_heal(config, **options)
    info = result.info
    resolved = stack.effective_config(config, info)
    document = {**_env_document(resolved, info), "actions": result.actions, "supervisor_pid": info.supervisor_pid}
    text = (f"stack up: store {resolved.store.endpoint}, ray {resolved.ray.address}, "
            f"metrics http://{config.metrics.host}:{info.metrics_port}/metrics")
    if result.actions:
        text += "".join(f"\n  {action}" for action in result.actions)
    _emit(args, document, text)
    return EXIT_OK


def cmd_supervise(args, config) -> int:
    from headshots import stack

    if not (config.store.endpoint or config.ray.address):
        return stack.supervise(config, interval_s=args.interval or stack.SUPERVISE_INTERVAL_S)
    raise UsageError("the supervisor keeps the local stack running; with store.endpoint or ray.address set "
                     "there is none (a deployment restarts its own services)")


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
    retention_port = info.retention_metrics_port if info else 0
    return {"s3_endpoint": config.store.endpoint, "secure": config.store.secure,
            "access_key": config.store.access_key, "secret_key": config.store.secret_key,
            "buckets": config.store.buckets, "ray_address": config.ray.address,
            "metrics_url": f"http://{config.metrics.host}:{port}/metrics" if port else "",
            "retention_metrics_url": f"http://{config.metrics.host}:{retention_port}/metrics"
            if retention_port else ""}


# --- batches ------------------------------------------------------------------------------------

def _load_manifest(path: str, config, overrides: dict[str, Any] | None = None):
    from headshots.manifest import load_manifest
    from pipeline.generate import load_style_presets

    presets = load_style_presets(config.generation.styles_file or None)
    return load_manifest(path, known_styles=presets, overrides=overrides)


def cmd_submit(args, config) -> int:
    from headshots import client, stack

    overrides = {"tenant": args.tenant, "batch": args.batch, "base_model": args.base_model,
                 "styles": args.styles, "images_per_style": args.images_per_style, "priority": args.priority}
    if args.consent_collected_by or args.consent_given_at:
        overrides["consent"] = {"collected_by": args.consent_collected_by, "given_at": args.consent_given_at}
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
    # Person ids are random: the operator's terminal shows whose is whose (names from the manifest in hand).
    names = {spec.person_id: spec.name for spec in manifest.persons}
    listed = len(result.persons) <= PER_PERSON_BARS_MAX
    for person in result.persons:
        if listed:
            print(f"  {_person_label(person['person_id'], names)}: {person['photos_accepted']} photo(s) accepted")
        for rejected in person["photos_rejected"]:
            print(f"  {_person_label(person['person_id'], names)}: photo rejected: {rejected['message']}")
    if not listed:
        print(f"  person ids with names: `headshots status {result.batch_id}`")
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
                line = f"{row['batch_id']:<40} {row['tenant']:<16} {row['state']:<10} {row['persons']:>4} persons"
                if row["persons_by_state"]:
                    done = row["persons_by_state"].get("done", 0)
                    line += f"  {done}/{row['persons']} done"
                if row["eta_seconds"] is not None:
                    line += f"  ETA {format_eta(row['eta_seconds'])}"
                if row.get("stalled_since"):
                    line += f"  STALLED since {row['stalled_since']}"
                print(line)
            if not rows:
                print("no batches yet: `headshots submit team.yaml`")
        return EXIT_OK
    if args.watch:
        watch(resolved, args.batch, tenant=args.tenant)
    summary = client.batch_status(resolved, args.batch, tenant=args.tenant)
    if args.json:
        print(json.dumps({key: summary.get(key) for key in ("tenant", "batch_id", "state", "eta_seconds",
                                                             "stalled_since", "hint", "persons")}, indent=1))
    else:
        eta = f", ETA {format_eta(summary['eta_seconds'])}" if summary["eta_seconds"] is not None else ""
        print(f"batch {summary['batch_id']} ({summary['tenant']}): {summary['state']}{eta}")
        if summary.get("stalled_since"):
            print(f"  STALLED: no progress since {summary['stalled_since']}; {summary['hint']}")
        names = person_names(resolved, summary["tenant"], summary["batch_id"])
        width = max([len(name) for name in names.values()] + [4])
        for person in summary["persons"]:
            name = names.get(person["person_id"]) or "-"
            line = (f"  {person['person_id']:<16} {name:<{min(width, NAME_WIDTH)}.{NAME_WIDTH}} "
                    f"{person['state']:<13} {person['headshots']} headshots")
            if person["eta_seconds"] is not None:
                line += f"  ETA {format_eta(person['eta_seconds'])}"
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


def _call(handle, method: str, *call_args):
    """Call a stack actor; a ValueError it raises is the operator's input problem (exit 2)."""
    from headshots.operations import OperationRefused, call_actor

    try:
        return call_actor(handle, method, *call_args)
    except OperationRefused as error:
        raise UsageError(str(error)) from None


def _coordinator_call(resolved, method: str, *call_args):
    from headshots import operations

    return _call(operations.coordinator(resolved), method, *call_args)


def cmd_cancel(args, config) -> int:
    from headshots import stack
    from storage.state import StateStore
    from headshots.client import store_for

    from headshots import operations

    resolved = stack.connect(config, start=True)
    try:
        result = operations.cancel(resolved, StateStore(store_for(resolved)), tenant=args.tenant,
                                   batch_id=args.batch, person_id=args.person)
    except operations.OperationRefused as error:
        raise UsageError(str(error)) from None
    _emit(args, result, f"cancelled {len(result['cancelled'])} person(s): {', '.join(result['cancelled']) or 'none'}")
    return EXIT_OK


def cmd_retry(args, config) -> int:
    from headshots import stack

    resolved = stack.connect(config, start=True)
    result = _coordinator_call(resolved, "retry_person", args.tenant, args.batch, args.person)
    _emit(args, result, f"person {args.person} queued again; follow it with `headshots status {args.batch} --watch`")
    return EXIT_OK


def cmd_more(args, config) -> int:
    from headshots import stack

    resolved = stack.connect(config, start=True)
    result = _coordinator_call(resolved, "more_headshots", args.tenant, args.batch, args.person, args.count,
                               args.style)
    styles = ", ".join(f"{count} {style}" for style, count in result["added_per_style"].items())
    _emit(args, result, f"person {args.person}: generating {styles} more from the stored model; "
                        f"follow it with `headshots status {args.batch} --watch`")
    if args.watch and not args.json:
        watch(resolved, args.batch, tenant=args.tenant)
    return EXIT_OK


def cmd_add_photos(args, config) -> int:
    from headshots import client, stack

    files = [Path(f) for f in args.files]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UsageError(f"no such file(s): {', '.join(missing)}")
    resolved = stack.connect(config, start=True)
    try:
        result = client.add_photos(resolved, tenant=args.tenant, batch_id=args.batch, person_id=args.person,
                                   files=files)
    except ValueError as error:
        raise UsageError(str(error)) from None
    lines = [f"{result['photos_added']} photo(s) stored; {args.person} now has {result['photos_accepted']}"]
    lines += [f"  rejected: {r['message']}" for r in result["photos_rejected"]]
    _emit(args, result, "\n".join(lines))
    return EXIT_OK


def cmd_check(args, config) -> int:
    """Upload checks only (no stack needed). Exit 0 even when photos are rejected: that is the answer."""
    from pipeline import faces

    paths: list[Path] = []
    for entry in args.photos:
        path = Path(entry)
        if path.is_dir():
            paths.extend(sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")))
        elif path.exists():
            paths.append(path)
        else:
            raise UsageError(f"{entry}: no such file or folder")
    if not paths:
        raise UsageError("no photos to check: name files or folders that contain some")
    from cluster.stages import gate_config

    verdicts = faces.check_files(paths, faces.load_face_models(), gate_config(config),
                                 max_pixels=config.ingest.max_pixels, max_bytes=config.ingest.max_bytes,
                                 min_side=config.ingest.min_side_px)
    if args.json:
        print(json.dumps([verdict.to_dict() for verdict in verdicts], indent=1))
    else:
        for verdict in verdicts:
            mark = "ok  " if verdict.accepted else "NO  "
            print(f"{mark}{verdict.file}: {verdict.message}")
        accepted = sum(v.accepted for v in verdicts)
        print(f"{accepted} of {len(verdicts)} photos accepted; a person needs {config.ingest.min_photos}")
    return EXIT_OK


# --- retention and deletion ---------------------------------------------------------------------

def _retention_controller(resolved):
    from headshots import operations

    return operations.retention_controller(resolved)


def cmd_delete(args, config) -> int:

    from headshots import stack

    if args.person and not args.batch:
        raise UsageError("--person needs --batch: person ids are unique only within a batch")
    resolved = stack.connect(config, start=True)
    controller = _retention_controller(resolved)
    result = _call(controller, "delete", args.tenant, args.batch, args.person, args.include_outputs,
                   args.requested_by)
    what = f"person {args.person}" if args.person else f"batch {args.batch}" if args.batch else f"tenant {args.tenant}"
    _emit(args, result, "\n".join([
        f"deleted {what}: {result['objects_deleted']} object versions in {result['seconds']} s; "
        f"receipt {result['receipt_id']} (verification listing count {result['verification']['listing_count']})",
        *_node_lines(result.get("nodes"))]))
    return EXIT_OK


def _node_lines(nodes: dict | None) -> list[str]:
    """The GPU nodes' part in a deletion: how many confirmed their purge, and each one that did not."""
    if not nodes:
        return []
    lines = [f"GPU nodes: {nodes['confirmed']} confirmed the purge, {len(nodes['not_confirmed'])} did not"]
    for node in nodes["not_confirmed"]:
        lines.append(f"  node {node['address'] or node['node_id'] or 'unknown'}: {node['outcome']}; covered by "
                     f"{', '.join(node['covered_by']) or 'nothing'}")
    return lines


def cmd_receipts(args, config) -> int:
    from headshots import client, stack
    from storage.receipts import list_receipts, verify_receipt

    resolved = stack.connect(config)
    store = client.store_for(resolved)
    if args.verify:
        result = verify_receipt(store, args.verify)
        _emit(args, result, f"receipt {args.verify}: {'verified' if result['verified'] else 'NOT verified'} — "
              f"{result['objects_checked']} object versions checked, {len(result['still_present'])} still present")
        return EXIT_OK if result["verified"] else EXIT_ERROR
    receipts = list_receipts(store, tenant=args.tenant, batch_id=args.batch, person_id=args.person)
    if args.json:
        print(json.dumps([receipt.to_json() for receipt in receipts], indent=1))
    else:
        for receipt in receipts:
            summary = receipt.summary()
            nodes = summary["nodes"]
            print(f"{receipt.receipt_id:<36} {receipt.kind:<8} {summary['persons']:>4} persons "
                  f"{summary['objects_deleted']:>6} versions  listing count {receipt.verification.get('listing_count')}"
                  f"  nodes {nodes['confirmed']} confirmed {len(nodes['not_confirmed'])} not")
            for line in _node_lines(nodes)[1:]:
                print(line)
        if not receipts:
            print("no receipts")
    return EXIT_OK


def cmd_retention_sweep(args, config) -> int:
    import ray

    from headshots import stack

    if args.now:
        from storage.retention import parse_time

        try:
            parse_time(args.now)
        except ValueError:
            raise UsageError(f"--now must be an ISO-8601 instant such as 2026-12-31T00:00:00Z, not {args.now!r}")
    resolved = stack.connect(config, start=True)
    controller = _retention_controller(resolved)
    result = ray.get(controller.sweep.remote(args.now, args.dry_run))
    verb = "would delete" if args.dry_run else "deleted"
    lines = [f"sweep as of {result['as_of']}: {verb} {result['objects']} object versions "
             f"({result['bytes']} bytes) of {result['persons']} persons in {result['seconds']} s"]
    for artifact, counts in sorted(result["by_artifact"].items()):
        lines.append(f"  {artifact:<9} {counts['versions']:>6} versions {counts['bytes']:>12} bytes")
    if result["receipt_id"]:
        lines.append(f"receipt {result['receipt_id']}")
    _emit(args, result, "\n".join(lines))
    return EXIT_OK


# --- HTTP API and tenants --------------------------------------------------------------------------

def cmd_serve(args, config) -> int:
    import uvicorn

    from headshots import stack
    from headshots.api.app import create_app

    resolved = stack.connect(config, start=True)
    host = args.host or config.api.host
    port = config.api.port if args.port is None else args.port
    print(f"headshots API on http://{host}:{port}/v1 (OpenAPI: /openapi.json); Ctrl-C stops it", file=sys.stderr)
    uvicorn.run(create_app(resolved), host=host, port=port, log_level="warning", server_header=False)
    return EXIT_OK


def _tenant_store(config):
    from headshots import client, stack

    store = client.store_for(stack.connect(config, start=True))
    store.ensure_buckets()
    return store


def _tenant_call(call):
    from headshots.tenants import TenantError

    try:
        return call()
    except (TenantError, ValueError) as error:
        raise UsageError(str(error)) from None


def cmd_tenants_create(args, config) -> int:
    from headshots import tenants

    store = _tenant_store(config)
    record, api_key = _tenant_call(lambda: tenants.create_tenant(
        store, args.name, tenant=args.tenant_id,
        rate_limit_per_s=args.rate_limit or config.api.default_rate_limit_per_s,
        max_concurrent_batches=args.max_concurrent_batches or config.api.default_max_concurrent_batches))
    document = {"tenant": record.tenant, "api_key": api_key, "webhook_secret": record.webhook_secret,
                "key_id": record.api_keys[0].key_id}
    _emit(args, document, f"tenant {record.tenant} created\n"
          f"API key (shown only now; send it as `Authorization: Bearer ...`): {api_key}\n"
          f"webhook secret (shown only now; verifies webhook signatures): {record.webhook_secret}")
    return EXIT_OK


def cmd_tenants_list(args, config) -> int:
    from headshots import tenants

    records = [record.public() for record in tenants.list_tenants(_tenant_store(config))]
    if args.json:
        print(json.dumps(records, indent=1))
        return EXIT_OK
    for record in records:
        active = [k["key_id"] for k in record["api_keys"] if not k["revoked_at"]]
        print(f"{record['tenant']:<24} {record['limits']['rate_limit_per_s']:>6g} req/s "
              f"{record['limits']['max_concurrent_batches']:>4} batches  keys: {', '.join(active) or 'none'}")
    if not records:
        print("no tenants yet: `headshots tenants create NAME`")
    return EXIT_OK


def cmd_tenants_add_key(args, config) -> int:
    from headshots import tenants

    api_key = _tenant_call(lambda: tenants.add_api_key(_tenant_store(config), args.tenant))
    _emit(args, {"tenant": args.tenant, "api_key": api_key}, f"API key (shown only now): {api_key}")
    return EXIT_OK


def cmd_tenants_revoke(args, config) -> int:
    from headshots import tenants

    result = _tenant_call(lambda: tenants.revoke_api_key(_tenant_store(config), args.key_id))
    _emit(args, result, f"key {args.key_id} revoked (API servers stop accepting it within api.auth_cache_s "
                        f"= {config.api.auth_cache_s:g} s)")
    return EXIT_OK


def cmd_tenants_limits(args, config) -> int:
    from headshots import tenants

    record = _tenant_call(lambda: tenants.set_limits(_tenant_store(config), args.tenant,
                                                     rate_limit_per_s=args.rate_limit,
                                                     max_concurrent_batches=args.max_concurrent_batches))
    limits = record.public()["limits"]
    _emit(args, {"tenant": record.tenant, **limits},
          f"tenant {record.tenant}: {limits['rate_limit_per_s']:g} req/s, "
          f"{limits['max_concurrent_batches']} concurrent batches")
    return EXIT_OK


def cmd_tenants_create_admin_key(args, config) -> int:
    from headshots import tenants

    api_key = _tenant_call(lambda: tenants.create_admin_key(_tenant_store(config)))
    _emit(args, {"role": "admin", "api_key": api_key},
          f"admin API key (shown only now; name the tenant with X-Headshots-Tenant): {api_key}")
    return EXIT_OK


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
    from storage.state import FINAL_PERSON_STATES, STAGE_OF_STATE, STAGES, PersonStatus

    stage_order = list(STAGES)
    # Stages a person in each state has finished.
    reached = {PersonStatus.QUEUED: 0, **{state: STAGES.index(stage) for state, stage in STAGE_OF_STATE.items()},
               PersonStatus.DONE: len(STAGES)}
    console = Console(stderr=False)
    summary = client.batch_status(config, batch_id, tenant=tenant)
    total = len(summary["persons"])
    names = person_names(config, summary["tenant"], summary["batch_id"]) if total <= PER_PERSON_BARS_MAX else {}
    labels = {p["person_id"]: f"  {p['person_id']} {names.get(p['person_id'], '')[:NAME_WIDTH]}".rstrip()
              for p in summary["persons"]} if total <= PER_PERSON_BARS_MAX else {}
    width = max([len(label) for label in labels.values()] + [28])
    with Progress(TextColumn(f"{{task.description:<{width}}}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=console, transient=False) as progress:
        stage_tasks = {stage: progress.add_task(f"stage {stage}", total=total, note="") for stage in stage_order}
        person_tasks = {}
        if total <= PER_PERSON_BARS_MAX:
            person_tasks = {person_id: progress.add_task(label, total=4, note="")
                            for person_id, label in labels.items()}
        while True:
            for stage_index, stage in enumerate(stage_order):
                finished = sum(1 for p in summary["persons"]
                               if p["state"] in FINAL_PERSON_STATES
                               or reached.get(p["state"], 0) > stage_index)
                progress.update(stage_tasks[stage], completed=finished)
            for person in summary["persons"]:
                task = person_tasks.get(person["person_id"])
                if task is None:
                    continue
                final = person["state"] in FINAL_PERSON_STATES
                note = person["state"] + (f" ({person['headshots']} headshots)" if person["headshots"] else "")
                if person.get("eta_seconds") is not None:
                    note += f" ETA {format_eta(person['eta_seconds'])}"
                progress.update(task, completed=4 if final else reached.get(person["state"], 0), note=note)
            if summary.get("eta_seconds") is not None:
                progress.update(stage_tasks["generate"], note=f"batch ETA {format_eta(summary['eta_seconds'])}")
            elif summary.get("stalled_since"):
                progress.update(stage_tasks["generate"], note=f"STALLED since {summary['stalled_since']}")
            if summary["state"] != "running":
                break
            time.sleep(WATCH_POLL_S)
            summary = client.batch_status(config, batch_id, tenant=tenant)
    for person in summary["persons"]:
        if person["error"]:
            console.print(f"{_person_label(person['person_id'], names)}: {person['state']}: {person['error']}")
    console.print(f"batch {batch_id}: {summary['state']}")
    return summary


def person_names(config, tenant: str, batch_id: str) -> dict[str, str]:
    """Person id -> display name, from the persons' state documents (the only place names are kept), for
    the operator's terminal: never logged, never in ``--json`` output. A deleted person has none."""
    from headshots.client import store_for
    from storage.state import StateStore

    states = StateStore(store_for(config))
    return {person.person_id: person.name for person in states.load_persons(states.load_batch(tenant, batch_id))
            if person.name}


def _person_label(person_id: str, names: dict[str, str]) -> str:
    name = names.get(person_id)
    return f"{person_id} ({name})" if name else person_id


def format_eta(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: an estimate, so no false precision beyond that."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _emit(args, document: dict[str, Any], text: str) -> None:
    print(json.dumps(document, indent=1) if getattr(args, "json", False) else text)


if __name__ == "__main__":
    sys.exit(main())
