"""Device front-ends: drive any vhost-user back-end as a guest driver would, from Python.

Each front-end owns its guest RAM (a memfd) and its driver rings and talks to the back-end
through :class:`vhostuser.io.frontend.FrontendClient`.
"""

from .blk import BlkError, BlkOp, VirtioBlkFrontend
from .net import VirtioNetFrontend

__all__ = ["BlkError", "BlkOp", "VirtioBlkFrontend", "VirtioNetFrontend"]
