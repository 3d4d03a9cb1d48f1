"""The study: native vs LLaVA vs Flamingo (and ablations) at matched compute, with seeds and CIs.

    python -m omnifuse.study run configs/study/tiny.yaml      # train, evaluate, compare, report
    python -m omnifuse.study plan configs/study/tiny.yaml     # what would run (no training)
    python -m omnifuse.study report configs/study/tiny.yaml   # rewrite the report from the folder

``config`` (the typed study config), ``budget`` (budget -> steps, both accountings), ``plan`` (runs and
folders), ``runner`` (subprocesses, resume), ``report`` (tables, plots, verdict).
"""
