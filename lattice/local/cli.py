"""``lattice local apply|get|scale|delete|logs|describe``: kubectl's verbs for a TrainingJob that
runs on this machine (docs/local.md). The work is in :mod:`.jobs`; this module parses and prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from ..core.errors import ConfigError
from . import jobs, table
from .state import all_jobs

RESOURCE = "trainingjob.exabits.ai"


def cmd_apply(args: argparse.Namespace) -> int:
    workdir = os.getcwd()
    docs = jobs.load_manifests(args.filename)
    if args.foreground and len(docs) != 1:
        raise ConfigError(f"--foreground runs one job; {args.filename} has {len(docs)} documents")
    local = {"ttl": args.ttl, "lastCall": args.last_call}
    for obj in docs:
        job, outcome, notes = jobs.apply(obj, workdir, local)
        for note in notes if outcome == "created" else ():
            print(f"info: {note}", file=sys.stderr)
        print(f"{RESOURCE}/{job.name} {outcome}")
        sys.stdout.flush()
        if outcome != "created":
            continue
        if args.foreground:
            from .controller import Controller

            logging.getLogger("lattice.local").setLevel(logging.INFO)
            return Controller(job).run()
        jobs.start_controller(job, workdir)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    if args.name:
        selected = [jobs.find(args.name, None if args.all_namespaces else args.namespace)]
    else:
        selected = all_jobs(None if args.all_namespaces else (args.namespace or "default"))
    objects = [jobs.read_object(j) for j in selected]
    if args.output == "json":
        print(json.dumps(objects[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": objects},
                         indent=2))
        return 0
    if not objects:
        where = "any namespace" if args.all_namespaces else f"{args.namespace or 'default'} namespace"
        others = [] if args.all_namespaces or args.namespace else all_jobs(None)
        hint = f" ({len(others)} in other namespaces: use -A or -n)" if others else ""
        print(f"No resources found in {where}.{hint}", file=sys.stderr)
        return 0
    for j in selected:
        if j.read_status().get("phase") not in ("Succeeded", "Failed") and not jobs.controller_alive(j):
            print(f"warning: the controller of {j.namespace}/{j.name} is not running; its status is "
                  f"stale (see {j.controller_log})", file=sys.stderr)
    print(table.render(objects, all_namespaces=args.all_namespaces))
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    job = jobs.find(args.name, args.namespace)
    jobs.scale(job, args.replicas)
    if not jobs.controller_alive(job):
        print(f"warning: {job.name} has no running controller (phase {job.read_status().get('phase')}); "
              "the new size takes no effect", file=sys.stderr)
    print(f"{RESOURCE}/{job.name} scaled")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    job = jobs.find(args.name, args.namespace)
    killed = jobs.delete(job, args.timeout, purge=args.purge)
    if killed:
        print(f"warning: did not stop on their own, killed: {', '.join(killed)}", file=sys.stderr)
    kept = "" if args.purge else f" (checkpoints and logs kept in {job.path})"
    print(f'{RESOURCE} "{job.name}" deleted{kept}')
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    job = jobs.find(args.name, args.namespace)
    if args.controller:
        files = [job.controller_log]
    elif args.worker is not None:
        files = [job.log_of(f"{job.name}-worker-{args.worker}")]
    else:
        files = sorted(job.logs.glob("*.log"))
    for path in files:
        if not path.exists():
            raise ConfigError(f"no log {path.name} for {job.name} (workers so far: "
                              f"{sorted(p.stem for p in job.logs.glob('*.log'))})")
        lines = path.read_text(errors="replace").splitlines()
        if len(files) > 1:
            print(f"==> {path.stem} <==")
        print("\n".join(lines[-args.tail:] if args.tail else lines))
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    job = jobs.find(args.name, args.namespace)
    obj = jobs.read_object(job)
    status, spec = obj.get("status") or {}, obj.get("spec") or {}
    print(f"Name:           {job.name}\nNamespace:      {job.namespace}\nState dir:      {job.path}")
    print(f"Controller:     {'running' if jobs.controller_alive(job) else 'not running'}")
    print(f"Sizes:          min {spec.get('minSize')}, max {spec.get('maxSize')}, replicas {spec.get('replicas')}")
    for key in ("phase", "replicas", "readyReplicas", "restarts", "round", "lastCheckpoint"):
        print(f"{key + ':':16}{status.get(key)}")
    print("Conditions:")
    for c in status.get("conditions") or ():
        print(f"  {c.get('type'):16} {c.get('status'):6} {c.get('reason')}: {c.get('message')}")
    print("Workers:")
    for pod in job.read_pods():
        state = "running" if pod.get("exit_code") is None else f"exited {pod['exit_code']}"
        print(f"  {pod['name']:30} pid {pod['pid']:<8} {state}{' (deleting)' if pod.get('deleted_at') else ''}")
    print("Events:")
    events = job.events_file.read_text().splitlines() if job.events_file.exists() else []
    for line in events[-args.events:]:
        e = json.loads(line)
        print(f"  {e['time']}  {e['type']:8} {e['reason']:22} {e['message']}")
    return 0


def _ns(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", default=None,
                   help="the job's namespace (default: the only job of that name, or 'default')")


def _named(sub: Any, name: str, helptext: str, fn: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=helptext)
    p.add_argument("name", help="the TrainingJob's metadata.name")
    _ns(p)
    p.set_defaults(fn=fn)
    return p


def add_cli(subparsers: Any) -> None:
    """Register ``lattice local ...`` on the ``lattice`` parser."""
    local = subparsers.add_parser("local", help="run a TrainingJob on this machine (kubectl-like verbs)")
    sub = local.add_subparsers(dest="local", required=True)
    ap = sub.add_parser("apply", help="start (or update) a TrainingJob from a YAML file")
    ap.add_argument("-f", "--filename", required=True, help="the TrainingJob YAML ('-': stdin)")
    ap.add_argument("--foreground", action="store_true", help="run the controller in this process (Ctrl-C stops)")
    ap.add_argument("--ttl", type=float, default=5.0, help="agents' rendezvous TTL in seconds (default 5)")
    ap.add_argument("--last-call", type=float, default=2.0,
                    help="seconds a round waits for more agents after minSize (default 2)")
    ap.set_defaults(fn=cmd_apply)
    get = sub.add_parser("get", help="the jobs with kubectl's columns (NAME PHASE READY DESIRED MIN MAX ...)")
    get.add_argument("name", nargs="?")
    _ns(get)
    get.add_argument("-A", "--all-namespaces", action="store_true")
    get.add_argument("-o", "--output", choices=("table", "json"), default="table")
    get.set_defaults(fn=cmd_get)
    sc = _named(sub, "scale", "change the desired number of workers (within minSize..maxSize)", cmd_scale)
    sc.add_argument("--replicas", type=int, required=True)
    de = _named(sub, "delete", "stop every worker (gracefully, then killed) and remove the job", cmd_delete)
    de.add_argument("--timeout", type=float, default=60.0, help="seconds before what still runs is killed")
    de.add_argument("--purge", action="store_true", help="also remove the job's checkpoints and logs")
    lg = _named(sub, "logs", "print a worker's log (agent and training output)", cmd_logs)
    lg.add_argument("--worker", type=int, default=None, help="worker index (default: every worker)")
    lg.add_argument("--controller", action="store_true", help="the controller's log instead")
    lg.add_argument("--tail", type=int, default=0, help="only the last N lines")
    ds = _named(sub, "describe", "status, conditions, workers and recent events of a job", cmd_describe)
    ds.add_argument("--events", type=int, default=20, help="how many recent events (default 20)")

