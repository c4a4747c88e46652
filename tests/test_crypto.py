"""Tier 1: key derivation (alpaca.protocol.crypto), the header, the sealed
datagram and the shard datagram (alpaca.protocol.wire).

The known vectors below were computed once with the code of wire version 2:
they pin the wire format, so any accidental change of a key derivation, the
header layout, the nonce, the header mask or a shard's framing and MAC fails
here first. Each is also recomputed from the documented construction with
the standard library and libsodium's plain bindings.
"""

from __future__ import annotations

import hashlib
import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl import bindings as sodium

from alpaca.protocol.constants import (
    FLAG_FRAG,
    HEADER_SIZE,
    KIND_DATA,
    MASK_SIZE,
    OVERHEAD,
    TAG_SIZE,
    WIRE_VERSION,
)
from alpaca.protocol.crypto import (
    MAC_SIZE,
    CryptoError,
    derive_group_key,
    derive_pair_key,
    derive_psk_key,
    derive_shard_key,
    genkey,
    mask_state,
)
from alpaca.protocol.wire import (
    MUTABLE_BYTES,
    SHARD_OVERHEAD,
    Header,
    frame_shards,
    open_message,
    open_sealed,
    peek,
    peek_shard,
    rewrite_mutable,
    seal,
    seal_message,
    shard_authentic,
    shard_chunk,
    unmask,
)

# ---------------------------------------------------------------- known vectors
V_GROUP = "example"
V_PSK_SERVER = "server-psk-0123456789abcdefghijklmnopqrstuvwxyz"   # peer 1.1
V_PSK_CLIENT = "client-psk-ABCDEFGHIJKLMNOPQRSTUVWXYZ9876543210"   # peer 16.1
V_SERVER, V_CLIENT = 0x0101, 0x1001                                 # 1.1 and 16.1
V_HEADER = Header(ttl=8, path=0, kind=KIND_DATA, src=V_CLIENT, dst=V_SERVER,
                  session=b"\x01" * 8, ts=1_700_000_000, seq=42)
V_PLAINTEXT = b"alpaca test vector: an inner IP packet would go here"

V_GROUP_KEY = "34134067b86ac0d568e3c169d6f3e69291a2c90acf86f93a6b5861640ddedb2e"
V_PSK_KEY_CLIENT = "1630f0102be4dc59d01d7b2939c06c78783c59e6c68f10241447e527ce26bfc3"
V_PAIR_KEY = "a1590651eb36d61718e8425348ddca0f4304dd100af6bf401236d7b5add5b64c"
V_DATAGRAM = (
    "38b9789c23271c6fba75cf24c511dfc1a3a85257a9c53db069b8"  # masked header (wire version 2)
    "fae6cac496ed02a2d0173b304eab240c931780c313b86ea0530e020c6e01e64e"
    "6d130cd118dd3419a0d0a850c6b2ae42f2131815"
    "880e25a38432aac78be170b6c826717c"  # tag
)
# the same plaintext sealed as a message of k = 2 shards, m = 0 (FLAG_FRAG, seq 42 and 43)
V_SHARD_KEY = "e9587495b6bf3d207bc4ee1f302a27a4"
V_SHARDS = (
    "5a3fc8f4dfe1ab1fe406fbb8cc34dc2140e772b21e9e7a82a46956edae691c3a"  # masked header | sub-header
    "fae6cac496ed02a2d0173b304eab240c931780c313b86ea0530e020c6e01e64e6d13"  # chunk 0 (35 bytes)
    "58861027f8a75a41",  # MAC
    "516f60f4db3aa68ab7ec6141e044dc808504748878674a29b982e3e18713e511"
    "0cd118dd3419a0d0a850c6b2ae42f213181588a65dc6d9841dc8f06ec4c0f7ed"  # chunk 1 (34 bytes)
    "dca5fbcee892ea023466",
)
V_MESSAGE_HEADER = V_HEADER._replace(flags=FLAG_FRAG)


def vector_keys():
    group_key = derive_group_key(V_GROUP)
    psk_key = derive_psk_key(V_PSK_CLIENT)          # the bigger ID's key protects the pair
    return group_key, psk_key, derive_pair_key(group_key, psk_key, V_SERVER, V_CLIENT)


def vector_datagram() -> bytes:
    group_key, _, pair = vector_keys()
    return seal(group_key, pair, V_HEADER, V_PLAINTEXT)


