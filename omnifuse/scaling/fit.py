"""Scaling-law fits with bootstrap intervals, and the compute-optimal model size.

Two laws, fitted per arm to the sweep's points ``(C, N, D, L)`` (training FLOPs, parameters, training
tokens, held-out loss):

- **compute law** ``L(C) = E + A * (C / c0)^(-alpha)``, fitted to the *compute frontier*: at each
  budget the lowest loss any size reached (:func:`frontier`), as loss-vs-compute laws are;
- **Chinchilla** ``L(N, D) = E + A * (N / n0)^(-alpha) + B * (D / d0)^(-beta)`` (Hoffmann et al. 2022,
  approach 3), fitted to every point.

Both are fitted in log space: the residual of a point is ``log model - log L`` (every point weighs
alike whatever its loss), its squares summed and minimised by ``scipy.optimize.least_squares``
(analytic Jacobian) with ``E, A, B`` as exponentials (positive) and ``alpha, beta`` in ``[0, 3]``.
Hoffmann et al. minimise a Huber loss (``delta = 1e-3``) instead; with a few dozen points, each the
mean of a run's whole held-out split, plain squares are as robust here and ten times faster, which
the bootstrap needs. Such fits have several local minima, so they start from the best few points of
a grid of initial guesses (scored in one vectorised pass) and keep the lowest cost. ``c0, n0, d0``
are the geometric means of the data, so that ``A`` and ``B`` are losses, not ``1e30``-sized constants.

**Compute-optimal size.** From Chinchilla, with training FLOPs ``C = k * N * D`` (``k`` the median of
``C / (N D)`` over the points: about 6 for a dense decoder; more for an arm that also pays for frozen
forwards or, under ``all_in``, for its parts), minimising ``L`` at fixed ``C`` gives
``N*(C) = n0 * G * (C / (k n0 d0))^(beta / (alpha + beta))`` with ``G = (alpha A / (beta B))^(1/(alpha+beta))``.
Independently, from the **IsoFLOP profiles** (Hoffmann et al.'s approach 2): at each budget a parabola
of ``L`` in ``log N`` (:func:`isoflop_minimum`) locates ``N*``, and ``log N* = a log C + b`` is fitted over
the budgets whose minimum lies inside the sizes tried.

**Intervals**: the points are resampled with replacement ``n_boot`` times and everything is refitted
(:func:`bootstrap`); an interval is the percentile interval of the refits that succeeded (a resample
with too few distinct budgets or points cannot be fitted and is counted, not used).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares

EXPONENT_BOUNDS = (0.0, 3.0)


# --------------------------------------------------------------------------- the laws


@dataclass(frozen=True)
class ComputeLaw:
    """``L(C) = E + A * (C / c0)^(-alpha)``; ``rmse`` is the root-mean-square log residual of the fit."""

    E: float
    A: float
    alpha: float
    c0: float
    rmse: float = math.nan

    def __call__(self, c):
        return self.E + self.A * (np.asarray(c, dtype=float) / self.c0) ** (-self.alpha)


@dataclass(frozen=True)
class ChinchillaLaw:
    """``L(N, D) = E + A * (N / n0)^(-alpha) + B * (D / d0)^(-beta)``; ``k`` = median ``C / (N D)``."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    n0: float
    d0: float
    k: float = math.nan
    rmse: float = math.nan

    def __call__(self, n, d):
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A * (n / self.n0) ** (-self.alpha) + self.B * (d / self.d0) ** (-self.beta)

    @property
    def optimal_exponent(self) -> float:
        """``a`` in ``N*(C) ∝ C^a``: ``beta / (alpha + beta)``."""
        return self.beta / (self.alpha + self.beta)

    def optimal_n(self, c):
        """``N*(C)``, the parameters that minimise ``L`` at ``C = k N D`` training FLOPs (module docstring)."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        c_norm = np.asarray(c, dtype=float) / (self.k * self.n0 * self.d0)
        return self.n0 * g * c_norm ** self.optimal_exponent

    def optimal_loss(self, c):
        """``L(N*(C), C / (k N*(C)))``: the loss of the compute-optimal model at ``C``."""
        n = self.optimal_n(c)
        return self(n, np.asarray(c, dtype=float) / (self.k * n))


@dataclass(frozen=True)
class IsoflopMinimum:
    """The parabola ``L = q2 (log N)^2 + q1 log N + q0`` of one budget's points and its vertex ``n_opt``;
    ``bracketed``: the vertex lies within the sizes tried (and the parabola opens upward)."""

    budget: float
    n_opt: float
    loss_opt: float
    coeffs: tuple[float, float, float]
    bracketed: bool
    n_range: tuple[float, float]


# --------------------------------------------------------------------------- helpers


def _geomean(x) -> float:
    return float(np.exp(np.mean(np.log(np.asarray(x, dtype=float)))))


def _least_squares_fit(residuals: Callable[[np.ndarray], np.ndarray], jacobian: Callable[[np.ndarray], np.ndarray],
               starts: Sequence[np.ndarray], lower, upper) -> np.ndarray | None:
    """The parameters with the lowest cost (sum of squared residuals) from ``starts`` (None when every
    start failed)."""
    best, best_cost = None, math.inf
    for x0 in starts:
        x0 = np.clip(np.asarray(x0, dtype=float), np.asarray(lower) + 1e-9, np.asarray(upper) - 1e-9)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                res = least_squares(residuals, x0, jac=jacobian, bounds=(lower, upper), x_scale="jac",
                                    max_nfev=500)
        except (ValueError, FloatingPointError):
            continue
        if np.all(np.isfinite(res.x)) and res.cost < best_cost:
            best, best_cost = res.x, res.cost
    return best


def _log_sum_exp(*terms: np.ndarray) -> np.ndarray:
    """``log(sum_i exp(term_i))`` elementwise, stably."""
    stack = np.stack(np.broadcast_arrays(*terms))
    top = stack.max(axis=0)
    return top + np.log(np.exp(stack - top).sum(axis=0))


def _softmax(*terms: np.ndarray) -> np.ndarray:
    """``exp(term_i) / sum_j exp(term_j)`` elementwise: (len(terms), P), the derivatives of
    :func:`_log_sum_exp` with respect to each term."""
    stack = np.stack(np.broadcast_arrays(*terms))
    w = np.exp(stack - stack.max(axis=0))
    return w / w.sum(axis=0)


def _best_starts(scores: np.ndarray, grid: np.ndarray, keep: int) -> list[np.ndarray]:
    order = np.argsort(np.where(np.isfinite(scores), scores, np.inf))
    return [grid[i] for i in order[:keep]]


# --------------------------------------------------------------------------- L(C)


def fit_compute_law(c: Sequence[float], loss: Sequence[float], starts: int = 4,
                    extra_starts: Sequence[ComputeLaw] = ()) -> ComputeLaw:
    """Fit ``L(C) = E + A (C/c0)^-alpha`` (module docstring). Needs 3 points at distinct ``C``; raises
    ``ValueError`` otherwise or when no start converges."""
    c, loss = np.asarray(c, dtype=float), np.asarray(loss, dtype=float)
    if len(np.unique(c)) < 3 or np.any(c <= 0) or np.any(loss <= 0):
        raise ValueError(f"L(C) needs >= 3 points at distinct positive C with positive losses, got {len(c)}")
    c0 = _geomean(c)
    x, log_l = np.log(c / c0), np.log(loss)

    def residuals(p):  # p = (log E, log A, alpha)
        return _log_sum_exp(np.full_like(x, p[0]), p[1] - p[2] * x) - log_l

    def jacobian(p):  # (P, 3)
        w = _softmax(np.full_like(x, p[0]), p[1] - p[2] * x)
        return np.stack([w[0], w[1], -x * w[1]], axis=1)

    # grid of guesses: E a share of the smallest loss, alpha; log A from the mean of log(L - E) + alpha x
    grid = []
    for share, alpha in itertools.product((1e-3, 0.25, 0.5, 0.75, 0.9), (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5)):
        e = share * loss.min()
        log_a = float(np.mean(np.log(np.maximum(loss - e, 1e-12)) + alpha * x))
        grid.append(np.array([math.log(e), log_a, alpha]))
    grid = np.array(grid)
    scores = np.array([np.sum(residuals(g) ** 2) for g in grid])
    begin = _best_starts(scores, grid, starts)
    begin += [np.array([math.log(max(w.E, 1e-12)), math.log(w.A * (c0 / w.c0) ** (-w.alpha)), w.alpha])
              for w in extra_starts]
    lower, upper = [-30.0, -30.0, EXPONENT_BOUNDS[0]], [math.log(loss.min()) + 0.1, 30.0, EXPONENT_BOUNDS[1]]
    p = _least_squares_fit(residuals, jacobian, begin, lower, upper)
    if p is None:
        raise ValueError("L(C): no start converged")
    rmse = float(np.sqrt(np.mean(residuals(p) ** 2)))
    return ComputeLaw(E=math.exp(p[0]), A=math.exp(p[1]), alpha=float(p[2]), c0=c0, rmse=rmse)


def frontier(c: Sequence[float], loss: Sequence[float], budget: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(C, L)`` of the lowest-loss point of each budget group, budgets in increasing order (``C`` is that
    point's measured FLOPs, which differ from its nominal budget by the rounding of steps)."""
    c, loss, budget = (np.asarray(v, dtype=float) for v in (c, loss, budget))
    out_c, out_l = [], []
    for b in np.unique(budget):
        idx = np.flatnonzero(budget == b)
        best = idx[np.argmin(loss[idx])]
        out_c.append(c[best])
        out_l.append(loss[best])
    return np.array(out_c), np.array(out_l)


