"""The souping methods' forward for *any* module called as ``module(x, edge_index)``.

:class:`~hpcsoup.soup.evaluate.Evaluator` runs hpcsoup's own :class:`~hpcsoup.models.GNN`
on a prebuilt sparse adjacency. A user's own model (other parameter names such as
``conv1``/``conv2``, BatchNorm, PyG's ``GCN``/``GAT``...) is run the same way, by
``functional_call``, but on the plain ``edge_index`` it was written for:

.. code-block:: python

    logits = torch.func.functional_call(template, params, (x, edge_index))

where ``template`` is a frozen copy of one of the experts in eval mode. Tensors
missing from ``params`` (integer buffers such as BatchNorm's
``num_batches_tracked``, which are carried rather than mixed) come from the
template; floating buffers (running statistics) are mixed but get no gradient. Every
souping method (uniform, greedy, GIS, LS, PLS) talks to this
object exactly as to :class:`~hpcsoup.soup.evaluate.Evaluator`: scores, masks and
evaluation counting are inherited from it; only the model and the graph format
differ. For PLS a partition's subgraph is given to the module as its local
``edge_index``, so a layer that normalises by degree (``GCNConv``) uses the
subgraph's degrees: unlike hpcsoup's own GNN, a halo of ``layers`` hops does not
make a user module's partition predictions exact.
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from hpcsoup.data import Graph
from hpcsoup.soup.evaluate import Evaluator


@dataclasses.dataclass(frozen=True)
class ModuleSpec:
    """The shape facts of a user's module that the souping methods read (``spec`` of the
    evaluator and the ingredients, in place of a :class:`~hpcsoup.models.ModelSpec`)."""

    module: str          # "package.Class"
    in_channels: int     # the graph's features
    out_channels: int    # the graph's classes
    arch: str = "module"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def of(cls, module: torch.nn.Module, graph: Graph) -> "ModuleSpec":
        kind = type(module)
        return cls(f"{kind.__module__}.{kind.__qualname__}", graph.num_features, graph.num_classes)


def frozen_copy(module: torch.nn.Module, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A deep copy of ``module`` in eval mode with no parameter requiring a gradient."""
    template = copy.deepcopy(module).to(device).eval()
    for p in template.parameters():
        p.requires_grad_(False)
    return template


class ModuleEvaluator(Evaluator):
    """Full-graph inference of any state_dict of ``module``'s class on ``graph``.

    Args:
        module: one of the experts (copied; the copy is the template whose
            weights ``functional_call`` replaces).
        graph: the graph (its masks and metric define the scores).
        device: where the forwards run (default: ``"cpu"``).

    The public interface is :class:`~hpcsoup.soup.evaluate.Evaluator`'s
    (``graph``, ``device``, ``y``, ``masks``, ``metric``, ``evaluations``,
    ``forward``, ``adjacency``, ``logits``, ``score``, ``evaluate``,
    ``metrics``); ``spec`` is a :class:`ModuleSpec`.
    """

    def __init__(self, module: torch.nn.Module, graph: Graph, device: str | torch.device = "cpu"):
        # Evaluator.__init__ builds hpcsoup's GNN from a spec; here the template is the user's
        # module, so the same attributes are set from it instead.
        self.spec, self.graph, self.device = ModuleSpec.of(module, graph), graph, torch.device(device)
        data = graph.data
        self.template = frozen_copy(module, self.device)
        self.y = data.y.to(self.device)
        self.masks = {s: graph.mask(s).to(self.device) for s in ("train", "val", "test")}
        self.x, self.inverse = data.x.to(self.device), None
        self.adj = data.edge_index.to(self.device)
        self.evaluations = 0
        self.receptive_field, self._field = False, None  # the module's depth is unknown
        self.buffers = {name for name, _ in self.template.named_buffers()}

    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor | None = None,
                adj: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the module with weights ``params``; differentiable in its parameters.

        Floating buffers (BatchNorm's running statistics) are mixed like parameters but enter
        detached: ``batch_norm`` has no gradient in them, so LS and PLS leave their
        coefficients where they started (uniform by default).
        """
        params = {k: v.detach() if k in self.buffers else v for k, v in params.items()}
        return super().forward(params, x, adj)

    @property
    def metric(self) -> str:
        return self.graph.metric

    def adjacency(self, edge_index: torch.Tensor, num_nodes: int,
                  deg: torch.Tensor | None = None) -> torch.Tensor:
        """A subgraph's ``edge_index`` on the device: the format ``module(x, edge_index)`` takes."""
        return edge_index.to(self.device)

    def part_adjacency(self, part, keep: bool = False) -> torch.Tensor:
        """A PLS partition's adjacency (a :class:`~hpcsoup.soup.pls.Part`): its local
        ``edge_index``, which costs nothing to rebuild, so ``keep`` changes nothing."""
        return self.adjacency(part.edge_index, part.num_nodes)
