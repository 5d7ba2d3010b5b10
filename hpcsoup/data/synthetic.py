r"""A seeded, ogbn-products-like graph of any size: a degree-corrected stochastic block model.

``ogbn-products`` (Hu et al., NeurIPS 2020) has 2,449,029 nodes, 61,859,140 undirected edges
(mean degree 50.5), 100 features, 47 heavily skewed classes, edge homophily 0.81 and an 8% / 2% /
90% train / val / test split. It cannot be fetched everywhere; :func:`synthetic_products` builds a
graph with the same statistics at any size from 10^3 to 2.5 * 10^6 nodes, for scaling studies.

The model (:math:`N` nodes, :math:`C` classes in :math:`G = \lceil C / 6 \rceil` groups of
related classes, class :math:`c` in group :math:`g(c) = c \bmod G`):

1. **Classes** -- Zipf-skewed sizes :math:`n_c \approx 1 + (N - C)\,(c+1)^{-s} / \sum_k (k+1)^{-s}`,
   :math:`s` = ``class_skew`` (largest-remainder rounding); labels are shuffled over node ids.
   With :math:`s = 1` the largest of 47 classes holds 22% of the nodes, the smallest 0.5%.
2. **Degrees and node homophily** -- each node draws a degree propensity
   :math:`\theta_i \sim \mathrm{LogNormal}(0, \sigma_d^2)` (:math:`\sigma_d` = ``degree_spread``,
   heavy-tailed degrees) and a homophily whose log-odds rise with its standardised log propensity
   :math:`z_i = (\log\theta_i - \overline{\log\theta}) / \mathrm{sd}(\log\theta)`:
   :math:`h_i = \sigma(\alpha + \beta z_i + \tau \xi_i)`, :math:`\xi_i \sim \mathcal N(0, 1)`,
   :math:`\beta` = ``homophily_slope``, :math:`\tau` = :data:`HOMOPHILY_SPREAD`, and
   :math:`\alpha` bisected so that the degree-weighted mean
   :math:`\sum_i \theta_i h_i / \sum_i \theta_i` is :math:`\bar h`. Popular nodes mostly link
   inside their class, rare ones mostly outside it (as popular products are co-purchased with
   their own category and niche ones more at random): the edges stay 80% homophilous while 45%
   of the nodes have mostly other-class neighbours (10^5 nodes, :math:`\beta = 2.5`; 55% with
   :math:`\beta = 5`), which is what keeps a GNN far from perfect (in products, 79%). Its
   integer in-class and cross-class weights are
   :math:`a_i = \mathrm{round}(16\,\theta_i h_i / \bar\theta)` and
   :math:`b_i = \mathrm{round}(16\,\theta_i (1 - h_i) / \bar\theta)` (at least one is >= 1).
3. **Edges** -- :math:`M = N \bar d / 2` undirected edges (:math:`\bar d` = ``avg_degree``), of
   two kinds. An *in-class* edge picks :math:`u \propto a_u` among all nodes and
   :math:`v \propto a_v` among the nodes of class :math:`y_u`. A *cross* edge picks
   :math:`u \propto b_u` among all nodes and :math:`v \propto b_v` among the nodes of
   :math:`u`'s group with probability :math:`q` = ``group_edge_prob`` (confusable, related
   classes, as related product categories), else among all nodes. A node's expected degree is
   thus proportional to :math:`\theta_i` and the fraction of its edges inside its class is about
   :math:`h_i`. With :math:`\pi_c` the share of weight in class :math:`c` and :math:`\Pi_g` that
   of group :math:`g`, a cross edge joins one class by chance with probability
   :math:`\chi = \sum_c \pi_c (q\,\pi_c / \Pi_{g(c)} + (1 - q)\,\pi_c)`, so the edge homophily is
   :math:`H = \bar h + (1 - \bar h)\chi`; :math:`\bar h = (H - \chi) / (1 - \chi)` is solved
   from ``homophily``. The first round draws :math:`\mathrm{round}(M \bar a)` in-class and the
   rest cross edges (:math:`\bar a = \sum a / \sum (a + b)`); self-loops and duplicate pairs are
   dropped and later rounds (at most 8) draw what is missing of each kind, until the graph has
   :math:`\mathrm{round}(M H)` same-class and :math:`M - \mathrm{round}(M H)` other edges.
   Measured: homophily 0.800 and mean degree 50.0 from 10^5 nodes up; below that the popular,
   homophilous nodes of small classes cannot hold their in-class edges (2 * 10^4 nodes: mean
   degree 49.2, homophily 0.794; 10^4: 46.5, 0.784; 10^3: 25.2, 0.60). About 0.7% of the nodes
   are isolated (tiny :math:`\theta_i`).
4. **Features** -- class means :math:`\mu_c = \rho\, m_{g(c)} + \sqrt{1 - \rho^2}\, \nu_c` with
   :math:`m_g, \nu_c \sim \mathcal N(0, I_F)` and :math:`\rho = 0.6` (related classes look alike);
   :math:`x_i = \mu_{y_i} + \sigma_x \varepsilon_i`, :math:`\varepsilon_i \sim \mathcal N(0, I_F)`,
   :math:`\sigma_x` = ``feature_noise``.
5. **Split** -- random ``train_frac`` / ``val_frac`` / rest (default 8% / 2% / 90%, the sizes of
   products' split; products' own split is by sales rank).

**Calibration.** The defaults (:math:`\sigma_x = 3.6`, :math:`\sigma_d = 1.4`, :math:`q = 0.5`,
:math:`\beta = 2.5`, :math:`\tau = 1`) aim at ogbn-products' difficulty (leaderboard: MLP 0.611,
full-batch GraphSAGE 0.785 - 0.795). The feature-only MLP sees none of :math:`\beta, q,
\sigma_d, \tau`: they move the GraphSAGE alone. A sweep at 2 * 10^5 nodes (100 epochs, MLP
0.622 throughout; ``benchmarks/RESULTS.md``) gave SAGE test 0.751, 0.764, 0.780, 0.794, 0.811
for :math:`\beta` = 5, 4, 3, 2.5, 2 (:math:`\sigma_d = 1.4`, :math:`q = 0.5`);
:math:`\sigma_d` 1.4 -> 1.2 adds about 4 points, :math:`q` 0.5 -> 0 takes 3 - 5 points (cross
edges to related classes carry the group's signal, random ones only dilute it), :math:`\tau`
1 -> 0.5 moves it by under a point. :math:`\beta = 2.5` (was 5) alone brings the GraphSAGE to
the target and leaves the degree propensities, the edge counts and the cost of a build as they
were.
Measured: test accuracy at the best validation epoch of a full-batch 2-layer GraphSAGE and of a
feature-only MLP (hidden 64, Adam lr 0.01, weight decay 5e-4, dropout 0.5, seed 0;
``benchmarks/bench_synthetic.py``), build seconds and seconds of the SAGE training, 1 thread:

====== ========== ========== ========= =========== ========= ============ ==========
nodes  SAGE test  MLP test   epochs    homophily   mean deg  build s      SAGE s
====== ========== ========== ========= =========== ========= ============ ==========
10^4   0.681      0.490      30 / 60   0.784       46.5      \-           (test)
10^5   0.714      0.599      25 / 100  0.799       50.1      1.9          (test)
2*10^5 0.793      0.621      100 / 100 0.799       50.0      9.3          1953
====== ========== ========== ========= =========== ========= ============ ==========

(epochs: SAGE / MLP; 10^4 and 10^5 from ``tests/data/test_synthetic.py``; seconds on 2 cores
shared with other jobs, load 5 - 12.) The sweep above ran on an H200 GPU, where the same loop
gave 0.751 / 0.622 with :math:`\beta = 5` (CPU: 0.754 / 0.621) and 0.794 / 0.622 with
:math:`\beta = 2.5` (CPU: 0.793 / 0.621). Experts that differ: 4 SAGE experts from one init,
seeds 0 - 3, 10 epochs of Cluster-GCN batches, at 10^5 nodes reach test 0.721 - 0.731 (spread
0.010; with :math:`\beta = 5` 0.007) and val 0.734 - 0.746; their uniform soup scores 0.726 test
and 0.742 val, below three of the four experts' val; at 2 * 10^5 nodes test 0.723 - 0.742
(spread 0.019) and val 0.713 - 0.746, soup 0.736 test and 0.730 val, below two of the four. So
soups that weigh the experts can differ from the uniform one.

Before this calibration (:math:`\beta = 5`) the same models reached SAGE 0.754 / MLP 0.621 at
2 * 10^5 nodes; before that (Beta node homophilies, :math:`\sigma_x = 3`, :math:`\sigma_d = 1`,
:math:`q = 0.9`) 0.93 / 0.71 at 10^5 nodes: the graph was saturated.

Every random draw comes from a NumPy PCG64 stream seeded by ``[seed, stream, chunk]`` with fixed
chunk sizes, so the graph depends on the arguments alone (identical on any machine).

Memory: edges are drawn in chunks of :data:`CHUNK` as int64 keys
:math:`\min(u,v) N + \max(u,v)` and deduplicated by an in-place sort; the returned ``edge_index``
is int64 (:math:`32 M` bytes). The peak is about :math:`48 M + 4 N F` bytes plus the
interpreter: measured 3.6 GiB in all at 2.4M nodes (120M directed edges), 259 s on a shared
2-core machine at load 6 - 18, with :math:`\beta = 5` (``benchmarks/RESULTS.md``; the build
costs about 1.9x the CPU time of the generator before the Beta homophilies were replaced).
:math:`\beta` changes no array and no pass: a build at 10^5 nodes takes the same CPU time with
:math:`\beta` = 5 and 2.5 (0.64 s and 0.63 s, interleaved).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch_geometric.data import Data

from hpcsoup.errors import DatasetError

MIN_NODES = 1_000
MAX_NODES = 2_500_000
#: edges drawn per chunk (fixed: the output must not depend on anything but the arguments)
CHUNK = 1 << 22
#: classes per group of related classes
GROUP_SIZE = 6
#: standard deviation of the node homophilies' log-odds around that trend
HOMOPHILY_SPREAD = 1.0
#: correlation of the feature means of classes in one group
GROUP_FEATURE_CORR = 0.6
#: mean stub count per node (granularity of the degree propensities and homophilies)
WEIGHT_SCALE = 16
#: top-up rounds after deduplication
TOPUP_ROUNDS = 8

# independent random streams (numpy SeedSequence entropy = [seed, stream, chunk])
_LABELS, _WEIGHTS, _HOMOPHILY, _EDGES, _FEATURES, _SPLIT = range(6)


def _rng(seed: int, stream: int, chunk: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, chunk])


def _class_sizes(nodes: int, classes: int, skew: float) -> np.ndarray:
    """Zipf class sizes rounded by largest remainder, every class non-empty."""
    p = (np.arange(1, classes + 1, dtype=np.float64)) ** -skew
    p /= p.sum()
    raw = 1 + p * (nodes - classes)            # one node each, the rest by share
    sizes = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - sizes), kind="stable")
    sizes[order[: nodes - int(sizes.sum())]] += 1
    return sizes


class _Sampler:
    """Draws node positions with probability proportional to integer weights, restricted to a
    contiguous range of positions (a class or a group, as positions are sorted by group, class).

    A position with weight ``w`` appears ``w`` times in ``stubs``; a draw is a uniform index into
    a range of ``stubs``: O(1) per draw, no search.
    """

    def __init__(self, weights: np.ndarray):
        self.stubs = np.repeat(np.arange(weights.size, dtype=np.int32), weights)
        self.ends = np.cumsum(weights)             # stub range of position p: [ends[p]-w_p, ends[p])
        self.total = int(self.ends[-1])

    def stub_range(self, first: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stub index range covering positions ``first .. last - 1``."""
        lo = np.where(first > 0, self.ends[np.maximum(first - 1, 0)], 0)
        return lo, self.ends[last - 1]

    def draw(self, rng: np.random.Generator, lo, hi, size: int) -> np.ndarray:
        span = np.asarray(hi - lo, dtype=np.float64)
        idx = lo + (rng.random(size) * span).astype(np.int64)
        np.minimum(idx, np.asarray(hi) - 1, out=idx)
        return self.stubs[idx]


