"""`import hf_rwsam` registers hf-rwsam's architectures in timm (`hf_rwsam.models`) without importing timm itself.

Model cards tell users ``import hf_rwsam`` before ``AutoModelForImageClassification.from_pretrained`` (transformers'
timm wrapper builds the architecture by its timm name). Importing timm there would load timm and torchvision for
every ``import hf_rwsam.sharpness`` too. So the registration runs at once if timm is loaded already, else right after
timm is first imported, whoever imports it: a post-import hook on ``sys.meta_path`` that lets the usual finders find
timm and runs `hf_rwsam.models` after timm's own module has run.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_MODELS = "hf_rwsam.models"


class _AfterTimmImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``timm`` is about to be imported, it asks the other finders for its spec and has the
    loader import `hf_rwsam.models` once timm's module has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        # the other finders' spec (a lookup alone, `importlib.util.find_spec`, imports nothing: the hook stays)
        index = sys.meta_path.index(self)
        del sys.meta_path[index]
        try:
            spec = importlib.util.find_spec("timm")
        finally:
            sys.meta_path.insert(index, self)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_timm = spec.loader.exec_module

        def exec_module(module):
            remove_hook()
            run_timm(module)
            importlib.import_module(_MODELS)

        spec.loader.exec_module = exec_module
        return spec


def remove_hook() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _AfterTimmImport)]


def register_when_timm_is_imported() -> None:
    """Registers the architectures now if timm is loaded, else once it is."""
    if "timm" in sys.modules:
        importlib.import_module(_MODELS)
    elif not any(isinstance(finder, _AfterTimmImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterTimmImport())
