"""Device-type definitions of virtio (wire layouts, constants) that back-ends and
front-ends share. Pure: no I/O, no state."""
