"""Keys and the cryptographic primitives of the protocol (docs/protocol.md §3-4).

Keys (all BLAKE2b via PyNaCl's crypto_generichash):
  group key  = BLAKE2b(group name, person "alpaca-group")         hides headers
  psk key    = BLAKE2b(whole secrets.txt key string, "alpaca-psk")
  pair key   = BLAKE2b(group key | min ID | max ID,
                       key = psk key of the bigger ID, "alpaca-pair")
  shard key  = BLAKE2b-128(pair key, person "alpaca-shard")       per-shard MACs
  AES key    = BLAKE2b(src | dst | session, key = pair key, "alpaca-aes")
                                                  one per sender session

Primitives: XChaCha20-Poly1305 (every whole datagram and every message sent
as shards) or, for data between two peers that both have AES instructions,
AES-256-GCM (docs/protocol.md §4 "AEAD"), SipHash-2-4 (the 8-byte MAC of each shard, checked before the
shard is kept, counted or relayed) and keyed BLAKE2b-256 (header masks).
How they are laid out in a datagram is wire.py's business.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct

from nacl import bindings as sodium
from nacl._sodium import ffi, lib
from nacl.exceptions import CryptoError

_PERSON_GROUP = b"alpaca-group".ljust(16, b"\0")
_PERSON_PSK = b"alpaca-psk".ljust(16, b"\0")
_PERSON_PAIR = b"alpaca-pair".ljust(16, b"\0")
_PERSON_MASK = b"alpaca-mask".ljust(16, b"\0")
_PERSON_SHARD = b"alpaca-shard".ljust(16, b"\0")
_PERSON_AES = b"alpaca-aes".ljust(16, b"\0")

TAG_SIZE = 16                # Poly1305
MAC_SIZE = 8                 # SipHash-2-4
MASK_BYTES = 32              # one BLAKE2b-256 output masks header and shard sub-header
NONCE_SIZE = sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES
AES_NONCE_SIZE = 12
AES_KEYS_LIMIT = 4096        # sender sessions whose AES key is kept


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


def derive_shard_key(pair_key: bytes) -> bytes:
    """The SipHash key of a pair's shard MACs: one key per purpose, so a MAC
    can never be confused with anything the AEAD computes."""
    return _blake2b(b"", _PERSON_SHARD, key=pair_key, size=16)


def genkey() -> str:
    """A new pre-shared key: 32 random bytes, base64url without padding (43 chars)."""
    return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()


# The per-datagram calls go straight to libsodium through PyNaCl's own cffi
# binding with preallocated buffers: nacl.bindings checks and allocates on
# every call, which costs more than the cryptography itself for 1.4 KB
# (docs/benchmarks.md). Same functions, same results (tests/test_crypto.py
# pins vectors made with nacl.bindings).
_LEN_OUT = ffi.new("unsigned long long *")
_MAC_OUT = ffi.new("unsigned char[8]")
_MAC_VIEW = ffi.buffer(_MAC_OUT)


def aead_seal_into(out, offset: int, plaintext, aad: bytes, nonce: bytes, key: bytes) -> None:
    """XChaCha20-Poly1305: ciphertext + tag written into out[offset:]."""
    _seal_with(lib.crypto_aead_xchacha20poly1305_ietf_encrypt, out, offset, plaintext, aad, nonce, key)


def aead_open(body, aad: bytes, nonce: bytes, key: bytes) -> bytes:
    """Authenticate and decrypt ciphertext + tag; raises CryptoError when the tag fails."""
    return _open_with(lib.crypto_aead_xchacha20poly1305_ietf_decrypt, body, aad, nonce, key)


def _seal_with(encrypt, out, offset: int, plaintext, aad: bytes, nonce: bytes, key: bytes) -> None:
    encrypt(ffi.from_buffer(out) + offset, _LEN_OUT, plaintext, len(plaintext), aad, len(aad), ffi.NULL, nonce, key)


def _open_with(decrypt, body, aad: bytes, nonce: bytes, key: bytes) -> bytes:
    clen = len(body)
    if clen < TAG_SIZE:
        raise CryptoError("Decryption failed. Ciphertext failed verification")
    out = bytearray(clen - TAG_SIZE)
    if decrypt(ffi.from_buffer(out), _LEN_OUT, ffi.NULL, ffi.from_buffer(body), clen, aad, len(aad), nonce, key) != 0:
        raise CryptoError("Decryption failed. Ciphertext failed verification")
    return bytes(out)


def aes_available() -> bool:
    """Can this CPU run libsodium's AES-256-GCM (AES-NI and PCLMULQDQ)?
    Without them libsodium has no AES-256-GCM at all."""
    return bool(lib.crypto_aead_aes256gcm_is_available())


def aes_key(pair_key: bytes, sender: bytes, keep: bool = True) -> bytes:
    """The AES-256-GCM key of one sender session of a pair: `sender` is the
    header's src | dst | session (12 bytes). Its 12-byte nonces are then
    (ts, seq) and zeros, which that session never repeats: the pair key
    alone would be shared by both directions and every restart. `keep`:
    cache it (a receiver keeps it only once a datagram under it opened,
    keep_aes_key, so forgeries cannot crowd out the real keys)."""
    key = _aes_keys.get((pair_key, sender))
    if key is None:
        key = _blake2b(sender, _PERSON_AES, key=pair_key)
        if keep:
            keep_aes_key(pair_key, sender, key)
    return key


def keep_aes_key(pair_key: bytes, sender: bytes, key: bytes) -> None:
    if len(_aes_keys) >= AES_KEYS_LIMIT and (pair_key, sender) not in _aes_keys:
        _aes_keys.clear()
    _aes_keys[(pair_key, sender)] = key


_aes_keys: dict[tuple[bytes, bytes], bytes] = {}


def aes_seal_into(out, offset: int, plaintext, aad: bytes, nonce: bytes, key: bytes) -> None:
    """AES-256-GCM: ciphertext + tag written into out[offset:]."""
    _seal_with(lib.crypto_aead_aes256gcm_encrypt, out, offset, plaintext, aad, nonce, key)


def aes_open(body, aad: bytes, nonce: bytes, key: bytes) -> bytes:
    """Authenticate and decrypt AES-256-GCM ciphertext + tag; raises CryptoError when the tag fails."""
    return _open_with(lib.crypto_aead_aes256gcm_decrypt, body, aad, nonce, key)


def mac(key: bytes, data) -> bytes:
    """SipHash-2-4 of data under a 16-byte key: 8 bytes (~0.6 us for 1.4 KB)."""
    # (cffi takes bytes as they are, other buffers through from_buffer: 0.15 us)
    lib.crypto_shorthash_siphash24(_MAC_OUT, data if data.__class__ is bytes else ffi.from_buffer(data), len(data), key)
    return _MAC_VIEW[:]


# mac's parts, for the loop that inlines it (wire.frame_shards): the
# function (output, input as bytes, its length, key), its output and a view
# that copies it out
MAC_PARTS = (lib.crypto_shorthash_siphash24, _MAC_OUT, _MAC_VIEW)


def mask_state(group_key: bytes):
    """The keyed BLAKE2b-256 state header masks start from (copy it, update
    with the sample, digest). hashlib's BLAKE2b is libsodium's function, and
    copying a state that has absorbed the key block costs 0.4 us against
    1.4 us for a fresh keyed hash through cffi."""
    state = _mask_states.get(group_key)
    if state is None:
        if len(_mask_states) > 16:
            _mask_states.clear()
        state = _mask_states[group_key] = hashlib.blake2b(digest_size=MASK_BYTES, key=group_key,
                                                          person=_PERSON_MASK)
    return state


_mask_states: dict[bytes, object] = {}

__all__ = ["CryptoError", "TAG_SIZE", "MAC_SIZE", "MASK_BYTES", "NONCE_SIZE", "genkey", "derive_group_key",
           "derive_psk_key", "derive_pair_key", "derive_shard_key", "aead_seal_into", "aead_open", "mac",
           "MAC_PARTS", "mask_state", "AES_NONCE_SIZE", "aes_available", "aes_key", "keep_aes_key", "aes_seal_into",
           "aes_open"]
