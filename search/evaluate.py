"""Cost an assignment of the decision space: input shardings -> propagation -> simulated cost, cached."""

from __future__ import annotations

import collections
import dataclasses
import math
import time

from cost_model.gc_pause import gc_paused
from cost_model.meshes import topology
from cost_model.simulate import CostReport, Overlap, Simulator
from ir.plan import Plan, Provenance
from ir.propagate import Propagation, propagate
from ir.spans import PropagationCache
from search.baselines import baseline_plans
from search.problem import Budget, CurvePoint, Progress, SearchProblem, SearchResult, Status
from search.space import Assignment, DecisionSpace, InputLayouts

MISFIT = 1e6  # the cost of a plan that does not fit, before its memory overflow is added


@dataclasses.dataclass(frozen=True, slots=True)
class Score:
    """A plan's cost as searchers compare it.

    Attributes:
      step_time: predicted seconds per step.
      memory: predicted per-device peak bytes.
      fits: memory within the problem's budget.
      cost: the scalar searchers minimise: step time if it fits; else MISFIT plus memory over
        the budget, so every fitting plan beats every misfit and among misfits the one that
        needs least memory wins (it is the plan reported as closest to fitting).
    """

    step_time: float
    memory: int
    fits: bool
    cost: float


class _Shared:
    """What every searcher of one problem shares in this process: the propagation and simulator
    caches, every score computed, and the problem's input bookkeeping (built once)."""

    def __init__(self, problem: SearchProblem, overlap: Overlap):
        self.keep = (problem.graph, problem.hardware, problem.fixed)  # their ids are in the key
        self.topo = topology(problem.hardware, problem.mesh, problem.nodes)
        self.hardware = problem.hardware
        self.overlap = overlap
        self.simulator = Simulator(problem.hardware, self.topo, overlap)
        self.prop_cache = PropagationCache()
        self.scores: dict[Assignment, Score] = {}
        self.label = ""  # the searcher running now, for progress reports
        self.seeds: list[Assignment] | None = None
        self.baselines: dict[str, Plan] | None = None
        self.seeds_for: tuple[int, ...] = ()  # ids of the hints `seeds` was made with
        g = problem.graph
        self.outputs_alias = tuple(g.output_alias)
        self.output_pairs = tuple((k, a) for k, a in enumerate(self.outputs_alias) if a >= 0)
        fixed = problem.fixed
        self.constraint = None
        if fixed is not None:
            constrained: dict[int, object] = {}

            def constraint(v):  # the plan's regexes, matched once per value
                if v.id not in constrained:
                    constrained[v.id] = fixed.activation_sharding(v.name, v.shape)
                return constrained[v.id]

            self.constraint = constraint

    def trim(self) -> None:
        """Starts the propagation and simulator caches afresh once they hold more than
        `_CACHE_ENTRIES` entries: a long search would otherwise grow them without bound (measured:
        about 2 KB per entry and 10 entries per new plan on scanned Llama-8B, 0.6 KB and 21,000
        per plan unrolled). Scores are kept."""
        sim = self.simulator
        entries = len(self.prop_cache) + sim.cache_entries()
        if entries > _CACHE_ENTRIES:
            self.simulator = Simulator(self.hardware, self.topo, self.overlap)
            self.prop_cache = PropagationCache()


# Cache entries one problem's propagation and simulator may hold (0.6-2 KB each: a few hundred
# MB) before they are started afresh.
_CACHE_ENTRIES = 250_000

# The tables of the last few problems (a portfolio's members run one after another on one;
# a benchmark moves from problem to problem). Entries hold their graph alive, so ids in keys
# cannot be reused while an entry exists.
_SHARED: collections.OrderedDict[tuple, _Shared] = collections.OrderedDict()
_SHARED_MAX = 4


def clear_shared() -> None:
    """Forgets every shared score and cache (a benchmark timing searchers one by one from cold)."""
    _SHARED.clear()


