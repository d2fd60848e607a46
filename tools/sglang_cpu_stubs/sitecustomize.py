"""CPU servers only (this folder is on their PYTHONPATH): SGLang pins the host buffer of its routed-experts capture
(--enable-return-routed-experts) with cudaHostRegister, which a CPU build of torch cannot do, and the server dies at
start-up. Pinning only speeds up device-to-host copies, so without CUDA it is made a no-op when SGLang's module is
imported. Test environment plumbing like the stand-ins beside it (../shared/ENVIRONMENT.md), not product code."""

import importlib.abc
import importlib.machinery
import sys

_MODULE = "sglang.srt.mem_cache.pool_host.common"


class _NoHostRegister(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != _MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            import torch

            if not torch.cuda.is_available():
                module._cuda_host_register = lambda *args, **kwargs: None

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _NoHostRegister())
