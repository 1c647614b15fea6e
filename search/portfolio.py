"""`portfolio` (the default searcher): ILP, then MCTS, then Optuna, each seeded with the others' best.

The budget is split between the members (default 30% / 35% / 35%). They run one after another
in this process rather than in parallel processes: scoring a plan is CPU-bound Python, and run in
one process the members share every score, propagation and cost computed (search.evaluate), which
on a 2-core machine is worth more than a second core. Seeding, as the design asks: the ILP is
hinted with the best expert baseline; its solution becomes a seed of MCTS (the tree scores it
first) and an enqueued Optuna trial; MCTS's incumbent is enqueued in Optuna too. Every member also
starts from the expert baselines (`Evaluator.seeds`), so the portfolio is never worse than the
best of them under the simulator.
"""

from __future__ import annotations

import dataclasses
import time

from search.evaluate import Evaluator
from search.problem import Budget, SearchProblem, SearchResult, Status
from search.registry import make_searcher
from search.space import build_space

DEFAULT_MEMBERS: tuple[tuple[str, float], ...] = (("ilp", 0.3), ("mcts", 0.35), ("optuna", 0.35))


@dataclasses.dataclass
class Portfolio:
    """Runs several searchers on one problem with a split budget and returns the best plan.

    Attributes:
      seed: seeds every member (deterministic for a seed under an evaluation budget).
      members: (searcher name, share of the budget) in the order they run.
    """

    seed: int = 0
    members: tuple[tuple[str, float], ...] = DEFAULT_MEMBERS

    def search(self, problem: SearchProblem, budget: Budget) -> SearchResult:
        start = time.perf_counter()
        total = sum(share for _, share in self.members)
        space = build_space(problem.graph, problem.mesh, fixed=problem.fixed)
        ev = Evaluator(problem, space)
        hints = list(problem.hints)
        results: dict[str, SearchResult] = {}
        stats: dict[str, float | int | str] = {}
        for k, (name, share) in enumerate(self.members):
            last = k == len(self.members) - 1
            part = _share(budget, share / total, time.perf_counter() - start, last)
            if part is None:
                stats[f"{name}_skipped"] = 1
                continue
            # Same graph, mesh and hardware objects: the member shares this process's caches.
            member_problem = dataclasses.replace(problem, hints=tuple(hints))
            ev.label = name
            r = make_searcher(name, seed=self.seed).search(member_problem, part)
            results[name] = r
            hints.insert(0, r.plan)
            stats[f"{name}_step_time"] = r.report.step_time
            stats[f"{name}_fits"] = int(r.report.fits)
            stats[f"{name}_status"] = r.status.value
            for key, value in r.stats.items():
                if key in ("evaluations", "seconds", "ilp_status", "gap", "objective", "best_bound"):
                    stats[f"{name}_{key}"] = value
        # The winner: the best plan any member returned, scored by the shared simulator.
        for r in results.values():
            a = space.assignment_of(r.plan)
            if a is not None:
                ev.score(a)
        for a in ev.seeds():
            ev.score(a)
        best = ev.cache[ev.best_assignment()]
        winner = next(
            (n for n, r in results.items() if space.assignment_of(r.plan) == ev.best_assignment()),
            "baseline",
        )
        stats["winner"] = winner
        optimal = any(r.status is Status.OPTIMAL for r in results.values()) and best.fits
        status = Status.OPTIMAL if optimal and results[winner].status is Status.OPTIMAL else None
        out = ev.result("portfolio", seed=self.seed, status=status, stats=stats)
        curve = _merged_curve(results, start)
        evaluations = (
            sum(int(r.stats.get("evaluations", 0)) for r in results.values()) + out.stats["evaluations"]
        )
        return dataclasses.replace(
            out,
            curve=curve or out.curve,
            stats={**out.stats, "evaluations": evaluations, "seconds": round(time.perf_counter() - start, 3)},
        )


def _share(budget: Budget, fraction: float, spent: float, last: bool) -> Budget | None:
    """A member's budget: its fraction of the whole; the last member gets what is left."""
    seconds = evaluations = None
    if budget.seconds is not None:
        seconds = (budget.seconds - spent) if last else budget.seconds * fraction
        seconds = min(seconds, budget.seconds - spent)
        if seconds <= 0.05:
            return None
    if budget.evaluations is not None:
        evaluations = max(1, round(budget.evaluations * fraction))
    return Budget(seconds=seconds, evaluations=evaluations)


def _merged_curve(results: dict[str, SearchResult], start: float):
    """The portfolio's best-so-far curve: the members' curves laid end to end."""
    points = []
    offset_s = offset_n = 0.0
    best = float("inf")
    for r in results.values():
        for p in r.curve:
            if p.step_time < best:
                best = p.step_time
                points.append(
                    dataclasses.replace(
                        p, seconds=p.seconds + offset_s, evaluations=p.evaluations + int(offset_n)
                    )
                )
        offset_s += float(r.stats.get("seconds", 0.0))
        offset_n += int(r.stats.get("evaluations", 0))
    return tuple(points)
