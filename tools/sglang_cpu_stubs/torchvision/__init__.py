import sys

from _standin import install

install(__name__, sys.modules[__name__])
__version__ = "0.0.0+cpu-standin"
