"""Stage 5: soup same-architecture experts (uniform, greedy, gis, learned, pls).

Example::

    from hpcsoup.soup import Evaluator, Ingredients, get_method
    ingredients = Ingredients.from_state_dicts(spec, [sd1, sd2, sd3], val_scores=[.8, .79, .81])
    evaluator = Evaluator(spec, graph)
    result = get_method("learned", steps=50).soup(ingredients, evaluator)
    evaluator.metrics(result.state_dict)     # {"metric", "val", "test"}

``run_soup(cfg)`` (:mod:`hpcsoup.soup.run`) is what ``hpcsoup soup`` calls.
"""
from hpcsoup.soup.base import Ingredients, SoupMethod, SoupResult
from hpcsoup.soup.evaluate import Evaluator, build_adjacency
from hpcsoup.soup.registry import METHODS, get_method, method_class

__all__ = ["Evaluator", "Ingredients", "METHODS", "SoupMethod", "SoupResult", "build_adjacency",
           "get_method", "method_class"]