def _shared(problem: SearchProblem, overlap: Overlap) -> _Shared:
    """The tables of every problem that scores plans alike (the same graph object, mesh,
    hardware, memory budget, fixed plan and overlap; hints and progress may differ)."""
    key = (
        id(problem.graph),
        problem.mesh,
        id(problem.hardware),
        problem.nodes,
        problem.capacity,
        id(problem.fixed),
        overlap,
    )
    hit = _SHARED.get(key)
    if hit is None:
        hit = _SHARED[key] = _Shared(problem, overlap)
        while len(_SHARED) > _SHARED_MAX:
            _SHARED.popitem(last=False)
    _SHARED.move_to_end(key)
    return hit


class Evaluator:
    """Scores assignments of one problem's decision space for one searcher.

    Scores are shared by every Evaluator of the same problem object in this process (the
    portfolio's searchers reuse each other's work); the count of evaluations, the best plan and
    the best-so-far curve are this searcher's. Its wall clock runs from `started` (a
    time.perf_counter() value; default: now), which a searcher sets to when its search began so
    that imports and building the decision space count against the budget too.

    Attributes:
      cache: assignment -> Score of every plan this searcher scored.
      evaluations: distinct plans this searcher scored (some may have been scored before by
        another searcher of the problem, and cost it a lookup).
      computed: those of them this searcher had to simulate.
      best: (cost, assignment) of the best plan this searcher scored.
      curve: the best-so-far step time of fitting plans over time and evaluations.
    """

    def __init__(
        self,
        problem: SearchProblem,
        space: DecisionSpace,
        overlap: Overlap = Overlap.BACKWARD_AND_PREFETCH,
        *,
        front: bool = False,
        started: float | None = None,
    ):
        self.problem = problem
        self.space = space
        self._layouts = InputLayouts(space)
        self.overlap = overlap
        self._shared = _shared(problem, overlap)
        self.topo = self._shared.topo
        self.cache: dict[Assignment, Score] = {}
        self.evaluations = 0
        self.computed = 0
        self.started = time.perf_counter() if started is None else started
        self.best: tuple[float, Assignment] | None = None
        self.curve: list[CurvePoint] = []
        self._next_report = 0.0
        self.scoring_s = 0.0  # seconds spent scoring plans new to this searcher
        # (step time, memory, assignment) of fitting plans no other scored plan dominates, kept
        # when the searcher reports a Pareto front.
        self.front: list[tuple[float, int, Assignment]] | None = [] if front else None

    @property
    def simulator(self) -> Simulator:
        """The problem's shared simulator (its caches)."""
        return self._shared.simulator

    @property
    def prop_cache(self) -> PropagationCache:
        """The problem's shared propagation cache."""
        return self._shared.prop_cache

    @property
    def label(self) -> str:
        return self._shared.label

    @label.setter
    def label(self, name: str) -> None:
        self._shared.label = name

    def propagation(self, assignment: Assignment) -> Propagation:
        g = self.problem.graph
        sh = self._shared
        inputs = self._layouts(assignment)
        outputs = {k: inputs[a] for k, a in sh.output_pairs if a in inputs}
        return propagate(
            g, self.problem.mesh, inputs, outputs=outputs, constraint=sh.constraint, cache=self.prop_cache
        )

    def report(self, assignment: Assignment) -> CostReport:
        return self.simulator.report(self.propagation(assignment))

    def score(self, assignment: Assignment) -> Score:
        hit = self.cache.get(assignment)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        s = self._shared.scores.get(assignment)
        if s is None and not self._layouts.valid(assignment):
            # A searcher's bug, not the user's: never the best, never a crash at the end.
            s = self._shared.scores[assignment] = Score(math.inf, 0, False, math.inf)
        if s is None:
            with gc_paused():  # an evaluation makes no cycles (see cost_model.gc_pause)
                step_time, peak = self.simulator.step_time_and_peak(self.propagation(assignment))
            cap = self.problem.capacity
            fits = peak <= cap
            cost = step_time if fits else MISFIT + peak / cap
            s = self._shared.scores[assignment] = Score(step_time, peak, fits, cost)
            self.computed += 1
            self._shared.trim()
        self.cache[assignment] = s
        self.evaluations += 1
        if self.front is not None and s.fits:
            add_to_front(self.front, s.step_time, s.memory, assignment)
        new_best = math.isfinite(s.cost) and (self.best is None or s.cost < self.best[0])
        if new_best:
            self.best = (s.cost, assignment)
            if s.fits:  # the curve follows plans that fit (every one beats every misfit)
                self.curve.append(CurvePoint(self.elapsed(), self.evaluations, s.step_time))
        if self.problem.progress is not None and (new_best or self.elapsed() >= self._next_report):
            self._next_report = self.elapsed() + 0.5
            best = self.cache[self.best[1]]
            self.problem.progress(
                Progress(
                    self.label,
                    self.elapsed(),
                    self.evaluations,
                    best.step_time if best.fits else math.inf,
                    best.memory,
                    new_best,
                )
            )
        self.scoring_s += time.perf_counter() - t0
        return s

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def exhausted(self, budget: Budget, *, margin: float = 0.0) -> bool:
        """Whether the budget is spent (`margin`: seconds to keep in hand for finishing)."""
        if budget.evaluations is not None and self.evaluations >= budget.evaluations:
            return True
        return budget.seconds is not None and self.elapsed() >= budget.seconds - margin

    def spent(self, budget: Budget) -> bool:
        """Whether the budget is spent, keeping in hand the time of one more evaluation and of
        the result's reports (about two evaluations each: the best plan's, and one per plan of
        the Pareto front)."""
        per = self.scoring_s / max(self.evaluations, 1)
        return self.exhausted(budget, margin=per * (3 + 2 * len(self.front or ())))

    def pareto(self, provenance: Provenance) -> tuple[tuple[Plan, CostReport], ...]:
        """The Pareto front of fitting plans by (step time, memory), fastest first, with reports."""
        entries = sorted(self.front or (), key=lambda t: t[:2])
        return tuple((self.space.plan(a, provenance), self.report(a)) for _, _, a in entries)

    def baselines(self) -> dict[str, Plan]:
        """The expert baseline plans of the problem's graph and mesh (search.baselines), made once
        per problem."""
        sh = self._shared
        if sh.baselines is None:
            sh.baselines = baseline_plans(self.problem.graph, self.problem.mesh)
        return sh.baselines

    def seeds(self) -> list[Assignment]:
        """Good starting points every searcher may use: the problem's hints, the expert baselines
        mapped into the decision space (those that are valid assignments), then the fully
        replicated plan."""
        sh = self._shared
        hints = tuple(id(h) for h in self.problem.hints)
        if sh.seeds is None or sh.seeds_for != hints:
            sh.seeds_for = hints
            out: list[Assignment] = []
            plans = (*self.problem.hints, *self.baselines().values())
            for plan in plans:
                a = self.space.assignment_of(plan)
                if a is not None and a not in out:
                    out.append(a)
            if self.space.empty not in out:
                out.append(self.space.empty)
            sh.seeds = out
        return list(sh.seeds)

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
        all_stats = {
            "evaluations": self.evaluations,
            "computed": self.computed,
            "seconds": round(self.elapsed(), 3),
        }
        all_stats.update(stats or {})
        return SearchResult(plan, report, tuple(self.curve), status, all_stats, front)


def relative(score: Score, reference: Score) -> float:
    """A reward in (0, 1]: 1 for a plan `reference.cost` times as good... i.e. reference/cost, capped."""
    if not math.isfinite(score.cost) or score.cost <= 0:
        return 0.0
    return min(1.0, reference.cost / score.cost) if reference.cost > 0 else 0.0


def add_to_front(
    front: list[tuple[float, int, Assignment]], time_s: float, memory: int, a: Assignment
) -> None:
    """Adds (step time, memory) to a Pareto front in place unless an entry dominates or equals it."""
    if any(t <= time_s and m <= memory for t, m, _ in front):
        return
    front[:] = [(t, m, b) for t, m, b in front if not (time_s <= t and memory <= m)]
    front.append((time_s, memory, a))
