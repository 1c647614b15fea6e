"""The CP-SAT program of an ILP Model: one-hots, pair booleans, the overlap rule and memory rows.

It minimises compute + exposed communication, where backward collectives and forward parameter
gathers hide behind compute up to that compute (the simulator's overlap rule: exposed_bwd ≥
comm_bwd − compute_bwd), subject to the memory rows ≤ capacity; when no choice fits, it finds the
least peak memory instead.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np

from search.ilp_nodes import Model, Part, check_deadline
from search.space import Assignment

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
            check_deadline(deadline, "building the CP-SAT program")
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
            (
                pt.const + sum(float(b.max()) for b in (*pt.terms.values(), *pt.pairs.values()))
                for pt in model.memory
            ),
            default=1.0,
        )
        self.mem_unit = max(1.0, min(capacity, largest) / _SCALE)
        self.min_memory = 0.0
        for pt in model.memory:
            check_deadline(deadline, "building the CP-SAT program")
            self.rows.append(self._memory_row(pt, hints))
            low = pt.const + sum(float(b.min()) for b in (*pt.terms.values(), *pt.pairs.values()))
            self.min_memory = max(self.min_memory, low)
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

    def _memory_row(self, pt, hints) -> object:
        """The bytes live at one memory point, in `mem_unit`s. A pair term's bytes go on its nodes
        as far as they are a sum of a part per strategy of each (the copy a layout needs whatever
        the other node does), the rest on the pair's booleans."""
        per_node = {k: b.astype(np.float64) for k, b in pt.terms.items()}
        pair_rest = []
        for (i, j), m in pt.pairs.items():
            rows = m.min(axis=1)
            rest = m - rows[:, None]
            cols = rest.min(axis=0)
            rest = rest - cols[None, :]
            per_node[i] = per_node[i] + rows if i in per_node else rows
            per_node[j] = per_node[j] + cols if j in per_node else cols
            if np.rint(rest / self.mem_unit).any():
                pair_rest.append((i, j, rest))
        terms = [round(pt.const / self.mem_unit)]
        for k, b in per_node.items():
            weights = np.rint(b / self.mem_unit).astype(np.int64)
            terms += [int(weights[s]) * self.x[k][s] for s in np.flatnonzero(weights)]
        for i, j, rest in pair_rest:
            for (a, b), var in self._pairs(i, j, hints).items():
                w = int(np.rint(rest[a, b] / self.mem_unit))
                if w:
                    terms.append(w * var)
        return sum(terms)

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
            _follows(m, xi, xj, rows, cols)
        elif all(len(col) <= 1 for col in cols):  # i follows from j
            c = {(a, b): xj[b] for a, b in reach}
            _follows(m, xj, xi, cols, rows)
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
            # One worker under a deterministic-time limit: the same seed gives the same solution.
            # (Interleaved multi-worker search aborts the process with "Check failed:
            # heuristics.fixed_search != nullptr" in OR-Tools 9.15 on some of these models, e.g.
            # the least-memory model of Llama-70B on data=2,model=4.)
            p.num_workers = 1
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


def _follows(m, x_from, x_to, leads_to: list[list[int]], led_from: list[list[int]]) -> None:
    """States that x_to follows from x_from: each x_to strategy is chosen exactly when one of
    the x_from strategies leading to it is (`led_from`), and an x_from strategy that leads to
    none (`leads_to`) is never chosen."""
    for k, members in enumerate(led_from):
        m.Add(sum(x_from[a] for a in members) == x_to[k])
    for a, targets in enumerate(leads_to):
        if not targets:
            m.Add(x_from[a] == 0)