# --------------------------------------------------------------------------- L(N, D)


def fit_chinchilla(n: Sequence[float], d: Sequence[float], loss: Sequence[float], c: Sequence[float] | None = None,
                   starts: int = 6, extra_starts: Sequence[ChinchillaLaw] = ()) -> ChinchillaLaw:
    """Fit ``L(N, D) = E + A (N/n0)^-alpha + B (D/d0)^-beta`` (module docstring); ``c`` (training FLOPs of
    each point) sets ``k = median(C / (N D))`` for :meth:`ChinchillaLaw.optimal_n`. Needs 6 distinct
    points; raises ``ValueError`` otherwise or when no start converges."""
    n, d, loss = (np.asarray(v, dtype=float) for v in (n, d, loss))
    if len({(a, b) for a, b in zip(n, d)}) < 6 or np.any(n <= 0) or np.any(d <= 0) or np.any(loss <= 0):
        raise ValueError(f"L(N, D) needs >= 6 distinct (N, D) points with positive values, got {len(n)}")
    n0, d0 = _geomean(n), _geomean(d)
    x, y, log_l = np.log(n / n0), np.log(d / d0), np.log(loss)

    def residuals(p):  # p = (log E, log A, alpha, log B, beta)
        return _log_sum_exp(np.full_like(x, p[0]), p[1] - p[2] * x, p[3] - p[4] * y) - log_l

    def jacobian(p):  # (P, 5)
        w = _softmax(np.full_like(x, p[0]), p[1] - p[2] * x, p[3] - p[4] * y)
        return np.stack([w[0], w[1], -x * w[1], w[2], -y * w[2]], axis=1)

    lm = float(loss.min())
    grid = np.array([[math.log(se * lm), math.log(sa * lm), alpha, math.log(sb * lm), beta]
                     for se, sa, sb, alpha, beta in itertools.product(
                         (1e-3, 0.3, 0.6, 0.9), (0.05, 0.2, 0.5), (0.05, 0.2, 0.5),
                         (0.1, 0.3, 0.6, 1.0, 1.5), (0.1, 0.3, 0.6, 1.0, 1.5))])
    # score every start at once: (G, P) residuals
    terms = np.stack([np.broadcast_to(grid[:, [0]], (len(grid), len(x))), grid[:, [1]] - grid[:, [2]] * x,
                      grid[:, [3]] - grid[:, [4]] * y])
    top = terms.max(axis=0)
    pred = top + np.log(np.exp(terms - top).sum(axis=0))
    scores = np.sum((pred - log_l) ** 2, axis=1)
    begin = _best_starts(scores, grid, starts)
    for w in extra_starts:
        begin.append(np.array([math.log(max(w.E, 1e-12)), math.log(w.A * (n0 / w.n0) ** (-w.alpha)), w.alpha,
                               math.log(w.B * (d0 / w.d0) ** (-w.beta)), w.beta]))
    lower = [-30.0, -30.0, EXPONENT_BOUNDS[0], -30.0, EXPONENT_BOUNDS[0]]
    upper = [math.log(lm) + 0.1, 30.0, EXPONENT_BOUNDS[1], 30.0, EXPONENT_BOUNDS[1]]
    p = _least_squares_fit(residuals, jacobian, begin, lower, upper)
    if p is None:
        raise ValueError("L(N, D): no start converged")
    k = float(np.median(np.asarray(c, dtype=float) / (n * d))) if c is not None else math.nan
    rmse = float(np.sqrt(np.mean(residuals(p) ** 2)))
    return ChinchillaLaw(E=math.exp(p[0]), A=math.exp(p[1]), alpha=float(p[2]), B=math.exp(p[3]), beta=float(p[4]),
                         n0=n0, d0=d0, k=k, rmse=rmse)


