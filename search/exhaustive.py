"""`exhaustive`: scores every valid assignment (small spaces only): the reference optimum the
conformance tests hold the other searchers to."""

from __future__ import annotations

import dataclasses
import time

from search.evaluate import Evaluator
from search.problem import Budget, SearchProblem, SearchResult, Status
from search.space import build_space


@dataclasses.dataclass
class Exhaustive:
    """Enumerates the decision space in a fixed order until the budget ends.

    Status is OPTIMAL when every assignment was scored and the best fits.
    """

    seed: int = 0

    def search(self, problem: SearchProblem, budget: Budget) -> SearchResult:
        started = time.perf_counter()
        space = build_space(problem.graph, problem.mesh, fixed=problem.fixed)
        ev = Evaluator(problem, space, started=started)
        complete = True
        for a in space.enumerate():
            if ev.exhausted(budget):
                complete = False
                break
            ev.score(a)
        best = ev.cache.get(ev.best_assignment())
        status = Status.OPTIMAL if complete and best is not None and best.fits else None
        return ev.result("exhaustive", seed=self.seed, status=status, stats={"complete": int(complete)})