def test_known_key_vectors():
    group_key, psk_key, pair = vector_keys()
    assert group_key.hex() == V_GROUP_KEY
    assert psk_key.hex() == V_PSK_KEY_CLIENT
    assert pair.hex() == V_PAIR_KEY


def test_known_datagram_vector():
    datagram = vector_datagram()
    assert datagram.hex() == V_DATAGRAM
    assert len(datagram) == OVERHEAD + len(V_PLAINTEXT)
    group_key, _, pair = vector_keys()
    header, _ = peek(group_key, bytes.fromhex(V_DATAGRAM))
    assert header == V_HEADER
    assert open_sealed(pair, header, bytes.fromhex(V_DATAGRAM)) == V_PLAINTEXT


def test_vectors_match_the_documented_construction():
    """Recompute the pinned values with the standard library's BLAKE2b, following
    the construction in crypto.py's docstring (not the module's own code)."""
    group_key = hashlib.blake2b(V_GROUP.encode(), digest_size=32, person=b"alpaca-group").digest()
    psk_key = hashlib.blake2b(V_PSK_CLIENT.encode(), digest_size=32, person=b"alpaca-psk").digest()
    pair = hashlib.blake2b(group_key + struct.pack(">HH", V_SERVER, V_CLIENT), digest_size=32,
                           key=psk_key, person=b"alpaca-pair").digest()
    assert (group_key.hex(), psk_key.hex(), pair.hex()) == (V_GROUP_KEY, V_PSK_KEY_CLIENT, V_PAIR_KEY)
    datagram = bytes.fromhex(V_DATAGRAM)
    # a 32-byte BLAKE2b: 26 bytes mask the header, 6 a fragment's sub-header
    mask = hashlib.blake2b(datagram[-TAG_SIZE:], digest_size=32, key=group_key,
                           person=b"alpaca-mask").digest()[:HEADER_SIZE]
    clear = bytes(a ^ b for a, b in zip(datagram[:HEADER_SIZE], mask))
    # ttl, path, version<<4|kind, flags, src, dst, session, ts, seq, pad (big-endian)
    assert clear == struct.pack(">BBBBHH8sIIH", 8, 0, WIRE_VERSION << 4 | KIND_DATA, 0, V_CLIENT, V_SERVER,
                                b"\x01" * 8, 1_700_000_000, 42, 0)
    # nonce = src|dst|session|ts|seq zero-padded to 24 bytes; AD = header minus TTL/path
    nonce = clear[4:24] + bytes(4)
    assert sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
        datagram[HEADER_SIZE:], clear[MUTABLE_BYTES:], nonce, pair) == V_PLAINTEXT


