"""The datagram layout: header fields, masks, whole datagrams and shards
(docs/protocol.md §2-4 and §12). Every bit position lives here.

A whole datagram (a packet, a keepalive, a loss report, a FEC batch that fits):

    masked(header, 26 B) | AEAD(plaintext) | tag (16 B)

(AEAD: XChaCha20-Poly1305, or AES-256-GCM when the header has FLAG_AES.)

A message too big for one datagram (a TUN super-packet, a FEC batch) is
sealed once with the same AEAD and its ciphertext + tag, cut into k chunks
plus m parity chunks, travels as k + m shard datagrams:

    masked(header, 26 B | sub-header, 6 B) | chunk | MAC (8 B)
    sub-header = index (1) | k (1) | m (1) | message length (3, big-endian)

Shard i of a message carries seq = the message's seq + i (the sender reserves
k + m sequence numbers), so every shard is a datagram of its own for the
replay window, and a relay or receiver checks each shard's SipHash MAC under
the pair's shard key (over header bytes 2.., sub-header and chunk) before it
keeps, counts, decodes or relays anything. The message's AEAD (nonce and
associated data from the header with the message's seq) is checked once,
after reassembly.

The mask: the first 26 (whole datagram) or all 32 (shard) bytes of keyed
BLAKE2b-256(last 16 bytes of the datagram, key = group key) are XORed over
the start, so an outsider sees only random bytes. Bytes 0-1 (TTL, path) are
not authenticated: relays rewrite them and re-mask them with the same mask.
"""

from __future__ import annotations

import hmac
import struct
from typing import NamedTuple

from .constants import FLAG_AES, FRAG_HEADER_SIZE, HEADER_SIZE, MASK_SIZE, WIRE_VERSION
from .crypto import (AES_NONCE_SIZE, MAC_PARTS, MAC_SIZE, NONCE_SIZE, TAG_SIZE, CryptoError, aead_open,
                     aead_seal_into, aes_key, aes_open, aes_seal_into, keep_aes_key, mac, mask_state)

HEADER = struct.Struct(">BBBBHH8sIIH")
SUB = struct.Struct(">BBBBH")         # index, k, m, length (hi byte, lo u16)
CLEAR = struct.Struct(">BBBBHH8sIIHBBBBH")
assert HEADER.size == HEADER_SIZE and CLEAR.size == MASK_SIZE == HEADER_SIZE + FRAG_HEADER_SIZE
MUTABLE_BYTES = 2                     # TTL and path: the only header bytes a relay may change
SHARD_OVERHEAD = MASK_SIZE + MAC_SIZE  # a shard datagram besides its chunk
SUB_BITS = 8 * FRAG_HEADER_SIZE       # the header's mask is the top 26 of the 32 mask bytes
SAMPLE = 16                           # the mask sample: the last 16 bytes of a datagram
# from one shard's 32 unmasked bytes (as an int) to the next's: seq + 1 (its
# lowest byte is byte 23) and index + 1 (byte 26)
NEXT_SHARD = (1 << 8 * (MASK_SIZE - 24)) + (1 << 8 * (MASK_SIZE - 27))
_NONCE_PAD = bytes(NONCE_SIZE - 20)
_AES_NONCE_PAD = bytes(AES_NONCE_SIZE - 8)
# what varies between consecutive whole datagrams of one sender to one
# receiver, in their 32 unmasked bytes as an int: seq (bytes 20-23) and
# bytes 26-31 (ciphertext, not header); the rest is the same until its
# clock's second (ts) changes
SEQ_SHIFT = 8 * (MASK_SIZE - 24)
SEQ_FIELD = 0xFFFFFFFF
SAME_SENDER_BITS = ((1 << 8 * MASK_SIZE) - 1) & ~(SEQ_FIELD << SEQ_SHIFT) & ~((1 << 8 * (MASK_SIZE - HEADER_SIZE)) - 1)


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
    flags: int = 0   # FLAG_* (constants.py)
    version: int = WIRE_VERSION

    def pack(self) -> bytes:
        return HEADER.pack(self.ttl, self.path, (self.version << 4) | self.kind, self.flags,
                           self.src, self.dst, self.session, self.ts, self.seq, self.pad)

    @classmethod
    def unpack(cls, raw: bytes) -> "Header":
        ttl, path, vk, flags, src, dst, session, ts, seq, pad = HEADER.unpack(raw)
        return cls(ttl, path, vk & 0x0F, src, dst, session, ts, seq, pad, flags, vk >> 4)