# --------------------------------------------------------------------------- IsoFLOP profiles


def isoflop_minimum(n: Sequence[float], loss: Sequence[float], budget: float) -> IsoflopMinimum | None:
    """The parabola in ``log N`` through one budget's points and its vertex; None with fewer than 3
    distinct sizes or a parabola that opens downward (no minimum)."""
    n, loss = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    if len(np.unique(n)) < 3:
        return None
    x = np.log(n)
    q2, q1, q0 = np.polyfit(x, loss, 2)
    if not q2 > 0:
        return None
    x_opt = -q1 / (2 * q2)
    inside = bool(x.min() <= x_opt <= x.max())
    return IsoflopMinimum(budget=float(budget), n_opt=float(math.exp(x_opt)), loss_opt=float(q0 - q1 * q1 / (4 * q2)),
                          coeffs=(float(q2), float(q1), float(q0)), bracketed=inside,
                          n_range=(float(n.min()), float(n.max())))


def isoflop_minima(n, loss, budget) -> list[IsoflopMinimum]:
    """:func:`isoflop_minimum` of every budget group (increasing budget), those without a minimum left out."""
    n, loss, budget = (np.asarray(v, dtype=float) for v in (n, loss, budget))
    out = []
    for b in np.unique(budget):
        m = isoflop_minimum(n[budget == b], loss[budget == b], b)
        if m is not None:
            out.append(m)
    return out


