"""`ilp`: sharding strategies chosen by an integer program over a coarsened graph (Alpa §4.2), CP-SAT.

search.ilp_model builds the program's data: one one-hot per node (each decision of the space, each
input tensor over the shardings its decisions allow, each op that combines two nodes over the
factor assignments propagation gives it), pair booleans for the reads between nodes, and live
bytes at a set of program points. This module states it for CP-SAT: minimise compute +
exposed communication, where backward collectives and forward parameter gathers hide behind
compute up to that compute (the simulator's overlap rule: exposed_bwd ≥ comm_bwd − compute_bwd),
subject to the memory rows ≤ capacity.

The solution's decisions are the plan. The simulator is the arbiter: it scores the solution (and
the runners-up the solver finds when asked to exclude it) along with the expert baselines, the
best of which warm-starts the solver, and the best plan is returned.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import time

import numpy as np

from cost_model.simulate import Overlap
from search.evaluate import Evaluator
from search.ilp_model import Builder, Model, NodeKind, OutOfTime, Part
from search.problem import Budget, SearchError, SearchProblem, SearchResult, Status
from search.space import Assignment, build_space

# Costs are scaled so that the dearest choice of every node and pair sums to about this many units.
_SCALE = 10**9
# CP-SAT deterministic-time limit of one solve when the budget has no wall-clock limit.
_DETERMINISTIC_TIME = 30.0


class Solved(enum.Enum):
    """What a solve proved (stats['ilp_status'] is its value)."""

    OPTIMAL = "optimal"  # best under the model
    FEASIBLE = "feasible"  # a solution, not proven best when time ran out
    INFEASIBLE = "infeasible"  # no choice fits the memory limit in the model
    UNKNOWN = "unknown"  # no solution in time


@dataclasses.dataclass(frozen=True, slots=True)
class Solution:
    """What one solve found.

    Attributes:
      status: what the solve proved.
      chosen: per node, the strategy picked (None when nothing was found).
      objective: predicted seconds per step of the solution (nan when none).
      bound: the solver's lower bound on it, seconds.
      memory: per-device bytes at the fullest memory point of the solution (nan when none).
      memory_needed: when infeasible, the least such bytes any choice reaches (as far as solved).
    """

    status: Solved
    chosen: tuple[int, ...] | None
    objective: float
    bound: float
    memory: float = float("nan")
    memory_needed: float | None = None


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
      deterministic: an interleaved search under a deterministic-time limit too, so that the
        same seed gives the same plan unless the wall-clock limit ends the search first.
    """

    seed: int = 0
    workers: int = 2
    free: bool = False
    max_strategies: int = 32
    memory_points: int = 24
    candidates: int = 3
    deterministic: bool = True

    def search(self, problem: SearchProblem, budget: Budget) -> SearchResult:
        try:
            from ortools.sat.python import cp_model  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise SearchError("the ilp searcher needs OR-Tools: pip install ortools") from e
        clock = _Clock(budget)
        space = build_space(problem.graph, problem.mesh, fixed=problem.fixed)
        ev = Evaluator(problem, space)
        # Plans this search scores (scores another search shared count too: the same seed and
        # budget then give the same plan).
        evaluations = budget.evaluations if budget.evaluations is not None else 1 << 30
        stats: dict[str, float | int | str] = {}

        model = self._build(problem, space, ev, clock, stats)
        seeds, hint = ev.seeds(), None
        if model is not None:
            seeds, hint = _rank(model, space, seeds, problem.capacity)
        program, first = None, Solution(Solved.UNKNOWN, None, float("nan"), float("nan"))
        if model is not None:
            program, first = self._solve(model, problem, hint, clock, stats)

        # The simulator is the arbiter: it scores the solution, the seeds (best by the model first)
        # and runners-up (each solve excludes the decisions found before) while the budget lasts.
        found: list[Assignment] = []
        if first.chosen is not None:
            found.append(model.assignment(space, first.chosen))
            clock.time(ev.score, found[0])
        scored: list[Assignment] = []
        for a in seeds:
            if (scored or found) and (not clock.room(1) or len(ev.cache) >= evaluations):
                break
            clock.time(ev.score, a)
            scored.append(a)
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
            sol = program.solve(clock.for_solver(), self.workers, self.seed, self.deterministic)
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
            stats["polished"] = _polish(ev, space, clock, evaluations)

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
            sol = program.solve(clock.for_solver(), self.workers, self.seed, self.deterministic)
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


