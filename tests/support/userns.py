"""Whether tests can mount a private tmpfs (``unshare -rm``: user and mount namespaces)."""

from __future__ import annotations

import shutil
import subprocess


def can_mount_tmpfs() -> bool:
    """Whether ``unshare -rm`` lets this user mount a private tmpfs over /dev/shm (user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    try:
        r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                           capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0
