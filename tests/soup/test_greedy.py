import torch

from hpcsoup.soup import Evaluator, Ingredients, get_method


def test_greedy_never_lowers_validation_score(tiny_graph, tiny_experts):
    evaluator = Evaluator(tiny_experts.spec, tiny_graph)
    result = get_method("greedy").soup(tiny_experts, evaluator)
    best_expert = max(evaluator.evaluate(tiny_experts.expert(i)) for i in range(tiny_experts.n))
    assert evaluator.evaluate(result.state_dict) >= best_expert
    weights = torch.tensor(result.coefficients)
    assert torch.allclose(weights.sum(1), torch.ones(len(weights), dtype=weights.dtype))


def test_greedy_drops_a_harmful_expert(tiny_graph, tiny_experts):
    noise = {k: torch.randn_like(v) * 5 for k, v in tiny_experts.expert(0).items()}
    states = [tiny_experts.expert(i) for i in range(tiny_experts.n)] + [noise]
    ingredients = Ingredients.from_state_dicts(tiny_experts.spec, states)  # no val scores given
    evaluator = Evaluator(tiny_experts.spec, tiny_graph)
    result = get_method("greedy").soup(ingredients, evaluator)
    assert result.coefficients[0][-1] == 0.0
    # unknown val scores: n evaluations to rank the experts, n - 1 to try them
    assert result.extras["evaluations"] == 2 * ingredients.n - 1


def test_the_greedy_prefix_stops_at_the_first_drop():
    """Recipe 1 tries every expert in order; ``until_drop`` stops at the first that lowers the
    score (PLS's start: one check where the best expert is best alone)."""
    from hpcsoup.soup.greedy import greedy_selection

    scores = [0.70, 0.80, 0.75, 0.60]           # order: 1, 2, 0, 3
    soups = {(1, 2): 0.81, (0, 1, 2): 0.79, (1, 2, 3): 0.82}
    tried = []

    def score_of(subset):
        tried.append(tuple(sorted(subset)))
        return soups[tried[-1]]

    assert greedy_selection(scores, score_of) == ([1, 2, 3], 0.82)
    assert tried == [(1, 2), (0, 1, 2), (1, 2, 3)]
    tried.clear()
    assert greedy_selection(scores, score_of, until_drop=True) == ([1, 2], 0.81)
    assert tried == [(1, 2), (0, 1, 2)]
