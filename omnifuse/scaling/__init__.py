"""Scaling sweeps (issue 12): every arm at several model sizes x compute budgets, fitted laws, a report.

    python -m omnifuse.study plan configs/study/scaling.yaml                 # the grid, no training
    python -m omnifuse.study run configs/study/scaling.yaml [--profile gpu]  # train, evaluate, fit, report
    python -m omnifuse.study report configs/study/scaling.yaml               # refit and rewrite the report

``config`` (sizes from a width/depth rule, the IsoFLOP grid, the sweep as a study config), ``fit``
(``L(C)``, Chinchilla ``L(N, D)``, bootstrap intervals, compute-optimal ``N*(C)``), ``report`` (the
points, the table of constants, the plot, the verdict), ``runner`` (the study runner plus the held-out
loss of every point). The study machinery (:mod:`omnifuse.study`) trains the points: a scaling
config becomes a study whose arms are the grid's points.
"""