def fit_optimal_size(minima: Sequence[IsoflopMinimum]) -> tuple[float, float] | None:
    """``(a, b)`` of ``log N* = a log C + b`` over the bracketed minima; None with fewer than 2."""
    used = [m for m in minima if m.bracketed]
    if len({m.budget for m in used}) < 2:
        return None
    a, b = np.polyfit(np.log([m.budget for m in used]), np.log([m.n_opt for m in used]), 1)
    return float(a), float(b)


# --------------------------------------------------------------------------- one arm, with intervals


@dataclass
class ArmFit:
    """Every fit of one arm's points, with bootstrap replicates of each quantity (``boot``: name ->
    values of the refits that succeeded) and how many refits failed per quantity (``failed``)."""

    compute: ComputeLaw | None
    chinchilla: ChinchillaLaw | None
    minima: list[IsoflopMinimum]
    isoflop_exponent: float | None
    n_points: int
    boot: dict[str, np.ndarray] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    n_boot: int = 0
    errors: dict[str, str] = field(default_factory=dict)
    boot_raw: dict[str, np.ndarray] = field(default_factory=dict)

    def ci(self, name: str, level: float = 0.95) -> tuple[float, float]:
        """Percentile interval of the bootstrap replicates of ``name`` (nan, nan when there are none)."""
        values = self.boot.get(name)
        if values is None or len(values) == 0:
            return math.nan, math.nan
        lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
        return float(lo), float(hi)


