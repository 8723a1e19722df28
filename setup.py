"""Build the optional compiled modules; metadata is in pyproject.toml.

``vhostuser._fastpath`` is the compiled burst engine (``vhostuser.engine``);
``vhostuser._memguard`` keeps a front-end that truncates unsealed guest memory from
killing the process with SIGBUS (``vhostuser.io.memguard``). Both are ``optional=True``:
on a machine without a C compiler (or without Python's headers) their build fails with a
warning and the package installs without them; the pure-Python engine then runs, and
unsealed guest memory is unguarded (said in the log).
"""

from setuptools import Extension, setup

_FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
          "-Wno-missing-field-initializers"]

setup(
    ext_modules=[
        Extension(
            "vhostuser._fastpath",
            sources=["src/vhostuser/_fastpath.c"],
            extra_compile_args=_FLAGS,
            optional=True,
        ),
        Extension(
            "vhostuser._memguard",
            sources=["src/vhostuser/_memguard.c"],
            extra_compile_args=_FLAGS,
            optional=True,
        ),
    ]
)
