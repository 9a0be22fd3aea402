"""The one compiled part: relay/media/_fastsend.c, the fan-out's send loop (see its header).

Optional: on a machine without a C compiler (or Python headers) the build of the extension fails
quietly, `pip install -e .` still succeeds, and rtp_fanout.py sends with its pure-Python loop.
"""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):  # sendmmsg(2) is Linux's
    ext_modules.append(Extension("relay.media._fastsend", ["relay/media/_fastsend.c"], optional=True,
                                 extra_compile_args=["-O2"]))

setup(ext_modules=ext_modules)
