"""Stand-ins for the two imports SGLang's CPU server has no CPU build for on PyPI (sgl_kernel, torchvision). They
let the real server start: any submodule imports, any attribute exists, and anything actually called raises.
Test environment plumbing for the CPU machines, not product code (../shared/ENVIRONMENT.md)."""

import importlib.abc
import importlib.machinery
import sys
import types


class _Missing:
    """An attribute of a stand-in module: a placeholder that fails loudly when used."""

    def __init__(self, name):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is a CPU stand-in: the real package is not installed")

    def __getattr__(self, attr):
        return _Missing(f"{self._name}.{attr}")

    def __mro_entries__(self, bases):  # usable as a base class
        return (object,)

    def __iter__(self):
        return iter(())


class _StandInModule(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self.__name__}.{attr}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = roots

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.roots and name not in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def install(root: str, module) -> None:
    module.__class__ = _StandInModule
    module.__path__ = []
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder({"sgl_kernel", "torchvision"}))
