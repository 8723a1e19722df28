"""The rule table is complete and the numbers are pinned to vhost-user.rst (ids 1-43, bits 0-19)."""

from __future__ import annotations

import pytest

from vhostuser.protocol import payloads as P
from vhostuser.protocol.enums import (
    BackendRequest,
    BlkFeature,
    DeviceType,
    DraftTextRequest,
    FrontendRequest,
    NetFeature,
    ProtocolFeature,
    VirtioFeature,
    feature_names,
    protocol_feature_names,
)
from vhostuser.protocol.table import BACKEND_RULES, FRONTEND_RULES, Fds, Reply

# vhost-user.rst "Front-end message types", ids 1-43 (44 and 45 moved while being
# merged: check them against the peer).
FRONTEND_IDS = {
    "GET_FEATURES": 1,
    "SET_FEATURES": 2,
    "SET_OWNER": 3,
    "RESET_OWNER": 4,
    "SET_MEM_TABLE": 5,
    "SET_LOG_BASE": 6,
    "SET_LOG_FD": 7,
    "SET_VRING_NUM": 8,
    "SET_VRING_ADDR": 9,
    "SET_VRING_BASE": 10,
    "GET_VRING_BASE": 11,
    "SET_VRING_KICK": 12,
    "SET_VRING_CALL": 13,
    "SET_VRING_ERR": 14,
    "GET_PROTOCOL_FEATURES": 15,
    "SET_PROTOCOL_FEATURES": 16,
    "GET_QUEUE_NUM": 17,
    "SET_VRING_ENABLE": 18,
    "SEND_RARP": 19,
    "NET_SET_MTU": 20,
    "SET_BACKEND_REQ_FD": 21,
    "IOTLB_MSG": 22,
    "SET_VRING_ENDIAN": 23,
    "GET_CONFIG": 24,
    "SET_CONFIG": 25,
    "CREATE_CRYPTO_SESSION": 26,
    "CLOSE_CRYPTO_SESSION": 27,
    "POSTCOPY_ADVISE": 28,
    "POSTCOPY_LISTEN": 29,
    "POSTCOPY_END": 30,
    "GET_INFLIGHT_FD": 31,
    "SET_INFLIGHT_FD": 32,
    "GPU_SET_SOCKET": 33,
    "RESET_DEVICE": 34,
    "VRING_KICK": 35,
    "GET_MAX_MEM_SLOTS": 36,
    "ADD_MEM_REG": 37,
    "REM_MEM_REG": 38,
    "SET_STATUS": 39,
    "GET_STATUS": 40,
    "GET_SHARED_OBJECT": 41,
    "SET_DEVICE_STATE_FD": 42,
    "CHECK_DEVICE_STATE": 43,
}

# vhost-user.rst "Back-end message types"; 9 and 10 are new.
BACKEND_IDS = {
    "IOTLB_MSG": 1,
    "CONFIG_CHANGE_MSG": 2,
    "VRING_HOST_NOTIFIER_MSG": 3,
    "VRING_CALL": 4,
    "VRING_ERR": 5,
    "SHARED_OBJECT_ADD": 6,
    "SHARED_OBJECT_REMOVE": 7,
    "SHARED_OBJECT_LOOKUP": 8,
}

# vhost-user.rst "Protocol features", bits 0-19 (20-23 are "check against the peer").
PROTOCOL_BITS = {
    "MQ": 0,
    "LOG_SHMFD": 1,
    "RARP": 2,
    "REPLY_ACK": 3,
    "MTU": 4,
    "BACKEND_REQ": 5,
    "CROSS_ENDIAN": 6,
    "CRYPTO_SESSION": 7,
    "PAGEFAULT": 8,
    "CONFIG": 9,
    "BACKEND_SEND_FD": 10,
    "HOST_NOTIFIER": 11,
    "INFLIGHT_SHMFD": 12,
    "RESET_DEVICE": 13,
    "INBAND_NOTIFICATIONS": 14,
    "CONFIGURE_MEM_SLOTS": 15,
    "STATUS": 16,
    "XEN_MMAP": 17,
    "SHARED_OBJECT": 18,
    "DEVICE_STATE": 19,
}

