"""Why a packet was dropped. Every drop is counted under one of these names."""

from __future__ import annotations

import enum


class DropReason(enum.Enum):
    # input that failed before a peer could be trusted: counted globally only,
    # because nothing unauthenticated may change per-peer state
    MALFORMED = "malformed"          # too short, unknown flags or kind, inconsistent fields
    WRONG_VERSION = "wrong_version"  # another wire version (a peer running another release)
    UNKNOWN_PEER = "unknown_peer"    # src/dst pair for which we hold no key
    AUTH_FAILURE = "auth_failure"    # AEAD tag or shard MAC did not verify
    AEAD_UNSUPPORTED = "aead_unsupported"  # sealed with AES-256-GCM, which this node does not open
    # authenticated input, counted against the source peer
    DUPLICATE = "duplicate"          # (session, ts, seq) already accepted
    REPLAY = "replay"                # outside the replay window (too old/new)
    UNVERIFIED = "unverified"        # a session not yet proven live by a challenge (docs/protocol.md §5)
    RATE_LIMITED = "rate_limited"    # a challenge beyond the answers a peer gets per second
    TOO_MANY_SESSIONS = "too_many_sessions"
    TTL = "ttl"                      # hop limit reached 0
    LOOP = "loop"                    # outer destination is the inner src/dst
    NO_PATH = "no_path"              # nowhere to send it (peer silent, no address)
    NOT_ROUTABLE = "not_routable"    # from TUN: not IP, or no peer for the destination (global)
    NO_TUN = "no_tun"                # for me, but this node has no TUN (forwarder)
    NEEDS_OFFLOAD = "needs_offload"  # a super-packet for a TUN without a virtio_net_hdr
    MALFORMED_REPORT = "malformed_report"  # a loss report that makes no sense
    MALFORMED_BATCH = "malformed_batch"    # a FEC batch whose packet lengths overrun it
    BAD_SHARD = "bad_shard"          # a shard whose sub-header is out of bounds or disagrees with its message's
    INCOMPLETE = "incomplete"        # a message still missing shards after the timeout
    REASSEMBLY_FULL = "reassembly_full"  # the peer's (or the node's) reassembly budget is used up
    SPOOFED = "spoofed"              # a client's packet with another peer's tunnel address as source


# drops that may be counted against a peer (the others only globally)
GLOBAL_DROPS = (DropReason.MALFORMED, DropReason.WRONG_VERSION, DropReason.UNKNOWN_PEER, DropReason.AUTH_FAILURE,
                DropReason.AEAD_UNSUPPORTED, DropReason.NOT_ROUTABLE)
PEER_DROPS = tuple(r for r in DropReason if r not in GLOBAL_DROPS)
