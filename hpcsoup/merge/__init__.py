"""Stage 5b: H-GRAMA, training-free merging of GNN experts of different architectures.

Modules: :mod:`~hpcsoup.merge.umpm` (operator family, converters, fused kernels),
:mod:`~hpcsoup.merge.align` (transport between hidden spaces), :mod:`~hpcsoup.merge.route`
(closed-form gate), :mod:`~hpcsoup.merge.calibrate` (statistics matching),
:mod:`~hpcsoup.merge.child` (the merged model), :mod:`~hpcsoup.merge.hgrama` (the merge),
:mod:`~hpcsoup.merge.ensemble` (baselines), :mod:`~hpcsoup.merge.timing`,
:mod:`~hpcsoup.merge.run` (``hpcsoup merge`` over the store).
"""
from hpcsoup.merge.child import MergedGNN
from hpcsoup.merge.ensemble import Ensemble, interpolate
from hpcsoup.merge.hgrama import HGramaSettings, merge
from hpcsoup.merge.umpm import GraphOps, UMPMNet, from_pyg

__all__ = ["Ensemble", "GraphOps", "HGramaSettings", "MergedGNN", "UMPMNet", "from_pyg",
           "interpolate", "merge"]
