"""What a front-end checks before it resumes a session with a back-end that came back. No I/O.

A front-end that reconnects keeps what it built for the first back-end: guest RAM laid
out for the negotiated ring layout (split or packed, EVENT_IDX, indirect tables), the
header length of every frame already queued (VERSION_1, MRG_RXBUF), the inflight area,
the number of queues. A restarted back-end that no longer offers one of those bits
cannot take the session over; retrying would only wait for the reconnect timeout to say
so. :func:`check_offer` names the missing bits at once and raises
:class:`BackendChangedError`, which the front-ends do not retry.

Bits the new back-end offers on top of the old ones are not acked (a driver may accept
any subset of the offer, virtio 1.2 §3.1.1), so a newer back-end is fine.
"""

from __future__ import annotations

from ..errors import RemoteProtocolError
from ..protocol.enums import DeviceType, feature_names, protocol_feature_names

__all__ = ["BackendChangedError", "check_offer"]


class BackendChangedError(RemoteProtocolError):
    """After a reconnect the back-end no longer offers bits the session depends on.

    Not retried: the same back-end will not offer them on the next attempt either.

    Attributes:
        missing_features: virtio feature bits negotiated before and not offered now.
        missing_protocol_features: protocol feature bits the session uses and not offered.
        missing_names: their enum names, features first (``RING_PACKED``,
            ``RING_EVENT_IDX``, ``INFLIGHT_SHMFD`` ...).
    """

    def __init__(self, message: str, *, missing_features: int = 0,
                 missing_protocol_features: int = 0, missing_names: tuple[str, ...] = ()
                 ) -> None:
        super().__init__(message)
        self.missing_features = missing_features
        self.missing_protocol_features = missing_protocol_features
        self.missing_names = missing_names


def check_offer(where: str, *, features: int, offered_features: int,
                protocol_features: int = 0, offered_protocol_features: int = 0,
                device: DeviceType | None = None) -> None:
    """Check that a back-end we reconnected to still offers what the session depends on.

    Args:
        where: names the session in the message (the socket path).
        features: the virtio features negotiated with the first back-end (all of them
            shaped the rings and buffers already in guest memory).
        offered_features: what GET_FEATURES returned now.
        protocol_features: the protocol features the session cannot do without.
        offered_protocol_features: what GET_PROTOCOL_FEATURES returned now (0 without
            VHOST_USER_F_PROTOCOL_FEATURES).
        device: names device-specific bits (``MRG_RXBUF`` rather than ``bit15``).

    Raises:
        BackendChangedError: something is missing; the message names every missing bit,
            e.g. ``/tmp/a.sock: after reconnecting, the back-end no longer offers
            RING_PACKED, RING_EVENT_IDX (features 0x... negotiated before, 0x... offered
            now)``.
    """
    missing = features & ~offered_features
    missing_pf = protocol_features & ~offered_protocol_features
    if not missing and not missing_pf:
        return
    names = tuple(feature_names(missing, device)) + tuple(protocol_feature_names(missing_pf))
    details = []
    if missing:
        details.append(f"features {features:#x} negotiated before, {offered_features:#x} "
                       "offered now")
    if missing_pf:
        details.append(f"protocol features {protocol_features:#x} in use, "
                       f"{offered_protocol_features:#x} offered now")
    raise BackendChangedError(
        f"{where}: after reconnecting, the back-end no longer offers {', '.join(names)} "
        f"({'; '.join(details)}); not retrying",
        missing_features=missing, missing_protocol_features=missing_pf, missing_names=names,
    )