def vector_shards() -> list[bytes]:
    group_key, _, pair = vector_keys()
    body = seal_message(pair, V_MESSAGE_HEADER, V_PLAINTEXT)
    size = -(-len(body) // 2)
    return frame_shards(group_key, derive_shard_key(pair), V_MESSAGE_HEADER, [body[:size], body[size:]], 2, 0,
                        len(body))


def test_known_shard_vector():
    group_key, _, pair = vector_keys()
    assert derive_shard_key(pair).hex() == V_SHARD_KEY
    shards = vector_shards()
    assert [d.hex() for d in shards] == list(V_SHARDS)
    assert sum(len(d) - SHARD_OVERHEAD for d in shards) == len(V_PLAINTEXT) + TAG_SIZE
    body = b""
    for index, datagram in enumerate(shards):
        header, _, clear = peek_shard(group_key, datagram)
        assert header == V_MESSAGE_HEADER._replace(seq=42 + index)
        assert (clear.index, clear.k, clear.m, clear.length) == (index, 2, 0, len(V_PLAINTEXT) + TAG_SIZE)
        assert shard_authentic(derive_shard_key(pair), unmask(mask_state(group_key), datagram)[0], datagram)
        body += shard_chunk(datagram)
    assert open_message(pair, V_MESSAGE_HEADER, body) == V_PLAINTEXT


def test_shard_vector_matches_the_documented_construction():
    """wire.py's docstring: masked(header | sub-header) | chunk | SipHash-2-4
    MAC under the shard key over header bytes 2.., sub-header and chunk; the
    32 mask bytes from the datagram's last 16; shard i carries seq + i; the
    message's AEAD as a whole datagram's, with the message's header."""
    group_key = bytes.fromhex(V_GROUP_KEY)
    pair = bytes.fromhex(V_PAIR_KEY)
    shard_key = hashlib.blake2b(b"", digest_size=16, key=pair, person=b"alpaca-shard").digest()
    assert shard_key.hex() == V_SHARD_KEY
    body = b""
    for index, datagram in enumerate(bytes.fromhex(d) for d in V_SHARDS):
        mask = hashlib.blake2b(datagram[-16:], digest_size=32, key=group_key, person=b"alpaca-mask").digest()
        clear = bytes(a ^ b for a, b in zip(datagram[:MASK_SIZE], mask))
        assert clear == struct.pack(">BBBBHH8sIIH", 8, 0, WIRE_VERSION << 4 | KIND_DATA, FLAG_FRAG, V_CLIENT,
                                    V_SERVER, b"\x01" * 8, 1_700_000_000, 42 + index, 0) + struct.pack(
            ">BBBBH", index, 2, 0, 0, len(V_PLAINTEXT) + TAG_SIZE)
        chunk = datagram[MASK_SIZE:-MAC_SIZE]
        assert sodium.crypto_shorthash_siphash24(clear[MUTABLE_BYTES:] + chunk, shard_key) == datagram[-MAC_SIZE:]
        body += chunk
    message_header = struct.pack(">BBBBHH8sIIH", 8, 0, WIRE_VERSION << 4 | KIND_DATA, FLAG_FRAG, V_CLIENT, V_SERVER,
                                 b"\x01" * 8, 1_700_000_000, 42, 0)
    nonce = message_header[4:24] + bytes(4)
    assert sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(body, message_header[MUTABLE_BYTES:], nonce,
                                                             pair) == V_PLAINTEXT


@pytest.mark.parametrize("shard", [0, 1])
def test_every_shard_byte_outside_ttl_and_path_is_authenticated(shard):
    group_key, _, pair = vector_keys()
    shard_key = derive_shard_key(pair)
    original = vector_shards()[shard]
    for position in range(len(original)):
        for bit in range(8):
            flipped = bytearray(original)
            flipped[position] ^= 1 << bit
            clear, _ = unmask(mask_state(group_key), flipped)
            assert shard_authentic(shard_key, clear, flipped) == (position < MUTABLE_BYTES), (position, bit)


def test_seal_is_deterministic():
    # the nonce comes from the header only: no hidden randomness in seal()
    assert vector_datagram() == vector_datagram()


# ---------------------------------------------------------------- header

headers = st.builds(
    Header,
    ttl=st.integers(0, 255), path=st.integers(0, 255), kind=st.integers(0, 15),
    src=st.integers(0, 0xFFFF), dst=st.integers(0, 0xFFFF), session=st.binary(min_size=8, max_size=8),
    ts=st.integers(0, 2**32 - 1), seq=st.integers(0, 2**32 - 1), pad=st.integers(0, 0xFFFF),
    flags=st.integers(0, 255), version=st.integers(0, 15))


@given(headers)
def test_header_round_trip(header):
    raw = header.pack()
    assert len(raw) == HEADER_SIZE
    assert Header.unpack(raw) == header
    assert Header.unpack(raw).pack() == raw


@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE))
def test_any_header_bytes_unpack_and_repack_identically(raw):
    # open_sealed re-packs the peeked header as associated data: must be lossless
    assert Header.unpack(raw).pack() == raw


def test_header_defaults():
    assert V_HEADER.version == WIRE_VERSION and V_HEADER.flags == 0 and V_HEADER.pad == 0
    assert V_HEADER.pack()[:MUTABLE_BYTES] == bytes((8, 0))


# ---------------------------------------------------------------- seal / peek / open

@settings(max_examples=60)
@given(headers, st.binary(max_size=300))
def test_seal_peek_open_round_trip(header, plaintext):
    group_key, _, pair = vector_keys()
    datagram = seal(group_key, pair, header, plaintext)
    assert len(datagram) == HEADER_SIZE + len(plaintext) + TAG_SIZE
    seen, _mask = peek(group_key, datagram)
    assert seen == header
    assert open_sealed(pair, seen, datagram) == plaintext


def test_header_is_hidden_from_outsiders():
    datagram = vector_datagram()
    assert V_HEADER.pack()[2:] not in datagram            # nothing readable in clear
    assert V_HEADER.session not in datagram
    outsider, _ = peek(derive_group_key("another-group"), datagram)
    assert (outsider.src, outsider.dst) != (V_CLIENT, V_SERVER)
    assert outsider != V_HEADER


