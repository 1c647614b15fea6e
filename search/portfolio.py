"""`portfolio` (the default searcher): ILP, then MCTS, then Optuna, each seeded with the others' best.

The budget is split between the members (default 30% / 35% / 35%). They run one after another
in this process rather than in parallel processes: scoring a plan is CPU-bound Python, and run in
one process the members share every score, propagation and cost computed (search.evaluate), which
on a 2-core machine is worth more than a second core. Seeding, as the design asks: the ILP is
hinted with the best expert baseline; its solution becomes a seed of MCTS (the tree scores it
first) and an enqueued Optuna trial; MCTS's incumbent is enqueued in Optuna too. Every member also
starts from the expert baselines mapped into the decision space (`Evaluator.seeds`). Before the
members run (within 30% of a wall budget), the baselines are also costed as written, with
their activation constraints; when none of the members' plans beats the best of those that fit,
that baseline is the result, so the portfolio is never slower than the best fitting baseline.
"""

from __future__ import annotations

import dataclasses
import time

from ir.propagate import propagate_plan
from search.evaluate import MISFIT, Evaluator
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

    def _experts(self, problem: SearchProblem, ev: Evaluator, start: float, budget: Budget) -> list:
        """(cost, plan, name) of each expert baseline that fits, best first (none when the user
        fixed decisions: a baseline may contradict them)."""
        if problem.fixed is not None:
            return []
        out = []
        limit = 0.3 * budget.seconds if budget.seconds is not None else None
        for name, plan in ev.baselines().items():
            if limit is not None and time.perf_counter() - start > limit:
                break
            # Baselines carry their own activation constraints: propagated without the shared
            # cache (whose entries assume the problem's constraints).
            step_time, peak = ev.simulator.step_time_and_peak(propagate_plan(problem.graph, plan))
            if peak <= problem.capacity:
                out.append((_expert_cost(step_time, peak, problem.capacity), plan, name))
        return sorted(out, key=lambda t: t[0])

    def search(self, problem: SearchProblem, budget: Budget) -> SearchResult:
        start = time.perf_counter()
        total = sum(share for _, share in self.members)
        space = build_space(problem.graph, problem.mesh, fixed=problem.fixed)
        ev = Evaluator(problem, space)
        hints = list(problem.hints)
        results: dict[str, SearchResult] = {}
        stats: dict[str, float | int | str] = {}
        # The expert plans as written (not as the decision space approximates them): the result is
        # never worse than the best that fits. At most 30% of the budget.
        experts = self._experts(problem, ev, start, budget)
        if experts:
            hints.append(experts[0][1])
        ready = time.perf_counter() - start
        for k, (name, share) in enumerate(self.members):
            last = k == len(self.members) - 1
            part = _share(budget, share / total, ready, time.perf_counter() - start, last)
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
        ev.label = "portfolio"
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
        optimal = any(r.status is Status.OPTIMAL for r in results.values()) and best.fits
        status = (
            Status.OPTIMAL
            if optimal and winner in results and results[winner].status is Status.OPTIMAL
            else None
        )
        if experts and experts[0][0] < best.cost:
            _, plan, name = experts[0]
            winner = f"baseline:{name}"
            stats["winner"] = winner
            out = ev.result("portfolio", seed=self.seed, status=Status.FEASIBLE, stats=stats)
            prov = dataclasses.replace(out.plan.provenance, searcher=f"portfolio ({winner})")
            plan = dataclasses.replace(plan, provenance=prov)
            report = ev.simulator.report(propagate_plan(problem.graph, plan))
            out = dataclasses.replace(out, plan=plan, report=report)
        else:
            stats["winner"] = winner
            out = ev.result("portfolio", seed=self.seed, status=status, stats=stats)
        curve = _merged_curve(results, start)
        evaluations = sum(int(r.stats.get("evaluations", 0)) for r in results.values())
        computed = sum(int(r.stats.get("computed", 0)) for r in results.values())
        return dataclasses.replace(
            out,
            curve=curve or out.curve,
            stats={
                **out.stats,
                "evaluations": evaluations,
                "computed": computed,
                "seconds": round(time.perf_counter() - start, 3),
            },
        )


def _share(budget: Budget, fraction: float, ready: float, spent: float, last: bool) -> Budget | None:
    """A member's budget: its fraction of what was left once the members could start (`ready`
    seconds in); the last member gets what is left."""
    seconds = evaluations = None
    if budget.seconds is not None:
        seconds = (budget.seconds - spent) if last else (budget.seconds - ready) * fraction
        seconds = min(seconds, budget.seconds - spent)
        if seconds <= 0.05:
            return None
    if budget.evaluations is not None:
        evaluations = max(1, round(budget.evaluations * fraction))
    return Budget(seconds=seconds, evaluations=evaluations)


def _expert_cost(step_time: float, peak: int, capacity: int) -> float:
    return step_time if peak <= capacity else MISFIT + peak / capacity


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
