"""Constants of the protocol core, grouped by what changing them would mean.

Protocol constants are part of the wire format or of what peers expect of each
other: changing one breaks interoperability. Tuning constants only change how
this implementation behaves and may be adjusted freely.
"""

# ---------------------------------------------------------------- protocol
# 2: shards carry their own sequence number and an 8-byte MAC (docs/protocol.md §12);
# a datagram of another version is dropped as wrong_version and logged once a minute
WIRE_VERSION = 2

HEADER_SIZE = 26          # see docs/protocol.md for the byte layout
TAG_SIZE = 16             # Poly1305 tag, last bytes of every datagram
OVERHEAD = HEADER_SIZE + TAG_SIZE
MIN_DATAGRAM = OVERHEAD   # a keepalive: header + empty ciphertext + tag

# flags byte of the header
FLAG_VNET = 0x80          # the plaintext starts with a virtio_net_hdr (TUN offloads)
FLAG_FRAG = 0x40          # this datagram is one shard of a fragmented message
FLAG_BATCH = 0x20         # the plaintext is several packets, each after its 2-byte length (FEC on)
FLAG_ISAL = 0x10          # shards: the parity is ISA-L's Cauchy Reed-Solomon, not zfec's
FLAG_AES = 0x08           # sealed with AES-256-GCM, not XChaCha20-Poly1305 (docs/protocol.md §4 "AEAD")
KNOWN_FLAGS = FLAG_VNET | FLAG_FRAG | FLAG_BATCH | FLAG_ISAL | FLAG_AES
# a challenge's or answer's first padding byte: what its sender can do
CAP_AES = 0x01            # opens AES-256-GCM
VNET_HDR_SIZE = 10        # struct virtio_net_hdr
FRAG_HEADER_SIZE = 6      # shard index, data shards k, parity shards m, message length (24 bits)
MASK_SIZE = HEADER_SIZE + FRAG_HEADER_SIZE
MAX_SHARDS = 255          # k + m, one byte each on the wire
MAX_DATA_SHARDS = 128     # k: the cost of a decode grows with it (at mtu 576 a 64 KiB message is ~120)
MAX_MESSAGE = 65536 + 64  # bytes of a message sealed as shards: 64 KiB, virtio_net_hdr and tag

SEQ_BITS = 20             # per-second sequence number (docs/protocol.md §4-5)
SEQ_LIMIT = 1 << SEQ_BITS  # datagrams per second per sender before borrowing the next second

DEFAULT_TTL = 8           # hops a datagram may take; forwarders decrement it
MAX_TTL = 16              # a relay never sends a datagram on with more hops left than this
PATH_DIRECT = 0           # path byte set by the origin
PATH_RELAYED = 1          # path byte set by a forwarder that relayed the datagram

# docs/protocol.md §6: a path that has carried nothing for PATH_LIFETIME is not used; a
# client heard from on no path for PEER_LIFETIME gets nothing sent downward.
PATH_LIFETIME = 10.0
# a path bulk is spread over (loss.py) has carried something from the peer this
# recently; a quiet one gets no share, and with fewer than two such paths bulk
# goes on every path
SPREAD_HEARD = 0.5
PEER_LIFETIME = 60.0

# The replay/dedup window (docs/protocol.md "Replay window"): a datagram whose
# timestamp is more than REPLAY_WINDOW seconds away from the receiver's clock is
# dropped; inside it each (session, timestamp, sequence) is accepted once. It
# must absorb inter-path skew (tens to hundreds of ms on real paths), delayed
# duplicates (duplicate_delay_ms <= 500 ms, times up to 4 copies = 2 s) and the clock
# offset between two NTP-synced hosts (ms), with margin for a slow forwarder.
REPLAY_WINDOW = 5

KIND_DATA = 0
KIND_KEEPALIVE = 1
KIND_REPORT = 2           # receiver -> sender: shards received / expected (loss)
KIND_CHALLENGE = 3        # "prove your session is live": 16 random bytes (docs/protocol.md §5)
KIND_RESPONSE = 4         # the challenge's 16 bytes, sealed with the responder's current session
KIND_MAX = KIND_RESPONSE

# ---------------------------------------------------------------- tuning
KEEPALIVE_INTERVAL = 4.0  # < PATH_LIFETIME so an idle client's paths stay live
SYN_DNS_COPY_DELAY = 0.02  # the extra copy of TCP SYN and DNS packets (docs/protocol.md §7)
MAX_PATHS_PER_PEER = 8    # learned paths kept per peer (oldest evicted)
MAX_SESSIONS_PER_PEER = 8  # sender restarts remembered inside the replay window
# replay windows a relay keeps for pairs this peer's key string seals, besides
# the pair (peer, me): a member holds the keys of every pair with a smaller ID,
# so without a cap it could make a relay keep a window per peer in the table
MAX_WINDOWS_PER_PEER = 16
REASSEMBLY_TIMEOUT = 0.5  # a fragmented message still incomplete after this is dropped
REASSEMBLY_PER_PEER = 64  # messages being reassembled per source peer
REASSEMBLY_TOTAL = 512    # ... and in all (each up to ~64 KiB + parity)
REASSEMBLY_PEER_BYTES = 8 << 20   # chunk bytes held per source peer
REASSEMBLY_BYTES = 32 << 20       # ... and in all
REPORT_INTERVAL = 0.5     # loss reports to each peer that sent us shards

# the forwarding engine (node.py and its parts)
PRUNE_INTERVAL = 5.0
PATH_NOTICES_PER_INTERVAL = 3     # per peer, then one line saying the rest are not logged
HOST_CACHE_LIMIT = 1024           # packed forms of target hosts kept for the loop guard
NEXT_HOPS_KEPT = 4096             # the host's next hop per destination outside the tunnel net
UNREACHABLE_PER_SECOND = 10       # ICMP host unreachable answers (token bucket), and their burst
UNREACHABLE_BURST = 10
HELD_PACKETS = 256                # packets waiting for a next hop (about a TUN batch); past it: the gateway
ZERO_VNET = bytes(VNET_HDR_SIZE)  # virtio_net_hdr of a plain packet: no GSO, checksum complete
INNER_HEAD = 64                   # bytes of an inner packet that routing looks at
BATCH_LIMIT = 65535               # plaintext bytes of one FEC batch (about 47 shards at MTU 1400)
BATCH_ENTRY = 2                   # the length before each packet of a batch
NONCE_SIZE = 16                   # of a challenge
CHALLENGE_INTERVAL = 0.25         # challenges to one peer at most this often
PATH_MTU_INTERVAL = 0.25          # path MTU probes looked after this often (pmtu.py)
RESPONSE_LIMIT = 20               # answers to one peer's challenges per second
VERSION_NOTICE_INTERVAL = 60.0    # one line about datagrams of another wire version