@pytest.mark.parametrize("position", range(len(vector_datagram())))
def test_every_byte_outside_ttl_and_path_is_authenticated(position):
    group_key, _, pair = vector_keys()
    original = vector_datagram()
    for bit in range(8):
        flipped = bytearray(original)
        flipped[position] ^= 1 << bit
        flipped = bytes(flipped)
        header, _ = peek(group_key, flipped)
        if position < MUTABLE_BYTES:
            # TTL and path: forwarders may change them, the datagram still authenticates
            assert open_sealed(pair, header, flipped) == V_PLAINTEXT
            assert header.pack()[MUTABLE_BYTES:] == V_HEADER.pack()[MUTABLE_BYTES:]
            continue
        # the header the receiver would trust no longer matches, or the tag fails
        with pytest.raises(CryptoError):
            open_sealed(pair, header, flipped)


def test_rewrite_mutable_changes_only_ttl_and_path():
    group_key, _, pair = vector_keys()
    datagram = vector_datagram()
    _header, mask = peek(group_key, datagram)
    for ttl, path in [(7, 1), (0, 255), (255, 0), (1, 1)]:
        relay = rewrite_mutable(datagram, mask, ttl, path)
        assert relay[MUTABLE_BYTES:] == datagram[MUTABLE_BYTES:]
        seen, mask2 = peek(group_key, relay)
        assert (seen.ttl, seen.path) == (ttl, path)
        assert (seen.src, seen.dst, seen.session, seen.ts, seen.seq) == (V_CLIENT, V_SERVER, b"\x01" * 8,
                                                                         1_700_000_000, 42)
        assert mask2 == mask                                # the mask depends on the tag only
        assert open_sealed(pair, seen, relay) == V_PLAINTEXT


def test_wrong_pair_key_fails():
    group_key, _, _pair = vector_keys()
    datagram = vector_datagram()
    header, _ = peek(group_key, datagram)
    other = derive_pair_key(group_key, derive_psk_key(V_PSK_SERVER), V_SERVER, V_CLIENT)
    with pytest.raises(CryptoError):
        open_sealed(other, header, datagram)


def test_direction_is_part_of_the_nonce():
    # same pair key both ways: src/dst in the nonce keep the two directions apart
    group_key, _, pair = vector_keys()
    back = Header(8, 0, KIND_DATA, V_SERVER, V_CLIENT, V_HEADER.session, V_HEADER.ts, V_HEADER.seq)
    assert seal(group_key, pair, back, V_PLAINTEXT)[HEADER_SIZE:] != vector_datagram()[HEADER_SIZE:]


# ---------------------------------------------------------------- key derivation

def test_pair_key_is_symmetric_and_per_pair_and_per_group():
    g1, g2 = derive_group_key("example"), derive_group_key("example2")
    k = derive_psk_key(V_PSK_CLIENT)
    assert derive_pair_key(g1, k, V_SERVER, V_CLIENT) == derive_pair_key(g1, k, V_CLIENT, V_SERVER)
    keys = {derive_pair_key(g, k, a, b) for g in (g1, g2) for a, b in
            [(V_SERVER, V_CLIENT), (0x0102, V_CLIENT), (V_SERVER, 0x1002), (0x0102, 0x1002)]}
    assert len(keys) == 8
    assert derive_pair_key(g1, k, V_SERVER, V_CLIENT) != derive_pair_key(g1, derive_psk_key(V_PSK_SERVER),
                                                                         V_SERVER, V_CLIENT)
    assert all(len(x) == 32 for x in keys)


def test_group_key_differs_per_group():
    assert derive_group_key("example") != derive_group_key("Example")
    assert derive_group_key("example") != derive_group_key("example ")


@pytest.mark.parametrize("prefix", [16, 32])
def test_psk_key_uses_the_whole_string(prefix):
    base = genkey()
    a, b = base[:prefix] + "A" * 20, base[:prefix] + "B" * 20
    assert a[:prefix] == b[:prefix]
    assert derive_psk_key(a) != derive_psk_key(b)
    # even the very last character matters
    assert derive_psk_key(base) != derive_psk_key(base[:-1] + ("x" if base[-1] != "x" else "y"))


def test_psk_key_is_not_the_group_key_of_the_same_string():
    # personalisation keeps the derivations apart
    assert derive_psk_key("example") != derive_group_key("example")


def test_genkey_format():
    keys = [genkey() for _ in range(200)]
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert len(key) == 43
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", key), key