def _fit_all(c, n, d, loss, budget, warm: ArmFit | None = None) -> tuple[dict[str, object], dict[str, str]]:
    """Every law of one set of points: ``{"compute", "chinchilla", "minima", "isoflop_exponent"}`` (None
    where it cannot be fitted) and the errors. ``warm``: a previous fit whose laws seed the starts (a
    bootstrap refit then needs few of its own)."""
    out: dict[str, object] = {"compute": None, "chinchilla": None}
    errors: dict[str, str] = {}
    fc, fl = frontier(c, loss, budget)
    try:
        out["compute"] = fit_compute_law(fc, fl, starts=1 if warm else 4,
                                         extra_starts=[warm.compute] if warm and warm.compute else ())
    except ValueError as e:
        errors["compute"] = str(e)
    try:
        out["chinchilla"] = fit_chinchilla(n, d, loss, c, starts=1 if warm else 6,
                                           extra_starts=[warm.chinchilla] if warm and warm.chinchilla else ())
    except ValueError as e:
        errors["chinchilla"] = str(e)
    minima = isoflop_minima(n, loss, budget)
    out["minima"] = minima
    opt = fit_optimal_size(minima)
    out["isoflop_exponent"] = opt[0] if opt else None
    return out, errors


def fit_arm(c, n, d, loss, budget, n_boot: int = 1000, seed: int = 0,
            extra: dict[str, Callable[[dict], float]] | None = None) -> ArmFit:
    """Fit both laws and the IsoFLOP minima to one arm's points, then refit ``n_boot`` resamples of the
    points. Replicates are kept for ``alpha_C`` (compute law), ``E_C``, ``alpha``, ``beta``, ``a_opt``
    (Chinchilla), ``a_isoflop`` and for each ``extra[name](laws)`` (a function of one refit's laws,
    e.g. the loss at a given compute); replicate ``i`` of every quantity comes from resample ``i``, so
    two arms' replicates can be paired by index (``nan`` where that refit failed)."""
    c, n, d, loss, budget = (np.asarray(v, dtype=float) for v in (c, n, d, loss, budget))
    laws, errors = _fit_all(c, n, d, loss, budget)
    fit = ArmFit(compute=laws["compute"], chinchilla=laws["chinchilla"], minima=laws["minima"],
                 isoflop_exponent=laws["isoflop_exponent"], n_points=len(c), n_boot=n_boot, errors=errors)
    names = ["alpha_C", "E_C", "alpha", "beta", "a_opt", "a_isoflop", *(extra or {})]
    reps = {k: np.full(n_boot, np.nan) for k in names}
    rng = np.random.default_rng(seed)
    for i in range(n_boot):
        idx = rng.integers(0, len(c), len(c))
        r, _ = _fit_all(c[idx], n[idx], d[idx], loss[idx], budget[idx], warm=fit)
        if r["compute"] is not None:
            reps["alpha_C"][i], reps["E_C"][i] = r["compute"].alpha, r["compute"].E
        if r["chinchilla"] is not None:
            reps["alpha"][i], reps["beta"][i] = r["chinchilla"].alpha, r["chinchilla"].beta
            reps["a_opt"][i] = r["chinchilla"].optimal_exponent
        if r["isoflop_exponent"] is not None:
            reps["a_isoflop"][i] = r["isoflop_exponent"]
        for name, fn in (extra or {}).items():
            try:
                reps[name][i] = fn(r)
            except (TypeError, ValueError, ArithmeticError, AttributeError):
                pass  # a degenerate refit (e.g. alpha + beta ~ 0 overflows N*): a failed replicate, counted
    fit.boot = {k: v[np.isfinite(v)] for k, v in reps.items()}
    fit.failed = {k: int(np.sum(~np.isfinite(v))) for k, v in reps.items()}
    fit.boot_raw = reps  # every replicate, nan where its refit failed
    return fit


__all__ = ["ComputeLaw", "ChinchillaLaw", "IsoflopMinimum", "ArmFit", "fit_compute_law", "fit_chinchilla",
           "frontier", "isoflop_minimum", "isoflop_minima", "fit_optimal_size", "fit_arm"]