class Clear(NamedTuple):
    """The 32 masked bytes of a datagram in clear: the header, and for a
    shard its sub-header (meaningless bytes of ciphertext otherwise)."""
    ttl: int
    path: int
    version_kind: int
    flags: int
    src: int
    dst: int
    session: bytes
    ts: int
    seq: int
    pad: int
    index: int
    k: int
    m: int
    length_hi: int
    length_lo: int

    @property
    def version(self) -> int:
        return self.version_kind >> 4

    @property
    def kind(self) -> int:
        return self.version_kind & 0x0F

    @property
    def length(self) -> int:
        return self.length_hi << 16 | self.length_lo

    def header(self) -> Header:
        return Header(self.ttl, self.path, self.version_kind & 0x0F, self.src, self.dst, self.session,
                      self.ts, self.seq, self.pad, self.flags, self.version_kind >> 4)


# ---------------------------------------------------------------- masks

def unmask(state, datagram) -> tuple[bytes, int]:
    """(the first 32 bytes in clear, the whole 32-byte mask as an int). No
    authentication yet. `state`: crypto.mask_state(group key)."""
    h = state.copy()
    h.update(datagram[-SAMPLE:])
    full = int.from_bytes(h.digest(), "big")
    return (int.from_bytes(datagram[:MASK_SIZE], "big") ^ full).to_bytes(MASK_SIZE, "big"), full


def fields(clear: bytes) -> Clear:
    return Clear._make(CLEAR.unpack(clear))


def peek(group_key: bytes, datagram: bytes) -> tuple[Header, int]:
    """The header of a datagram, unmasked but not authenticated, and its
    32-byte mask (for tests and tools)."""
    clear, full = unmask(mask_state(group_key), datagram)
    return Header.unpack(clear[:HEADER_SIZE]), full


def peek_shard(group_key: bytes, datagram: bytes) -> tuple[Header, int, Clear]:
    """Like peek, plus all unmasked fields (the sub-header of a shard)."""
    clear, full = unmask(mask_state(group_key), datagram)
    return Header.unpack(clear[:HEADER_SIZE]), full, fields(clear)


def rewrite_mutable(datagram: bytes, full_mask: int, ttl: int, path: int) -> bytes:
    """What a relay changes: TTL and path, re-masked; the rest stays bit-identical."""
    m0, m1 = full_mask >> 248, (full_mask >> 240) & 0xFF
    return bytes((ttl ^ m0, path ^ m1)) + datagram[MUTABLE_BYTES:]


# ---------------------------------------------------------------- whole datagrams

def _seal_into(out, offset: int, plaintext, raw: bytes, pair_key: bytes) -> None:
    """The AEAD the header's flags name, its associated data header bytes
    2-25. XChaCha20-Poly1305: the pair key, nonce src | dst | session | ts |
    seq (and zeros). AES-256-GCM: the key of the sender's session
    (crypto.aes_key of src | dst | session), nonce ts | seq (and zeros)."""
    if raw[3] & FLAG_AES:
        aes_seal_into(out, offset, plaintext, raw[MUTABLE_BYTES:HEADER_SIZE], raw[16:24] + _AES_NONCE_PAD,
                      aes_key(pair_key, raw[4:16]))
    else:
        aead_seal_into(out, offset, plaintext, raw[MUTABLE_BYTES:HEADER_SIZE], raw[4:24] + _NONCE_PAD, pair_key)


def _open(body, raw, pair_key: bytes) -> bytes:
    """What _seal_into sealed under the header bytes `raw` (in clear)."""
    if raw[3] & FLAG_AES:
        sender = raw[4:16]
        key = aes_key(pair_key, sender, keep=False)
        plaintext = aes_open(body, raw[MUTABLE_BYTES:HEADER_SIZE], raw[16:24] + _AES_NONCE_PAD, key)
        keep_aes_key(pair_key, sender, key)        # (only once something under it authenticated)
        return plaintext
    return aead_open(body, raw[MUTABLE_BYTES:HEADER_SIZE], raw[4:24] + _NONCE_PAD, pair_key)


