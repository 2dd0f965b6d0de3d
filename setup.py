"""Build the compiled core: every engine/cypaxos/*.pyx becomes cypaxos.<name>.

Cython resolves a .pxd by its full module name, so the sources mirror the package
under engine/ and engine/ is the include path.  Set CYPAXOS_DEBUG=1 to build with
invariant checks compiled in (assert statements and bounds checking).  Release builds
carry no debug info and no symbol table (-g0, and -s at link), which makes them a sixth
of the size; debug builds keep both.
"""
import os
from glob import glob

from setuptools import Extension, setup
from Cython.Build import cythonize

DEBUG = os.environ.get("CYPAXOS_DEBUG", "") not in ("", "0")

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": DEBUG,
    "embedsignature": True,
}

sources = sorted(glob(os.path.join("engine", "cypaxos", "*.pyx")))
if not sources:
    # Building on would make a wheel without the compiled core, which cannot import.
    raise SystemExit("setup.py: no engine/cypaxos/*.pyx found; the Cython sources are missing")
extensions = []
for source in sources:
    name = os.path.splitext(os.path.basename(source))[0]
    extensions.append(
        Extension(
            f"cypaxos.{name}",
            [source],
            extra_compile_args=["-O2"] + ([] if DEBUG else ["-DNDEBUG", "-g0"]),
            extra_link_args=[] if DEBUG else ["-s"],
        )
    )

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["engine"],
        compiler_directives=directives,
    ),
)
