"""Operator tests: put ``operator/`` (the kopf layer's package folder) on ``sys.path`` so the
tests import ``lattice_operator`` exactly as ``kopf run -m lattice_operator`` does."""

from __future__ import annotations

import sys
from pathlib import Path

OPERATOR_DIR = Path(__file__).resolve().parents[2] / "operator"
if str(OPERATOR_DIR) not in sys.path:
    sys.path.insert(0, str(OPERATOR_DIR))
