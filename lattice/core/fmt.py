"""The on-disk checkpoint format, version 1.

A checkpoint is a directory ``step-<step:010d>/`` holding:

- ``data.safetensors``: every array, a valid safetensors file (readable by the
  ``safetensors`` library). The header is padded with spaces so the data section starts
  at a multiple of 64 bytes, and arrays are laid out by decreasing item size so each starts
  aligned to its own item size; dtypes safetensors lacks are stored as ``U8`` bytes.
- ``tree.json``: per item, the adapter name and the JSON skeleton of its state
  (see ``lattice.core.tree``), whose array nodes name tensors of the data file.
- ``manifest.json``: written last: format, version, step, wall time, each file's
  size and crc32c, and, as its last field, its own crc32c (``manifest_crc32c``, over the
  file's bytes before that field, closed with ``\n}``). A directory is a committed
  checkpoint only under its final name (renamed atomically from a temporary name) and
  with a manifest.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import crc32c

from .arrays import DTYPES, nbytes
from .tree import Leaf, path_str

FORMAT = "lattice-checkpoint"
VERSION = 1
DATA = "data.safetensors"
TREE = "tree.json"
MANIFEST = "manifest.json"
LATEST = "latest"
MANIFEST_CRC = "manifest_crc32c"  # the manifest's checksum of itself
_CRC_MARK = b',\n "' + MANIFEST_CRC.encode() + b'": '
STEP_PREFIX = "step-"
MAX_HEADER = 100 * 1024 * 1024  # the safetensors limit
DATA_ALIGN = 64  # the data section starts at a multiple of this in the file (and in the snapshot buffer)


def step_dirname(step: int) -> str:
    return f"{STEP_PREFIX}{step:010d}"


def parse_step_dirname(name: str) -> int | None:
    rest = name[len(STEP_PREFIX):]
    if name.startswith(STEP_PREFIX) and len(rest) == 10 and rest.isdigit():
        return int(rest)
    return None


@dataclasses.dataclass
class Entry:
    """One array's place in the data file."""

    name: str
    leaf: Leaf
    offset: int  # from the start of the data section
    size: int


@dataclasses.dataclass
class Layout:
    entries: list[Entry]
    header: bytes  # the 8-byte length plus the padded JSON header
    data_size: int

    @property
    def file_size(self) -> int:
        return len(self.header) + self.data_size


def plan_layout(named_leaves: list[tuple[str, Leaf]], metadata: dict[str, str]) -> Layout:
    """Place the arrays in the data file and build its safetensors header."""
    order = sorted(named_leaves, key=lambda nl: -DTYPES[nl[1].dtype][0])  # stable
    entries, offset = [], 0
    for name, leaf in order:
        size = nbytes(leaf.dtype, leaf.shape)
        entries.append(Entry(name, leaf, offset, size))
        offset += size
    header: dict[str, Any] = {"__metadata__": metadata}
    for e in entries:
        st = DTYPES[e.leaf.dtype][1]
        shape = list(e.leaf.shape) if st else [e.size]
        header[e.name] = {"dtype": st or "U8", "shape": shape, "data_offsets": [e.offset, e.offset + e.size]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % DATA_ALIGN)  # safetensors allows trailing spaces
    return Layout(entries, struct.pack("<Q", len(raw)) + raw, offset)


def tensor_name(item: str, leaf: Leaf, taken: set[str]) -> str:
    base = f"{item}/{path_str(leaf.path)}" if leaf.path else item
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}#{n}"
    taken.add(name)
    return name


def read_header(raw8: bytes, read: Any) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header; ``read(n)`` returns the next n bytes. Returns (header, data start)."""
    if len(raw8) != 8:
        raise ValueError("file shorter than the 8-byte safetensors header length")
    (n,) = struct.unpack("<Q", raw8)
    if n > MAX_HEADER:
        raise ValueError(f"header length {n} exceeds {MAX_HEADER}")
    body = read(n)
    if len(body) != n:
        raise ValueError("file ends inside the safetensors header")
    header = json.loads(body)
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not a JSON object")
    return header, 8 + n


def manifest(step: int, wall_time: float, files: dict[str, dict[str, int]], items: dict[str, Any],
             extra: dict[str, Any] | None = None) -> bytes:
    """The manifest; ``items`` maps a name to its adapter name or to ``{"adapter", "scope"}``."""
    items = {k: v if isinstance(v, dict) else {"adapter": v} for k, v in items.items()}
    doc = {"format": FORMAT, "version": VERSION, "step": step, "wall_time": wall_time,
           "files": files, "items": items}
    doc.update(extra or {})
    body = json.dumps(doc, indent=1, sort_keys=True).encode()
    # its own checksum goes last, over the exact bytes before it (closed with "\n}")
    return body[:-2] + _CRC_MARK + str(crc32c.crc32c(body)).encode() + b"\n}"


def _check_manifest_crc(raw: bytes, doc: dict[str, Any]) -> None:
    at = raw.rfind(_CRC_MARK)
    crc = doc.get(MANIFEST_CRC)
    if at < 0 or type(crc) is not int or raw[at:] != _CRC_MARK + str(crc).encode() + b"\n}":
        raise ValueError(f"the manifest's own checksum ({MANIFEST_CRC}, last) is missing or malformed")
    if crc32c.crc32c(raw[:at] + b"\n}") != crc:
        raise ValueError("the manifest's own crc32c does not match (the file is corrupt)")


def parse_manifest(raw: bytes) -> dict[str, Any]:
    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} manifest")
    if not isinstance(doc.get("version"), int) or doc["version"] > VERSION:
        raise ValueError(f"manifest version {doc.get('version')!r} is newer than this Lattice reads ({VERSION}); upgrade lattice")
    # the manifest checksums the other files; its own checksum catches damage to it that
    # still parses (a flipped digit in the step, a size or a checksum)
    _check_manifest_crc(raw, doc)
    for key, kind in (("step", int), ("files", dict), ("items", dict)):
        if not isinstance(doc.get(key), kind):
            raise ValueError(f"manifest field {key!r} missing or not a {kind.__name__}")
    for name, info in doc["files"].items():
        if not (isinstance(info, dict) and isinstance(info.get("size"), int) and isinstance(info.get("crc32c"), int)):
            raise ValueError(f"manifest entry for file {name!r} lacks size/crc32c")
    return doc
