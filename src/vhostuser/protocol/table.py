"""One table per request: payload layout, fd count, feature gate, reply and legal states. No I/O.

Everything that enforces a per-request rule reads it from here (DESIGN.md rule 3), so a
rule is stated once. Sources: vhost-user.rst "Front-end message types" / "Back-end message
types" and QEMU hw/virtio/vhost-user.c; see PROTOCOL.md §4-5.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from . import payloads as P
from .enums import BackendRequest, FrontendRequest, ProtocolFeature, VirtioFeature


class Fds(Enum):
    """How many file descriptors a message carries."""

    NONE = "none"
    ONE = "one"
    NOFD_BIT = "one unless the NOFD bit is set"
    PER_REGION = "one per memory region"
    OPTIONAL = "zero or one"


class Reply(Enum):
    """Whether a request has a reply of its own (besides a REPLY_ACK ack)."""

    NONE = "none"
    ALWAYS = "always"
    IF_LOG_SHMFD = "a u64 ack if LOG_SHMFD was negotiated"


@dataclass(frozen=True, slots=True)
class Rule:
    """Everything the protocol says about one request."""

    payload: type[P.Payload]
    fds: Fds = Fds.NONE
    gate: ProtocolFeature | VirtioFeature | None = None
    reply: Reply = Reply.NONE
    reply_payload: type[P.Payload] | None = None
    reply_fds: int = 0
    needs_owner: bool = True
    needs_features: bool = False
    ring_index: bool = False
    """The payload names a vring (checked against the number of queues)."""


R = FrontendRequest
PF = ProtocolFeature

FRONTEND_RULES: dict[FrontendRequest, Rule] = {
    R.GET_FEATURES: Rule(P.Empty, reply=Reply.ALWAYS, reply_payload=P.U64Payload,
                         needs_owner=False),
    R.SET_FEATURES: Rule(P.U64Payload, needs_owner=False),
    R.SET_OWNER: Rule(P.Empty, needs_owner=False),
    R.RESET_OWNER: Rule(P.Empty),
    R.SET_MEM_TABLE: Rule(P.MemoryTable, fds=Fds.PER_REGION, needs_features=True),
    R.SET_LOG_BASE: Rule(P.LogBase, fds=Fds.ONE, reply=Reply.IF_LOG_SHMFD,
                         reply_payload=P.U64Payload, needs_features=True),
    R.SET_LOG_FD: Rule(P.Empty, fds=Fds.ONE),
    R.SET_VRING_NUM: Rule(P.VringState, needs_features=True, ring_index=True),
    R.SET_VRING_ADDR: Rule(P.VringAddr, needs_features=True, ring_index=True),
    R.SET_VRING_BASE: Rule(P.VringState, needs_features=True, ring_index=True),
    R.GET_VRING_BASE: Rule(P.VringState, reply=Reply.ALWAYS, reply_payload=P.VringState,
                           needs_features=True, ring_index=True),
    R.SET_VRING_KICK: Rule(P.VringFile, fds=Fds.NOFD_BIT, ring_index=True),
    R.SET_VRING_CALL: Rule(P.VringFile, fds=Fds.NOFD_BIT, ring_index=True),
    R.SET_VRING_ERR: Rule(P.VringFile, fds=Fds.NOFD_BIT, ring_index=True),
    R.GET_PROTOCOL_FEATURES: Rule(P.Empty, gate=VirtioFeature.PROTOCOL_FEATURES,
                                  reply=Reply.ALWAYS, reply_payload=P.U64Payload,
                                  needs_owner=False),
    R.SET_PROTOCOL_FEATURES: Rule(P.U64Payload, gate=VirtioFeature.PROTOCOL_FEATURES,
                                  needs_owner=False),
    R.GET_QUEUE_NUM: Rule(P.Empty, gate=PF.MQ, reply=Reply.ALWAYS,
                          reply_payload=P.U64Payload, needs_owner=False),
    R.SET_VRING_ENABLE: Rule(P.VringState, gate=VirtioFeature.PROTOCOL_FEATURES,
                             ring_index=True),
    R.SEND_RARP: Rule(P.U64Payload, gate=PF.RARP),
    R.NET_SET_MTU: Rule(P.U64Payload, gate=PF.MTU),
    R.SET_BACKEND_REQ_FD: Rule(P.Empty, fds=Fds.ONE, gate=PF.BACKEND_REQ, needs_owner=False),
    R.IOTLB_MSG: Rule(P.IotlbMsg, gate=VirtioFeature.ACCESS_PLATFORM),
    R.SET_VRING_ENDIAN: Rule(P.VringState, gate=PF.CROSS_ENDIAN, ring_index=True),
    R.GET_CONFIG: Rule(P.ConfigPayload, gate=PF.CONFIG, reply=Reply.ALWAYS,
                       reply_payload=P.ConfigPayload, needs_owner=False),
    R.SET_CONFIG: Rule(P.ConfigPayload, gate=PF.CONFIG),
    R.CREATE_CRYPTO_SESSION: Rule(P.RawPayload, gate=PF.CRYPTO_SESSION, reply=Reply.ALWAYS,
                                  reply_payload=P.RawPayload),
    R.CLOSE_CRYPTO_SESSION: Rule(P.U64Payload, gate=PF.CRYPTO_SESSION),
    R.POSTCOPY_ADVISE: Rule(P.Empty, gate=PF.PAGEFAULT, reply=Reply.ALWAYS,
                            reply_payload=P.Empty, reply_fds=1),
    R.POSTCOPY_LISTEN: Rule(P.Empty, gate=PF.PAGEFAULT),
    R.POSTCOPY_END: Rule(P.Empty, gate=PF.PAGEFAULT, reply=Reply.ALWAYS,
                         reply_payload=P.U64Payload),
    R.GET_INFLIGHT_FD: Rule(P.InflightPayload, gate=PF.INFLIGHT_SHMFD, reply=Reply.ALWAYS,
                            reply_payload=P.InflightPayload, reply_fds=1,
                            needs_features=True),
    R.SET_INFLIGHT_FD: Rule(P.InflightPayload, fds=Fds.ONE, gate=PF.INFLIGHT_SHMFD,
                            needs_features=True),
    R.GPU_SET_SOCKET: Rule(P.Empty, fds=Fds.ONE),
    R.RESET_DEVICE: Rule(P.Empty, gate=PF.RESET_DEVICE),
    R.VRING_KICK: Rule(P.VringState, gate=PF.INBAND_NOTIFICATIONS, ring_index=True),
    R.GET_MAX_MEM_SLOTS: Rule(P.Empty, gate=PF.CONFIGURE_MEM_SLOTS, reply=Reply.ALWAYS,
                              reply_payload=P.U64Payload, needs_owner=False),
    R.ADD_MEM_REG: Rule(P.SingleRegion, fds=Fds.ONE, gate=PF.CONFIGURE_MEM_SLOTS,
                        needs_features=True),
    R.REM_MEM_REG: Rule(P.SingleRegion, fds=Fds.OPTIONAL, gate=PF.CONFIGURE_MEM_SLOTS,
                        needs_features=True),
    R.SET_STATUS: Rule(P.U64Payload, gate=PF.STATUS),
    R.GET_STATUS: Rule(P.Empty, gate=PF.STATUS, reply=Reply.ALWAYS,
                       reply_payload=P.U64Payload),
    R.GET_SHARED_OBJECT: Rule(P.SharedObject, gate=PF.SHARED_OBJECT, reply=Reply.ALWAYS,
                              reply_payload=P.U64Payload, reply_fds=1),
    R.SET_DEVICE_STATE_FD: Rule(P.DeviceStateParams, fds=Fds.ONE, gate=PF.DEVICE_STATE,
                                reply=Reply.ALWAYS, reply_payload=P.U64Payload),
    R.CHECK_DEVICE_STATE: Rule(P.Empty, gate=PF.DEVICE_STATE, reply=Reply.ALWAYS,
                               reply_payload=P.U64Payload),
    R.GET_SHMEM_CONFIG: Rule(P.Empty, gate=PF.SHMEM, reply=Reply.ALWAYS,
                             reply_payload=P.ShmemConfig),
    R.GET_VRING_BASE_SKIP_DRAIN: Rule(P.VringState, gate=PF.GET_VRING_BASE_SKIP_DRAIN,
                                      reply=Reply.ALWAYS, reply_payload=P.VringState,
                                      needs_features=True, ring_index=True),
}

B = BackendRequest

BACKEND_RULES: dict[BackendRequest, Rule] = {
    B.IOTLB_MSG: Rule(P.IotlbMsg, gate=VirtioFeature.ACCESS_PLATFORM, needs_owner=False),
    B.CONFIG_CHANGE_MSG: Rule(P.Empty, gate=PF.CONFIG, needs_owner=False),
    B.VRING_HOST_NOTIFIER_MSG: Rule(P.VringArea, fds=Fds.NOFD_BIT, gate=PF.HOST_NOTIFIER,
                                    needs_owner=False),
    B.VRING_CALL: Rule(P.VringState, gate=PF.INBAND_NOTIFICATIONS, needs_owner=False,
                       ring_index=True),
    B.VRING_ERR: Rule(P.VringState, gate=PF.INBAND_NOTIFICATIONS, needs_owner=False,
                      ring_index=True),
    B.SHARED_OBJECT_ADD: Rule(P.SharedObject, gate=PF.SHARED_OBJECT, needs_owner=False),
    B.SHARED_OBJECT_REMOVE: Rule(P.SharedObject, gate=PF.SHARED_OBJECT, needs_owner=False),
    B.SHARED_OBJECT_LOOKUP: Rule(P.SharedObject, gate=PF.SHARED_OBJECT, reply=Reply.ALWAYS,
                                 reply_payload=P.U64Payload, reply_fds=1, needs_owner=False),
    B.SHMEM_MAP: Rule(P.ShmemMap, fds=Fds.ONE, gate=PF.SHMEM, needs_owner=False),
    B.SHMEM_UNMAP: Rule(P.ShmemMap, gate=PF.SHMEM, needs_owner=False),
}
