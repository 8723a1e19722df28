"""Build the optional compiled engine (vhostuser._fastpath); metadata is in pyproject.toml.

``optional=True``: on a machine without a C compiler (or without Python's headers) the
build of the extension fails with a warning and the package installs without it; the
pure-Python engine then runs (``vhostuser.engine``).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "vhostuser._fastpath",
            sources=["src/vhostuser/_fastpath.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
