"""``lattice ckpt export|import --format orbax|tf``: convert checkpoints to and from other formats.

The converters are imported only when a command runs (orbax imports JAX, tf TensorFlow).
"""

from __future__ import annotations

import argparse
import importlib.util

FORMATS = ("orbax", "tf")


def _module(fmt: str) -> object:
    name = {"orbax": "lattice.interop.orbax", "tf": "lattice.interop.tf"}[fmt]
    needs = {"orbax": "orbax.checkpoint", "tf": "tensorflow"}[fmt]
    from ..core.errors import ConfigError

    try:
        missing = importlib.util.find_spec(needs) is None
    except ModuleNotFoundError:
        missing = True
    if missing:
        extra = {"orbax": "jax", "tf": "tensorflow"}[fmt]
        raise ConfigError(f"--format {fmt} needs {needs}: pip install 'lattice[{extra}]'")
    if importlib.util.find_spec(name) is None:
        raise ConfigError(f"--format {fmt} is not available in this version of lattice")
    return importlib.import_module(name)


def cmd_export(args: argparse.Namespace) -> int:
    mod = _module(args.format)
    if args.format == "orbax":
        skipped = mod.export_orbax(args.dir, args.out, args.step, internal=args.internal)  # type: ignore[attr-defined]
        for leaf in skipped:
            print(f"left out {leaf}")
        print(f"wrote orbax checkpoint {args.out} (read it with ocp.StandardCheckpointer().restore)")
    else:
        prefix = mod.export_tf(args.dir, args.out, args.step, include_internal=args.internal)  # type: ignore[attr-defined]
        print(f"wrote tf.train.Checkpoint {prefix}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    mod = _module(args.format)
    if args.format == "orbax":
        path = mod.import_orbax(args.src, args.dir, args.step, item=args.item)  # type: ignore[attr-defined]
    else:
        if args.item is not None:
            from ..core.errors import ConfigError

            raise ConfigError("--item applies to --format orbax only")
        path = mod.import_tf(args.src, args.dir, args.step)  # type: ignore[attr-defined]
    print(f"wrote Lattice checkpoint {path}")
    return 0


def add_ckpt_cli(ckpt: argparse._SubParsersAction) -> None:
    """Add ``export`` and ``import`` to ``lattice ckpt``."""
    exp = ckpt.add_parser("export", help="write a Lattice checkpoint in another format (orbax, tf)")
    exp.add_argument("--format", required=True, choices=FORMATS)
    exp.add_argument("dir", help="the Lattice checkpoint directory")
    exp.add_argument("out", help="where to write (orbax: a new directory; tf: a checkpoint prefix)")
    exp.add_argument("--step", type=int, default=None, help="default: the newest committed step")
    exp.add_argument("--internal", action="store_true", help="also Lattice's own items (__rng__ ...)")
    exp.set_defaults(fn=cmd_export)
    imp = ckpt.add_parser("import", help="write a checkpoint of another format (orbax, tf) as a Lattice checkpoint")
    imp.add_argument("--format", required=True, choices=FORMATS)
    imp.add_argument("src", help="orbax: a checkpoint or CheckpointManager directory; tf: a prefix or directory")
    imp.add_argument("dir", help="the Lattice checkpoint directory to write into")
    imp.add_argument("--step", type=int, default=None,
                     help="orbax: which step of a CheckpointManager directory (default: the newest; also the "
                          "Lattice step); tf: the Lattice step (default: the save counter)")
    imp.add_argument("--item", default=None, help="orbax: put the whole tree under this one item name")
    imp.set_defaults(fn=cmd_import)
