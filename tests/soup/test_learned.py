import pytest
import torch

from hpcsoup.errors import SoupError
from hpcsoup.soup import Evaluator, get_method


def _close(a: dict, b: dict, atol=1e-6):
    return all(torch.allclose(a[k], b[k], atol=atol) for k in a)


@pytest.mark.parametrize("frozen", [{"steps": 1, "lr": 1e-12}, {"lr": 1e-12, "steps": 3}])
def test_frozen_uniform_logits_equal_the_uniform_soup(tiny_graph, tiny_experts, frozen):
    evaluator = Evaluator(tiny_experts.spec, tiny_graph)
    uniform = get_method("uniform").soup(tiny_experts, evaluator)
    method = get_method("learned", optimizer="sgd", momentum=0.0, init="uniform", **frozen)
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
    assert evaluator.evaluate(result.state_dict) == pytest.approx(result.extras["check_val"])


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
    with pytest.raises(SoupError, match="soup.learned.optimizer.*'lbfgs'.*'adam', 'sgd'"):
        get_method("learned", optimizer="lbfgs").soup(tiny_experts, evaluator)
    no_scores = type(tiny_experts)(tiny_experts.spec, tiny_experts.params, tiny_experts.ids)
    with pytest.raises(SoupError, match="init='validation' needs"):
        get_method("learned", init="validation").soup(no_scores, evaluator)


def test_stopper_selects_by_metric_and_stops_on_the_loss():
    from hpcsoup.soup.learned import Stopper

    stopper = Stopper(patience=2, min_delta=0.01, min_steps=0)
    logits = torch.zeros(2, 3)
    assert not stopper.check(0, 0.50, 1.00, logits)
    assert not stopper.check(1, 0.48, 0.90, logits + 1)   # the metric dips while the loss falls:
    assert stopper.best_step == 0 and stopper.stale == 0  # not kept, but learning goes on
    assert not stopper.check(2, 0.50, 0.895, logits + 2)  # a tie, lower loss: kept; fall < 1%
    assert stopper.best_step == 2 and stopper.stale == 1
    assert stopper.check(3, 0.49, 0.894, logits + 3)      # 2 checks without a 1% fall: stop
    assert stopper.best_step == 2 and torch.equal(stopper.best_logits, logits + 2)
    late = Stopper(patience=1, min_delta=0.0, min_steps=5)
    late.check(0, 0.5, 1.0, logits)
    assert not late.check(1, 0.5, 1.0, logits)            # stale, but before min_steps
    assert late.check(5, float("nan"), 1.0, logits)       # NaN never replaces the kept logits
    assert late.best == 0.5


def test_a_soup_that_ends_on_its_start_says_so(tiny_graph, tiny_experts, caplog):
    evaluator = Evaluator(tiny_experts.spec, tiny_graph)
    result = get_method("learned", steps=1, lr=1e-12, init="uniform").soup(tiny_experts, evaluator)
    assert result.extras["moved"] is False and result.extras["shift_from_uniform"] < 1e-6
    assert "did not move" in caplog.text


@pytest.mark.parametrize("setting, value", [("lr", 0.0), ("steps", -1), ("optimizer", "lbfgs")])
def test_settings_that_cannot_learn_are_errors_naming_the_key(setting, value):
    with pytest.raises(SoupError, match=f"soup.learned.{setting}"):
        get_method("learned", **{setting: value})


def test_the_greedy_start_is_the_greedy_soup(tiny_graph, tiny_experts):
    evaluator = Evaluator(tiny_experts.spec, tiny_graph)
    greedy = get_method("greedy").soup(tiny_experts, evaluator)
    start = get_method("learned", steps=1, lr=1e-12).soup(tiny_experts, evaluator)  # the default
    assert start.extras["init"] == "greedy" and start.extras["best_step"] == 0
    # the experts greedy left out weigh e^-8 each: the greedy soup to float rounding
    assert torch.allclose(torch.tensor(start.coefficients), torch.tensor(greedy.coefficients),
                          atol=1e-3)
    assert _close(start.state_dict, greedy.state_dict, atol=1e-3)
    learned = get_method("learned").soup(tiny_experts, evaluator)
    assert learned.extras["moved"] and evaluator.evaluate(learned.state_dict) >= \
        evaluator.evaluate(greedy.state_dict)


def test_the_greedy_start_needs_the_graph(tiny_experts):
    with pytest.raises(SoupError, match="init='greedy' needs the full graph"):
        get_method("learned").soup(tiny_experts, Evaluator(tiny_experts.spec, None,
                                                           metric="accuracy"))