# The 2014 draft as its protocol text numbers it (vhost-user v6 thread, qemu-devel).
DRAFT_IDS = {
    "ECHO": 1,
    "GET_FEATURES": 2,
    "SET_FEATURES": 3,
    "SET_OWNER": 4,
    "RESET_OWNER": 5,
    "SET_MEM_TABLE": 6,
    "SET_LOG_BASE": 7,
    "SET_LOG_FD": 8,
    "SET_VRING_NUM": 9,
    "SET_VRING_ADDR": 10,
    "SET_VRING_BASE": 11,
    "GET_VRING_BASE": 12,
    "SET_VRING_KICK": 13,
    "SET_VRING_CALL": 14,
    "SET_VRING_ERR": 15,
}


# -- completeness -------------------------------------------------------------------------


def test_frontend_rules_cover_every_frontend_request() -> None:
    assert set(FRONTEND_RULES) == set(FrontendRequest)


def test_backend_rules_cover_every_backend_request() -> None:
    assert set(BACKEND_RULES) == set(BackendRequest)


@pytest.mark.parametrize("req", list(FrontendRequest), ids=lambda r: r.name)
def test_frontend_rule_is_self_consistent(req: FrontendRequest) -> None:
    rule = FRONTEND_RULES[req]
    assert hasattr(rule.payload, "decode") and hasattr(rule.payload, "SIZE")
    if rule.reply is Reply.ALWAYS:
        assert rule.reply_payload is not None
    if rule.reply is Reply.NONE:
        assert rule.reply_payload is None and rule.reply_fds == 0
    if rule.fds is Fds.NOFD_BIT:
        assert rule.payload in (P.VringFile, P.VringArea)
    if rule.fds is Fds.PER_REGION:
        assert issubclass(rule.payload, P.MemoryTable)
    if rule.ring_index:
        assert rule.payload in (P.VringState, P.VringAddr, P.VringFile)


@pytest.mark.parametrize("req", list(BackendRequest), ids=lambda r: r.name)
def test_backend_rule_is_self_consistent(req: BackendRequest) -> None:
    rule = BACKEND_RULES[req]
    assert not rule.needs_owner and not rule.needs_features
    if rule.reply is Reply.ALWAYS:
        assert rule.reply_payload is not None


# -- pinned numbers -----------------------------------------------------------------------


def test_frontend_ids_1_to_43_pinned() -> None:
    for name, value in FRONTEND_IDS.items():
        assert FrontendRequest[name] == value, name
    assert sorted(r.value for r in FrontendRequest if r.value <= 43) == list(range(1, 44))


def test_new_frontend_ids_follow_qemu_merged_enum() -> None:
    # QEMU's merged enum has 44 = GET_SHMEM_CONFIG, 45 = SKIP_DRAIN.
    assert FrontendRequest.GET_SHMEM_CONFIG.value == 44
    assert FrontendRequest.GET_VRING_BASE_SKIP_DRAIN.value == 45
    assert max(FrontendRequest) == 45


def test_backend_ids_pinned() -> None:
    for name, value in BACKEND_IDS.items():
        assert BackendRequest[name] == value, name
    assert BackendRequest.SHMEM_MAP.value == 9
    assert BackendRequest.SHMEM_UNMAP.value == 10


def test_protocol_bits_0_to_19_pinned() -> None:
    for name, bit in PROTOCOL_BITS.items():
        assert ProtocolFeature[name] == 1 << bit, name
    low = [f for f in ProtocolFeature if f.value < 1 << 20]
    assert sorted(f.value for f in low) == [1 << b for b in range(20)]


def test_virtio_bits_used_by_vhost_user() -> None:
    assert VirtioFeature.PROTOCOL_FEATURES == 1 << 30
    assert VirtioFeature.LOG_ALL == 1 << 26
    assert VirtioFeature.VERSION_1 == 1 << 32
    assert VirtioFeature.RING_PACKED == 1 << 34
    assert VirtioFeature.RING_EVENT_IDX == 1 << 29
    assert VirtioFeature.RING_INDIRECT_DESC == 1 << 28
    assert VirtioFeature.ACCESS_PLATFORM == 1 << 33
    assert NetFeature.MRG_RXBUF == 1 << 15
    assert NetFeature.MQ == 1 << 22
    assert BlkFeature.WRITE_ZEROES == 1 << 14