def _node_homophily(theta: np.ndarray, h_mean: float, slope: float, seed: int) -> np.ndarray:
    """Node homophilies, logit-normal with log-odds rising with the log degree propensity;
    the offset is bisected so that their degree-weighted mean is ``h_mean``."""
    if not 0 < h_mean < 1:
        return np.full(theta.size, h_mean)
    log_theta = np.log(theta)
    spread = log_theta.std()
    trend = slope * (log_theta - log_theta.mean()) / (spread if spread > 0 else 1.0)
    del log_theta
    trend += HOMOPHILY_SPREAD * _rng(seed, _HOMOPHILY).standard_normal(theta.size)
    weight = theta / theta.sum()
    buf = np.empty_like(trend)
    lo, hi = -30.0, 30.0
    for _ in range(40):            # 60 / 2^40: far below a rounding step of the weights
        mid = (lo + hi) / 2
        # sum_i w_i sigmoid(t_i + mid) = (1 + sum_i w_i tanh((t_i + mid) / 2)) / 2, as sum w = 1
        np.add(trend, mid, out=buf)
        np.multiply(buf, 0.5, out=buf)
        np.tanh(buf, out=buf)
        if (1.0 + float(weight @ buf)) / 2 < h_mean:
            lo = mid
        else:
            hi = mid
    trend += (lo + hi) / 2
    return _sigmoid(trend)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values; sorts ``keys`` in place (no second full-size copy)."""
    keys.sort()
    if keys.size == 0:
        return keys
    keep = np.empty(keys.size, dtype=bool)
    keep[0] = True
    np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    return keys[keep]


def edge_homophily(edge_index: torch.Tensor, y: torch.Tensor, chunk: int = 1 << 24) -> float:
    """Fraction of edges whose two ends have the same label (chunked: no E-sized temporaries)."""
    same = 0
    for start in range(0, edge_index.size(1), chunk):
        block = edge_index[:, start:start + chunk]
        same += int((y[block[0]] == y[block[1]]).sum())
    return same / max(edge_index.size(1), 1)


def synthetic_products(nodes: int, seed: int = 0, classes: int = 47, features: int = 100,
                       avg_degree: float = 50.0, homophily: float = 0.8, feature_noise: float = 3.6,
                       class_skew: float = 1.0, degree_spread: float = 1.4,
                       homophily_slope: float = 2.5, group_edge_prob: float = 0.5,
                       train_frac: float = 0.08, val_frac: float = 0.02) -> tuple[Data, int]:
    """Build an ogbn-products-like graph (see the module docstring for the model and formulas).

    Args:
        nodes: number of nodes, 1,000 to 2,500,000.
        seed: the graph depends on the arguments alone (default: ``0``).
        classes: number of classes (default: ``47``).
        features: feature dimension (default: ``100``).
        avg_degree: target mean degree, i.e. directed edges / nodes (default: ``50``).
        homophily: target edge homophily, the fraction of edges joining same-class nodes
            (default: ``0.8``; ogbn-products: 0.81).
        feature_noise: :math:`\\sigma_x`, noise scale of the features around their class mean
            (default: ``3.6``).
        class_skew: Zipf exponent of the class sizes (default: ``1.0``).
        degree_spread: :math:`\\sigma_d`, log-normal sigma of the degree propensities
            (default: ``1.4``).
        homophily_slope: :math:`\\beta`, log-odds of a node's homophily per standard deviation
            of its log degree propensity (default: ``2.5``; 0 = homophily independent of degree).
        group_edge_prob: :math:`q`, probability that a cross-class edge stays inside the class's
            group of related classes (default: ``0.5``).
        train_frac, val_frac: random split fractions; the rest is test
            (default: ``0.08`` / ``0.02``).

    Returns:
        ``(data, num_classes)``: a PyG ``Data`` with ``x`` [N, F] float32, ``y`` [N] long, an
        undirected, coalesced (sorted by row, then column), self-loop-free ``edge_index`` [2, E]
        and boolean ``train_mask`` / ``val_mask`` / ``test_mask``.
    """
    _check(nodes, seed, classes, features, avg_degree, homophily, feature_noise, homophily_slope,
           group_edge_prob, train_frac, val_frac)
    n = int(nodes)
    groups = math.ceil(classes / GROUP_SIZE)

    # 1. classes: positions 0..n-1 sorted by (group, class); node id = perm[position]
    sizes = _class_sizes(n, classes, class_skew)
    class_order = np.argsort(np.arange(classes) % groups, kind="stable")   # classes by group
    pos_class = np.repeat(class_order, sizes[class_order]).astype(np.int64)
    class_first = np.zeros(classes, np.int64)
    class_first[class_order] = np.concatenate([[0], np.cumsum(sizes[class_order])[:-1]])
    class_last = class_first + sizes
    group_of = np.arange(classes) % groups
    group_first = np.array([class_first[group_of == g].min() for g in range(groups)])
    group_last = np.array([class_last[group_of == g].max() for g in range(groups)])
    perm = _rng(seed, _LABELS).permutation(n)

    # 2. degree propensities and node homophilies -> integer in-class / cross weights
    theta = _rng(seed, _WEIGHTS).lognormal(0.0, degree_spread, n)
    theta *= WEIGHT_SCALE / theta.mean()
    class_w = np.bincount(pos_class, weights=theta, minlength=classes) / theta.sum()
    group_w = np.bincount(group_of, weights=class_w, minlength=groups)
    q = group_edge_prob
    chance = float(np.sum(class_w * (q * class_w / group_w[group_of] + (1 - q) * class_w)))
    if homophily < chance:
        raise DatasetError(f"synthetic-products: homophily={homophily} is below the chance level "
                           f"{chance:.3f} of this class distribution; pick a value in [{chance:.3f}, 1]")
    h_mean = (homophily - chance) / (1 - chance)
    node_h = _node_homophily(theta, h_mean, homophily_slope, seed)
    w_in = np.rint(theta * node_h).astype(np.int64)
    w_out = np.rint(theta * (1 - node_h)).astype(np.int64)
    lonely = (w_in + w_out) == 0                        # keep every node reachable
    w_in[lonely & (node_h >= 0.5)] = 1
    w_out[lonely & (node_h < 0.5)] = 1
    del theta, node_h, lonely
    inside, across = _Sampler(w_in), _Sampler(w_out)
    p_inside = float(w_in.sum()) / max(float(w_in.sum() + w_out.sum()), 1.0)
    del w_in, w_out

    # 3. edges as sorted distinct keys min*n + max; the first round draws in-class and cross
    # edges in proportion to their weights, later rounds replace what dedup removed, per kind
    y = np.empty(n, np.int64)
    y[perm] = pos_class                                 # labels by node id
    target = int(round(n * avg_degree / 2))
    want_same = int(round(target * homophily))
    ctx = _EdgeContext(inside, across, q, pos_class, group_of, perm, n, seed,
                       inside.stub_range(class_first, class_last),
                       across.stub_range(group_first, group_last))
    n_in = int(round(target * p_inside))
    keys = np.empty(target, np.int64)
    end = ctx.draw(True, n_in, keys, 0)
    end = ctx.draw(False, target - n_in, keys, end)
    keys = _sorted_unique(keys[:end])
    same = _count_same(keys, y, n)
    for _ in range(TOPUP_ROUNDS):
        counts = (max(want_same - same, 0) if inside.total else 0,
                  max(target - want_same - (keys.size - same), 0) if across.total else 0)
        if sum(counts) == 0:
            break
        new = np.empty(sum(counts), np.int64)
        end = ctx.draw(True, counts[0], new, 0)
        end = ctx.draw(False, counts[1], new, end)
        new = _sorted_unique(new[:end])
        at = np.searchsorted(keys, new)
        fresh = keys[np.minimum(at, keys.size - 1)] != new
        new, at = new[fresh], at[fresh]
        same += _count_same(new, y, n)
        keys = np.insert(keys, at, new)      # stays sorted and distinct
        del new, at, fresh
    del ctx, inside, across, pos_class, perm
    edge_index = _both_directions(keys, n)
    del keys

    # 4. features
    x = _features(y, classes, groups, features, feature_noise, seed)

    # 5. split
    order = _rng(seed, _SPLIT).permutation(n)
    n_train, n_val = int(round(train_frac * n)), int(round(val_frac * n))
    masks = [torch.zeros(n, dtype=torch.bool) for _ in range(3)]
    masks[0][torch.from_numpy(order[:n_train])] = True
    masks[1][torch.from_numpy(order[n_train:n_train + n_val])] = True
    masks[2][torch.from_numpy(order[n_train + n_val:])] = True
    data = Data(x=torch.from_numpy(x), y=torch.from_numpy(y), edge_index=torch.from_numpy(edge_index),
                train_mask=masks[0], val_mask=masks[1], test_mask=masks[2])
    data.num_nodes = n
    return data, classes


def _check(nodes, seed, classes, features, avg_degree, homophily, feature_noise, homophily_slope,
           group_edge_prob, train_frac, val_frac):
    if isinstance(nodes, bool) or not isinstance(nodes, (int, np.integer)) \
            or not MIN_NODES <= nodes <= MAX_NODES:
        raise DatasetError(f"synthetic-products: nodes={nodes!r} is not supported; "
                           f"use an integer from {MIN_NODES:,} to {MAX_NODES:,}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasetError(f"synthetic-products: seed={seed!r} must be an integer >= 0")
    if not 2 <= classes <= nodes // 10:
        raise DatasetError(f"synthetic-products: classes={classes} must be in [2, nodes/10]")
    if features < 1:
        raise DatasetError(f"synthetic-products: features={features} must be >= 1")
    if not 1 <= avg_degree <= min(nodes / 10, 1000):
        raise DatasetError(f"synthetic-products: avg_degree={avg_degree} must be in "
                           f"[1, min(nodes/10, 1000)]")
    if not 0 <= homophily <= 1:
        raise DatasetError(f"synthetic-products: homophily={homophily} must be in [0, 1]")
    if feature_noise < 0:
        raise DatasetError(f"synthetic-products: feature_noise={feature_noise} must be >= 0")
    if not math.isfinite(homophily_slope):
        raise DatasetError(f"synthetic-products: homophily_slope={homophily_slope} must be a finite "
                           f"number")
    if not 0 <= group_edge_prob <= 1:
        raise DatasetError(f"synthetic-products: group_edge_prob={group_edge_prob} must be in [0, 1]")
    if not (0 < train_frac and 0 < val_frac and train_frac + val_frac < 1):
        raise DatasetError(f"synthetic-products: train_frac={train_frac}, val_frac={val_frac} "
                           f"must be > 0 with a sum below 1")


class _EdgeContext:
    """Draws edges of one kind in fixed-size chunks, one random stream per chunk."""

    def __init__(self, inside, across, group_edge_prob, pos_class, group_of, perm, n, seed,
                 class_ranges, group_ranges):
        self.inside, self.across, self.group_edge_prob = inside, across, group_edge_prob
        self.pos_class, self.group_of, self.perm, self.n, self.seed = pos_class, group_of, perm, n, seed
        self.class_ranges, self.group_ranges = class_ranges, group_ranges
        self.chunk_id = 0

    def draw(self, same_class: bool, count: int, out: np.ndarray, pos: int) -> int:
        """Write ``count`` edge draws as keys into ``out[pos:]``; self-loops are dropped, so the
        new end can be short of ``pos + count``. Returns the new end."""
        for offset in range(0, count, CHUNK):
            size = min(CHUNK, count - offset)
            rng = _rng(self.seed, _EDGES, self.chunk_id)
            self.chunk_id += 1
            if same_class:   # both ends by in-class weight, v inside u's class
                u = self.inside.draw(rng, 0, self.inside.total, size)
                c = self.pos_class[u]
                v = self.inside.draw(rng, self.class_ranges[0][c], self.class_ranges[1][c], size)
            else:            # both ends by cross weight, v inside u's group with probability q
                u = self.across.draw(rng, 0, self.across.total, size)
                g = self.group_of[self.pos_class[u]]
                in_group = rng.random(size) < self.group_edge_prob
                lo = np.where(in_group, self.group_ranges[0][g], 0)
                hi = np.where(in_group, self.group_ranges[1][g], self.across.total)
                v = self.across.draw(rng, lo, hi, size)
            u, v = self.perm[u], self.perm[v]
            keep = u != v
            a, b = np.minimum(u[keep], v[keep]), np.maximum(u[keep], v[keep])
            out[pos:pos + a.size] = a * self.n + b
            pos += a.size
        return pos


def _count_same(keys: np.ndarray, y: np.ndarray, n: int, chunk: int = CHUNK) -> int:
    same = 0
    for start in range(0, keys.size, chunk):
        block = keys[start:start + chunk]
        same += int(np.count_nonzero(y[block // n] == y[block % n]))
    return same


def _both_directions(keys: np.ndarray, n: int) -> np.ndarray:
    """Sorted undirected keys ``u * n + v`` (u < v) -> [2, 2E] int64 edge_index sorted by
    (row, col). The reversed keys are sorted on their own and merged (NumPy's stable sort is a
    timsort: two sorted runs merge in linear time), cheaper than one sort of 2E keys."""
    e = keys.size
    full = np.empty(2 * e, np.int64)
    rev = full[e:]
    np.floor_divide(keys, n, out=rev)                 # u
    np.subtract(keys, rev * n, out=full[:e])          # v   (one temporary of size E)
    np.multiply(full[:e], n, out=full[:e])
    np.add(full[:e], rev, out=rev)                    # v * n + u
    rev.sort()
    full[:e] = keys
    full.sort(kind="stable")
    edge_index = np.empty((2, 2 * e), np.int64)
    np.floor_divide(full, n, out=edge_index[0])
    np.multiply(edge_index[0], n, out=edge_index[1])
    np.subtract(full, edge_index[1], out=edge_index[1])
    return edge_index


def _features(y: np.ndarray, classes: int, groups: int, features: int, noise: float,
              seed: int) -> np.ndarray:
    rng = _rng(seed, _FEATURES)
    rho = GROUP_FEATURE_CORR
    group_means = rng.standard_normal((groups, features))
    means = (rho * group_means[np.arange(classes) % groups]
             + math.sqrt(1 - rho ** 2) * rng.standard_normal((classes, features))).astype(np.float32)
    x = np.empty((y.size, features), np.float32)
    rows = max(1, (1 << 22) // features)
    for chunk_id, start in enumerate(range(0, y.size, rows)):
        block = x[start:start + rows]
        _rng(seed, _FEATURES, chunk_id + 1).standard_normal(block.shape, dtype=np.float32, out=block)
        block *= noise
        block += means[y[start:start + rows]]
    return x
