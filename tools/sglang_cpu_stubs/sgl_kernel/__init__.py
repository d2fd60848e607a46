import sys

from _standin import install

install(__name__, sys.modules[__name__])
