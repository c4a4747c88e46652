"""Forward error correction: Reed-Solomon codecs and the parity policy
(docs/protocol.md §12-13).

A message (a super-packet or a FEC batch) is sealed once; its ciphertext +
tag is cut into k balanced chunks and, when parity is wanted, m parity
chunks computed over the zero-padded data chunks: ISA-L's Cauchy
Reed-Solomon through pyeclib (zfec's Vandermonde code is still decoded, for
older senders). wire.py frames each chunk as a shard datagram;
reassembly.py collects authenticated shards; `decode` rebuilds the message
from any k of them. Everything a sub-header says is bounded (`valid_sub`)
before a shard is kept, so no codec ever sees a size it did not expect.
"""

from __future__ import annotations

import collections

import zfec
from pyeclib.ec_iface import ECDriver

from . import isal
from .constants import MAX_DATA_SHARDS, MAX_MESSAGE, MAX_SHARDS, TAG_SIZE


def shard_size(length: int, k: int) -> int:
    """Every data shard but the last, and every parity shard, has this size."""
    return -(-length // k)


def shard_count(length: int, max_shard: int) -> int:
    return max(1, -(-length // max_shard))


EC_TYPE = "isa_l_rs_cauchy"  # Cauchy Reed-Solomon: MDS for any k + m <= 255 (ISA-L's Vandermonde is not)
FRAGMENT_HEADER = 80       # liberasurecode's header before each fragment: never sent
# Both caches are keyed by what a sub-header says (authenticated, but a
# member's bug or a compromised member may say anything), so both are
# bounded (least recently used out): codecs by (k, m), headers by (k, m, length)
CODEC_CACHE = 128
HEADER_CACHE = 256         # <= 255 x 80 bytes each: <= 5 MiB in all
_headers: collections.OrderedDict[tuple[int, int, int], list[bytes]] = collections.OrderedDict()


def uses_isal(k: int, m: int) -> bool:
    """Which Reed-Solomon a k + m message uses (FLAG_ISAL, docs/protocol.md §12):
    ISA-L for every message with parity. It encodes all parity of a 64 KiB
    message in ~20-30 us where zfec takes ~40 us per parity shard, and
    decodes in ~0.1 ms when called directly (_Isal._rebuild; through
    liberasurecode ~0.5 ms at k = 47). zfec stays for decoding what older
    senders made."""
    return k > 1 and m > 0


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
        self.matrix: list[bytes] | None = None   # parity row r - k -> C[r][j], learnt (fast_ok)
        self.fast = False                         # set once by the self-check (fast_ok)

    def parity(self, body) -> list:
        """The m parity shards of a body cut into k zero-padded data shards (systematic)."""
        return [memoryview(f)[FRAGMENT_HEADER:] for f in self.driver.encode(bytes(body))[self.k:]]


    def decode(self, shards: dict, size: int, length: int) -> bytes:
        """The body from any k of its shards (the last data shard zero-padded to size)."""
        body = self._rebuild(shards, size, length) if self.fast_ok() else None
        if body is not None:
            return body
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

    def _rebuild(self, shards: dict, size: int, length: int) -> bytes | None:
        """The body, rebuilt with ISA-L directly (isal.py). Parity shard r is
        the sum over the data shards j of C[r][j] * d(j) in GF(2^8). With the
        data shards x missing, e of them, and e parity shards r that came:
        sum over x of C[r][x] * d(x) = p(r) + sum over the known j of
        C[r][j] * d(j). So d = A^-1 (M s), A = C[rows][missing] (e x e), s the
        k shards that came (known data, then the e parity), M = C[rows][known]
        beside the identity: one e x e inversion, and D = A^-1 M (e x k)
        applied to the k shards in one pass."""
        k = self.k
        missing = [i for i in range(k) if i not in shards]
        e = len(missing)
        known = [j for j in range(k) if j in shards]
        rows = [r for r in sorted(shards) if r >= k][:e]
        last = length - (k - 1) * size
        matrix = self.matrix
        inverse = isal.invert([bytes([matrix[r - k][x] for x in missing]) for r in rows])
        if inverse is None:
            return None         # (a Cauchy code has no singular square submatrix: the library decides)
        unit = bytes(e)
        mixed = [bytes([matrix[r - k][j] for j in known]) + unit[:i] + b"\1" + unit[i + 1:]
                 for i, r in enumerate(rows)]
        decoding = isal.combine(inverse, mixed, len(known) + e)
        sources = [bytes(shards[j]) if j < k - 1 else bytes(shards[j]).ljust(size, b"\0") for j in known]
        rebuilt = dict(zip(missing, isal.combine(decoding, sources + [bytes(shards[r]) for r in rows], size)))
        parts = [shards[j] if j not in rebuilt else rebuilt[j] for j in range(k - 1)]
        final = shards[k - 1] if k - 1 not in rebuilt else rebuilt[k - 1][:last]
        return b"".join(parts) + bytes(final)[:last]

    def fast_ok(self) -> bool:
        """Whether `_rebuild` may decode: ISA-L loads, and once per codec,
        the code's matrix learnt from the library (one encode of a probe
        whose data shard j is 1 at byte j) rebuilds a test message missing
        one data shard, and one missing as many as the parity allows."""
        if self.matrix is None:
            k = self.k
            self.matrix = []
            if not isal.available():
                return False
            probe = bytearray(k * k)
            for j in range(k):
                probe[j * k + j] = 1
            self.matrix = [bytes(p)[:k] for p in self.parity(probe)]
            body = bytes((7 * i + 3) % 251 for i in range(k * 300 - 5))
            size = shard_size(len(body), k)
            chunks = [body[i * size:(i + 1) * size] for i in range(k)] + [bytes(p) for p in self.parity(body)]
            self.fast = all(self._rebuild({i: c for i, c in enumerate(chunks) if i not in gone}, size, len(body))
                            == body for gone in (range(k - 1, k), range(min(self.m, k))))
        return self.fast


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


def valid_sub(index: int, k: int, m: int, length: int, chunk_len: int) -> bool:
    """Is this sub-header within bounds and self-consistent, and the chunk of
    the size it implies? Checked on a message's first shard, before anything
    is kept: at most MAX_DATA_SHARDS data chunks (what a decode costs grows
    with k), at most MAX_SHARDS in all, at most MAX_MESSAGE bytes."""
    if not 1 <= k <= MAX_DATA_SHARDS or k + m > MAX_SHARDS or index >= k + m:
        return False
    if not TAG_SIZE * k <= length <= MAX_MESSAGE:
        return False
    size = shard_size(length, k)
    expected = length - (k - 1) * size if index == k - 1 else size
    return chunk_len == expected and expected >= TAG_SIZE


def decode(k: int, m: int, isal: bool, chunks: dict, size: int, length: int) -> bytes:
    """The message body from any k of its chunks ({index: chunk}; the last
    data chunk is shorter, the others `size` bytes)."""
    if k == 1:
        return bytes(next(iter(chunks.values())))      # repetition (split)
    if all(i in chunks for i in range(k)):
        return b"".join([chunks[i] for i in range(k)])
    return _codec(k, m, isal).decode(chunks, size, length)


# A lost message is one congestion event for TCP (a hole of up to 47 segments):
# CUBIC at tens of ms RTT needs them rarer than 1 a second (docs/protocol.md §13)
MESSAGE_LOSS_TARGET = 0.0001
CLEAN_LOSS = 0.0005        # a path losing no more than this gets no parity (a few kernel drops)
# parity is planned for a little more loss than estimated: loss varies
# between reports, and at 30 % an estimate 2 points low loses 4x the
# messages the target allows (docs/protocol.md §13)
MARGIN_REL, MARGIN_ABS = 0.1, 0.002
MAX_PLANNED_LOSS = 0.5


def planned_loss(loss: float) -> float:
    """The loss `parity_for` sizes parity for, given the estimate."""
    if loss <= CLEAN_LOSS:
        return 0.0
    return min(loss * (1 + MARGIN_REL) + MARGIN_ABS, MAX_PLANNED_LOSS)


def parity_for(loss: float, k: int, target: float = MESSAGE_LOSS_TARGET) -> int:
    """Fewest parity shards m such that a message of k data shards is lost
    (more than m of k+m shards lost, independent loss `planned_loss(loss)`)
    with probability <= target. 0 on a clean path; at most what the wire
    holds (k + m <= MAX_SHARDS), which covers 50 % loss for every k up to
    MAX_DATA_SHARDS."""
    loss = planned_loss(loss)
    if loss == 0.0:
        return 0
    lo, hi = 0, MAX_SHARDS - k          # lost(m) falls as m grows: the fewest m by bisection
    while lo < hi:
        mid = (lo + hi) // 2
        if message_loss(loss, k, mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def message_loss(loss: float, k: int, m: int) -> float:
    """P(more than m of k + m shards lost), each lost with probability `loss`."""
    n, ratio = k + m, loss / (1 - loss)
    term = (1 - loss) ** n          # P(0 lost); >= 0.5 ** 255, no underflow
    ok = term
    for i in range(m):              # P(i + 1 lost) from P(i lost)
        term *= (n - i) / (i + 1) * ratio
        ok += term
    return max(0.0, 1 - ok)


# ---------------------------------------------------------------- FEC policy (config `fec`)
AUTO = "auto"              # the policy "follow the loss reports" (config syntax: alpaca/config.py)
FEC_MAX = 64               # K and M of a fixed "K:M" ratio


def format_fec(policy: str | tuple[int, int] | None) -> str:
    return "off" if policy is None else policy if policy == AUTO else f"{policy[0]}:{policy[1]}"


def ratio_parity(ratio: tuple[int, int], k: int) -> int:
    """Parity shards of a k-shard message under a fixed K:M ratio (at least one)."""
    return min(-(-k * ratio[1] // ratio[0]), MAX_SHARDS - k)
