"""TensorFlow/Keras tests: skipped where TensorFlow is not installed (CI installs tensorflow-cpu).

TensorFlow is imported once per test process (about 5 s), so most tests share this one.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
pytest.importorskip("tensorflow")
