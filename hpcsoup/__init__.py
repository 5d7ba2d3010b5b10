"""hpcsoup: combine trained Graph Neural Networks at HPC scale.

The pipeline, one subpackage per stage::

    data  ->  models  ->  train  ->  store  ->  soup / merge  ->  bench

``hpcsoup.cli`` is a thin command line over the Python API of these stages. For models
and graphs of your own (:mod:`hpcsoup.api`, :mod:`hpcsoup.export`)::

    import hpcsoup
    souped = hpcsoup.soup(models, data, method="learned")   # same class and shape
    merged = hpcsoup.merge([gcn, gat], data)                 # different architectures
    souped.save("soup.pt"); model = hpcsoup.load_model("soup.pt")

These names are imported on first use: ``import hpcsoup`` does not import torch.
"""
import importlib
import sys
import types

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first access, PEP 562)
_LAZY = {"Souped": "hpcsoup.api", "Merged": "hpcsoup.api", "load_model": "hpcsoup.export"}
#: stages that are both a subpackage and a call: ``hpcsoup.soup(...)`` is ``hpcsoup.api.soup``
_STAGES = ("soup", "merge")

__all__ = ["__version__", "soup", "merge", *_LAZY]


class _Stage(types.ModuleType):
    """A stage subpackage that can be called: ``hpcsoup.soup(models, data)`` runs
    :func:`hpcsoup.api.soup` while ``hpcsoup.soup.Evaluator`` stays the subpackage's."""

    def __call__(self, *args, **kwargs):
        return getattr(importlib.import_module("hpcsoup.api"), self.__name__.rsplit(".", 1)[1])(
            *args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # the import system binds each loaded subpackage here: make the stages callable
        if name in _STAGES and isinstance(value, types.ModuleType):
            value.__class__ = _Stage
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _STAGES:
        return importlib.import_module(f"hpcsoup.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hpcsoup' has no attribute {name!r}")
