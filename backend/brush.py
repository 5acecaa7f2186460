"""Label Studio brush RLE, vectorised.

Produces exactly the bytes of ``label_studio_sdk.converter.brush.mask2rle`` (tests compare them
on many masks) but with numpy instead of a Python loop over a bit string: the SDK takes ~0.9 s
for a 640x480 mask with a ragged outline (a random-weight model's mask, or hair, foliage), this
takes a few milliseconds. Decoding stays with the SDK.

Format (LS editor, @thi.ng/rle-pack): header = 32 bits value count N (= W*H*4: every pixel's
value repeated for R, G, B, A), 5 bits word size - 1 (7), four 4-bit run-length field widths - 1
(3, 4, 8, 16). Then per run: flag bit (1 repeat / 0 literal), 2 bits choosing the width, count - 1
in that width, the 8-bit value. Runs longer than 2^16 values are split; the stream is padded with
1 to 8 zero bits to whole bytes (the SDK always pads, also when already aligned).
"""

from __future__ import annotations

import numpy as np

_CHUNK = 2**16
_HEADER_SIZES = "0010001101111111"  # widths 3, 4, 8, 16, each minus one
_CLASS_LIMITS = np.array([1, 8, 16, 256], np.uint64)  # largest count of classes 0..3
_PREFIX = np.array(
    [0, 1 << 13, (1 << 14) | (1 << 12), (1 << 18) | (2 << 16), (1 << 26) | (3 << 24)], np.uint64
)
_WIDTH = np.array([14, 14, 15, 19, 27], np.int64)


def encode_brush_mask(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool/uint8 mask -> LS brush RLE bytes (uint8 array; ``.tolist()`` is the SDK's
    list); foreground = 255. An array, not a list: orjson writes it and the JSON job serializer
    (worker/serialization.py) ships it as base64 in
    a fraction of the time a 150,000-int list takes."""
    flat = np.asarray(mask).ravel() != 0
    total = flat.size * 4
    header = f"{total:032b}" + f"{7:05b}" + _HEADER_SIZES
    if flat.size == 0:
        return _pack(np.array([int(b) for b in header], np.uint8))
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change))
    lengths = np.diff(np.concatenate((starts, [flat.size]))) * 4
    run_values = flat[starts].astype(np.uint64) * np.uint64(255)

    long = lengths > 256
    if (lengths > _CHUNK).any():
        # Runs longer than 2^16 values become full 2^16 chunks plus the remainder.
        full_chunks = np.where(long, (lengths - 1) // _CHUNK, 0)
        repeats = full_chunks + 1
        remainder = lengths - full_chunks * _CHUNK
        run_values = np.repeat(run_values, repeats)
        long = np.repeat(long, repeats)
        is_last = np.zeros(int(repeats.sum()), bool)
        is_last[np.cumsum(repeats) - 1] = True
        lengths = np.where(is_last, np.repeat(remainder, repeats), _CHUNK)
    chunk_count = lengths.astype(np.uint64)

    # Chunk classes: 0 literal of 1 word, 1 repeat <= 8, 2 <= 16, 3 <= 256, 4 split/long (16 bits).
    # Every form keeps count - 1 at bit 8 and the value in bits 0-7, so one table lookup gives
    # the prefix bits and the width.
    chunk_class = np.searchsorted(_CLASS_LIMITS, chunk_count)
    chunk_class[long] = 4
    codes = np.empty(chunk_count.size + 1, np.uint64)
    codes[0] = int(header, 2)
    np.bitwise_or(_PREFIX[chunk_class], (chunk_count - 1) << np.uint64(8), out=codes[1:])
    codes[1:] |= run_values
    widths = np.empty(codes.size, np.int64)
    widths[0] = len(header)
    np.take(_WIDTH, chunk_class, out=widths[1:])
    return _pack_codes(codes, widths)


def _pack_codes(codes: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Concatenate codes (uint64, MSB first, ``widths`` bits each, <= 64) into bytes, zero-pad
    with 1..8 bits. Bits of different codes never overlap, so each 64-bit word is the OR of the
    pieces that land in it; a code crossing a word boundary also puts its low part at the top
    of the next word."""
    ends = np.cumsum(widths)
    starts = ends - widths
    total_bits = int(ends[-1])
    total_bits += 8 - total_bits % 8
    words = np.zeros(total_bits // 64 + 2, np.uint64)
    word = starts // 64
    offset = starts % 64  # from the word's most significant bit
    overflow = offset + widths - 64  # > 0: the code continues in the next word
    shift_left = np.clip(-overflow, 0, 63).astype(np.uint64)
    shift_right = np.clip(overflow, 0, 63).astype(np.uint64)
    high = (codes << shift_left) >> shift_right
    boundaries = np.flatnonzero(np.diff(word)) + 1
    group_starts = np.concatenate(([0], boundaries))
    words[word[group_starts]] = np.bitwise_or.reduceat(high, group_starts)
    crossing = overflow > 0
    if crossing.any():
        spill = (64 - overflow[crossing]).astype(np.uint64)
        words[word[crossing] + 1] |= codes[crossing] << spill
    return words.astype(">u8").view(np.uint8)[: total_bits // 8]


def _pack(bits: np.ndarray) -> np.ndarray:
    padded = np.concatenate((bits, np.zeros(8 - bits.size % 8, np.uint8)))
    return np.packbits(padded)