def test_draft_ids_pinned() -> None:
    for name, value in DRAFT_IDS.items():
        assert DraftTextRequest[name] == value, name


# -- rules that vhost-user.rst states ----------------------------------------------------------

R = FrontendRequest
PF = ProtocolFeature


def test_requests_that_always_reply() -> None:
    # vhost-user.rst: requests that always have a reply.
    for r in (R.GET_FEATURES, R.GET_VRING_BASE, R.GET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM,
              R.GET_CONFIG, R.GET_MAX_MEM_SLOTS):
        assert FRONTEND_RULES[r].reply is Reply.ALWAYS, r.name
    assert FRONTEND_RULES[R.GET_FEATURES].reply_payload is P.U64Payload
    assert FRONTEND_RULES[R.GET_VRING_BASE].reply_payload is P.VringState
    assert FRONTEND_RULES[R.GET_CONFIG].reply_payload is P.ConfigPayload
    # SET_LOG_BASE replies only with LOG_SHMFD
    assert FRONTEND_RULES[R.SET_LOG_BASE].reply is Reply.IF_LOG_SHMFD
    for r in (R.SET_FEATURES, R.SET_OWNER, R.SET_MEM_TABLE, R.SET_VRING_NUM,
              R.SET_VRING_ADDR, R.SET_VRING_BASE, R.SET_VRING_KICK, R.SET_VRING_CALL,
              R.SET_VRING_ERR, R.SET_PROTOCOL_FEATURES, R.SET_VRING_ENABLE,
              R.SET_BACKEND_REQ_FD, R.ADD_MEM_REG, R.REM_MEM_REG, R.SET_STATUS):
        assert FRONTEND_RULES[r].reply is Reply.NONE, r.name


def test_fd_rules() -> None:
    expected = {
        R.SET_MEM_TABLE: Fds.PER_REGION,
        R.SET_LOG_BASE: Fds.ONE,
        R.SET_LOG_FD: Fds.ONE,
        R.SET_VRING_KICK: Fds.NOFD_BIT,
        R.SET_VRING_CALL: Fds.NOFD_BIT,
        R.SET_VRING_ERR: Fds.NOFD_BIT,
        R.SET_BACKEND_REQ_FD: Fds.ONE,
        R.SET_INFLIGHT_FD: Fds.ONE,
        R.GPU_SET_SOCKET: Fds.ONE,
        R.ADD_MEM_REG: Fds.ONE,
        R.SET_DEVICE_STATE_FD: Fds.ONE,
    }
    for r, fds in expected.items():
        assert FRONTEND_RULES[r].fds is fds, r.name
    for r in (R.GET_FEATURES, R.SET_FEATURES, R.SET_OWNER, R.SET_VRING_NUM, R.GET_CONFIG,
              R.SET_PROTOCOL_FEATURES, R.GET_VRING_BASE):
        assert FRONTEND_RULES[r].fds is Fds.NONE, r.name
    assert BACKEND_RULES[BackendRequest.VRING_HOST_NOTIFIER_MSG].fds is Fds.NOFD_BIT
    assert BACKEND_RULES[BackendRequest.SHMEM_MAP].fds is Fds.ONE
    assert BACKEND_RULES[BackendRequest.SHARED_OBJECT_LOOKUP].reply_fds == 1


def test_rem_mem_reg_tolerates_the_fd_older_qemu_sends() -> None:
    """REM_MEM_REG takes no fd (QEMU up to 7.0 sent one: it is closed if it arrives).

    QEMU up to 7.0 sent the region's fd with REM_MEM_REG (``vhost_user_write(dev, msg,
    &fd, 1)`` in send_remove_regions, changed by Kevin Wolf in 2022); libvhost-user keeps
    "accepting, but ignoring a file descriptor for compatibility with older QEMU".
    """
    assert FRONTEND_RULES[R.REM_MEM_REG].fds is Fds.OPTIONAL


