"""The ``.roic`` file format: pack and unpack, with one clear error type.

Layout (little-endian)::

    magic      4 bytes  b"ROIC"
    version    u8       FORMAT_VERSION
    variant    u8 length + ASCII name
    fingerprint 8 bytes  of the checkpoint's parameters
    width, height        u32, u32   original image size (decoder crops to it)
    rate, roi_quality    f32, f32   the knobs the file was made with
    groups     u8 count; per group: u8 string count, then u32 length per string
    payload    the entropy-coded strings, in order
    crc32      u32 over every byte before it

The CRC makes truncation and flipped bytes anywhere a clean :class:`BitstreamError`
before any entropy decoding runs; the fingerprint makes decoding with another
checkpoint a clear error too. The decoder needs no mask: a version 4 file carries three
string groups, y, z and the level map, each latent cell's quantisation step
(:mod:`pipeline.codec.level_map`; an empty string when every step is 1).

Files from version 2 on are portable: the coding tables are selected by integer-exact
arithmetic (:mod:`pipeline.codec.integer`), so they decode to the same symbols on every
machine. Version 3 files (a one-bit ROI cell map, the background's step from the header's
Q) and version 2 files (two groups, y and z: quantisation step 1 everywhere) still
decode; version 1 files (float table selection) are refused with a clear error. The CRC catches
damage, not a crafted file: :func:`pipeline.codec.coding.decode` also limits the declared
pixel count and turns any failure while decoding into a :class:`BitstreamError`.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

MAGIC = b"ROIC"
FORMAT_VERSION = 4
READABLE_VERSIONS = (2, 3, 4)
FINGERPRINT_BYTES = 8
MAX_SIDE = 1 << 16
# The decoder's default pixel limit, like Pillow's decompression-bomb guard: far above a
# camera photo (24 MP is 6000x4000), far below the 2^32 pixels a header can declare.
DEFAULT_MAX_PIXELS = 1 << 25


class BitstreamError(ValueError):
    """A ``.roic`` file that cannot be decoded: not ours, damaged, or from another model."""


@dataclass(frozen=True)
class RoicHeader:
    """Everything the decoder needs besides the model and the strings."""

    variant: str
    fingerprint: bytes
    width: int
    height: int
    rate: float
    roi_quality: float
    version: int = FORMAT_VERSION


def pack(header: RoicHeader, groups: list[list[bytes]]) -> bytes:
    """Serialise a header and the entropy-coded string groups into ``.roic`` bytes."""
    name = header.variant.encode("ascii")
    if len(name) > 255 or len(header.fingerprint) != FINGERPRINT_BYTES:
        raise ValueError("variant name too long or fingerprint of wrong size")
    if not (0 < header.width <= MAX_SIDE and 0 < header.height <= MAX_SIDE):
        raise ValueError(f"image size {header.width}x{header.height} outside 1..{MAX_SIDE}")
    return serialize(name, header.fingerprint, header.width, header.height, header.rate,
                     header.roi_quality, groups, header.version)


def serialize(name: bytes, fingerprint: bytes, width: int, height: int, rate: float, roi_quality: float,
              groups: list[list[bytes]], version: int = FORMAT_VERSION) -> bytes:
    """The file layout with its CRC, fields unchecked (:func:`pack` checks them; tests craft files)."""
    parts = [MAGIC, struct.pack("<BB", version, len(name)), name, fingerprint,
             struct.pack("<IIff", width, height, rate, roi_quality), struct.pack("<B", len(groups))]
    for group in groups:
        parts.append(struct.pack("<B", len(group)))
        parts.extend(struct.pack("<I", len(s)) for s in group)
    parts.extend(s for group in groups for s in group)
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise BitstreamError("truncated .roic file")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))


def unpack(data: bytes) -> tuple[RoicHeader, list[list[bytes]]]:
    """Parse and verify ``.roic`` bytes; raise :class:`BitstreamError` on any problem."""
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise BitstreamError("not a .roic file (bad magic bytes)")
    if len(data) < len(MAGIC) + 5:
        raise BitstreamError("truncated .roic file")
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise BitstreamError("corrupted or truncated .roic file (checksum mismatch)")
    r = _Reader(body)
    r.take(len(MAGIC))
    version, name_len = r.unpack("<BB")
    if version not in READABLE_VERSIONS:
        hint = " (not portable across machines: re-encode the image)" if version == 1 else ""
        raise BitstreamError(f"unsupported .roic format version {version}{hint}; "
                             f"this build reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    try:
        variant = r.take(name_len).decode("ascii")
    except UnicodeDecodeError as exc:
        raise BitstreamError("corrupted .roic header (variant name)") from exc
    fingerprint = r.take(FINGERPRINT_BYTES)
    width, height, rate, roi_quality = r.unpack("<IIff")
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise BitstreamError(f"corrupted .roic header (image size {width}x{height})")
    if not (0.0 <= rate <= 1.0 and 0.0 <= roi_quality <= 1.0):
        raise BitstreamError("corrupted .roic header (rate or ROI quality out of range)")
    (n_groups,) = r.unpack("<B")
    lengths = []
    for _ in range(n_groups):
        (n_strings,) = r.unpack("<B")
        lengths.append([r.unpack("<I")[0] for _ in range(n_strings)])
    groups = [[r.take(n) for n in group] for group in lengths]
    if r.pos != len(body):
        raise BitstreamError("corrupted .roic file (trailing bytes)")
    return RoicHeader(variant, fingerprint, width, height, rate, roi_quality, version), groups