def _polish(ev: Evaluator, space, clock: _Clock, evaluations: int) -> int:
    """Scores the neighbours of the best plan (one decision changed), moving to any that is
    better, while the budget lasts; then those two decisions away. Returns the plans scored."""
    n = 0
    for distance in (1, 2):
        moved = True
        while moved:
            moved = False
            start = ev.best_assignment()
            for a in _neighbours(space, start, distance):
                if a in ev.cache:
                    continue
                if len(ev.cache) >= evaluations or not clock.room(1):
                    return n
                clock.time(ev.score, a)
                n += 1
                if ev.best_assignment() != start:
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

    def for_solver(self) -> float | None:
        """Seconds the solver may take: what is left after scoring its plan and writing the
        result (a simulation each). None without a wall budget."""
        if self.budget.seconds is None:
            return None
        return max(0.1, self.left() - 2 * self.score_seconds - self.margin())


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


class Program:
    """The CP-SAT program of one Model.

    Variables: a one-hot x per node (a node of one strategy is the constant 1); pair booleans
    per merge node (its combo: Σ_j c_ij = x_a[i], Σ_i c_ij = x_b[j], x_op[s] = Σ_{table=s} c_ij)
    and per edge whose cost does not split into a cost per end (Σ_j e_ij = x_i, Σ_i e_ij = y_j).
    An input node's strategies sum to the decision option they take. Costs are integers in
    `unit` seconds.
    """

    def __init__(
        self,
        model: Model,
        capacity: float,
        hint: tuple[int, ...] | None = None,
        *,
        deadline: float | None = None,
    ):
        from ortools.sat.python import cp_model

        self._cp = cp_model
        self.model = model
        self.capacity = capacity
        self.cp = cp_model.CpModel()
        self.n_pairs = 0
        nodes = model.nodes
        cost = [n.cost.copy() for n in nodes]
        pair_cost: list[tuple[int, int, np.ndarray]] = []  # (node i, node j, seconds per pair and Part)
        for (i, j), mat in model.edges.items():
            # The part of the matrix that is a cost per row plus a cost per column goes on the nodes.
            rows = mat.min(axis=1)
            rest = mat - rows[:, None, :]
            cols = rest.min(axis=0)
            rest = rest - cols[None, :, :]
            cost[i] += rows
            cost[j] += cols
            if rest.max() > 0:
                pair_cost.append((i, j, rest))
        pair_cost += [(combo.a, combo.b, combo.cost) for combo in model.combos.values()]
        total = sum(float(c.max(axis=0).sum()) for c in cost)
        total += sum(float(p.max(axis=(0, 1)).sum()) for _, _, p in pair_cost)
        self.unit = max(total, 1e-12) / _SCALE

        m = self.cp
        self.x: list[list] = []
        for k, n in enumerate(nodes):
            if n.size == 1:
                self.x.append([1])
            else:
                xs = [m.NewBoolVar(f"x{k}_{s}") for s in range(n.size)]
                m.AddExactlyOne(xs)
                self.x.append(xs)
        for k, n in enumerate(nodes):
            for d, picks in n.links:
                for o in range(nodes[d].size):
                    m.Add(sum(self.x[k][s] for s in range(n.size) if picks[s] == o) == self.x[d][o])
        hints = dict(enumerate(hint)) if hint is not None else {}
        for k, s in hints.items():
            if nodes[k].size > 1:
                for i, var in enumerate(self.x[k]):
                    m.AddHint(var, int(i == s))

        parts: list[list] = [[] for _ in Part]
        for k in range(len(nodes)):
            self._charge(parts, cost[k], self.x[k])
        self._pair_vars: dict[tuple[int, int], dict[tuple[int, int], object]] = {}
        for i, j, pc in pair_cost:
            if deadline is not None and time.perf_counter() > deadline:
                raise OutOfTime("building the CP-SAT program passed its deadline")
            pairs = self._pairs(i, j, hints)
            ab = np.array(list(pairs), dtype=np.int64).reshape(-1, 2)
            self._charge(parts, pc[ab[:, 0], ab[:, 1]], list(pairs.values()))
        for k, combo in model.combos.items():
            members: list[list] = [[] for _ in range(nodes[k].size)]
            for (a, b), var in self._pairs(combo.a, combo.b, hints).items():
                members[combo.table[a, b]].append(var)
            for s, vs in enumerate(members):
                m.Add(sum(vs) == self.x[k][s])
        self.parts = [sum(p) for p in parts]

        self.rows = []
        largest = max(
            (pt.const + sum(float(b.max()) for b in pt.terms.values()) for pt in model.memory), default=1.0
        )
        self.mem_unit = max(1.0, min(capacity, largest) / _SCALE)
        self.min_memory = 0.0
        for pt in model.memory:
            terms = [round(pt.const / self.mem_unit)]
            for k, b in pt.terms.items():
                weights = np.rint(b / self.mem_unit).astype(np.int64)
                terms += [int(weights[s]) * self.x[k][s] for s in np.flatnonzero(weights)]
            self.min_memory = max(self.min_memory, pt.const + sum(float(b.min()) for b in pt.terms.values()))
            self.rows.append(sum(terms))
        # One literal per bound the rows were given (set_capacity): the active one is fixed true.
        self._levels: dict[int, object] = {}
        self.set_capacity(capacity)
        fwd, bwd = self.parts[Part.FWD_COMPUTE], self.parts[Part.BWD_COMPUTE]
        exposed_fwd = m.NewIntVar(0, 4 * _SCALE, "exposed_fwd")
        exposed_bwd = m.NewIntVar(0, 4 * _SCALE, "exposed_bwd")
        m.Add(exposed_fwd >= self.parts[Part.FWD_COMM] - fwd)
        m.Add(exposed_bwd >= self.parts[Part.BWD_COMM] - bwd)
        self.time = (
            fwd
            + bwd
            + self.parts[Part.OTHER_COMPUTE]
            + self.parts[Part.EXPOSED_COMM]
            + exposed_fwd
            + exposed_bwd
        )
        m.Minimize(self.time)
        self.n_vars = len(m.Proto().variables)
        self.n_constraints = len(m.Proto().constraints)

    # -- building ---------------------------------------------------------------------------------

    def _charge(self, parts: list[list], seconds: np.ndarray, variables: list) -> None:
        """Adds Σ_s seconds[s, p] · variables[s] to each Part's sum (in units; 1 is a constant)."""
        weights = np.rint(seconds / self.unit).astype(np.int64)
        for p in Part:
            for s in np.flatnonzero(weights[:, p]):
                parts[p].append(int(weights[s, p]) * variables[s])

    def _pairs(self, i: int, j: int, hints) -> dict[tuple[int, int], object]:
        """Pair booleans c[(a, b)] = x_i[a] ∧ x_j[b] of nodes i and j (made once per pair of nodes),
        for the pairs some valid assignment reaches when the model knows them (else all), with
        Σ_b c[(a, b)] = x_i[a] and Σ_a c[(a, b)] = x_j[b]. When one node's strategy determines the
        other's, its own booleans are the pair booleans."""
        hit = self._pair_vars.get((i, j))
        if hit is not None:
            return hit
        xi, xj = self.x[i], self.x[j]
        reach = self.model.reachable(i, j)
        rows: list[list[int]] = [[] for _ in xi]
        cols: list[list[int]] = [[] for _ in xj]
        for a, b in reach:
            rows[a].append(b)
            cols[b].append(a)
        m = self.cp
        if len(xi) == 1 or len(xj) == 1:
            c = {(a, b): xj[b] if len(xi) == 1 else xi[a] for a, b in reach}
        elif all(len(r) <= 1 for r in rows):  # j follows from i
            c = {(a, b): xi[a] for a, b in reach}
            for b, members in enumerate(cols):
                m.Add(sum(xi[a] for a in members) == xj[b])
            for a, r in enumerate(rows):
                if not r:
                    m.Add(xi[a] == 0)
        elif all(len(col) <= 1 for col in cols):  # i follows from j
            c = {(a, b): xj[b] for a, b in reach}
            for a, members in enumerate(rows):
                m.Add(sum(xj[b] for b in members) == xi[a])
            for b, col in enumerate(cols):
                if not col:
                    m.Add(xj[b] == 0)
        else:
            c = {(a, b): m.NewBoolVar(f"c{i}_{a}_{j}_{b}") for a, b in reach}
            for a, r in enumerate(rows):
                m.Add(sum(c[(a, b)] for b in r) == xi[a])
            for b, col in enumerate(cols):
                m.Add(sum(c[(a, b)] for a in col) == xj[b])
            hi, hj = hints.get(i), hints.get(j)
            if hi is not None and hj is not None:
                for (a, b), var in c.items():
                    m.AddHint(var, int(a == hi and b == hj))
            self.n_pairs += len(c)
        self._pair_vars[(i, j)] = c
        return c

    # -- solving ----------------------------------------------------------------------------------

    def exclude(self, chosen: tuple[int, ...]) -> None:
        """Forbids the decisions of `chosen` (to find the runner-up)."""
        lits = []
        for d in self.model.decision_nodes:
            var = self.x[d][chosen[d]]
            if not isinstance(var, int):
                lits.append(var.Not())
        if lits:
            self.cp.AddBoolOr(lits)

    def fix(self, space, assignment: Assignment) -> None:
        """Fixes the decisions to `assignment` (the program then prices that one plan)."""
        for i, d in enumerate(self.model.decision_nodes):
            var = self.x[d][space.decisions[i].options.index(assignment[i])]
            if not isinstance(var, int):
                self.cp.Add(var == 1)

    def set_capacity(self, capacity: float) -> None:
        """Bounds the memory rows by `capacity` bytes (instead of the bound before; inf: none)."""
        self.capacity = capacity
        if not math.isfinite(capacity):
            self._activate(self.cp, None)
            return
        bound = int(capacity // self.mem_unit)
        if bound not in self._levels:
            lit = self.cp.NewBoolVar(f"capacity_{bound}")
            for row in self.rows:
                self.cp.Add(row <= bound).OnlyEnforceIf(lit)
            self._levels[bound] = lit
        self._activate(self.cp, bound)

    def _activate(self, cp, bound: int | None) -> None:
        for b, lit in self._levels.items():
            domain = cp.Proto().variables[lit.Index()].domain
            domain[0] = domain[1] = int(b == bound)

    def solve(self, seconds: float | None, workers: int, seed: int, deterministic: bool) -> Solution:
        """Minimises step time; when no choice fits, the least peak memory instead (`memory_needed`)."""
        if self.min_memory > self.capacity:
            return self._least_memory(seconds, workers, seed, deterministic)
        status, solver = self._run(self.cp, seconds, workers, seed, deterministic)
        if status in (Solved.OPTIMAL, Solved.FEASIBLE):
            return Solution(
                status,
                self._chosen(solver),
                self.unit * solver.objective_value,
                self.unit * solver.best_objective_bound,
                self._memory(solver),
            )
        if status is Solved.INFEASIBLE:
            return self._least_memory(seconds, workers, seed, deterministic)
        return Solution(Solved.UNKNOWN, None, float("nan"), float("nan"))

    def _least_memory(self, seconds, workers, seed, deterministic) -> Solution:
        """Re-solves for the least peak memory: the memory a plan would need."""
        peak_model = self.cp.Clone()
        self._activate(peak_model, None)
        peak_model.clear_objective()
        peak = peak_model.NewIntVar(0, 2**50, "peak")
        for row in self.rows:
            peak_model.Add(row <= peak)
        peak_model.Minimize(peak)
        status, solver = self._run(peak_model, seconds, workers, seed, deterministic)
        if status in (Solved.OPTIMAL, Solved.FEASIBLE):
            needed = self.mem_unit * solver.objective_value
            return Solution(
                Solved.INFEASIBLE, self._chosen(solver), float("nan"), float("nan"), needed, needed
            )
        return Solution(Solved.INFEASIBLE, None, float("nan"), float("nan"), memory_needed=self.min_memory)

    def _run(self, cp, seconds, workers, seed, deterministic):
        solver = self._cp.CpSolver()
        p = solver.parameters
        p.random_seed = seed
        p.num_workers = max(1, workers)
        # Probing in presolve costs seconds on these models and the search needs none of it: once the
        # decisions are fixed, unit propagation fixes everything else.
        p.cp_model_probing_level = 0
        if deterministic:
            p.interleave_search = True
            p.max_deterministic_time = _DETERMINISTIC_TIME if seconds is None else max(0.1, seconds)
        if seconds is not None:
            p.max_time_in_seconds = max(0.1, seconds)
        code = solver.Solve(cp)
        name = {
            self._cp.OPTIMAL: Solved.OPTIMAL,
            self._cp.FEASIBLE: Solved.FEASIBLE,
            self._cp.INFEASIBLE: Solved.INFEASIBLE,
        }.get(code, Solved.UNKNOWN)
        return name, solver

    def _memory(self, solver) -> float:
        return self.mem_unit * max((solver.Value(row) for row in self.rows), default=0)

    def _chosen(self, solver) -> tuple[int, ...]:
        out = []
        for xs in self.x:
            if len(xs) == 1:
                out.append(0)
            else:
                out.append(next(s for s, v in enumerate(xs) if solver.BooleanValue(v)))
        return tuple(out)
