import pytest
import torch

from hpcsoup.errors import SoupError
from hpcsoup.soup import Evaluator, get_method


def test_granularity_two_chooses_between_endpoints(tiny_graph, tiny_experts):
    evaluator = Evaluator(tiny_experts.spec, tiny_graph)
    result = get_method("gis", granularity=2).soup(tiny_experts, evaluator)
    # alphas {0, 1}: the soup is always exactly one expert, the best by validation
    best = max(range(tiny_experts.n), key=lambda i: tiny_experts.val_scores[i])
    for name, tensor in result.state_dict.items():
        assert torch.equal(tensor, tiny_experts.expert(best)[name])
    assert result.coefficients[0] == [1.0 if i == best else 0.0 for i in range(tiny_experts.n)]
    assert result.extras["evaluations"] == 0  # both endpoints are already scored


def test_gis_interpolates_and_never_drops_below_the_best_expert(tiny_graph, tiny_experts):
    evaluator = Evaluator(tiny_experts.spec, tiny_graph)
    result = get_method("gis", granularity=5).soup(tiny_experts, evaluator)
    assert result.extras["evaluations"] == (tiny_experts.n - 1) * 3  # inner points only
    assert result.extras["nominal_evaluations"] == tiny_experts.n + (tiny_experts.n - 1) * 5
    assert evaluator.evaluate(result.state_dict) >= max(tiny_experts.val_scores) - 1e-9
    weights = torch.tensor(result.coefficients)
    assert torch.allclose(weights.sum(1), torch.ones(len(weights), dtype=weights.dtype))
    assert (weights >= 0).all()


def test_gis_default_granularity_is_the_papers():
    assert get_method("gis").settings["granularity"] == 20
    with pytest.raises(SoupError, match="soup.gis.granularity' = 1: must be >= 2"):
        get_method("gis", granularity=1).soup(None, None)
