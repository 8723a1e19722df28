"""Pure protocol layer: enums, payload layouts, framing and the per-request rule table. No I/O."""

from .enums import (
    BackendRequest,
    BlkFeature,
    DeviceType,
    DraftRequest,
    FrontendRequest,
    NetFeature,
    ProtocolFeature,
    VirtioFeature,
    feature_names,
    protocol_feature_names,
)
from .framing import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER_SIZE,
    MAX_FDS,
    MAX_PAYLOAD,
    Direction,
    FrameDecoder,
    Message,
    encode_message,
)
from .table import BACKEND_RULES, FRONTEND_RULES, Fds, Reply, Rule

__all__ = [
    "BACKEND_RULES",
    "FLAG_NEED_REPLY",
    "FLAG_REPLY",
    "FRONTEND_RULES",
    "HEADER_SIZE",
    "MAX_FDS",
    "MAX_PAYLOAD",
    "BackendRequest",
    "BlkFeature",
    "DeviceType",
    "Direction",
    "DraftRequest",
    "Fds",
    "FrameDecoder",
    "FrontendRequest",
    "Message",
    "NetFeature",
    "ProtocolFeature",
    "Reply",
    "Rule",
    "VirtioFeature",
    "encode_message",
    "feature_names",
    "protocol_feature_names",
]
