"""Build the compiled core: every engine/cypaxos/*.pyx becomes cypaxos.<name>.

Cython resolves a .pxd by its full module name, so the sources mirror the package
under engine/ and engine/ is the include path.

Set CYPAXOS_DEBUG=1 for a debug build (docs/testing.md): bounds and initialization
checks, and the debug-only asserts (`if DEBUG: assert ...` in the core, compiled out
otherwise), with `cypaxos.core.DEBUG_BUILD` True.  Each kind of build keeps its
generated C in its own directory (build/cython-debug, build/cython-release), and a
build of the other kind than the last rebuilds every extension: Cython and setuptools
decide what to rebuild by file times alone, which once let a CYPAXOS_DEBUG=1 build
silently reuse the release build.  Release builds carry no debug info and no symbol
table (-g0, and -s at link), which makes them a sixth of the size; debug builds keep both.
"""
import os
from glob import glob

from setuptools import Extension, setup
from Cython.Build import cythonize

DEBUG = os.environ.get("CYPAXOS_DEBUG", "") not in ("", "0")
MODE = "debug" if DEBUG else "release"

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": DEBUG,
    "embedsignature": True,
}


def build_kind_stamp():
    """A file that changes (and so is newer than every extension) when the kind does."""
    stamp = os.path.join("build", "cypaxos-build-kind")
    try:
        with open(stamp) as f:
            unchanged = f.read() == MODE
    except OSError:
        unchanged = False
    if not unchanged:
        os.makedirs("build", exist_ok=True)
        with open(stamp, "w") as f:
            f.write(MODE)
    return stamp


stamp = build_kind_stamp()
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
            depends=[stamp],
            define_macros=[("CYPAXOS_DEBUG", "1" if DEBUG else "0")],
            extra_compile_args=["-O2"] + ([] if DEBUG else ["-DNDEBUG", "-g0"]),
            extra_link_args=[] if DEBUG else ["-s"],
        )
    )

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["engine"],
        compiler_directives=directives,
        build_dir=os.path.join("build", f"cython-{MODE}"),
    ),
)
