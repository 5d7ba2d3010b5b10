import pytest
import torch

from hpcsoup.errors import SoupError
from hpcsoup.soup import Evaluator, Ingredients, get_method, method_class
from hpcsoup.soup.registry import METHODS


def test_uniform_is_the_exact_arithmetic_mean(tiny_graph, tiny_experts):
    result = get_method("uniform").soup(tiny_experts, Evaluator(tiny_experts.spec, tiny_graph))
    for p, name in enumerate(tiny_experts.names):
        experts = [tiny_experts.expert(i)[name] for i in range(tiny_experts.n)]
        assert torch.equal(result.state_dict[name], torch.stack(experts).mean(0))
        assert result.coefficients[p] == [1 / tiny_experts.n] * tiny_experts.n
    assert result.extras["evaluations"] == 0


def test_registry_lists_every_method_and_rejects_unknown_names():
    assert list(METHODS) == ["uniform", "greedy", "gis", "learned", "pls"]
    with pytest.raises(SoupError, match=r"unknown souping method 'ties'.*uniform, greedy, gis, "
                                        r"learned, pls"):
        method_class("ties")


def test_unknown_setting_names_the_valid_ones():
    with pytest.raises(SoupError, match=r"'gis' has no setting 'grid'.*granularity"):
        get_method("gis", grid=3)


def test_experts_of_different_shapes_point_to_merge(tiny_experts):
    a, b = tiny_experts.expert(0), dict(tiny_experts.expert(1))
    name = next(iter(b))
    b[name] = torch.zeros(3, 3)
    with pytest.raises(SoupError, match=r"shape.*hpcsoup merge"):
        Ingredients.from_state_dicts(tiny_experts.spec, [a, b])
    del b[name]
    with pytest.raises(SoupError, match=r"hpcsoup merge"):
        Ingredients.from_state_dicts(tiny_experts.spec, [a, b])