def test_feature_gates() -> None:
    gates = {
        R.GET_QUEUE_NUM: PF.MQ,
        R.SEND_RARP: PF.RARP,
        R.NET_SET_MTU: PF.MTU,
        R.SET_BACKEND_REQ_FD: PF.BACKEND_REQ,
        R.SET_VRING_ENDIAN: PF.CROSS_ENDIAN,
        R.GET_CONFIG: PF.CONFIG,
        R.SET_CONFIG: PF.CONFIG,
        R.GET_INFLIGHT_FD: PF.INFLIGHT_SHMFD,
        R.SET_INFLIGHT_FD: PF.INFLIGHT_SHMFD,
        R.RESET_DEVICE: PF.RESET_DEVICE,
        R.VRING_KICK: PF.INBAND_NOTIFICATIONS,
        R.GET_MAX_MEM_SLOTS: PF.CONFIGURE_MEM_SLOTS,
        R.ADD_MEM_REG: PF.CONFIGURE_MEM_SLOTS,
        R.REM_MEM_REG: PF.CONFIGURE_MEM_SLOTS,
        R.SET_STATUS: PF.STATUS,
        R.GET_STATUS: PF.STATUS,
        R.GET_SHARED_OBJECT: PF.SHARED_OBJECT,
        R.SET_DEVICE_STATE_FD: PF.DEVICE_STATE,
        R.CHECK_DEVICE_STATE: PF.DEVICE_STATE,
        R.GET_PROTOCOL_FEATURES: VirtioFeature.PROTOCOL_FEATURES,
        R.SET_PROTOCOL_FEATURES: VirtioFeature.PROTOCOL_FEATURES,
        R.SET_VRING_ENABLE: VirtioFeature.PROTOCOL_FEATURES,
    }
    for r, gate in gates.items():
        assert FRONTEND_RULES[r].gate == gate, r.name
    for r in (R.GET_FEATURES, R.SET_FEATURES, R.SET_OWNER, R.SET_MEM_TABLE, R.SET_VRING_NUM,
              R.GET_VRING_BASE, R.SET_VRING_KICK):
        assert FRONTEND_RULES[r].gate is None, r.name


def test_ring_index_rules() -> None:
    for r in (R.SET_VRING_NUM, R.SET_VRING_ADDR, R.SET_VRING_BASE, R.GET_VRING_BASE,
              R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR, R.SET_VRING_ENABLE,
              R.VRING_KICK, R.SET_VRING_ENDIAN):
        assert FRONTEND_RULES[r].ring_index, r.name
    for r in (R.GET_FEATURES, R.SET_MEM_TABLE, R.GET_CONFIG, R.SET_STATUS):
        assert not FRONTEND_RULES[r].ring_index, r.name


def test_legal_before_set_owner() -> None:
    # What QEMU sends before SET_OWNER (trace qemu72-*: GET_FEATURES, GET/SET_PROTOCOL_FEATURES,
    # GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, SET_BACKEND_REQ_FD).
    for r in (R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES,
              R.GET_QUEUE_NUM, R.GET_MAX_MEM_SLOTS, R.SET_BACKEND_REQ_FD, R.SET_OWNER):
        assert not FRONTEND_RULES[r].needs_owner, r.name
    for r in (R.SET_MEM_TABLE, R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_NUM,
              R.RESET_OWNER):
        assert FRONTEND_RULES[r].needs_owner, r.name


# -- feature names decode the trace words --------------------------------------------------


def test_protocol_feature_names_net_trace_offer() -> None:
    # qemu72-net-to-testpmd: GET_PROTOCOL_FEATURES reply u64=0x10cbf
    assert protocol_feature_names(0x10CBF) == [
        "MQ", "LOG_SHMFD", "RARP", "REPLY_ACK", "MTU", "BACKEND_REQ", "CRYPTO_SESSION",
        "BACKEND_SEND_FD", "HOST_NOTIFIER", "STATUS",
    ]


