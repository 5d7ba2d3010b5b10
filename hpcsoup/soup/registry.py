"""Souping methods by name: ``get_method("gis", granularity=10)``.

An explicit registry (no import-time magic): adding a method is one line here.
"""
from __future__ import annotations

from typing import Any

from hpcsoup.errors import SoupError
from hpcsoup.soup.base import SoupMethod
from hpcsoup.soup.gis import GISSoup
from hpcsoup.soup.greedy import GreedySoup
from hpcsoup.soup.learned import LearnedSoup
from hpcsoup.soup.pls import PartitionLearnedSoup
from hpcsoup.soup.uniform import UniformSoup

METHODS: dict[str, type[SoupMethod]] = {
    cls.name: cls for cls in (UniformSoup, GreedySoup, GISSoup, LearnedSoup, PartitionLearnedSoup)
}


def method_class(name: str) -> type[SoupMethod]:
    """The class of souping method ``name``; unknown -> :class:`SoupError` listing the valid ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise SoupError(f"unknown souping method {name!r}; valid methods: "
                        f"{', '.join(METHODS)}") from None


def get_method(name: str, **settings: Any) -> SoupMethod:
    """An instance of method ``name`` with ``settings`` over its defaults."""
    return method_class(name)(**settings)
