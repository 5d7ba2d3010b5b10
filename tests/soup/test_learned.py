import pytest
import torch

from hpcsoup.errors import SoupError
from hpcsoup.soup import Evaluator, get_method


def _close(a: dict, b: dict, atol=1e-6):
    return all(torch.allclose(a[k], b[k], atol=atol) for k in a)


@pytest.mark.parametrize("frozen", [{"steps": 0}, {"lr": 1e-12, "steps": 3}])
def test_frozen_uniform_logits_equal_the_uniform_soup(tiny_graph, tiny_experts, frozen):
    evaluator = Evaluator(tiny_experts.spec, tiny_graph)
    uniform = get_method("uniform").soup(tiny_experts, evaluator)
    method = get_method("learned", optimizer="sgd", momentum=0.0, **frozen)
    learned = method.soup(tiny_experts, evaluator)
    assert _close(learned.state_dict, uniform.state_dict)
    assert torch.allclose(torch.tensor(learned.coefficients), torch.tensor(uniform.coefficients))


def test_learning_lowers_the_validation_loss(tiny_graph, tiny_experts):
    evaluator = Evaluator(tiny_experts.spec, tiny_graph)
    mask, y = evaluator.masks["val"], evaluator.y[evaluator.masks["val"]]

    def val_loss(state):
        return torch.nn.functional.cross_entropy(evaluator.logits(state)[mask], y).item()

    uniform = get_method("uniform").soup(tiny_experts, evaluator)
    learned = get_method("learned", steps=15, lr=0.5, patience=100).soup(tiny_experts, evaluator)
    assert learned.extras["steps"] == 15
    assert val_loss(learned.state_dict) < val_loss(uniform.state_dict)
    weights = torch.tensor(learned.coefficients)
    assert weights.shape == (tiny_experts.num_tensors, tiny_experts.n)
    assert not torch.allclose(weights, weights[:1].expand_as(weights))  # per-tensor rows differ
    assert torch.allclose(weights.sum(1), torch.ones(len(weights), dtype=weights.dtype))


def test_experts_never_get_gradients(tiny_graph, tiny_experts):
    get_method("learned", steps=2).soup(tiny_experts, Evaluator(tiny_experts.spec, tiny_graph))
    assert all(not t.requires_grad and t.grad is None for t in tiny_experts.params.values())


def test_patience_stops_early_and_keeps_the_best(tiny_graph, tiny_experts):
    evaluator = Evaluator(tiny_experts.spec, tiny_graph)
    result = get_method("learned", steps=500, lr=0.5, patience=3).soup(tiny_experts, evaluator)
    assert result.extras["stopped_early"] and result.extras["steps"] < 500
    assert evaluator.evaluate(result.state_dict) == pytest.approx(result.extras["val"])


@pytest.mark.parametrize("settings", [
    {"optimizer": "sgd", "lr": 20.0, "schedule": "cosine_warm_restarts", "restart": 3},
    {"optimizer": "adam", "schedule": "cosine", "init": "validation"}])
def test_same_seed_same_soup_for_each_optimizer(tiny_graph, tiny_experts, settings):
    evaluator = Evaluator(tiny_experts.spec, tiny_graph)
    a = get_method("learned", steps=6, **settings).soup(tiny_experts, evaluator, seed=1)
    b = get_method("learned", steps=6, **settings).soup(tiny_experts, evaluator, seed=1)
    assert a.coefficients == b.coefficients
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_bad_settings_are_named(tiny_graph, tiny_experts):
    evaluator = Evaluator(tiny_experts.spec, tiny_graph)
    with pytest.raises(SoupError, match="optimizer='lbfgs'.*'adam' or 'sgd'"):
        get_method("learned", optimizer="lbfgs").soup(tiny_experts, evaluator)
    no_scores = type(tiny_experts)(tiny_experts.spec, tiny_experts.params, tiny_experts.ids)
    with pytest.raises(SoupError, match="init='validation' needs"):
        get_method("learned", init="validation").soup(no_scores, evaluator)


def test_stopper_keeps_latest_best_and_ignores_gains_below_min_delta():
    from hpcsoup.soup.learned import Stopper

    stopper = Stopper(patience=2, min_delta=0.01)
    logits = torch.zeros(2, 3)
    assert not stopper.check(0, 0.50, logits)
    assert not stopper.check(1, 0.505, logits + 1)   # kept (best) but no reset: stale 1
    assert stopper.best_step == 1
    assert stopper.check(2, 0.508, logits + 2)       # +0.008 over the reference: stale 2 -> stop
    assert stopper.best_step == 2 and torch.equal(stopper.best_logits, logits + 2)
    fresh = Stopper(patience=2, min_delta=0.01)
    fresh.check(0, 0.50, logits)
    fresh.check(1, 0.505, logits)
    assert not fresh.check(2, 0.52, logits)           # +0.02: a real improvement resets
    assert not fresh.check(3, float("nan"), logits)  # NaN never improves, never replaces
    assert fresh.best == 0.52
