"""The .roic format: round trip, and one clear error for every kind of bad file."""

from __future__ import annotations

import random

import pytest
import torch

from pipeline.codec.bitstream import BitstreamError, RoicHeader, pack, unpack
from pipeline.codec.coding import decode, encode
from pipeline.codec.models import build_model

from conftest import TINY, image_and_mask

HEADER = RoicHeader("tlic", b"\x01" * 8, 67, 45, 0.25, 0.5)


def test_pack_unpack_round_trip():
    groups = [[b"abc"], [b"", b"xyz" * 100]]
    header, back = unpack(pack(HEADER, groups))
    assert back == groups
    assert header.variant == "tlic" and header.width == 67 and header.height == 45
    assert header.rate == pytest.approx(0.25) and header.roi_quality == pytest.approx(0.5)


@pytest.fixture(scope="module")
def encoded(untrained):
    model = untrained["tlic"]
    x, m = image_and_mask(96, 80, seed=3)
    return model, x, encode(model, x, m, roi_quality=0.2, rate=0.6)


def test_every_truncation_is_a_clean_error(encoded):
    model, _, data = encoded
    for n in range(len(data)):
        with pytest.raises(BitstreamError):
            decode(model, data[:n])


def test_every_flipped_header_byte_is_a_clean_error(encoded):
    model, _, data = encoded
    header_len = 4 + 2 + len(model.variant) + 8 + 16 + 1 + 2 * (1 + 4)
    for i in range(header_len):
        for bit in (0, 7):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            with pytest.raises(BitstreamError):
                decode(model, bytes(bad))


def test_flipped_payload_bytes_are_a_clean_error(encoded):
    model, _, data = encoded
    rng = random.Random(0)
    for _ in range(50):
        bad = bytearray(data)
        bad[rng.randrange(40, len(bad))] ^= 1 << rng.randrange(8)
        with pytest.raises(BitstreamError):
            decode(model, bytes(bad))


def test_other_checkpoint_is_a_clean_error(encoded):
    _, _, data = encoded
    torch.manual_seed(123)
    other = build_model("tlic", **TINY).eval()
    other.update(force=True)
    with pytest.raises(BitstreamError, match="different checkpoint"):
        decode(other, data)


def test_other_variant_is_a_clean_error(encoded, untrained):
    _, _, data = encoded
    with pytest.raises(BitstreamError, match="variant"):
        decode(untrained["sft"], data)


@pytest.mark.parametrize("junk", [b"", b"R", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, b"ROIC", b"ROIC\x01"])
def test_non_roic_files_are_a_clean_error(untrained, junk):
    with pytest.raises(BitstreamError):
        decode(untrained["tlic"], junk)


def test_future_version_is_named(encoded):
    model, _, data = encoded
    import struct
    import zlib
    body = bytearray(data[:-4])
    body[4] = 9
    with pytest.raises(BitstreamError, match="version 9"):
        decode(model, bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))))
