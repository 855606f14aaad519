"""Transparent mode: an unmodified PyTorch training script checkpoints and resumes by itself.

    python -m lattice.auto train.py [args...]        # what `lattice run --auto` runs
    python -m lattice.auto -m package.module [args...]
    import lattice.auto                              # first line of a script you start yourself

Importing this module installs the patches of ``lattice.adapters.torch_auto`` once (and
imports torch), unless ``LATTICE_AUTO=0``; ``LATTICE_AUTO=1`` makes ``import lattice`` import
it too. Checkpoint options come from the ``LATTICE_*`` variables (``LATTICE_CHECKPOINT_DIR``,
``LATTICE_EVERY_STEPS``, ...). See docs/transparent.md for what is captured and the limits.
"""

from __future__ import annotations

import os
import sys

USAGE = "usage: python -m lattice.auto SCRIPT [ARGS...]  |  python -m lattice.auto -m MODULE [ARGS...]"


def enabled() -> bool:
    """False when ``LATTICE_AUTO=0`` (or ``false``/``no``/``off``) switches transparent mode off."""
    return os.environ.get("LATTICE_AUTO", "1").strip().lower() not in ("0", "false", "no", "off")


def install() -> bool:
    """Install the patches (once) unless switched off; True if they are installed."""
    if not enabled():
        return False
    import lattice
    from lattice.adapters import torch_auto

    torch_auto.install(lattice.new_session)
    return True


def main(argv: list[str] | None = None) -> None:
    """Run a script (or ``-m`` module) as ``__main__``, as ``python`` would, with the patches on."""
    import runpy

    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help") or (args[0] == "-m" and len(args) < 2):
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]  # run_module(alter_sys=True) sets argv[0] to the file
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(args)
        sys.path[0] = os.path.dirname(os.path.abspath(args[0]))  # as `python SCRIPT` sets it
        runpy.run_path(args[0], run_name="__main__")


install()

if __name__ == "__main__":
    main()
