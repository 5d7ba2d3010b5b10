"""Scaling model of distributed PLS: predicted step time at 8 ... 1024 MPI ranks, plotted.

    .venv/bin/python benchmarks/scaling_model.py        # reads benchmarks/out/mpi_pls.json
                                                        # (bench_mpi_pls.py), writes
                                                        # benchmarks/scaling_model.png and
                                                        # benchmarks/out/scaling_model.json

Model of one PLS step on P ranks (R partitions drawn per step, K partitions in all):

.. math::
    T(P) = t_0 + \\mathbb{E}\\Big[\\max_{r < P} \\sum_{k \\in D_t,\\ k \\bmod P = r} t_k\\Big]
           + T_{ar}(P, m), \\qquad
    T_{ar}(P, m) = \\lceil \\log_2 P \\rceil \\, (\\alpha + \\beta m)

- :math:`t_k`: measured CPU time of partition k's term (mixing the weights, forward and
  backward of the souped model on its receptive field or subgraph), median over steps at P = 1,
  one thread; the slowest rank sets the step time, so the spread of the :math:`t_k` (partitions
  differ in edges and validation nodes) is what limits scaling, not the communication;
- :math:`t_0`: measured per-step work outside the partitions (optimizer update of the logits);
- :math:`T_{ar}`: recursive-doubling allreduce (MPICH's algorithm for short messages),
  :math:`\\lceil \\log_2 P \\rceil` rounds of latency :math:`\\alpha` and :math:`\\beta` s/byte;
  :math:`\\alpha, \\beta` fitted by least squares to the measured ``MPI_Allreduce`` times at P = 2
  on this machine (shared memory; P = 4 was oversubscribed), and, for a cluster, an assumed network
  (:data:`NETWORK`: 2 µs per round, 12.5 GB/s, i.e. 100 Gb/s InfiniBand);
- :math:`m = 4 (T n + 1)` bytes: the gradient of the ``[T tensors, n experts]`` logits plus the
  loss, float32 -- independent of the graph.

Assumptions (what the prediction ignores): the stratified draw with round-robin ownership (a
rank computes at most :math:`\\lceil R/P \\rceil` partitions); for more partitions than
measured, partition costs are drawn from the measured ones (bootstrap); ranks do not share cores
(here P = 4 was oversubscribed on 2 cores) and see no OS noise; the stopping checks (every
``eval_every`` steps: one forward per held partition and an allreduce of the validation scores)
and the start-up (reading the shard) are left out.

Scenarios, each with the measured and the assumed-network allreduce; efficiency is the ideal
time (:math:`t_0 + \\frac{R}{P}\\bar t`, perfect balance, no communication) over :math:`T(P)`:

- **A, fixed step** (this benchmark's K and R, the measured partitions and the real draws):
  ranks beyond R have nothing to compute; the step time stops falling at P = R.
- **B, weak scaling** (R = P, K = 4P: the graph grows with P, one partition per rank per step).
- **C, strong scaling of a large step** (R = 1024 of K = 4096 partitions like the measured ones).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"

#: an assumed cluster network: per-round latency (s) and inverse bandwidth (s/byte)
NETWORK = {"alpha": 2e-6, "beta": 1 / 12.5e9}
RANKS = [2 ** i for i in range(0, 11)]  # 1 ... 1024


def fit_allreduce(measured: dict) -> dict:
    """``alpha, beta`` of ``t = ceil(log2 P) (alpha + beta m)`` (both >= 0), least squares in
    *relative* error, so that the 1 MB point does not drown the few-byte ones PLS sends."""
    rows = [(math.ceil(math.log2(int(p))) / r["seconds"], r["bytes"])
            for p, results in measured.items() for r in results]
    # minimise sum (1 - k' a - k' m b)^2 over a, b with k' = rounds / t: 2x2 normal equations
    s11 = sum(k * k for k, m in rows)
    s12 = sum(k * k * m for k, m in rows)
    s22 = sum((k * m) ** 2 for k, m in rows)
    b1 = sum(k for k, m in rows)
    b2 = sum(k * m for k, m in rows)
    det = s11 * s22 - s12 * s12
    alpha, beta = (b1 * s22 - b2 * s12) / det, (s11 * b2 - s12 * b1) / det
    if beta < 0:
        beta, alpha = 0.0, b1 / s11
    if alpha < 0:
        alpha, beta = 0.0, b2 / s22
    return {"alpha": alpha, "beta": beta}


def allreduce_time(p: int, m: int, net: dict) -> float:
    return math.ceil(math.log2(p)) * (net["alpha"] + net["beta"] * m) if p > 1 else 0.0


def slowest_rank_actual(p: int, times: dict, seed: int, partitions: int, per_step: int,
                        steps: int = 500) -> float:
    """E[max over ranks of their partitions' time] over the real stratified draws (scenario A)."""
    from hpcsoup.distributed.shards import owner_of
    from hpcsoup.soup.pls import draw_partitions

    fallback = sum(times.values()) / len(times)  # a partition never drawn in the benchmark
    total = 0.0
    for step in range(steps):
        load = [0.0] * min(p, partitions)
        for k in draw_partitions(seed, step, partitions, per_step, "stratified"):
            load[owner_of(k, len(load))] += times.get(k, fallback)
        total += max(load)
    return total / steps


def slowest_rank_bootstrap(p: int, per_step: int, samples: list, trials: int = 400,
                           seed: int = 0) -> float:
    """E[max over ranks of sums of ceil(R/P) partition times drawn from ``samples``]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    each = math.ceil(per_step / p)
    ranks = min(p, per_step)
    draws = rng.choice(np.asarray(samples), size=(trials, ranks, each))
    return float(draws.sum(-1).max(-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=str(OUT / "mpi_pls.json"))
    parser.add_argument("--plot", default=str(REPO / "benchmarks" / "scaling_model.png"))
    args = parser.parse_args()
    bench = json.loads(Path(args.input).read_text())
    rows = {(r["ranks"], r["draw"]): r for r in bench["table"]}
    one = rows[(1, "stratified")]
    times = {int(k): v for k, v in one["partition_times"].items()}
    samples = list(times.values())
    mean_t = sum(samples) / len(samples)
    t0 = one["step_overhead"]
    m = one["bytes_per_step"]
    R, K = bench["args"]["per_step"], bench["args"]["partitions"]
    # P = 2 only: at P = 4 the ranks were oversubscribed on 2 cores, and MPICH's ranks poll
    # while they wait, so a descheduled peer, not the network, set those times
    measured_net = fit_allreduce({p: r for p, r in bench["allreduce"].items() if int(p) <= 2})
    nets = {"allreduce measured here (shared memory)": measured_net, "assumed network": NETWORK}

    print(f"inputs (P=1, 1 thread): {len(samples)} partitions, t_k mean {mean_t * 1e3:.2f} ms, "
          f"min {min(samples) * 1e3:.2f}, max {max(samples) * 1e3:.2f}; t_0 = {t0 * 1e3:.2f} ms; "
          f"m = {m} bytes per step; R = {R}, K = {K}")
    print(f"allreduce fit (P=2 on this machine): alpha = {measured_net['alpha'] * 1e6:.1f} us, "
          f"beta = {measured_net['beta'] * 1e9:.3f} ns/B; assumed network: alpha = "
          f"{NETWORK['alpha'] * 1e6:.1f} us, beta = {NETWORK['beta'] * 1e9:.3f} ns/B")
    compute = {
        "A": [slowest_rank_actual(p, times, 0, K, R) for p in RANKS],
        "B": [slowest_rank_bootstrap(p, p, samples) for p in RANKS],
        "C": [slowest_rank_bootstrap(p, 1024, samples) for p in RANKS]}
    work = {"A": lambda p: R, "B": lambda p: p, "C": lambda p: 1024}
    prediction, efficiency = {}, {}
    for name, net in nets.items():
        prediction[name] = {key: [t0 + c + allreduce_time(p, m, net) for p, c in zip(RANKS, cs)]
                            for key, cs in compute.items()}
        efficiency[name] = {key: [(t0 + work[key](p) / p * mean_t) / t
                                  for p, t in zip(RANKS, ts)]
                            for key, ts in prediction[name].items()}
    net = "assumed network"
    print("\npredicted step time (ms), parallel efficiency, with the assumed network")
    print(f"{'P':>5} | {'A: K=' + str(K) + ', R=' + str(R):>20} | {'B: R=P (weak)':>20} | "
          f"{'C: R=1024 (strong)':>20} | allreduce")
    for i, p in enumerate(RANKS):
        cells = [f"{prediction[net][key][i] * 1e3:9.2f} ({efficiency[net][key][i]:5.1%})"
                 for key in "ABC"]
        print(f"{p:>5} | " + " | ".join(f"{c:>20}" for c in cells)
              + f" | {allreduce_time(p, m, NETWORK) * 1e6:5.1f} us")
    measured = {r["ranks"]: r["step_seconds"] for r in bench["table"] if r["draw"] == "stratified"}
    cpu = {r["ranks"]: r["compute_cpu_seconds"] + r["allreduce_seconds"]
           for r in bench["table"] if r["draw"] == "stratified"}
    print("measured here, wall (ms): " + ", ".join(f"P={p} {t * 1e3:.1f}" for p, t in measured.items())
          + "; busiest rank's CPU time + allreduce (ms): "
          + ", ".join(f"P={p} {t * 1e3:.1f}" for p, t in cpu.items()))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    styles = {"allreduce measured here (shared memory)": "--", "assumed network": "-"}
    colours = {"A": "tab:blue", "B": "tab:green", "C": "tab:red"}
    labels = {"A": f"A: fixed step K={K}, R={R}", "B": "B: weak, R=P (1 partition/rank)",
              "C": "C: strong, R=1024"}
    for name in nets:
        short = name.split(" (")[0]
        for key in "ABC":
            ax1.plot(RANKS, [t * 1e3 for t in prediction[name][key]], styles[name],
                     color=colours[key], label=f"{labels[key]} ({short})")
            ax2.plot(RANKS, efficiency[name][key], styles[name], color=colours[key],
                     label=f"{labels[key]} ({short})")
    ax1.plot(list(measured), [t * 1e3 for t in measured.values()], "o", color="black",
             mfc="none", label="measured A, wall (2 shared cores, P=4 oversubscribed)")
    ax1.plot(list(cpu), [t * 1e3 for t in cpu.values()], "o", color="black",
             label="measured A, busiest rank's CPU time + allreduce")
    ax1.set(xscale="log", yscale="log", xlabel="MPI ranks P", ylabel="PLS step time (ms)",
            title=f"Predicted PLS step time (mean t_k = {mean_t * 1e3:.1f} ms, {m} B allreduce)")
    ax2.set(xscale="log", xlabel="MPI ranks P", ylabel="parallel efficiency", ylim=(0, 1.05),
            title="Parallel efficiency")
    for ax in (ax1, ax2):
        ax.set_xticks(RANKS, [str(p) for p in RANKS])
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "scaling_model.json").write_text(json.dumps({
        "partition_times": times, "step_overhead": t0, "bytes": m, "R": R, "K": K,
        "allreduce_fit": measured_net, "network": NETWORK, "ranks": RANKS,
        "prediction": prediction, "efficiency": efficiency, "measured": measured,
        "measured_cpu": cpu}, indent=1))
    print(f"\nwrote {args.plot} and {OUT / 'scaling_model.json'}")


if __name__ == "__main__":
    main()