def seal(group_key: bytes, pair_key: bytes, header: Header, plaintext) -> bytes:
    raw = header.pack()
    out = bytearray(HEADER_SIZE + len(plaintext) + TAG_SIZE)
    _seal_into(out, HEADER_SIZE, plaintext, raw, pair_key)
    h = mask_state(group_key).copy()
    h.update(out[-SAMPLE:])
    mask = int.from_bytes(h.digest(), "big") >> SUB_BITS
    out[:HEADER_SIZE] = (int.from_bytes(raw, "big") ^ mask).to_bytes(HEADER_SIZE, "big")
    return bytes(out)


def open_sealed(pair_key: bytes, header: Header, datagram) -> bytes:
    """Authenticate and decrypt a whole datagram; raises CryptoError when the tag fails."""
    return open_clear(pair_key, header.pack(), datagram)


def open_clear(pair_key: bytes, clear: bytes, datagram) -> bytes:
    """open_sealed, given the datagram's header bytes in clear (the first
    HEADER_SIZE of its unmasked bytes) instead of a Header."""
    return _open(memoryview(datagram)[HEADER_SIZE:], clear, pair_key)


# ---------------------------------------------------------------- messages and shards

def seal_message(pair_key: bytes, header: Header, plaintext) -> bytearray:
    """Ciphertext and tag of a message that travels as shards (one AEAD call
    for the whole message; `header` has the message's seq)."""
    raw = header.pack()
    out = bytearray(len(plaintext) + TAG_SIZE)
    _seal_into(out, 0, plaintext, raw, pair_key)
    return out


def open_message(pair_key: bytes, header: Header, body) -> bytes:
    """Authenticate and decrypt a reassembled message (ciphertext + tag)."""
    return _open(body, header.pack(), pair_key)


def frame_shards(group_key: bytes, shard_key: bytes, header: Header, chunks: list, k: int, m: int,
                 length: int) -> list[bytes]:
    """The shard datagrams of one message: chunk i with seq = header.seq + i,
    its sub-header and its MAC, masked by its own last 16 bytes. (crypto.mac
    inlined, the MAC's input kept as the start of the tail: ~1.6 us a shard,
    and a sender's core spends most of its time here.)"""
    state, from_bytes = mask_state(group_key), int.from_bytes
    siphash, mac_out, mac_view = MAC_PARTS
    clear_int = from_bytes(header.pack() + SUB.pack(0, k, m, length >> 16, length & 0xFFFF), "big")
    out = []
    append = out.append
    for chunk in chunks:
        signed = clear_int.to_bytes(MASK_SIZE, "big")[MUTABLE_BYTES:] + chunk
        siphash(mac_out, signed, len(signed), shard_key)
        tail = signed[MASK_SIZE - MUTABLE_BYTES:] + mac_view[:]
        h = state.copy()
        h.update(tail[-SAMPLE:])
        append((clear_int ^ from_bytes(h.digest(), "big")).to_bytes(MASK_SIZE, "big") + tail)
        clear_int += NEXT_SHARD
    return out


def shard_authentic(shard_key: bytes, clear: bytes, datagram) -> bool:
    """Does the shard's MAC verify (over header bytes 2.., sub-header and chunk)?"""
    chunk = datagram[MASK_SIZE:-MAC_SIZE]
    return hmac.compare_digest(mac(shard_key, clear[MUTABLE_BYTES:] + chunk), datagram[-MAC_SIZE:])


def shard_chunk(datagram) -> bytes:
    return datagram[MASK_SIZE:-MAC_SIZE]


__all__ = ["CryptoError", "Header", "Clear", "HEADER", "SUB", "MUTABLE_BYTES", "SHARD_OVERHEAD", "SUB_BITS", "NEXT_SHARD",
           "unmask", "fields", "peek", "peek_shard", "rewrite_mutable", "seal", "open_sealed", "seal_message",
           "open_message", "frame_shards", "shard_authentic", "shard_chunk"]
