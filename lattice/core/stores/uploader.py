"""Getting a session's committed checkpoints into a remote store (docs/storage.md).

The session commits into a local staging directory; ``Uploader`` then puts the checkpoint into
the store (files first, manifest last) on a thread of its own. With one rank the files are sent
straight from the snapshot's buffers while the staging copy is being written, and only what that
did not deliver is uploaded from the staged copy afterwards.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import crc32c as _crc

from .. import fmt
from ..errors import AlreadyCommittedError, CheckpointError, CorruptCheckpointError
from ..snapshot import Snapshot
from .base import Store
from .transfer import Sent, TransientStoreError, drop_other_timeline, upload

log = logging.getLogger("lattice")


class Uploader:
    """Uploads each committed staging checkpoint on its own thread; the returned future covers the upload.

    The future resolves once the store committed the step; retention on the store (deleting
    the steps ``keep`` drops) runs after that on the same thread, and ``join`` waits for it.
    """

    def __init__(self, store: Store, keep: Callable[[], int]):
        self.store, self.keep = store, keep
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def chain(self, persisted: concurrent.futures.Future[Path], step: int,
              snap: Snapshot | None = None) -> concurrent.futures.Future[Path]:
        """A future that resolves once ``persisted`` committed and the upload finished (or failed).

        With the ``snap`` of a single-rank checkpoint, its files go to the store straight from
        the snapshot's buffers while the persist writes the staging copy (the two overlap);
        the staged files are uploaded only where that failed. The future resolves only after
        both, so the buffers are not reused while being sent.
        """
        out: concurrent.futures.Future[Path] = concurrent.futures.Future()
        out.set_running_or_notify_cancel()

        def run() -> None:
            sent: Sent | None = None
            unreachable: BaseException | None = None
            if snap is not None and snap.ranks.world == 1:
                sent, unreachable = self._stream(snap, step)
            try:
                path = persisted.result()
            except BaseException as exc:
                if sent:
                    self._drop_sent(step)
                out.set_exception(exc)
                return
            if path.name != fmt.step_dirname(step):  # another rank commits this one
                out.set_result(path)
                return
            try:
                if unreachable is not None:  # already retried in full: do not wait as long again
                    raise unreachable
                self._upload(path, step, sent)
            except BaseException as exc:  # the local commit stands; the store keeps its older ones
                log.error("upload of step %d to %s failed: %s: %s", step, self.store.url, type(exc).__name__, exc)
                out.set_exception(exc)
                return
            out.set_result(path)  # committed in the store; retention follows, as a local persist's does
            self._retain(step)

        thread = threading.Thread(target=run, name=f"lattice-upload-{step}", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return out

    def _stream(self, snap: Snapshot, step: int) -> tuple[Sent | None, BaseException | None]:
        """Put ``snap``'s files from its buffers. Returns what was put (None: nothing was tried,
        ``upload`` does everything) and, if the store could not be reached at all, that error."""
        snap.copied.wait()
        if snap.copy_error is not None:
            return None, None  # the persist fails too, and says why; the store is left alone
        try:
            drop_other_timeline(self.store, step)
        except TransientStoreError as exc:
            return None, exc
        except Exception as exc:
            log.warning("cannot send step %d to %s from memory (%s: %s); uploading the staged copy instead",
                        step, self.store.url, type(exc).__name__, exc)
            return None, None
        sent: Sent = {}
        try:
            for part in snap.parts:
                for name, view in ((part.tree_name, memoryview(part.tree)), (part.data_name, memoryview(part.file))):
                    crc = _crc.crc32c(view)
                    self.store.put_file(step, name, view, len(view), crc)
                    sent[name] = (len(view), crc)
        except Exception as exc:  # the rest is uploaded from the staged copy, with retries
            log.warning("sending step %d to %s from memory failed (%s: %s); uploading the staged copy instead",
                        step, self.store.url, type(exc).__name__, exc)
        return sent, None

    def _upload(self, path: Path, step: int, sent: Sent | None) -> None:
        """``upload`` of the staged checkpoint, skipping what ``sent`` delivered; if the store lost
        those files before the commit (a service restart drops uploads in progress), once more in full."""
        try:
            upload(path, self.store, step, sent=sent)
        except (AlreadyCommittedError, CorruptCheckpointError):
            raise
        except CheckpointError as exc:
            if not sent:
                raise
            log.warning("committing step %d to %s failed (%s); uploading every file from the staged copy",
                        step, self.store.url, exc)
            upload(path, self.store, step)

    def _drop_sent(self, step: int) -> None:
        """The persist failed after files were sent: remove them rather than leave a copy in the store."""
        try:
            if step not in self.store.list_committed():
                self.store.delete(step)
        except FileNotFoundError:
            pass
        except Exception as exc:  # the store removes abandoned uploads itself, later
            log.warning("could not remove the files of failed step %d from %s: %s", step, self.store.url, exc)

    def _retain(self, step: int) -> None:
        try:
            self.store.retain(self.keep(), newest=step)
        except Exception as exc:  # the step is committed; a failed cleanup only wastes space
            log.warning("retention on %s after step %d failed: %s: %s", self.store.url, step, type(exc).__name__, exc)

    def resume(self, path: Path, step: int) -> concurrent.futures.Future[Path] | None:
        """After restoring from staging: upload ``step`` if the store does not have it (a crash cut it off)."""
        try:
            if step in self.store.list_committed():
                return None
        except Exception as exc:
            log.warning("cannot list %s to check step %d was uploaded: %s", self.store.url, step, exc)
            return None
        log.info("step %d is in the staging directory but not in %s: uploading it", step, self.store.url)
        done: concurrent.futures.Future[Path] = concurrent.futures.Future()
        done.set_result(path)
        return self.chain(done, step)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every upload thread (their retention included); False if ``timeout`` ran out."""
        with self._lock:
            threads = list(self._threads)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)
