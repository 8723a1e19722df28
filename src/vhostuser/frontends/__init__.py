"""Device front-ends: drive any vhost-user back-end as a guest driver would, from Python.

Each front-end owns its guest RAM (a memfd) and its driver rings and talks to the back-end
through :class:`vhostuser.io.frontend.FrontendClient`. Both survive their back-end: they
take up the next one on the same socket and resume, unless it lacks a bit the session was
built on (:class:`BackendChangedError`, see :mod:`vhostuser.frontends.resume`).
"""

from .blk import BlkError, BlkOp, VirtioBlkFrontend
from .net import VirtioNetFrontend
from .resume import BackendChangedError

__all__ = ["BackendChangedError", "BlkError", "BlkOp", "VirtioBlkFrontend", "VirtioNetFrontend"]
