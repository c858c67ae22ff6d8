"""llama.cpp's simple block formats, written out in numpy: q8_0, q5_0 and q4_0.

A quantised GGUF tensor is a list of blocks of 32 numbers taken along each row. A block keeps
one scale `d` (a float16) and 32 small integers q; a number is read back as d * q. The three
formats differ only in how many bits q has and how the bits are packed:

    q8_0  34 bytes:  d, then 32 int8 q in [-127, 127]             d = absmax / 127
    q5_0  22 bytes:  d, 4 bytes of high bits, 16 bytes of nibbles  q in [-16, 15], d = max / -16
    q4_0  18 bytes:  d, 16 bytes of nibbles                        q in [-8, 7],   d = max / -8

In q4_0 and q5_0, `max` is the number of largest magnitude *with its sign*, and d takes the
opposite sign: that number then lands exactly on q = -8 (-16), the one end of the range that
has no positive twin, so the scale is as fine as it can be. Each q is stored as q + 8 (q + 16),
an unsigned 4-bit (5-bit) value. Two 4-bit values share a byte: the low nibble holds element j
and the high nibble element j + 16 of the block. q5_0 keeps the fifth bit of every element in a
32-bit little-endian word.

The arithmetic (float32, the rounding rule, the clipping) follows llama.cpp's reference
quantizers, so the bytes equal those of `gguf.quants.quantize` (tests/test_gguf_families.py
checks it). The K-quants (q4_K_M, q5_K_M, q6_K...) pick scales per sub-block by a search and
are left to llama.cpp's own `llama-quantize` tool, run on an f16 or f32 export.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32  # numbers per block, in every format here


def _blocks(data: np.ndarray) -> np.ndarray:
    """The tensor as float32 blocks of 32, one per row of the result (rows must divide into blocks)."""
    if data.shape[-1] % BLOCK:
        raise ValueError(f"rows of {data.shape[-1]} numbers do not divide into blocks of {BLOCK}")
    return np.ascontiguousarray(data, dtype=np.float32).reshape(-1, BLOCK)


def _inverse(scale: np.ndarray) -> np.ndarray:
    """1 / scale, and 0 where the scale is 0 (an all-zero block stores q = 0 everywhere)."""
    with np.errstate(divide="ignore"):
        return np.where(scale == 0, np.float32(0), np.float32(1) / scale)


def _with_scale(scale: np.ndarray, payload: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Each block's float16 scale bytes followed by its payload bytes; rows of bytes in `shape`."""
    stored = np.concatenate([scale.astype(np.float16).view(np.uint8), payload], axis=1)
    return stored.reshape(*shape[:-1], -1)


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """32 values of 4 bits per block into 16 bytes: element j in the low nibble, j + 16 in the high."""
    return (values[:, : BLOCK // 2] & 0x0F) | (values[:, BLOCK // 2 :] << 4)


def _signed_max(blocks: np.ndarray) -> np.ndarray:
    """Per block, the number of largest magnitude, sign kept (the first one on a tie)."""
    return np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1, keepdims=True), axis=1)


def quantize_q8_0(data: np.ndarray) -> np.ndarray:
    """q8_0: q = round(x / d) with d = absmax / 127, halves rounded away from zero."""
    blocks = _blocks(data)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    scaled = blocks * _inverse(scale)
    q = (np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))).astype(np.int8)  # C's roundf
    return _with_scale(scale, q.view(np.uint8), data.shape)


def quantize_q4_0(data: np.ndarray) -> np.ndarray:
    """q4_0: 4-bit q + 8 = trunc(x / d + 8.5) clipped to [0, 15], with d = max / -8."""
    blocks = _blocks(data)
    scale = _signed_max(blocks) / np.float32(-8)
    q = np.trunc(blocks * _inverse(scale) + np.float32(8.5)).astype(np.uint8).clip(0, 15)
    return _with_scale(scale, _pack_nibbles(q), data.shape)


def quantize_q5_0(data: np.ndarray) -> np.ndarray:
    """q5_0: 5-bit q + 16 = trunc(x / d + 16.5) clipped to [0, 31], with d = max / -16; the low
    four bits packed as in q4_0, the fifth bits of the 32 elements in one little-endian uint32."""
    blocks = _blocks(data)
    scale = _signed_max(blocks) / np.float32(-16)
    q = np.trunc(blocks * _inverse(scale) + np.float32(16.5)).astype(np.uint8).clip(0, 31)
    high_bits = np.packbits(q >> 4, axis=1, bitorder="little")  # bit j of the word = fifth bit of element j
    return _with_scale(scale, np.concatenate([high_bits, _pack_nibbles(q)], axis=1), data.shape)


QUANTIZERS = {"q8_0": quantize_q8_0, "q5_0": quantize_q5_0, "q4_0": quantize_q4_0}
