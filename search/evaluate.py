"""Cost an assignment of the decision space: input shardings -> propagation -> simulated cost, cached."""

from __future__ import annotations

import dataclasses
import math
import time

from cost_model.meshes import topology
from cost_model.simulate import CostReport, Overlap, simulate_propagation
from ir.graph import Role
from ir.plan import Plan, Provenance
from ir.propagate import Propagation, propagate
from search.baselines import baseline_plans
from search.problem import Budget, CurvePoint, SearchProblem, SearchResult, Status
from search.space import Assignment, DecisionSpace


@dataclasses.dataclass(frozen=True, slots=True)
class Score:
    """A plan's cost as searchers compare it.

    Attributes:
      step_time: predicted seconds per step.
      memory: predicted per-device peak bytes.
      fits: memory within the problem's budget.
      cost: the scalar searchers minimise: step time if it fits, else step time scaled up by
        how far memory exceeds the budget (so the least-overflowing plan wins among misfits).
    """

    step_time: float
    memory: int
    fits: bool
    cost: float


class Evaluator:
    """Scores assignments of one problem's decision space, remembering every score it computed.

    It also keeps the best-so-far curve all searchers report.
    """

    def __init__(
        self, problem: SearchProblem, space: DecisionSpace, overlap: Overlap = Overlap.BACKWARD_AND_PREFETCH
    ):
        self.problem = problem
        self.space = space
        self.overlap = overlap
        self.topo = topology(problem.hardware, problem.mesh, problem.nodes)
        self.cache: dict[Assignment, Score] = {}
        self.evaluations = 0
        self.started = time.perf_counter()
        self.best: tuple[float, Assignment] | None = None
        self.curve: list[CurvePoint] = []
        g = problem.graph
        self._opt_for_param: dict[int, list[int]] = {}
        params = {
            g.values[v].name.removeprefix("params/"): v for v in g.inputs if g.values[v].role is Role.PARAM
        }
        for vid in g.inputs:
            v = g.values[vid]
            if v.role is Role.OPT_STATE:
                for suffix, pid in params.items():
                    if v.name.endswith("/" + suffix) and g.values[pid].shape == v.shape:
                        self._opt_for_param.setdefault(pid, []).append(vid)
                        break
        self._outputs_alias = tuple(g.output_alias)

    def propagation(self, assignment: Assignment) -> Propagation:
        g = self.problem.graph
        inputs = self.space.shardings(assignment)
        for pid, opts in self._opt_for_param.items():
            if pid in inputs:
                for o in opts:
                    inputs[o] = inputs[pid]
        outputs = {k: inputs[a] for k, a in enumerate(self._outputs_alias) if a >= 0 and a in inputs}
        fixed = self.problem.fixed
        constraint = (lambda v: fixed.activation_sharding(v.name, v.shape)) if fixed is not None else None
        return propagate(g, self.problem.mesh, inputs, outputs=outputs, constraint=constraint)

    def report(self, assignment: Assignment) -> CostReport:
        prop = self.propagation(assignment)
        return simulate_propagation(prop, self.problem.hardware, self.topo, overlap=self.overlap)

    def score(self, assignment: Assignment) -> Score:
        hit = self.cache.get(assignment)
        if hit is not None:
            return hit
        r = self.report(assignment)
        cap = self.problem.capacity
        fits = r.memory.peak <= cap
        cost = r.step_time if fits else r.step_time * (1.0 + 10.0 * (r.memory.peak / cap - 1.0)) + 1e3
        s = Score(r.step_time, r.memory.peak, fits, cost)
        self.cache[assignment] = s
        self.evaluations += 1
        if self.best is None or cost < self.best[0]:
            self.best = (cost, assignment)
            self.curve.append(CurvePoint(time.perf_counter() - self.started, self.evaluations, r.step_time))
        return s

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def exhausted(self, budget: Budget, *, margin: float = 0.0) -> bool:
        """Whether the budget is spent (`margin`: seconds to keep in hand for finishing)."""
        if budget.evaluations is not None and self.evaluations >= budget.evaluations:
            return True
        return budget.seconds is not None and self.elapsed() >= budget.seconds - margin

    def seeds(self) -> list[Assignment]:
        """Good starting points every searcher may use: the expert baselines mapped into the
        decision space (those that are valid assignments), then the fully replicated plan."""
        out: list[Assignment] = []
        for plan in baseline_plans(self.problem.graph, self.problem.mesh).values():
            a = self.space.assignment_of(plan)
            if a is not None and a not in out:
                out.append(a)
        if self.space.empty not in out:
            out.append(self.space.empty)
        return out

    def best_assignment(self) -> Assignment:
        """The best assignment scored so far (the replicated plan if none was)."""
        return self.best[1] if self.best is not None else self.space.empty

    def result(
        self,
        searcher: str,
        *,
        seed: int | None = None,
        status: Status | None = None,
        stats: dict | None = None,
        front: tuple[tuple[Plan, object], ...] = (),
    ) -> SearchResult:
        """The SearchResult of the best assignment scored so far.

        Args:
          searcher: recorded in the plan's provenance.
          seed: the searcher's seed, recorded too.
          status: default: FEASIBLE if the best plan fits, INFEASIBLE if not, TIMED_OUT if
            nothing was scored.
          stats: searcher-specific numbers; evaluations and seconds are added.
          front: Pareto front for the time-and-memory objective.
        """
        best = self.best_assignment()
        if self.best is None:
            self.score(best)
        score = self.cache[best]
        if status is None:
            status = Status.FEASIBLE if score.fits else Status.INFEASIBLE
        workload, fingerprint = self.problem.source
        prov = Provenance(
            fingerprint=fingerprint,
            workload=workload,
            hardware=self.problem.hardware.name,
            searcher=searcher,
            seed=seed,
            solver_status=status.value,
        )
        plan = self.space.plan(best, prov)
        report = self.report(best)
        all_stats = {"evaluations": self.evaluations, "seconds": round(self.elapsed(), 3)}
        all_stats.update(stats or {})
        return SearchResult(plan, report, tuple(self.curve), status, all_stats, front)


def relative(score: Score, reference: Score) -> float:
    """A reward in (0, 1]: 1 for a plan `reference.cost` times as good... i.e. reference/cost, capped."""
    if not math.isfinite(score.cost) or score.cost <= 0:
        return 0.0
    return min(1.0, reference.cost / score.cost) if reference.cost > 0 else 0.0
