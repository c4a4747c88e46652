"""Key derivation and the sealed datagram (docs/protocol.md).

Keys (all BLAKE2b via PyNaCl's crypto_generichash):
  group key  = BLAKE2b(group name, person "alpaca-group")         hides headers
  psk key    = BLAKE2b(whole secrets.txt key string, "alpaca-psk")
  pair key   = BLAKE2b(group key | min ID | max ID,
                       key = psk key of the bigger ID, "alpaca-pair")

A datagram is  mask(header) | XChaCha20-Poly1305(plaintext) | tag.  The header
is the AEAD's associated data except its first two bytes (TTL and path), which
forwarders rewrite. The whole header is XORed with the first 26 bytes of
BLAKE2b-256(tag, key = group key, person "alpaca-mask") so that an outsider
sees only random bytes. A message too big for one datagram (a TUN
super-packet) is sealed once and travels as shards, each masked the same way
with its own last 16 bytes as the sample over header + 6-byte sub-header
(docs/protocol.md §12, fragments.py).
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from typing import NamedTuple

from nacl import bindings as sodium
from nacl._sodium import ffi, lib
from nacl.exceptions import CryptoError

from .constants import FRAG_HEADER_SIZE, HEADER_SIZE, MASK_SIZE, TAG_SIZE, WIRE_VERSION

_PERSON_GROUP = b"alpaca-group".ljust(16, b"\0")
_PERSON_PSK = b"alpaca-psk".ljust(16, b"\0")
_PERSON_PAIR = b"alpaca-pair".ljust(16, b"\0")
_PERSON_MASK = b"alpaca-mask".ljust(16, b"\0")

_HEADER = struct.Struct(">BBBBHH8sIIH")
assert _HEADER.size == HEADER_SIZE
MUTABLE_BYTES = 2   # TTL and path: the only header bytes a forwarder may change
_NONCE_PAD = bytes(sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES - 20)


def _blake2b(data: bytes, person: bytes, key: bytes = b"", size: int = 32) -> bytes:
    return sodium.crypto_generichash_blake2b_salt_personal(data, digest_size=size, key=key, person=person)


def derive_group_key(group: str) -> bytes:
    return _blake2b(group.encode(), _PERSON_GROUP)


def derive_psk_key(psk: str) -> bytes:
    """Hash the whole key string (never a prefix of it)."""
    return _blake2b(psk.encode(), _PERSON_PSK)


def derive_pair_key(group_key: bytes, psk_key_of_bigger: bytes, id_a: int, id_b: int) -> bytes:
    lo, hi = sorted((id_a, id_b))
    return _blake2b(group_key + struct.pack(">HH", lo, hi), _PERSON_PAIR, key=psk_key_of_bigger)


def genkey() -> str:
    """A new pre-shared key: 32 random bytes, base64url without padding (43 chars)."""
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


class Header(NamedTuple):
    """A tuple, not a dataclass: one is built for every datagram received."""
    ttl: int
    path: int
    kind: int
    src: int
    dst: int
    session: bytes   # 8 random bytes chosen by the sender at start
    ts: int          # sender's clock, whole seconds
    seq: int         # per-second sequence, < 2**20
    pad: int = 0     # padding bytes at the end of the plaintext
    flags: int = 0   # FLAG_VNET | FLAG_FRAG (constants.py)
    version: int = WIRE_VERSION

    def pack(self) -> bytes:
        return _HEADER.pack(self.ttl, self.path, (self.version << 4) | self.kind, self.flags,
                            self.src, self.dst, self.session, self.ts, self.seq, self.pad)

    @classmethod
    def unpack(cls, raw: bytes) -> "Header":
        ttl, path, vk, flags, src, dst, session, ts, seq, pad = _HEADER.unpack(raw)
        return cls(ttl, path, vk & 0x0F, src, dst, session, ts, seq, pad, flags, vk >> 4)


# The per-datagram calls go straight to libsodium through PyNaCl's own cffi
# binding with preallocated buffers: nacl.bindings checks and allocates on
# every call, which costs more than the cryptography itself for 1.4 KB
# (docs/benchmarks.md). Same functions, same results (tests/test_crypto.py
# pins vectors made with nacl.bindings).
_LEN_OUT = ffi.new("unsigned long long *")


class _Masker:
    """Header masks under one group key: keyed BLAKE2b-256 of the sample.
    hashlib's BLAKE2b (the same function as libsodium's) can hash the key
    block once and copy that state per datagram: 0.4 us instead of 1.4 us,
    once per shard on both ends."""
    __slots__ = ("keyed",)

    def __init__(self, group_key: bytes):
        self.keyed = hashlib.blake2b(digest_size=MASK_SIZE, key=group_key, person=_PERSON_MASK)

    def mask(self, sample) -> int:
        h = self.keyed.copy()
        h.update(sample)
        return int.from_bytes(h.digest(), "big")


_maskers: dict[bytes, _Masker] = {}


def _masker(group_key: bytes) -> _Masker:
    masker = _maskers.get(group_key)
    if masker is None:
        if len(_maskers) > 16:
            _maskers.clear()
        masker = _maskers[group_key] = _Masker(group_key)
    return masker


def header_mask(group_key: bytes, tag: bytes) -> int:
    """The mask of the 26-byte header: the first 26 of the 32 mask bytes."""
    return _masker(group_key).mask(tag) >> (8 * FRAG_HEADER_SIZE)


def _xor(raw: bytes, mask: int) -> bytes:
    return (int.from_bytes(raw, "big") ^ mask).to_bytes(HEADER_SIZE, "big")


def seal(group_key: bytes, pair_key: bytes, header: Header, plaintext: bytes) -> bytes:
    return seal_raw(group_key, pair_key, header.pack(), plaintext)


def seal_raw(group_key: bytes, pair_key: bytes, raw: bytes, plaintext: bytes) -> bytes:
    """raw: the packed, unmasked header."""
    nonce = raw[4:24] + _NONCE_PAD      # src, dst, session, ts, seq: unique per key
    out = bytearray(HEADER_SIZE + len(plaintext) + TAG_SIZE)
    lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
        ffi.from_buffer(out) + HEADER_SIZE, _LEN_OUT, plaintext, len(plaintext),
        raw[MUTABLE_BYTES:], HEADER_SIZE - MUTABLE_BYTES, ffi.NULL, nonce, pair_key)
    out[:HEADER_SIZE] = _xor(raw, header_mask(group_key, bytes(out[-TAG_SIZE:])))
    return bytes(out)


def peek(group_key: bytes, datagram: bytes) -> tuple[Header, int]:
    """Unmask the header (no authentication yet). Returns it and the mask."""
    header, mask, _ = peek_shard(group_key, datagram)
    return header, mask


# header and sub-header as one struct; the 24-bit length is hi byte + lo u16
_CLEAR = struct.Struct(">BBBBHH8sIIHBBBBH")


def unmask(group_key: bytes, datagram: bytes, clear: int | None = None, full: int | None = None) -> tuple[tuple, int]:
    """The 32 masked bytes in clear, as fields (ttl, path, version<<4|kind,
    flags, src, dst, session, ts, seq, pad, index, k, m, length_hi,
    length_lo), and the whole mask. No authentication yet. `clear` and
    `full`: what the caller already computed (unmask_int)."""
    if clear is None:
        clear, full = unmask_int(_masker(group_key).mask, datagram)
    return _CLEAR.unpack(clear.to_bytes(MASK_SIZE, "big")), full


def unmask_int(mask, datagram: bytes) -> tuple[int, int]:
    """(the 32 masked bytes in clear, the mask), both as ints."""
    full = mask(datagram[-TAG_SIZE:])
    return int.from_bytes(datagram[:MASK_SIZE], "big") ^ full, full


def keyed_mask_state(group_key: bytes):
    """The keyed BLAKE2b state masks start from (copy, update with the
    sample, digest), for a loop that inlines _Masker.mask."""
    return _masker(group_key).keyed


def peek_shard(group_key: bytes, datagram: bytes) -> tuple[Header, int, bytes]:
    """Like peek, plus the unmasked fragment sub-header (meaningful only when
    the header has FLAG_FRAG)."""
    f, full = unmask(group_key, datagram)
    header = Header(f[0], f[1], f[2] & 0x0F, f[4], f[5], f[6], f[7], f[8], f[9], f[3], f[2] >> 4)
    sub = bytes((f[10], f[11], f[12], f[13])) + f[14].to_bytes(2, "big")
    return header, full >> (8 * FRAG_HEADER_SIZE), sub


def seal_body(pair_key: bytes, raw: bytes, plaintext: bytes) -> bytearray:
    """Ciphertext and tag of a message that will travel as shards (one AEAD
    call for the whole message; the header is not attached)."""
    out = bytearray(len(plaintext) + TAG_SIZE)
    lib.crypto_aead_xchacha20poly1305_ietf_encrypt(
        ffi.from_buffer(out), _LEN_OUT, plaintext, len(plaintext),
        raw[MUTABLE_BYTES:], HEADER_SIZE - MUTABLE_BYTES, ffi.NULL, raw[4:24] + _NONCE_PAD, pair_key)
    return out


def frame_shards(group_key: bytes, raw: bytes, shards: list, k: int, m: int, length: int) -> list[bytes]:
    """The shard datagrams of one message: header and sub-header (index, k,
    m, length) masked with each shard's last 16 bytes as the sample, as a
    whole datagram is masked with its tag."""
    base = int.from_bytes(raw, "big") << (8 * FRAG_HEADER_SIZE) | k << 32 | m << 24 | length
    keyed, from_bytes = _masker(group_key).keyed, int.from_bytes
    out = []
    for index, shard in enumerate(shards):     # _Masker.mask inlined: once per shard
        h = keyed.copy()
        h.update(shard[-TAG_SIZE:])
        out.append(((base | index << 40) ^ from_bytes(h.digest(), "big")).to_bytes(MASK_SIZE, "big") + shard)
    return out


def open_body(pair_key: bytes, header: Header, body) -> bytes:
    """Authenticate and decrypt a reassembled message (ciphertext + tag)."""
    raw = header.pack()
    clen = len(body)
    if clen < TAG_SIZE:
        raise CryptoError("Decryption failed. Ciphertext failed verification")
    out = bytearray(clen - TAG_SIZE)
    if lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
            ffi.from_buffer(out), _LEN_OUT, ffi.NULL, ffi.from_buffer(body), clen,
            raw[MUTABLE_BYTES:], HEADER_SIZE - MUTABLE_BYTES, raw[4:24] + _NONCE_PAD, pair_key) != 0:
        raise CryptoError("Decryption failed. Ciphertext failed verification")
    return bytes(out)


def open_sealed(pair_key: bytes, header: Header, datagram: bytes) -> bytes:
    """Authenticate and decrypt; raises nacl CryptoError when the tag fails."""
    raw = header.pack()
    clen = len(datagram) - HEADER_SIZE
    out = bytearray(clen - TAG_SIZE)
    if lib.crypto_aead_xchacha20poly1305_ietf_decrypt(
            ffi.from_buffer(out), _LEN_OUT, ffi.NULL, ffi.from_buffer(datagram) + HEADER_SIZE, clen,
            raw[MUTABLE_BYTES:], HEADER_SIZE - MUTABLE_BYTES, raw[4:24] + _NONCE_PAD, pair_key) != 0:
        raise CryptoError("Decryption failed. Ciphertext failed verification")
    return bytes(out)


def rewrite_mutable(datagram: bytes, mask: int, ttl: int, path: int) -> bytes:
    """What a forwarder changes: TTL and path, re-masked; the rest stays bit-identical."""
    m = mask.to_bytes(HEADER_SIZE, "big")
    return bytes((ttl ^ m[0], path ^ m[1])) + datagram[MUTABLE_BYTES:]


__all__ = ["CryptoError", "Header", "seal", "peek", "peek_shard", "unmask", "open_sealed", "seal_body",
           "frame_shards", "open_body", "rewrite_mutable", "genkey",
           "derive_group_key", "derive_psk_key", "derive_pair_key", "MUTABLE_BYTES"]
