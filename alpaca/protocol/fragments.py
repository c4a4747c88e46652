"""Messages bigger than one datagram: shards, parity and reassembly.

A TUN device with offloads hands us TCP super-packets of up to 64 KiB. Such a
message is sealed with ONE AEAD call (the cost of a call, not of a byte, is
what limits a Python datapath) and its ciphertext + tag is cut into k data
shards of equal size (the last one shorter), optionally followed by m parity
shards computed with ISA-L's Cauchy Reed-Solomon through pyeclib (over the
zero-padded data shards).
Each shard travels in its own datagram:

    masked(header | sub-header) | shard
    sub-header = index (1 byte) | k (1) | m (1) | message length (3, big-endian)

The header is the message's header (same src, dst, session, ts, seq for every
shard; flags has FLAG_FRAG), so a forwarder relays shards like any datagram
without reassembling them. The receiver decodes from any k distinct shards,
then authenticates the whole message once: a lost, forged or corrupted shard
can only lose the message, never change it. docs/protocol.md "Fragments".
"""

from __future__ import annotations

import collections
import math

import zfec
from pyeclib.ec_iface import ECDriver

from .constants import MAX_SHARDS, REASSEMBLY_PER_PEER, REASSEMBLY_TIMEOUT, REASSEMBLY_TOTAL, TAG_SIZE
from .drops import DropReason

DONE_LIMIT = 8192          # decoded messages remembered (a few hundred bytes each)


