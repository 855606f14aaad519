"""The ``lattice`` command: ``ckpt ls|inspect|verify`` and ``demo`` here; other parts add their own (see ``_COMMAND_MODULES``)."""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import logging
import signal
import sys
from collections.abc import Sequence

from .core import fmt, inspect
from .core.errors import CorruptCheckpointError, LatticeError


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def cmd_ls(args: argparse.Namespace) -> int:
    lst = inspect.listing(args.dir)
    if not lst.committed:
        print(f"no committed checkpoints in {args.dir}")
    else:
        print(f"{'STEP':>10}  {'WRITTEN (UTC)':19}  {'SIZE':>10}  ITEMS")
    for step, path in lst.committed:
        try:
            m = inspect.read_manifest(path)
            when = datetime.datetime.fromtimestamp(m["wall_time"], datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
            size = _size(sum(f["size"] for f in m["files"].values()))
            items = ", ".join(k for k in m["items"] if not k.startswith("__"))
        except CorruptCheckpointError as exc:
            when, size, items = "?", "?", f"DAMAGED: {exc.reason}"
        mark = "  (latest)" if lst.latest == path.name else ""
        print(f"{step:>10}  {when:19}  {size:>10}  {items}{mark}")
    for name in lst.other:
        print(f"{'':>10}  not committed / set aside: {name}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    d = inspect.describe(inspect.find(args.dir, args.step))
    if args.json:
        print(json.dumps(d, indent=1, default=str))
        return 0
    m = d["manifest"]
    print(f"checkpoint {d['path']}\n  step {m['step']}, format {m['format']} v{m['version']}")
    for name, f in m["files"].items():
        print(f"  file {name}: {_size(f['size'])}, crc32c {f['crc32c']:08x}")
    print("  items:")
    for name, it in d["items"].items():
        print(f"    {name:24} adapter {it['adapter']:20} {it['tensors']:4} tensors  {_size(it['bytes'])}")
    print("  tensors:")
    for name, t in d["tensors"].items():
        begin, end = t["data_offsets"]
        print(f"    {name:48} {t['dtype']:6} {str(t['shape']):20} {_size(end - begin)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    lst = inspect.listing(args.dir)
    targets = [(s, p) for s, p in lst.committed if args.step is None or s == args.step]
    # a directory under a final step name is only ever made by renaming a finished one, so
    # one without a manifest lost it: damaged (restore skips it, as never committed)
    unfinished = [(step, name) for name in lst.other if (step := fmt.parse_step_dirname(name)) is not None
                  and (args.step is None or step == args.step)]
    if not targets and not unfinished:
        print(f"no committed checkpoint{'' if args.step is None else f' of step {args.step}'} in {args.dir}")
        return 2
    bad = 0
    for step, name in unfinished:
        bad += 1
        print(f"step {step}: DAMAGED: {args.dir}/{name}/{fmt.MANIFEST} is missing (never committed, or lost)")
    for step, path in targets:
        try:
            inspect.verify(path)
            print(f"step {step}: ok")
        except CorruptCheckpointError as exc:
            bad += 1
            print(f"step {step}: DAMAGED: {exc}")
    print(f"{len(targets) + len(unfinished) - bad} ok, {bad} damaged")
    return 1 if bad else 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.simple:
        from .demo.simple import main

        return main(args.workdir, epochs=args.epochs, seed=args.seed)
    from .demo.elastic import main as elastic

    return elastic(args.workdir, steps=args.steps, sleep=args.sleep)


# modules with ``add_cli(subparsers)``: each adds its top-level commands (``lattice run``, ...)
_COMMAND_MODULES = (
    "lattice.runtime.agent.cli",         # run, agent
    "lattice.runtime.rendezvous.cli",    # rendezvous serve
    "lattice.runtime.service.cli",       # checkpoint-service serve
    "lattice.local.cli",                 # local apply|get|scale|delete
)
# modules with ``add_ckpt_cli(ckpt_subparsers)``: more ``lattice ckpt ...`` commands
_CKPT_MODULES = (
    "lattice.interop.cli",               # ckpt export|import (orbax, tf.train.Checkpoint)
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lattice", description="Elastic, fault-tolerant training.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)
    ckpt = sub.add_parser("ckpt", help="list, inspect and verify checkpoints").add_subparsers(dest="ckpt", required=True)
    ls = ckpt.add_parser("ls", help="list committed checkpoints")
    ls.add_argument("dir")
    ls.set_defaults(fn=cmd_ls)
    ins = ckpt.add_parser("inspect", help="items, tensors, sizes and adapters of one checkpoint")
    ins.add_argument("dir")
    ins.add_argument("step", nargs="?", type=int, help="default: the newest")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(fn=cmd_inspect)
    ver = ckpt.add_parser("verify", help="check sizes and checksums; exit 1 if anything is damaged")
    ver.add_argument("dir")
    ver.add_argument("step", nargs="?", type=int, help="default: every committed checkpoint")
    ver.set_defaults(fn=cmd_verify)
    demo = sub.add_parser("demo", help="the quick-start job: elastic DDP on local agents (kill, scale up, scale down)")
    demo.add_argument("--workdir", default="demo-run", help="where the demo writes (default: ./demo-run)")
    demo.add_argument("--steps", type=int, default=300, help="training steps of the elastic demo (default 300)")
    demo.add_argument("--sleep", type=float, default=0.04, help="seconds each step sleeps (default 0.04)")
    demo.add_argument("--simple", action="store_true",
                      help="the single-process demo instead: train, SIGKILL, resume, compare the weights")
    demo.add_argument("--epochs", type=int, default=6, help="--simple: epochs to train")
    demo.add_argument("--seed", type=int, default=None, help="--simple: seed for the kill point")
    demo.set_defaults(fn=cmd_demo)
    for module in _COMMAND_MODULES:  # each part of Lattice adds its own commands
        importlib.import_module(module).add_cli(sub)
    for module in _CKPT_MODULES:
        importlib.import_module(module).add_ckpt_cli(ckpt)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    pipe = None
    if args.command == "ckpt" and hasattr(signal, "SIGPIPE") and args.ckpt in ("ls", "inspect", "verify"):
        # `lattice ckpt inspect D | head` ends quietly; never for servers, where a client
        # that hangs up must not kill the process (restored after, for callers in-process)
        pipe = signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    chatty = args.verbose or args.command in ("run", "agent", "rendezvous")  # operators read agent logs
    logging.basicConfig(level=logging.INFO if chatty else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except LatticeError as exc:
        print(f"lattice: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if pipe is not None:
            signal.signal(signal.SIGPIPE, pipe)


if __name__ == "__main__":
    sys.exit(main())
