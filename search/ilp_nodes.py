"""The coarsened problem the ILP solves: strategy nodes, their costs by Part, pair booleans, memory points.

search.ilp_model builds a `Model`; search.ilp_program states it for CP-SAT. The model predicts the
step time and memory of any choice of strategies itself (`Model.predict`), as the program prices
it, and knows every node's strategy under the assignments of the decisions it was built with
(`known_assignments`). Costs are seconds, split in `Part`s so that the solver can apply the simulator's overlap rule
(backward collectives and forward parameter gathers hide behind compute, up to that compute).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import random
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ir.sharding import Sharding
from search.ilp_factors import Groups
from search.space import Assignment, DecisionSpace


class Part(enum.IntEnum):
    """What a second of cost is, for the overlap rule."""

    FWD_COMPUTE = 0
    BWD_COMPUTE = 1
    OTHER_COMPUTE = 2
    FWD_COMM = 3  # parameter all-gathers outside the backward pass: may hide behind forward compute
    BWD_COMM = 4  # collectives of the backward pass: may hide behind backward compute
    EXPOSED_COMM = 5


N_PARTS = len(Part)


class NodeKind(enum.Enum):
    CONST = "const"  # one strategy: what no decision changes
    DECISION = "decision"  # per strategy, one option of a decision of the space
    INPUT = "input"  # an input tensor's shardings that its decisions allow
    MERGE = "merge"  # an op's factors as propagation derives them from two nodes
    FREE = "free"  # any assignment of mesh axes to an op's factors


@dataclasses.dataclass(eq=False)
class Node:
    """One one-hot choice of the ILP.

    Attributes:
      kind: what its strategies are.
      name: a readable label (its first member's value name).
      strategies: per strategy, the axes (DECISION), sharding (INPUT) or factors (MERGE, FREE).
      cost: seconds per strategy and Part, [n, N_PARTS], of every op that follows it.
      members: ops or tensors that share it.
      links: for INPUT nodes, (decision node, option index per strategy) per decision it reads.
      bytes: for INPUT nodes, per-device bytes per strategy of the arguments it shards.
      sample: the node's strategy under each sampled assignment of the decisions. A FREE node
        of a sampled model has the strategy propagation gives its op under each (among its
        strategies); one of an exact or `free` model has none (None): no assignment fixes it.
      pick: for a FREE node, the strategy propagation gives its op, from the strategies of the
        nodes before it ([nodes]); None when that strategy is not among the node's.
    """

    kind: NodeKind
    name: str
    strategies: list
    cost: np.ndarray
    members: int = 1
    links: list[tuple[int, tuple[int, ...]]] = dataclasses.field(default_factory=list)
    bytes: np.ndarray | None = None
    sample: np.ndarray | None = None
    pick: Callable[[np.ndarray], int | None] | None = None

    @property
    def size(self) -> int:
        return len(self.strategies)


@dataclasses.dataclass(eq=False)
class Combo:
    """The pair booleans of a MERGE node over its two operand nodes.

    Attributes:
      a, b: the operand nodes.
      table: the merge node's strategy for each pair, [n_a, n_b].
      cost: seconds of each pair and Part (the operands' resharding), [n_a, n_b, N_PARTS].
    """

    a: int
    b: int
    table: np.ndarray
    cost: np.ndarray


@dataclasses.dataclass(frozen=True, slots=True)
class Source:
    """How a value's sharding follows a node's strategy.

    Attributes:
      node: the node index.
      shardings: the value's sharding (pending sum included) per strategy of the node.
      groups: per strategy, its partial axes grouped as XLA reduces them (() when no sum).
    """

    node: int
    shardings: tuple[Sharding, ...]
    groups: tuple[Groups, ...]

    def resolved(self) -> Source:
        if not any(s.partial for s in self.shardings):
            return self
        return Source(self.node, tuple(Sharding(s.dims) for s in self.shardings), ((),) * len(self.groups))


@dataclasses.dataclass(frozen=True, slots=True)
class MemoryPoint:
    """Per-device bytes live at one program point: `const` plus, per node, bytes per strategy, plus,
    per pair of nodes (i, j), bytes per pair of their strategies ([n_i, n_j]: a value's copy in
    the layout its reader reads it in)."""

    where: str
    const: float
    terms: Mapping[int, np.ndarray]
    pairs: Mapping[tuple[int, int], np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(eq=False)
class Model:
    """The coarsened problem the solver sees.

    Attributes:
      nodes: the one-hot choices; node 0 is the constant node (its cost is a constant).
      combos: merge node -> its pair booleans.
      edges: (node i, node j) -> seconds per strategy pair and Part, [n_i, n_j, N_PARTS], for
        reads between nodes no combo covers.
      memory: the program points whose live bytes must fit.
      decision_nodes: node index per decision of the space.
      n_ops: ops of the graph (a body counted once).
      exact: every node's `sample` covers every valid assignment of the decisions.
    """

    nodes: list[Node]
    combos: dict[int, Combo]
    edges: dict[tuple[int, int], np.ndarray]
    memory: list[MemoryPoint]
    decision_nodes: tuple[int, ...]
    n_ops: int
    exact: bool = False

    def reachable(self, i: int, j: int) -> list[tuple[int, int]]:
        """The (strategy of i, strategy of j) pairs some known assignment reaches (every valid one
        when the space was enumerated, else the sample): the program has booleans for those only,
        so its solutions are assignments whose every pair was seen. Every pair of a node without
        a sample (a FREE node of an exact or `free` model)."""
        return reachable_pairs(self.nodes[i], self.nodes[j])

    def count(self, kind: NodeKind) -> int:
        return sum(1 for n in self.nodes if n.kind is kind)

    def assignment(self, space: DecisionSpace, chosen: Sequence[int]) -> Assignment:
        """The decision options a solution picks, in the space's order."""
        return tuple(space.decisions[i].options[chosen[n]] for i, n in enumerate(self.decision_nodes))

    def evaluate(self, space: DecisionSpace, assignment: Assignment) -> Evaluation | None:
        """The strategy of every node under `assignment`, and what the model predicts for it.

        A FREE node takes the strategy propagation gives its op (`Node.pick`); failing that, its
        cheapest given the nodes before it: its own cost and the reads between it and them (the
        program chooses FREE nodes freely). None when an input cannot take the assignment (a
        tensor would use an axis twice).
        """
        reads = self._free_reads
        chosen = np.zeros(len(self.nodes), dtype=np.int64)
        for i, n in enumerate(self.decision_nodes):
            chosen[n] = space.decisions[i].options.index(assignment[i])
        for k, node in enumerate(self.nodes):
            if node.kind is NodeKind.INPUT:
                ok = np.ones(node.size, dtype=bool)
                for d, picks in node.links:
                    ok &= np.asarray(picks) == chosen[d]
                if not ok.any():
                    return None
                chosen[k] = int(np.argmax(ok))
            elif node.kind is NodeKind.MERGE:
                combo = self.combos[k]
                chosen[k] = combo.table[chosen[combo.a], chosen[combo.b]]
            elif node.kind is NodeKind.FREE:
                picked = node.pick(chosen) if node.pick is not None else None
                if picked is not None:
                    chosen[k] = picked
                    continue
                own = node.cost.sum(axis=1)
                for other, mat, reading in reads.get(k, ()):
                    if other < k:  # chosen already
                        own = own + (mat[chosen[other]] if reading else mat[:, chosen[other]]).sum(axis=1)
                chosen[k] = int(np.argmin(own))
        times, memory = self.predict(chosen[None, :])
        return Evaluation(tuple(int(c) for c in chosen), float(times[0]), float(memory[0]))

    @functools.cached_property
    def _free_reads(self) -> dict[int, list[tuple[int, np.ndarray, bool]]]:
        """Per FREE node, its edges: (the node at the other end, the edge's matrix, whether the
        FREE node is the one reading)."""
        free = {k for k, n in enumerate(self.nodes) if n.kind is NodeKind.FREE}
        out: dict[int, list[tuple[int, np.ndarray, bool]]] = {}
        for (i, j), mat in self.edges.items():
            if i != j and j in free:
                out.setdefault(j, []).append((i, mat, True))
            if i != j and i in free:
                out.setdefault(i, []).append((j, mat, False))
        return out

    def best_world(self, capacity: float) -> tuple[Evaluation, bool] | None:
        """The best of the assignments the model knows (every valid one when `exact`), evaluated
        all at once: the fastest that fits, else the smallest; and whether it fits. None when a
        FREE node has no known strategy. When exact, the CP-SAT program has this optimum too."""
        if any(n.sample is None for n in self.nodes):
            return None
        chosen = np.stack([n.sample for n in self.nodes], axis=1)  # [worlds, nodes]
        times, memory = self.predict(chosen)
        fits = memory <= capacity
        w = int(np.argmin(np.where(fits, times, np.inf))) if fits.any() else int(np.argmin(memory))
        return Evaluation(tuple(int(c) for c in chosen[w]), float(times[w]), float(memory[w])), bool(
            fits.any()
        )

    def predict(self, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Step time and fullest memory point per row of strategies ([rows, nodes])."""
        parts = np.zeros((len(chosen), N_PARTS))
        for k, n in enumerate(self.nodes):
            parts += n.cost[chosen[:, k]]
        for c in self.combos.values():
            parts += c.cost[chosen[:, c.a], chosen[:, c.b]]
        for (i, j), m in self.edges.items():
            parts += m[chosen[:, i], chosen[:, j]]
        memory = np.zeros(len(chosen))
        for pt in self.memory:
            row = np.full(len(chosen), pt.const)
            for k, b in pt.terms.items():
                row += b[chosen[:, k]]
            for (i, j), b in pt.pairs.items():
                row += b[chosen[:, i], chosen[:, j]]
            memory = np.maximum(memory, row)
        return step_times(parts), memory


@dataclasses.dataclass(frozen=True, slots=True)
class Evaluation:
    """The model's prediction for one assignment.

    Attributes:
      chosen: the strategy of every node.
      step_time: seconds per step: compute + exposed communication.
      memory: per-device bytes at the fullest memory point.
    """

    chosen: tuple[int, ...]
    step_time: float
    memory: float


def step_times(parts: np.ndarray) -> np.ndarray:
    """Compute + exposed communication per row of Part sums ([rows, N_PARTS]): communication that
    may hide is exposed only beyond the compute it hides behind (the simulator's overlap rule)."""
    compute = parts[:, Part.FWD_COMPUTE] + parts[:, Part.BWD_COMPUTE] + parts[:, Part.OTHER_COMPUTE]
    exposed = (
        parts[:, Part.EXPOSED_COMM]
        + np.maximum(0.0, parts[:, Part.FWD_COMM] - parts[:, Part.FWD_COMPUTE])
        + np.maximum(0.0, parts[:, Part.BWD_COMM] - parts[:, Part.BWD_COMPUTE])
    )
    return compute + exposed


CONST_NODE = 0


class OutOfTime(Exception):
    """Building the model (or its program) passed its deadline."""


def check_deadline(deadline: float | None, what: str) -> None:
    """Raises OutOfTime when time.perf_counter() is past `deadline` (None: no deadline)."""
    if deadline is not None and time.perf_counter() > deadline:
        raise OutOfTime(f"{what} passed its deadline")


def reachable_pairs(x: Node, y: Node) -> list[tuple[int, int]]:
    """The (strategy of x, strategy of y) pairs some known assignment reaches; every pair when
    either node has no sample (a FREE node of an exact or `free` model)."""
    if x.sample is None or y.sample is None:
        return [(a, b) for a in range(x.size) for b in range(y.size)]
    flat = np.unique(x.sample * y.size + y.sample)
    return [(int(f // y.size), int(f % y.size)) for f in flat]


class Interner:
    """Integers for shardings and sum groups (equal integers: equal values), so that a source's
    shardings compare, hash and key caches as one array."""

    def __init__(self) -> None:
        self._ids: dict[object, int] = {}
        self._cache: dict[int, tuple] = {}

    def source(self, s: Source) -> np.ndarray:
        """The source's shardings (with their sum groups) as interned integers, per strategy."""
        ids = self.items(s.shardings)
        if any(s.groups):
            ids = ids * (1 << 24) + self.items(s.groups)
        return ids

    def items(self, items: tuple) -> np.ndarray:
        """Interned integers of a tuple's items (cached per tuple object, which the cache holds)."""
        hit = self._cache.get(id(items))
        if hit is not None and hit[0] is items:
            return hit[1]
        ids = np.array([self._ids.setdefault(x, len(self._ids)) for x in items], dtype=np.int64)
        self._cache[id(items)] = (items, ids)
        return ids


def known_assignments(
    space: DecisionSpace, n: int, exact_up_to: int, seeds: Sequence[Assignment]
) -> tuple[np.ndarray, bool]:
    """Assignments of the decisions (as option indices, [rows, decisions]) that the nodes'
    strategies are known under (`Node.sample`), and whether they are all the valid ones.

    A space of at most `exact_up_to` assignments is enumerated: node fingerprints are then
    exact and a merge node's unreachable strategy pairs can be dropped. A larger one is
    sampled: the empty assignment, the `seeds`, each option of each decision alone, and `n`
    random valid ones.
    """
    if space.size <= exact_up_to:
        return _valid_assignments(space), True
    rows: list[tuple[int, ...]] = [(0,) * len(space.decisions)]
    rows += [tuple(d.options.index(o) for d, o in zip(space.decisions, a, strict=True)) for a in seeds]
    for d in space.decisions:
        for o in range(1, len(d.options)):
            row = [0] * len(space.decisions)
            row[d.id] = o
            rows.append(tuple(row))
    rng = random.Random(0)
    tries = 0
    seen = set(rows)
    while len(rows) < n and tries < 20 * n:
        tries += 1
        row = tuple(rng.randrange(len(d.options)) for d in space.decisions)
        if row not in seen and space.valid(
            tuple(d.options[o] for d, o in zip(space.decisions, row, strict=True))
        ):
            rows.append(row)
            seen.add(row)
    return np.array(rows, dtype=np.int64).reshape(len(rows), len(space.decisions)), False


def _valid_assignments(space: DecisionSpace) -> np.ndarray:
    """Every valid assignment of the space as option indices, [n, decisions]: those in which no
    tensor uses a mesh axis twice (DecisionSpace.valid, for all assignments at once)."""
    sizes = [len(d.options) for d in space.decisions]
    rows = np.indices(sizes).reshape(len(sizes), -1).T if sizes else np.zeros((1, 0), dtype=np.int64)
    ok = np.ones(len(rows), dtype=bool)
    per_tensor: dict[int, list[tuple[int, int]]] = {}
    for d in space.decisions:
        for vid, dim in d.members:
            per_tensor.setdefault(vid, []).append((d.id, dim))
    fixed_axes: dict[int, list[str]] = {}
    for (vid, _), axes in space.fixed.items():
        fixed_axes.setdefault(vid, []).extend(axes)
    for vid, dims in per_tensor.items():
        if len(dims) < 2 and not fixed_axes.get(vid):
            continue
        for axis in space.mesh.axes:
            count = np.full(len(rows), fixed_axes.get(vid, []).count(axis))
            for d, _ in dims:
                uses = np.array([axis in o for o in space.decisions[d].options])
                count += uses[rows[:, d]]
            ok &= count <= 1
    return np.ascontiguousarray(rows[ok]).astype(np.int64)
