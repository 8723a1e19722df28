"""The ``vhost-user`` command line."""
