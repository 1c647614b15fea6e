"""`ilp`: sharding strategies chosen by an integer program over a coarsened graph (Alpa §4.2), CP-SAT.

search.ilp_model builds the program's data (search.ilp_nodes): one one-hot per node (each
decision of the space, each input tensor over the shardings its decisions allow, each op that
combines two nodes over the factor assignments propagation gives it), pair booleans for the reads
between nodes, and live bytes at a set of program points. search.ilp_program states it for
CP-SAT: minimise compute + exposed communication subject to the memory rows ≤ capacity.

The solution's decisions are the plan. The simulator is the arbiter: it scores the expert
baselines first (the model's best of them warm-starts the solver), then the solution and the
runners-up the solver finds when asked to exclude it, then climbs from the best plan (and from
the others) while the budget lasts; the best plan is returned.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np

from cost_model.simulate import Overlap
from search.evaluate import Evaluator
from search.ilp_model import Builder
from search.ilp_nodes import Model, NodeKind, OutOfTime
from search.ilp_program import Program, Solution, Solved
from search.problem import Budget, SearchError, SearchProblem, SearchResult, Status
from search.space import Assignment, build_space


@dataclasses.dataclass
class ILP:
    """Solves the strategy program with CP-SAT; returns the simulator's best of its plans and the seeds.

    Attributes:
      seed: CP-SAT's random seed.
      workers: CP-SAT search workers.
      free: Alpa's formulation: every op that reads two nodes picks any factor assignment (a
        relaxation: propagation, which the simulator runs, may not follow it).
      max_strategies: the most strategies a free op keeps (its cheapest on its own).
      memory_points: how many program points the memory rows are written at.
      candidates: solutions the simulator scores: the optimum, then runners-up (each solve
        excludes the decisions found before).
      deterministic: one CP-SAT worker under a deterministic-time limit too (`workers` is then
        ignored), so that the same seed gives the same plan unless the wall-clock limit ends the
        search first.
    """

    seed: int = 0
    workers: int = 2
    free: bool = False
    max_strategies: int = 32
    memory_points: int = 24
    candidates: int = 3
    deterministic: bool = True

    def search(self, problem: SearchProblem, budget: Budget) -> SearchResult:
        clock = _Clock(budget)  # from here: importing OR-Tools the first time takes ~0.3 s
        try:
            from ortools.sat.python import cp_model  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise SearchError("the ilp searcher needs OR-Tools: pip install ortools") from e
        space = build_space(problem.graph, problem.mesh, fixed=problem.fixed)
        ev = Evaluator(problem, space, started=clock.started)
        # Plans this search scores (scores another search shared count too: the same seed and
        # budget then give the same plan).
        evaluations = budget.evaluations if budget.evaluations is not None else 1 << 30
        stats: dict[str, float | int | str] = {}

        model = self._build(problem, space, ev, clock, stats)
        seeds, hint = ev.seeds(), None
        if model is not None:
            seeds, hint = _rank(model, space, seeds, problem.capacity)

        # The simulator is the arbiter: it scores the seeds (best by the model first), the
        # solution and runners-up (each solve excludes the decisions found before) while the
        # budget lasts. The seeds go first, up to 60% of the budget: the result is then never
        # worse than the best of them, however long the solver takes to find a poor solution
        # (unrolled Llama-8B over data=4,fsdp=4,model=4: a 1,036 ms plan after 43 s of CP-SAT,
        # where the seeds climb to 248 ms), and the solver is given what is left once a
        # simulation's time is known.
        scored: list[Assignment] = []
        pending = list(seeds)

        def score_seeds(until: float | None) -> None:
            while pending:
                late = until is not None and time.perf_counter() > until
                if scored and (len(ev.cache) >= evaluations or not clock.room(1) or late):
                    break
                a = pending.pop(0)
                clock.time(ev.score, a)
                scored.append(a)

        score_seeds(clock.at(0.6) if model is not None else None)
        program, first = None, Solution(Solved.UNKNOWN, None, float("nan"), float("nan"))
        if model is not None:
            program, first = self._solve(model, problem, hint, clock, stats)
        found: list[Assignment] = []
        if first.chosen is not None:
            found.append(model.assignment(space, first.chosen))
            clock.time(ev.score, found[0])
        score_seeds(None)
        sol = first
        binding = (
            model is not None
            and first.status is Solved.OPTIMAL
            and _memory_binds(model, first, problem.capacity)
        )
        recalibrated = False
        while program is not None and sol.chosen is not None and len(found) < self.candidates:
            if first.status is Solved.INFEASIBLE or len(ev.cache) >= evaluations or not clock.room(2):
                break
            last = ev.cache[found[-1]]
            ratio = sol.memory / last.memory if last.memory else 1.0  # the model's bytes over the simulator's
            optimistic = not last.fits and sol.memory <= program.capacity
            if not recalibrated and (optimistic or (last.fits and binding)):
                # The model's memory is off where the limit bites: bound it by what the simulator's
                # limit means in the model's terms near this plan, and solve again.
                program.set_capacity(problem.capacity * ratio)
                recalibrated = True
            else:
                program.exclude(sol.chosen)
            t = time.perf_counter()
            sol = program.solve(clock.for_solver(model.exact), self.workers, self.seed, self.deterministic)
            stats["solve_seconds"] = round(float(stats["solve_seconds"]) + time.perf_counter() - t, 3)
            if sol.chosen is None:
                break
            found.append(model.assignment(space, sol.chosen))
            clock.time(ev.score, found[-1])

        proven = (
            first.status is Solved.OPTIMAL
            and not self.free  # the free program relaxes propagation: its optimum proves nothing
            and model.exact  # else the program knows only the pairs a sample of plans reaches
            and not binding  # else the proof rests on the model's memory, which is approximate
            and found
            and len(scored) == len(seeds)
            # The simulator agrees (to the model's rounding) that no seed beats it.
            and ev.cache[found[0]].cost <= ev.cache[ev.best_assignment()].cost * (1 + 1e-6)
        )
        if not proven:
            # Budget left and no proof: climb from the best plan, one decision at a time.
            stats["polished"] = _polish(ev, space, clock, evaluations, [*found, *scored])

        stats.update(
            ilp_status=first.status.value,
            objective=first.objective,
            best_bound=first.bound,
            gap=_gap(first.objective, first.bound),
            ilp_memory=first.memory,
            seeds_scored=len(scored),
            candidates_scored=len(found),
        )
        fitting = [ev.cache[a].step_time for a in scored if ev.cache[a].fits]
        stats["best_seed_step_time"] = min(fitting) if fitting else float("nan")
        if found:
            stats["ilp_plan_step_time"] = ev.cache[found[0]].step_time
            stats["ilp_plan_memory"] = ev.cache[found[0]].memory
        if first.memory_needed is not None:
            stats["memory_needed"] = int(first.memory_needed)

        best = ev.cache.get(ev.best_assignment())
        status = None  # the evaluator's: feasible if the best plan fits, else infeasible
        if proven and best.fits:
            # Proven best under the model, and the simulator agrees it beats every seed.
            status = Status.OPTIMAL
        elif first.status is Solved.INFEASIBLE and best is not None and not best.fits:
            status = Status.INFEASIBLE
        return ev.result("ilp", seed=self.seed, status=status, stats=stats)

    def _build(
        self, problem: SearchProblem, space, ev: Evaluator, clock: _Clock, stats: dict
    ) -> Model | None:
        """The model, or None when building it would take more than 70% of the budget."""
        t = time.perf_counter()
        try:
            model = Builder(
                problem.graph,
                space,
                ev.topo,
                overlap=ev.overlap is not Overlap.NONE,
                free=self.free,
                max_strategies=self.max_strategies,
                constraint=_constraint(problem),
                seeds=ev.seeds(),
                deadline=clock.at(0.7),
            ).build(memory_points=self.memory_points)
        except OutOfTime:
            stats["build_seconds"] = round(time.perf_counter() - t, 3)
            return None
        stats["build_seconds"] = round(time.perf_counter() - t, 3)
        stats.update(
            n_strategies=sum(n.size for n in model.nodes),
            n_nodes=len(model.nodes),
            n_coarse_ops=model.count(NodeKind.MERGE) + model.count(NodeKind.FREE),
            n_ops=model.n_ops,
            memory_points=len(model.memory),
        )
        # Until a simulation is timed, guess it from the build (both walk the whole graph).
        clock.score_seconds = 0.5 * (time.perf_counter() - t)
        return model

    def _solve(self, model: Model, problem: SearchProblem, hint, clock: _Clock, stats: dict):
        """(the CP-SAT program or None, its first solution). When the program would not be built
        in time, the model's optimum is found by evaluating it under every valid assignment."""
        t = time.perf_counter()
        program = None
        try:
            program = Program(model, problem.capacity, hint, deadline=clock.at(0.85))
        except OutOfTime:
            pass
        stats["program_seconds"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        if program is not None:
            stats.update(n_vars=program.n_vars, n_constraints=program.n_constraints, n_edges=program.n_pairs)
            sol = program.solve(clock.for_solver(model.exact), self.workers, self.seed, self.deterministic)
            stats["solved_by"] = "cp-sat"
        else:
            sol = _enumerated(model, problem.capacity)
            stats["solved_by"] = "enumeration" if sol.chosen is not None else "none"
        stats["solve_seconds"] = round(time.perf_counter() - t, 3)
        return program, sol


def _memory_binds(model: Model, solution: Solution, capacity: float) -> bool:
    """Whether the memory limit changed the model's optimum (or may have, when unknown)."""
    free = model.best_world(float("inf")) if model.exact else None
    if free is None:
        return solution.memory > 0.8 * capacity
    times, _ = model.predict(np.array([solution.chosen]))
    return free[0].step_time < times[0] * (1 - 1e-9)


def _polish(ev: Evaluator, space, clock: _Clock, evaluations: int, starts: list[Assignment]) -> int:
    """Climbs from the best plan: scores its neighbours (one decision changed), moving to any
    that is better, then those two decisions away. When no neighbour is better and the budget
    lasts, climbs again from each of `starts` in turn (the solver's candidates, the seeds): from
    a plan that does not fit, the climb first sheds memory. Returns the plans scored."""
    n = 0
    done: set[Assignment] = set()
    for start in (ev.best_assignment(), *starts):
        if start in done or start not in ev.cache:
            continue
        done.add(start)
        cur = start
        for distance in (1, 2):
            moved = True
            while moved:
                moved = False
                for a in _neighbours(space, cur, distance):
                    s = ev.cache.get(a)
                    if s is None:
                        if len(ev.cache) >= evaluations or not clock.room(1):
                            return n
                        s = clock.time(ev.score, a)
                        n += 1
                    if s.cost < ev.cache[cur].cost:
                        cur = a
                        moved = distance == 1
                        break
    return n


def _neighbours(space, a: Assignment, distance: int):
    """Valid assignments that differ from `a` in `distance` decisions, in a fixed order."""
    for ds in itertools.combinations(range(len(a)), distance):
        for opts in itertools.product(*(space.decisions[d].options for d in ds)):
            if any(o == a[d] for d, o in zip(ds, opts, strict=True)):
                continue
            b = list(a)
            for d, o in zip(ds, opts, strict=True):
                b[d] = o
            if space.valid(tuple(b)):
                yield tuple(b)


def _rank(
    model: Model, space, seeds: list[Assignment], capacity: float
) -> tuple[list[Assignment], tuple | None]:
    """The seeds the model can evaluate, fitting and fastest first; and the node strategies of
    the first (the solver's warm start)."""
    ranked = []
    for k, a in enumerate(seeds):
        e = model.evaluate(space, a)
        if e is not None:
            ranked.append((e.memory > capacity, e.step_time, k, a, e.chosen))
    ranked.sort(key=lambda r: r[:3])
    return [r[3] for r in ranked], (ranked[0][4] if ranked else None)


def _enumerated(model: Model, capacity: float) -> Solution:
    """The model's best over the assignments it knows (all valid ones, or its sample)."""
    best = model.best_world(capacity)
    if best is None:
        return Solution(Solved.UNKNOWN, None, float("nan"), float("nan"))
    e, fits = best
    if fits:
        status = Solved.OPTIMAL if model.exact else Solved.FEASIBLE
        return Solution(status, e.chosen, e.step_time, e.step_time if model.exact else float("nan"), e.memory)
    return Solution(Solved.INFEASIBLE, e.chosen, float("nan"), float("nan"), e.memory, e.memory)


class _Clock:
    """The wall budget: how much is left, and how long the solver may run."""

    def __init__(self, budget: Budget):
        self.budget = budget
        self.started = time.perf_counter()
        self.score_seconds = 0.0  # what the last simulation took (a guess until one is timed)

    def time(self, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        self.score_seconds = time.perf_counter() - t
        return out

    def at(self, fraction: float) -> float | None:
        """The time.perf_counter() value when `fraction` of the wall budget is spent."""
        if self.budget.seconds is None:
            return None
        return self.started + fraction * self.budget.seconds

    def left(self) -> float:
        if self.budget.seconds is None:
            return float("inf")
        return self.budget.seconds - (time.perf_counter() - self.started)

    def room(self, simulations: int) -> bool:
        """Whether `simulations` more fit, with the result's own simulation after them."""
        return self.left() > (simulations + 1) * self.score_seconds + self.margin()

    def margin(self) -> float:
        return 0.02 * self.budget.seconds if self.budget.seconds is not None else 0.0

    def for_solver(self, exact: bool) -> float | None:
        """Seconds the solver may take: what is left after scoring its plan and writing the
        result (a simulation each); half of that for a model that knows only a sample of the
        space (`Model.exact` false), whose optimum is only as good as the sample, so that the
        simulator's climb from the best plan gets the other half (unrolled Llama-8B over
        data=4,fsdp=4,model=4, 60 s: CP-SAT's first solution after 43 s was a 1,036 ms plan, the
        climb reaches 248 ms). None without a wall budget."""
        if self.budget.seconds is None:
            return None
        left = self.left() - 2 * self.score_seconds - self.margin()
        return max(0.1, left if exact else 0.5 * left)


def _constraint(problem: SearchProblem):
    """The fixed plan's constraints on named activations, as propagation applies them."""
    fixed = problem.fixed
    if fixed is None or not fixed.activations:
        return None
    return lambda v: fixed.activation_sharding(v.name, v.shape)


def _gap(objective: float, bound: float) -> float:
    if not objective or objective != objective:
        return float("nan")
    return max(0.0, (objective - bound) / abs(objective))