def test_protocol_feature_names_blk_trace_offer() -> None:
    # qemu72-blk-to-qsd: GET_PROTOCOL_FEATURES reply u64=0x8f2b
    assert protocol_feature_names(0x8F2B) == [
        "MQ", "LOG_SHMFD", "REPLY_ACK", "BACKEND_REQ", "PAGEFAULT", "CONFIG",
        "BACKEND_SEND_FD", "HOST_NOTIFIER", "CONFIGURE_MEM_SLOTS",
    ]


def test_protocol_feature_names_virtio_user_ack() -> None:
    # dpdk-virtio-user-to-testpmd: SET_PROTOCOL_FEATURES u64=0x10009
    assert protocol_feature_names(0x10009) == ["MQ", "REPLY_ACK", "STATUS"]


def test_protocol_feature_names_unknown_bits() -> None:
    assert protocol_feature_names(0) == []
    assert protocol_feature_names((1 << 24) | (1 << 63) | 1) == ["MQ", "bit24", "bit63"]
    assert protocol_feature_names(1 << 23) == ["GET_VRING_BASE_SKIP_DRAIN"]


def test_feature_names_net_trace_offer() -> None:
    # qemu72-net-to-testpmd: GET_FEATURES reply u64=0xd7c66e7cb (DPDK testpmd offer)
    assert feature_names(0xD7C66E7CB, DeviceType.NET) == [
        "CSUM", "GUEST_CSUM", "MTU", "GSO", "GUEST_TSO4", "GUEST_TSO6", "GUEST_ECN",
        "GUEST_UFO", "HOST_ECN", "HOST_UFO", "MRG_RXBUF", "CTRL_VQ", "CTRL_RX",
        "GUEST_ANNOUNCE", "MQ",
        "LOG_ALL", "ANY_LAYOUT", "RING_INDIRECT_DESC", "RING_EVENT_IDX", "PROTOCOL_FEATURES",
        "VERSION_1", "RING_PACKED", "IN_ORDER",
    ]


def test_feature_names_net_trace_ack() -> None:
    # qemu72-net-to-testpmd: SET_FEATURES u64=0x17020e783
    assert feature_names(0x17020E783, DeviceType.NET) == [
        "CSUM", "GUEST_CSUM", "GUEST_TSO4", "GUEST_TSO6", "GUEST_ECN", "GUEST_UFO",
        "HOST_ECN", "HOST_UFO", "MRG_RXBUF", "GUEST_ANNOUNCE",
        "RING_INDIRECT_DESC", "RING_EVENT_IDX", "PROTOCOL_FEATURES", "VERSION_1",
    ]


def test_feature_names_blk_trace_offer() -> None:
    # qemu72-blk-to-qsd: GET_FEATURES reply u64=0x175007e46 (qemu-storage-daemon offer)
    assert feature_names(0x175007E46, DeviceType.BLK) == [
        "SIZE_MAX", "SEG_MAX", "BLK_SIZE", "FLUSH", "TOPOLOGY", "CONFIG_WCE", "MQ",
        "DISCARD", "WRITE_ZEROES",
        "NOTIFY_ON_EMPTY", "LOG_ALL", "RING_INDIRECT_DESC", "RING_EVENT_IDX",
        "PROTOCOL_FEATURES", "VERSION_1",
    ]


def test_feature_names_without_device_type() -> None:
    # virtiofsd's offer (qemu72-fs-to-virtiofsd): u64=0x175000000, no device bits
    assert feature_names(0x175000000) == [
        "NOTIFY_ON_EMPTY", "LOG_ALL", "RING_INDIRECT_DESC", "RING_EVENT_IDX",
        "PROTOCOL_FEATURES", "VERSION_1",
    ]
    # device bits are not named without a device type
    assert feature_names(0x3) == ["bit0", "bit1"]
    assert feature_names((1 << 25) | (1 << 31)) == ["bit25", "bit31"]
    assert feature_names(1 << 4, DeviceType.NET) == ["bit4"]