def shard_size(length: int, k: int) -> int:
    """Every data shard but the last, and every parity shard, has this size."""
    return -(-length // k)


def shard_count(length: int, max_shard: int) -> int:
    return max(1, -(-length // max_shard))


EC_TYPE = "isa_l_rs_cauchy"  # Cauchy Reed-Solomon: MDS for any k + m <= 255 (ISA-L's Vandermonde is not)
FRAGMENT_HEADER = 80       # liberasurecode's header before each fragment: never sent
# Both caches are keyed by what an unauthenticated sub-header says, so both
# are bounded (least recently used out): codecs by (k, m), headers by (k, m, length)
CODEC_CACHE = 128
HEADER_CACHE = 256         # <= 255 x 80 bytes each: <= 5 MiB in all
_headers: collections.OrderedDict[tuple[int, int, int], list[bytes]] = collections.OrderedDict()


def uses_isal(k: int, m: int) -> bool:
    """Which Reed-Solomon a k + m message uses (FLAG_ISAL, docs/protocol.md §12).
    zfec's decode costs ~30 us per missing data shard but its encode ~40 us
    per parity shard (k = 47); ISA-L encodes all parity in ~40 us but its
    decode costs ~0.45 ms whatever is missing (it inverts a k x k matrix).
    So ISA-L where parity is heavy (high loss), zfec where it is light."""
    return k > 1 and 4 * m > k


class _Zfec:
    """zfec (Rizzo's Vandermonde Reed-Solomon) for one (k, m)."""

    def __init__(self, k: int, m: int):
        self.k, self.m = k, m
        self.encoder, self.decoder = zfec.Encoder(k, k + m), zfec.Decoder(k, k + m)

    def parity(self, shards: list, size: int) -> list:
        last = bytes(shards[-1]).ljust(size, b"\0")
        return self.encoder.encode(tuple(shards[:-1]) + (last,), tuple(range(self.k, self.k + self.m)))

    def decode(self, shards: dict, size: int, length: int) -> bytes:
        k = self.k
        nums = tuple(sorted(shards)[:k])
        blocks = tuple(shards[i] if i != k - 1 else bytes(shards[i]).ljust(size, b"\0") for i in nums)
        return b"".join(self.decoder.decode(blocks, nums))[:length]


class _Isal:
    """Reed-Solomon for one (k, m): ISA-L through pyeclib. liberasurecode
    frames every fragment with a header; it depends only on (k, m, index,
    message length), so it is never sent: the receiver makes the headers by
    encoding zeros of the message's length (cached), and what it passes to
    the library beyond them is shard bytes of the sizes valid_sub checked."""

    def __init__(self, k: int, m: int):
        self.k, self.m = k, m
        self.driver = ECDriver(k=k, m=m, ec_type=EC_TYPE)

    def parity(self, body) -> list:
        """The m parity shards of a body cut into k zero-padded data shards (systematic)."""
        return [memoryview(f)[FRAGMENT_HEADER:] for f in self.driver.encode(bytes(body))[self.k:]]


    def decode(self, shards: dict, size: int, length: int) -> bytes:
        """The body from any k of its shards (the last data shard zero-padded to size)."""
        key = (self.k, self.m, length)
        headers = _headers.get(key)
        if headers is None:
            headers = [f[:FRAGMENT_HEADER] for f in self.driver.encode(bytes(length))]
            if len(_headers) >= HEADER_CACHE:
                _headers.popitem(last=False)
        else:
            _headers.move_to_end(key)
        _headers[key] = headers
        k = self.k
        fragments = [headers[i] + (bytes(shards[i]).ljust(size, b"\0") if i == k - 1 else shards[i])
                     for i in sorted(shards)[:k]]
        return self.driver.decode(fragments)


_codecs: collections.OrderedDict[tuple[int, int, bool], _Zfec | _Isal] = collections.OrderedDict()


def codec_problem() -> str | None:
    """None when the Reed-Solomon backend works; else one line saying why
    (an old pyeclib or a liberasurecode built without ISA-L)."""
    try:
        codec, body = _Isal(2, 1), bytes(range(40))
        if codec.decode({1: body[20:], 2: codec.parity(body)[0]}, 20, 40) != body:
            raise ValueError("a decoded message differs from the one encoded")
    except Exception as e:  # noqa: BLE001  (any failure of the library means no FEC)
        return (f"the Reed-Solomon backend {EC_TYPE} does not work ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:120]}); install pyeclib >= 1.8 from PyPI, whose wheel includes ISA-L")
    return None


def _codec(k: int, m: int, isal: bool) -> _Zfec | _Isal:
    key = (k, m, isal)
    codec = _codecs.get(key)
    if codec is None:
        if len(_codecs) >= CODEC_CACHE:
            _codecs.popitem(last=False)
        codec = _codecs[key] = (_Isal if isal else _Zfec)(k, m)
    else:
        _codecs.move_to_end(key)
    return codec


def split(body, max_shard: int, parity: int, isal: bool = False) -> tuple[list, int, int]:
    """Cut a sealed message into k data shards (balanced, so none is tiny:
    each carries a 16-byte mask sample) and `parity` parity shards.
    Returns (shards, k, m)."""
    length = len(body)
    k = shard_count(length, max_shard)
    m = min(parity, MAX_SHARDS - k)
    size = shard_size(length, k)
    view = memoryview(body)
    if k == 1:
        # Reed-Solomon of one shard is repetition: every parity shard is the
        # message itself (with its own index, so the receiver counts each)
        return [view] * (1 + m), 1, m
    shards = [view[i * size:(i + 1) * size] for i in range(k)]
    if m > 0:
        shards.extend(_codec(k, m, True).parity(view) if isal else _codec(k, m, False).parity(shards, size))
    return shards, k, m


def valid_sub(index: int, k: int, m: int, length: int, shard_len: int) -> bool:
    """Is this sub-header self-consistent, and the shard of the size it implies?"""
    if k < 1 or k + m > MAX_SHARDS or index >= k + m or length < TAG_SIZE * k:
        return False
    size = shard_size(length, k)
    expected = length - (k - 1) * size if index == k - 1 else size
    return shard_len == expected and expected >= TAG_SIZE


class Reassembly:
    __slots__ = ("k", "m", "length", "isal", "size", "last", "shards", "addrs", "born")

    def __init__(self, k: int, m: int, length: int, now: float, isal: bool = False):
        self.k, self.m, self.length, self.isal = k, m, length, isal
        self.size = shard_size(length, k)
        self.last = length - (k - 1) * self.size     # the last data shard's size
        self.shards: dict[int, bytes] = {}
        self.addrs: list = []
        self.born = now


Key = tuple  # (src, dst, session, ts, seq)


class Reassembler:
    """Shards in, whole messages (ciphertext + tag) out.

    Bounded: at most REASSEMBLY_PER_PEER incomplete messages per (src, dst)
    and REASSEMBLY_TOTAL in all, each dropped REASSEMBLY_TIMEOUT after its
    first shard. A decoded message is remembered (which shards arrived, not
    their bytes; at most DONE_LIMIT) for the same time, so its late parity
    and duplicate shards are recognised and counted for the loss report, not
    reassembled again."""

    def __init__(self):
        self.slots: collections.OrderedDict[Key, Reassembly] = collections.OrderedDict()
        self.per_pair: collections.Counter[tuple[int, int]] = collections.Counter()
        # decoded messages: key -> [bitmask of shard indices seen, k + m, born]
        self.done: collections.OrderedDict[Key, list] = collections.OrderedDict()
        # src -> [shards sent, distinct shards arrived] of messages no longer
        # tracked (decoded or expired): for the loss report (loss.py)
        self.tally: dict[int, list[int]] = {}

    def add(self, key: Key, index: int, k: int, m: int, length: int, shard: bytes, addr,
            now: float, isal: bool = False) -> tuple[bytes | None, Reassembly | None, DropReason | None]:
        """Returns (message, its slot, None) when this shard completes a
        message, (None, slot, None) when it was filed in a message still
        incomplete, (None, None, reason) when it is dropped, and (None, None,
        None) for a surplus shard of a message already decoded."""
        slot = self.slots.get(key)
        if slot is not None:        # the hot path: the next shard of a message in progress
            if (k != slot.k or m != slot.m or length != slot.length or index >= k + m or isal != slot.isal
                    or len(shard) != (slot.last if index == k - 1 else slot.size)):
                return None, None, DropReason.MALFORMED
            return self._add(slot, key, index, shard, addr)
        seen = self.done.get(key)
        if seen is not None:
            bit = 1 << index
            if seen[0] & bit:
                return None, None, DropReason.DUPLICATE_SHARD
            seen[0] |= bit              # a surplus shard (parity, or a copy's): for the loss report
            return None, None, None
        if not valid_sub(index, k, m, length, len(shard)):
            return None, None, DropReason.MALFORMED
        pair = key[:2]
        if self.per_pair[pair] >= REASSEMBLY_PER_PEER or len(self.slots) >= REASSEMBLY_TOTAL:
            self.expire(now)
            if self.per_pair[pair] >= REASSEMBLY_PER_PEER or len(self.slots) >= REASSEMBLY_TOTAL:
                return None, None, DropReason.REASSEMBLY_FULL
        slot = self.slots[key] = Reassembly(k, m, length, now, isal)
        self.per_pair[pair] += 1
        return self._add(slot, key, index, shard, addr)

    def knows(self, key: Key) -> bool:
        """A message in progress or recently decoded."""
        return key in self.slots or key in self.done

    def _add(self, slot: Reassembly, key: Key, index: int, shard: bytes,
             addr) -> tuple[bytes | None, Reassembly | None, DropReason | None]:
        if index in slot.shards:
            return None, None, DropReason.DUPLICATE_SHARD
        slot.shards[index] = shard
        if addr not in slot.addrs:
            slot.addrs.append(addr)
        if len(slot.shards) < slot.k:
            return None, slot, None
        message = self._decode(slot)
        self._forget(key)
        mask = 0
        for i in slot.shards:
            mask |= 1 << i
        if len(self.done) >= DONE_LIMIT:
            self._retire(*self.done.popitem(last=False))
        self.done[key] = [mask, slot.k + slot.m, slot.born]
        return message, slot, None

    def _forget(self, key: Key) -> None:
        del self.slots[key]
        pair = key[:2]
        self.per_pair[pair] -= 1
        if not self.per_pair[pair]:
            del self.per_pair[pair]

    def _retire(self, key: Key, seen: list) -> None:
        self._count(key[0], seen[1], seen[0].bit_count())

    def _count(self, src: int, sent: int, arrived: int) -> None:
        tally = self.tally.get(src)
        if tally is None:
            tally = self.tally[src] = [0, 0]
        tally[0] += sent
        tally[1] += arrived

    @staticmethod
    def _decode(slot: Reassembly) -> bytes:
        k, shards = slot.k, slot.shards
        if k == 1:
            return bytes(next(iter(shards.values())))      # repetition (split)
        if all(i in shards for i in range(k)):
            return b"".join([shards[i] for i in range(k)])
        return _codec(k, slot.m, slot.isal).decode(shards, slot.size, slot.length)

    def expire(self, now: float) -> list[tuple[Key, Reassembly]]:
        """Forget messages older than the timeout; returns those that never
        completed (lost). Decoded ones go into the loss statistics here, when
        no more of their shards are expected."""
        lost = []
        slots = self.slots
        while slots:
            key, slot = next(iter(slots.items()))
            if now - slot.born < REASSEMBLY_TIMEOUT:
                break
            self._forget(key)
            lost.append((key, slot))
        done = self.done
        while done:
            key, seen = next(iter(done.items()))
            if now - seen[2] < REASSEMBLY_TIMEOUT:
                break
            del done[key]
            self._retire(key, seen)
        return lost

    def count_lost(self, key: Key, slot: Reassembly) -> None:
        """The shards of an incomplete message in the loss tally (the node
        passes on only the tallies of peers it has authenticated)."""
        self._count(key[0], slot.k + slot.m, len(slot.shards))

    def take_tally(self) -> dict[int, list[int]]:
        tally, self.tally = self.tally, {}
        return tally


SMALL_LIMIT = 12           # parity shards a message of few shards may get (what it costs is small)
# A lost message is one congestion event for TCP (a hole of up to 47 segments):
# CUBIC at tens of ms RTT needs them rarer than 1 a second (docs/protocol.md §13)
MESSAGE_LOSS_TARGET = 0.0001


def parity_for(loss: float, k: int, target: float = MESSAGE_LOSS_TARGET, limit: int | None = None) -> int:
    """Fewest parity shards m such that a message of k data shards is lost
    (more than m of k+m shards lost, independent loss `loss`) with
    probability <= target. 0 on a clean path; at most `limit`, by default
    max(k, SMALL_LIMIT): enough for 30 % loss at any k (docs/protocol.md §13)."""
    if loss <= 0.0005:
        return 0
    if limit is None:
        limit = min(max(k, SMALL_LIMIT), MAX_SHARDS - k)
    loss = min(loss, 0.5)
    for m in range(0, limit + 1):
        n = k + m
        ok = sum(math.comb(n, i) * loss ** i * (1 - loss) ** (n - i) for i in range(m + 1))
        if 1 - ok <= target:
            return m
    return limit


# ---------------------------------------------------------------- FEC policy (config `fec`)
AUTO = "auto"
FEC_MAX = 64               # K and M of a fixed "K:M" ratio


def parse_fec(value: str) -> str | tuple[int, int] | None:
    """`fec` as config.json writes it: "auto" (follow the loss reports),
    "off" (None), or "K:M": M parity shards per K data shards, as
    UDPspeeder's -fK:M (a message of k shards gets ceil(k * M / K)).
    Raises ValueError with a sentence for anything else."""
    if value in (AUTO, "off"):
        return None if value == "off" else AUTO
    k, sep, m = str(value).partition(":")
    digits = sep and k.isascii() and m.isascii() and k.isdigit() and m.isdigit()
    if not (digits and 1 <= int(k) <= FEC_MAX and 0 <= int(m) <= FEC_MAX):
        raise ValueError(f'{value!r} is not "auto", "off" or "K:M" with K 1..{FEC_MAX} and M 0..{FEC_MAX} '
                         f'(e.g. "20:10")')
    return None if int(m) == 0 else (int(k), int(m))


def format_fec(policy: str | tuple[int, int] | None) -> str:
    return "off" if policy is None else policy if policy == AUTO else f"{policy[0]}:{policy[1]}"


def ratio_parity(ratio: tuple[int, int], k: int) -> int:
    """Parity shards of a k-shard message under a fixed K:M ratio (at least one)."""
    return min(-(-k * ratio[1] // ratio[0]), MAX_SHARDS - k)
