"""The ILP's cost model: a coarsened graph of strategy nodes, resharding costs and memory points.

Every op's factor assignment is read off the shardings of its operands, as sharding propagation
does (ir.propagate: each operand proposes axes for its factors, by priority). So an op takes no
variable of its own unless it combines values of two different nodes (Alpa §4.2, XLA
auto-sharding; coarsening as there):
- an op whose shardable operands all hang off one node *follows* it: per strategy of that node,
  its factors are what propagation gives (elementwise chains, reshapes, reductions, the optimizer
  update, ...), and its compute and resharding costs land on that node's strategy;
- an op that reads two nodes is a *merge* node: its strategies are propagation's outcomes over the
  pairs of operand strategies, linked to them by pair booleans c_ij (one per pair, with the
  tight formulation Σ_j c_ij = x_i, Σ_i c_ij = y_j, x_op[s] = Σ_{f(i,j)=s} c_ij), which also
  carry the operands' resharding costs;
- an op reading three or more nodes (or any op, in `free` mode) is a *free* node: every assignment
  of mesh axes to its factors, operands resharded over pair booleans, as in Alpa;
- ops whose operands shard alike under every assignment of the decisions (the same op in two
  layers, typically, as the decision space ties layers) behave alike and share their node: every
  node knows its strategy under every valid assignment (or a sample of them, in a large space);
- a scan body is built once, its costs times the trip count.
Inputs are nodes over the shardings their decisions allow; optimizer state shares its parameter's.

Costs are seconds, split in `Part`s so that the solver can apply the simulator's overlap rule
(backward collectives and forward parameter gathers hide behind compute, up to that compute).
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from cost_model.collectives import collective_time
from cost_model.compute import fused_values, local_sizes, op_flops, roofline_time
from cost_model.fusion import GENERATED
from cost_model.hardware import HardwareError
from cost_model.meshes import MeshTopology
from ir.comm import CollectiveKind
from ir.graph import Graph, Op, Role, Value
from ir.plan import name_pattern
from ir.propagate import reshard
from ir.rules import FactorKind, OpRule
from ir.sharding import MeshShape, Sharding
from search.space import Assignment, DecisionSpace

Factors = tuple[tuple[str, ...], ...]  # mesh axes per rule factor
Groups = tuple[tuple[str, ...], ...]  # partial axes grouped by the reduction dim that made them
# Propagation's priority of a proposal: (a constrained result, derived from the batch, bytes, earlier).
Priority = tuple[int, bool, int, int]
DimsMap = tuple[tuple[int, ...], ...]  # a tensor's factors per dim


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
      sample: the node's strategy under each sampled assignment of the decisions (None for FREE
        nodes, which no assignment determines).
    """

    kind: NodeKind
    name: str
    strategies: list
    cost: np.ndarray
    members: int = 1
    links: list[tuple[int, tuple[int, ...]]] = dataclasses.field(default_factory=list)
    bytes: np.ndarray | None = None
    sample: np.ndarray | None = None

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
    """Per-device bytes live at one program point: `const` plus, per node, bytes per strategy."""

    where: str
    const: float
    terms: Mapping[int, np.ndarray]


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
        so its solutions are assignments whose every pair was seen. Every pair of a FREE node."""
        return _reachable(self.nodes[i], self.nodes[j])

    def count(self, kind: NodeKind) -> int:
        return sum(1 for n in self.nodes if n.kind is kind)

    def assignment(self, space: DecisionSpace, chosen: Sequence[int]) -> Assignment:
        """The decision options a solution picks, in the space's order."""
        return tuple(space.decisions[i].options[chosen[n]] for i, n in enumerate(self.decision_nodes))

    def evaluate(self, space: DecisionSpace, assignment: Assignment) -> Evaluation | None:
        """The strategy of every node under `assignment`, and what the model predicts for it.

        A FREE node takes its cheapest strategy on its own. None when an input cannot take the
        assignment (a tensor would use an axis twice).
        """
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
                chosen[k] = int(np.argmin(node.cost.sum(axis=1)))
        times, memory = self.predict(chosen[None, :])
        return Evaluation(tuple(int(c) for c in chosen), float(times[0]), float(memory[0]))

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


def opt_state_params(graph: Graph) -> dict[int, int]:
    """Optimizer-state input id -> the parameter it follows (path suffix and shape), the pairing
    search.evaluate applies."""
    params = {
        graph.values[v].name.removeprefix("params/"): v
        for v in graph.inputs
        if graph.values[v].role is Role.PARAM
    }
    out = {}
    for vid in graph.inputs:
        v = graph.values[vid]
        if v.role is Role.OPT_STATE:
            for suffix, pid in params.items():
                if v.name.endswith("/" + suffix) and graph.values[pid].shape == v.shape:
                    out[vid] = pid
                    break
    return out


# --- factor assignments ------------------------------------------------------------------------------


def merge(rule: OpRule, proposals: Sequence[tuple[Priority, DimsMap, Sharding]], mesh: MeshShape) -> Factors:
    """The factors propagation gives an op whose operands (and constrained results) are sharded as
    proposed.

    Each (priority, the tensor's factors per dim, sharding) proposes its dims' axes for their
    factors (major factor first in a compound dim); the highest priority takes a factor, a LOCAL
    factor takes nothing, an axis goes to one factor only and must divide it; then minor factors
    that would break a compound dim are unsharded. This is ir.propagate's rule.
    """
    props: list[tuple[Priority, int, tuple[str, ...]]] = []
    for prio, dims_map, s in proposals:
        for d, fs in enumerate(dims_map):
            axes = s.dims[d]
            if not axes or not fs:
                continue
            if len(fs) == 1:
                props.append((prio, fs[0], axes))
                continue
            rest = list(axes)
            for f in fs:
                taken: list[str] = []
                while rest and rule.sizes[f] % mesh.axes_size((*taken, rest[0])) == 0:
                    taken.append(rest.pop(0))
                if taken:
                    props.append((prio, f, tuple(taken)))
                if mesh.axes_size(taken) != rule.sizes[f]:
                    break
    factors: list[tuple[str, ...] | None] = [None] * rule.num_factors
    used: set[str] = set()
    for _, f, axes in sorted(props, key=lambda p: p[0], reverse=True):
        if factors[f] is not None or rule.kinds[f] is FactorKind.LOCAL:
            continue
        taken = []
        for a in axes:
            if a in used or rule.sizes[f] % mesh.axes_size((*taken, a)):
                break
            taken.append(a)
        if taken:
            factors[f] = tuple(taken)
            used.update(taken)
    out = [f or () for f in factors]
    _make_contiguous(rule, out, mesh)
    return tuple(out)


def _make_contiguous(rule: OpRule, factors: list[tuple[str, ...]], mesh: MeshShape) -> None:
    """A compound dim is one block only if each factor before its minor-most sharded one is whole."""
    for tensor in (*rule.operands, *rule.results):
        for fs in tensor:
            if len(fs) < 2:
                continue
            broken = False
            for f in fs:
                if broken:
                    factors[f] = ()
                elif mesh.axes_size(factors[f]) != rule.sizes[f]:
                    broken = True


def op_strategies(rule: OpRule, mesh: MeshShape, max_axes: int = 2) -> list[Factors]:
    """Every assignment of the mesh's axes to the op's shardable factors (a FREE node's strategies).

    A factor is shardable when it is not LOCAL and some operand holds it (propagation never shards
    a factor no operand proposes). Each mesh axis goes to at most one factor, a factor takes at
    most `max_axes` axes in mesh order, and their product must divide it.
    """
    eligible = sorted(
        {f for t in rule.operands for d in t for f in d if rule.kinds[f] is not FactorKind.LOCAL}
    )
    axes = [a for a, n in zip(mesh.axes, mesh.shape, strict=True) if n > 1]
    out: list[Factors] = []
    for choice in itertools.product((None, *eligible), repeat=len(axes)):
        factors: list[tuple[str, ...]] = [()] * rule.num_factors
        for a, f in zip(axes, choice, strict=True):
            if f is not None:
                factors[f] = (*factors[f], a)
        if any(len(fa) > max_axes or rule.sizes[f] % mesh.axes_size(fa) for f, fa in enumerate(factors)):
            continue
        fixed = list(factors)
        _make_contiguous(rule, fixed, mesh)
        if fixed == factors:
            out.append(tuple(factors))
    return out


def _dims(dims_map, factors: Factors) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(a for f in fs for a in factors[f]) for fs in dims_map)


def _result(rule: OpRule, k: int, factors: Factors) -> tuple[Sharding, Groups]:
    red = rule.factors_of(FactorKind.REDUCTION)
    partial = frozenset(a for f in red for a in factors[f])
    # XLA reduces each sharded reduction dim by its own all-reduce, minor dim first.
    groups = tuple(factors[f] for f in reversed(red) if factors[f]) if partial else ()
    return Sharding(_dims(rule.results[k], factors), partial), groups


# --- the builder -------------------------------------------------------------------------------------

_CONTRACTIONS = frozenset(("dot_general", "conv_general_dilated"))


class Builder:
    """Builds the Model of one problem (see the module doc).

    Args:
      graph: the traced step.
      space: its decision space (inputs become nodes over the decisions' options).
      topo: the mesh on its hardware (collective times).
      overlap: whether communication may hide behind compute (the simulator's default).
      free: give every op that reads two or more nodes a FREE node (Alpa's formulation) instead
        of deriving its strategy from its operands'.
      max_strategies: per FREE node, the most strategies kept (its cheapest on its own).
      max_axes: the most mesh axes one factor of a FREE node takes.
      max_pairs: the most pair booleans one MERGE node may have before it becomes FREE.
      exact_up_to: decision spaces of at most this many assignments are enumerated to know every
        node's strategy as a function of the decisions (else it is sampled).
      constraint: the sharding a named value must have, or None (a fixed plan's activations).
      deadline: a time.perf_counter() value; building past it raises OutOfTime.
      seeds: assignments a sampled space samples first (the expert baselines).
    """

    def __init__(
        self,
        graph: Graph,
        space: DecisionSpace,
        topo: MeshTopology,
        *,
        overlap: bool = True,
        free: bool = False,
        max_strategies: int = 32,
        max_axes: int = 2,
        max_pairs: int = 4096,
        exact_up_to: int = 1 << 15,
        constraint: Callable[[Value], Sharding | None] | None = None,
        deadline: float | None = None,
        seeds: Sequence[Assignment] = (),
    ):
        self.g = graph
        self.space = space
        self.mesh = space.mesh
        self.topo = topo
        self.device = topo.hardware.device
        self.overlap = overlap
        self.free = free
        self.max_strategies = max_strategies
        self.max_axes = max_axes
        self.max_pairs = max_pairs
        self.constraint = constraint
        self.deadline = deadline
        self.nodes: list[Node] = [Node(NodeKind.CONST, "const", [None], np.zeros((1, N_PARTS)))]
        self.combos: dict[int, Combo] = {}
        self.edges: dict[tuple[int, int], np.ndarray] = {}
        self.by_key: dict[object, int] = {}
        self.defining: dict[int, object] = {}  # merge node -> the operand layout its combo is for
        self.n_ops = 0
        # (id of graph, op id) -> (node, factors per strategy of the node): what each op does.
        self.decided: dict[tuple[int, int], tuple[int, list[Factors]]] = {}
        self._first_read: set[tuple[int, int]] = set()
        self._seen: set[tuple] = set()
        self._reshard_cache: dict[tuple, np.ndarray] = {}
        self._matrix_cache: dict[tuple, np.ndarray] = {}
        self._merge_cache: dict[tuple, tuple] = {}
        self._strategy_cache: dict[OpRule, list[Factors]] = {}
        self._intern: dict[object, int] = {}
        self._ids_cache: dict[int, tuple] = {}
        self._reach_cache: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self._fraction_cache: dict[int, tuple] = {}
        self._fingerprints: dict[tuple[int, bytes], int] = {}
        self._fingerprint_ids: dict[object, int] = {}
        self._wants_cache: dict[tuple[int, int], tuple] = {}
        self._results_cache: dict[tuple[int, int], tuple] = {}
        self._compute_cache: dict[tuple, tuple] = {}
        self.samples, self.exact = self._sample_assignments(256, exact_up_to, seeds)
        self.nodes[CONST_NODE].sample = np.zeros(len(self.samples), dtype=np.int64)

    # -- entry point ------------------------------------------------------------------------------

    def build(self, *, memory_points: int = 24) -> Model:
        g = self.g
        decision_nodes = []
        for d in self.space.decisions:
            idx = self._add(
                Node(NodeKind.DECISION, d.name, list(d.options), np.zeros((len(d.options), N_PARTS)))
            )
            self.nodes[idx].sample = self.samples[:, d.id]
            decision_nodes.append(idx)
        env = self._inputs(decision_nodes)
        liveness = _Liveness(g)
        batch = frozenset(i for i in g.inputs if g.values[i].role is Role.BATCH)
        src = self._graph(g, env, 1, batch, liveness)
        alias = g.output_alias or (-1,) * len(g.outputs)
        for k, vid in enumerate(g.outputs):
            # An output that updates an input is returned sharded like it; the evaluator leaves
            # one whose input is replicated as propagation made it.
            want = env.get(alias[k]) if alias[k] >= 0 else None
            self._read(g, vid, src[vid], want, 1, replicated_free=True)
        memory = liveness.points(self, src, env, memory_points)
        return Model(
            self.nodes, self.combos, self.edges, memory, tuple(decision_nodes), self.n_ops, self.exact
        )

    def _add(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _const(self, s: Sharding) -> Source:
        return Source(CONST_NODE, (s,), ((),))

    # -- inputs -----------------------------------------------------------------------------------

    def _inputs(self, decision_nodes: list[int]) -> dict[int, Source]:
        g, space = self.g, self.space
        layout_of: dict[int, dict[int, object]] = {}
        for (vid, dim), axes in space.fixed.items():
            layout_of.setdefault(vid, {})[dim] = axes
        for d in space.decisions:
            for vid, dim in d.members:
                layout_of.setdefault(vid, {})[dim] = d.id
        env: dict[int, Source] = {}
        for vid in g.inputs:
            v = g.values[vid]
            spec = layout_of.get(vid)
            if not spec or v.role not in (Role.PARAM, Role.BATCH):
                continue
            layout = tuple(spec.get(d, ()) for d in range(v.rank))
            decisions = sorted({x for x in layout if isinstance(x, int)})
            if not decisions:
                env[vid] = self._const(Sharding(layout))
                continue
            key = ("input", name_pattern(v.name), v.shape, v.dtype, layout)
            idx = self.by_key.get(key)
            if idx is None:
                idx = self.by_key[key] = self._input_node(v, layout, decisions, decision_nodes)
            else:
                self.nodes[idx].members += 1
            node = self.nodes[idx]
            env[vid] = Source(idx, tuple(node.strategies), ((),) * node.size)
        for o, p in opt_state_params(g).items():
            if p in env:
                env[o] = env[p]
        for vid in g.inputs:
            if vid not in env:
                env[vid] = self._const(Sharding.replicated(g.values[vid].rank))
        for vid in g.inputs:  # arguments are live for the whole step
            s = env[vid]
            if s.node != CONST_NODE:
                node = self.nodes[s.node]
                node.bytes = node.bytes + self.bytes(g.values[vid], s)
        return env

    def _input_node(self, v: Value, layout, decisions: list[int], decision_nodes: list[int]) -> int:
        space = self.space
        shardings, picks = [], []
        for combo in itertools.product(*(space.decisions[d].options for d in decisions)):
            chosen = dict(zip(decisions, combo, strict=True))
            dims = tuple(chosen[x] if isinstance(x, int) else x for x in layout)
            used = [a for axes in dims for a in axes]
            if len(used) == len(set(used)):  # no tensor uses an axis twice (DecisionSpace.valid)
                shardings.append(Sharding(dims))
                picks.append(combo)
        node = Node(NodeKind.INPUT, v.name, shardings, np.zeros((len(shardings), N_PARTS)))
        node.links = [
            (decision_nodes[d], tuple(space.decisions[d].options.index(c[i]) for c in picks))
            for i, d in enumerate(decisions)
        ]
        node.bytes = np.zeros(len(shardings))
        index = {
            tuple(space.decisions[d].options.index(o) for d, o in zip(decisions, c, strict=True)): s
            for s, c in enumerate(picks)
        }
        node.sample = np.array([index.get(tuple(row[decisions]), 0) for row in self.samples], dtype=np.int64)
        return self._add(node)

    def bytes(self, v: Value, s: Source) -> np.ndarray:
        """Per-device bytes of `v` per strategy of its node."""
        return v.nbytes / self._fractions(s.shardings)

    def _fractions(self, shardings: tuple[Sharding, ...]) -> np.ndarray:
        """How many pieces each sharding splits its tensor into (cached per tuple object)."""
        hit = self._fraction_cache.get(id(shardings))
        if hit is None or hit[0] is not shardings:
            hit = self._fraction_cache[id(shardings)] = (
                shardings,
                np.array([sh.shard_fraction(self.mesh) for sh in shardings], dtype=np.float64),
            )
        return hit[1]

    # -- one graph --------------------------------------------------------------------------------

    def _graph(self, g: Graph, env: Mapping[int, Source], mult: int, batch, liveness) -> dict[int, Source]:
        src: dict[int, Source] = dict(env)
        for v in g.values:
            if v.id not in src and v.id not in g.producer:
                src[v.id] = self._const(Sharding.replicated(v.rank))
        batch = set(batch)
        fused = fused_values(g)
        for op in g.ops:
            if self.deadline is not None and time.perf_counter() > self.deadline:
                raise OutOfTime(f"building the model passed its deadline after {self.n_ops} ops")
            if any(i in batch for i in op.inputs):
                batch.update(op.outputs)
            self.n_ops += 1
            if op.primitive == "scan":
                self._scan(g, op, src, mult, batch, liveness)
            elif op.primitive == "cond":
                self._cond(g, op, src, mult, batch)
            elif op.rule is not None:
                self._op(g, op, src, mult, batch, fused)
        return src

    def _op(self, g: Graph, op: Op, src: dict[int, Source], mult: int, batch, fused) -> None:
        rule = op.rule
        operands = [src[v] for v in op.inputs]
        prios = [(0, v in batch, g.values[v].nbytes, -k) for k, v in enumerate(op.inputs)]
        proposing = [k for k in range(len(op.inputs)) if any(rule.operands[k])]
        # A constrained result proposes first, and every reader sees it as constrained.
        targets = tuple(self.constraint(g.values[v]) if self.constraint else None for v in op.outputs)
        fixed = tuple(((1, True, 0, -k), rule.results[k], t) for k, t in enumerate(targets) if t is not None)
        for k, vid in enumerate(op.inputs):
            if k not in proposing and (operands[k].node != CONST_NODE or operands[k].shardings[0].partial):
                # A scalar or size-1 operand is read replicated whatever the op does.
                rep = Sharding.replicated(g.values[vid].rank)
                have = operands[k]
                self._read(g, vid, have, _target(have.node, (rep,) * len(have.shardings)), mult)
        reading = list(dict.fromkeys(operands[k].node for k in proposing if operands[k].node != CONST_NODE))
        if len(reading) <= 1:
            node = reading[0] if reading else CONST_NODE
            strategies = self._follow(rule, operands, prios, proposing, fixed, node)
            self._charge_reads(g, op, operands, proposing, node, strategies, mult)
        elif not self.free and len(reading) == 2 and self._pairs(reading) <= self.max_pairs:
            node, strategies = self._merge_node(g, op, operands, prios, proposing, fixed, reading, mult)
        else:
            # Ops that read alike share one node.
            key = ("free", rule, fixed, tuple((self._fingerprint(operands[k]), prios[k]) for k in proposing))
            node, strategies = self._free_node(g, op, key)
            self._charge_reads(g, op, operands, proposing, node, strategies, mult)
        self.decided[(id(g), op.id)] = (node, strategies)
        if op.id in g.live_ops:
            self.nodes[node].cost += self._compute_all(g, op, strategies, fused) * mult
        for k, vid in enumerate(op.outputs):
            src[vid] = Source(node, *self._results(rule, strategies, k))
            if targets[k] is not None:
                self._read(g, vid, src[vid], _target(node, (targets[k],) * len(strategies)), mult)
                src[vid] = self._const(targets[k])

    def _pairs(self, reading: list[int]) -> int:
        return len(self.reachable(*reading))

    def reachable(self, i: int, j: int) -> list[tuple[int, int]]:
        hit = self._reach_cache.get((i, j))
        if hit is None:
            hit = self._reach_cache[(i, j)] = _reachable(self.nodes[i], self.nodes[j])
        return hit

    def _follow(self, rule: OpRule, operands, prios, proposing, fixed, node: int) -> list[Factors]:
        n = self.nodes[node].size
        key = self._layout(rule, operands, prios, proposing, fixed)
        hit = self._merge_cache.get(key)
        if hit is None:
            hit = self._merged(
                rule, operands, prios, proposing, fixed, [{node: i, CONST_NODE: 0} for i in range(n)]
            )
            self._merge_cache[key] = hit
        return hit

    def _merged(self, rule: OpRule, operands, prios, proposing, fixed, picks) -> list[Factors]:
        """`merge` of the operands at each of `picks` (node -> its strategy), memoised by what the
        operands' shardings are (many strategy pairs shard an op's operands alike)."""
        ids = [self._interned(operands[k].shardings) for k in proposing]
        nodes = [operands[k].node for k in proposing]
        memo: dict[tuple, Factors] = {}
        out = []
        for pick in picks:
            key = tuple(int(x[pick[n]]) for x, n in zip(ids, nodes, strict=True))
            f = memo.get(key)
            if f is None:
                props = [
                    (prios[k], rule.operands[k], operands[k].shardings[pick[operands[k].node]])
                    for k in proposing
                ]
                f = memo[key] = merge(rule, props + list(fixed), self.mesh)
            out.append(f)
        return out

    def _charge_reads(self, g, op: Op, operands, proposing, node: int, strategies, mult: int) -> None:
        """Each proposing operand is read with the dims its factors give, per strategy of `node`."""
        for k in proposing:
            want = _target(node, self._wants(op.rule, strategies, k))
            self._read(g, op.inputs[k], operands[k], want, mult)

    def _merge_node(
        self, g, op: Op, operands, prios, proposing, fixed, reading, mult
    ) -> tuple[int, list[Factors]]:
        rule = op.rule
        a, b = reading
        layout = self._layout(rule, operands, prios, proposing, fixed)
        # Ops whose operands shard alike under every sampled assignment of the decisions (the same
        # op in two layers, typically) behave alike: they share one node.
        key = ("merge", rule, fixed, tuple((self._fingerprint(operands[k]), prios[k]) for k in proposing))
        hit = self._merge_cache.get(layout)
        if hit is None:
            # Pairs no valid assignment reaches get strategy 0; nothing reads them.
            found: dict[Factors, int] = {}
            table = np.zeros((self.nodes[a].size, self.nodes[b].size), dtype=np.int64)
            pairs = self.reachable(a, b)
            merged = self._merged(
                rule, operands, prios, proposing, fixed, [{a: i, b: j, CONST_NODE: 0} for i, j in pairs]
            )
            for (i, j), f in zip(pairs, merged, strict=True):
                table[i, j] = found.setdefault(f, len(found))
            hit = self._merge_cache[layout] = (list(found), table)
        strategies, table = hit
        idx = self.by_key.get(key)
        if idx is None:
            name = g.values[op.outputs[0]].name if op.outputs else op.primitive
            node = Node(NodeKind.MERGE, name, list(strategies), np.zeros((len(strategies), N_PARTS)))
            na, nb = self.nodes[a].sample, self.nodes[b].sample
            node.sample = table[na, nb] if na is not None and nb is not None else None
            idx = self.by_key[key] = self._add(node)
            self.combos[idx] = Combo(a, b, table, np.zeros((*table.shape, N_PARTS)))
            self.defining[idx] = layout
        elif self.defining.get(idx) != layout:
            # Its operands are other nodes that shard alike: it takes that node's strategy and
            # reads its operands over edges.
            self.nodes[idx].members += 1
            strategies = self.nodes[idx].strategies
            self._charge_reads(g, op, operands, proposing, idx, strategies, mult)
            return idx, strategies
        else:
            self.nodes[idx].members += 1
        combo = self.combos[idx]
        cost = combo.cost
        for k in proposing:
            vid = op.inputs[k]
            have = self._as_read(g, vid, operands[k])
            wants = self._wants(rule, strategies, k)
            if self._repeated(g, vid, have, _target(idx, wants)):
                continue
            m = self._matrix(g, vid, have, wants)  # [n_have, n_strategies, P]
            if not m.any():
                continue
            m = m * mult
            if have.node == a:
                cost += m[np.arange(table.shape[0])[:, None], table]
            elif have.node == b:
                cost += m[np.arange(table.shape[1])[None, :], table]
            else:
                cost += m[0][table]
        return idx, strategies

    def _ids(self, s: Source) -> np.ndarray:
        """The source's shardings (with their sum groups) as interned integers, per strategy."""
        ids = self._interned(s.shardings)
        if any(s.groups):
            ids = ids * (1 << 24) + self._interned(s.groups)
        return ids

    def _interned(self, items: tuple) -> np.ndarray:
        """Interned integers of a tuple's items (cached per tuple object, which the cache holds)."""
        hit = self._ids_cache.get(id(items))
        if hit is not None and hit[0] is items:
            return hit[1]
        ids = np.array([self._intern.setdefault(x, len(self._intern)) for x in items], dtype=np.int64)
        self._ids_cache[id(items)] = (items, ids)
        return ids

    def _layout(self, rule: OpRule, operands, prios, proposing, fixed) -> tuple:
        """What decides an op's factors, exactly: its rule, operand nodes and shardings, constraints."""
        return (
            rule,
            fixed,
            tuple((k, operands[k].node, self._ids(operands[k]).tobytes(), prios[k]) for k in proposing),
        )

    def _fingerprint(self, s: Source) -> int:
        """What the source's sharding is under each sampled assignment, as an interned number
        (equal numbers: sharded alike under every sample; a FREE node's sources are their own)."""
        ids = self._ids(s)
        key = (s.node, ids.tobytes())
        hit = self._fingerprints.get(key)
        if hit is None:
            sample = self.nodes[s.node].sample
            full = key if sample is None else ids[sample].astype(np.int32).tobytes()
            hit = self._fingerprints[key] = self._fingerprint_ids.setdefault(full, len(self._fingerprint_ids))
        return hit

    def _wants(self, rule: OpRule, strategies: list[Factors], k: int) -> tuple[Sharding, ...]:
        """The sharding operand `k` is read with, per strategy (cached per strategy list)."""
        key = (id(strategies), k)
        hit = self._wants_cache.get(key)
        if hit is None or hit[0] is not strategies:
            hit = self._wants_cache[key] = (
                strategies,
                tuple(Sharding(_dims(rule.operands[k], f)) for f in strategies),
            )
        return hit[1]

    def _results(
        self, rule: OpRule, strategies: list[Factors], k: int
    ) -> tuple[tuple[Sharding, ...], tuple[Groups, ...]]:
        """Result `k`'s sharding and sum groups per strategy (cached per strategy list)."""
        key = (id(strategies), k)
        hit = self._results_cache.get(key)
        if hit is None or hit[0] is not strategies:
            made = [_result(rule, k, f) for f in strategies]
            hit = self._results_cache[key] = (
                strategies,
                tuple(s for s, _ in made),
                tuple(gr for _, gr in made),
            )
        return hit[1], hit[2]

    def _sample_assignments(
        self, n: int, exact_up_to: int, seeds: Sequence[Assignment]
    ) -> tuple[np.ndarray, bool]:
        """Assignments of the decisions (as option indices) that node functions are known under,
        and whether they are all the valid ones.

        A space of at most `exact_up_to` assignments is enumerated: node fingerprints are then
        exact and a merge node's unreachable strategy pairs can be dropped. A larger one is
        sampled: the empty assignment, the `seeds`, each option of each decision alone, and `n`
        random valid ones.
        """
        space = self.space
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

    def _free_node(self, g: Graph, op: Op, key) -> tuple[int, list[Factors]]:
        idx = self.by_key.get(key)
        if idx is not None:
            self.nodes[idx].members += 1
            return idx, self.nodes[idx].strategies
        rule = op.rule
        options = self._strategy_cache.get(rule)
        if options is None:
            options = self._strategy_cache[rule] = op_strategies(rule, self.mesh, self.max_axes)
        if len(options) > self.max_strategies:
            fused = fused_values(g)
            own = [float(self._compute(g, op, f, fused).sum()) for f in options]
            keep = sorted(sorted(range(len(options)), key=lambda i: (own[i], i))[: self.max_strategies])
            options = [options[i] for i in keep]
        name = g.values[op.outputs[0]].name if op.outputs else op.primitive
        idx = self.by_key[key] = self._add(
            Node(NodeKind.FREE, name, list(options), np.zeros((len(options), N_PARTS)))
        )
        return idx, self.nodes[idx].strategies

    # -- structure --------------------------------------------------------------------------------

    def _scan(self, g: Graph, op: Op, src: dict[int, Source], mult: int, batch, liveness) -> None:
        body = op.body[0]
        nc, nk = op.params["num_consts"], op.params["num_carry"]
        trips = mult * op.trip_count
        env: dict[int, Source] = {}
        body_batch = set()
        for k, (vid, bid) in enumerate(zip(op.inputs, body.inputs, strict=True)):
            s = self._resolve(g, vid, src, mult)
            if k >= nc + nk:  # xs: read whole along the loop dim, sliced per iteration
                whole = tuple(Sharding(((), *sh.dims[1:])) for sh in s.shardings)
                if whole != s.shardings:
                    self._read(g, vid, s, _target(s.node, whole), mult)
                s = Source(s.node, tuple(Sharding(sh.dims[1:]) for sh in s.shardings), ((),) * len(whole))
            env[bid] = s
            if vid in batch:
                body_batch.add(bid)
        inner = self._graph(body, env, trips, body_batch, None)
        for j, vid in enumerate(body.outputs):
            # The carry comes back as it went in; stacked outputs resolve their sums.
            self._read(body, vid, inner[vid], env[body.inputs[nc + j]] if j < nk else None, trips)
        for j, vid in enumerate(op.outputs):
            if j < nk:
                src[vid] = env[body.inputs[nc + j]]
            else:
                s = inner[body.outputs[j]].resolved()
                src[vid] = Source(s.node, tuple(Sharding(((), *sh.dims)) for sh in s.shardings), s.groups)
        if liveness is not None:
            liveness.body(op, body, inner)

    def _cond(self, g: Graph, op: Op, src: dict[int, Source], mult: int, batch) -> None:
        self._resolve(g, op.inputs[0], src, mult)
        outs: list[Source] | None = None
        for branch in op.body:
            env = {
                b: self._resolve(g, v, src, mult) for v, b in zip(op.inputs[1:], branch.inputs, strict=True)
            }
            branch_batch = {b for v, b in zip(op.inputs[1:], branch.inputs, strict=True) if v in batch}
            inner = self._graph(branch, env, mult, branch_batch, None)
            if outs is None:
                outs = [inner[v].resolved() for v in branch.outputs]
            for j, v in enumerate(branch.outputs):
                self._read(branch, v, inner[v], outs[j], mult)
        for j, vid in enumerate(op.outputs):
            src[vid] = outs[j]

    def _resolve(self, g: Graph, vid: int, src: dict[int, Source], mult: int) -> Source:
        s = src[vid]
        if any(sh.partial for sh in s.shardings):
            self._read(g, vid, s, None, mult)
            src[vid] = s = s.resolved()
        return s

    # -- costs ------------------------------------------------------------------------------------

    def _compute_all(self, g: Graph, op: Op, strategies: list[Factors], fused) -> np.ndarray:
        """Seconds per strategy and Part of one execution of `op` (cached per kind of op)."""
        key = (
            id(strategies),
            op.primitive,
            op.params.get("y") if op.primitive == "integer_pow" else None,
            tuple((g.values[v].itemsize, v in fused) for v in (*op.inputs, *op.outputs)),
            g.values[op.inputs[0]].dtype if op.inputs else "",
            _compute_part(op),
        )
        hit = self._compute_cache.get(key)
        if hit is None or hit[0] is not strategies:
            hit = self._compute_cache[key] = (
                strategies,
                np.array([self._compute(g, op, f, fused) for f in strategies]),
            )
        return hit[1]

    def _compute(self, g: Graph, op: Op, factors: Factors, fused) -> np.ndarray:
        """Seconds of one execution of `op` with `factors` (roofline of its local shard), in its Part."""
        sizes = local_sizes(op, factors, self.mesh)
        flops, _ = op_flops(op, sizes)
        traffic = 0.0
        for vid, dims in (
            *zip(op.inputs, op.rule.operands, strict=True),
            *zip(op.outputs, op.rule.results, strict=True),
        ):
            if vid not in fused:
                traffic += math.prod(sizes[f] for d in dims for f in d) * g.values[vid].itemsize
        out = np.zeros(N_PARTS)
        peak = self._rate(g, op) if flops else 1.0
        out[_compute_part(op)] = roofline_time(flops, traffic, peak, self.device.memory_bandwidth)
        return out

    def _rate(self, g: Graph, op: Op) -> float:
        """The device's FLOP/s for the op, as the simulator picks it (TF32 for float32 matmuls)."""
        dtype = g.values[op.inputs[0]].dtype if op.inputs else "float32"
        if dtype not in ("float64", "float32", "bfloat16", "float16") and not dtype.startswith("float8"):
            dtype = "float32"
        contraction = op.primitive in _CONTRACTIONS
        if dtype == "float32" and contraction:
            dtype = "tf32"
        rate = self.device.matmul_flops if contraction else self.device.flops
        try:
            return rate(dtype)
        except HardwareError:
            return rate("float32")

    def _read(
        self,
        g: Graph,
        vid: int,
        have: Source,
        want: Source | None,
        mult: int,
        *,
        replicated_free: bool = False,
    ) -> None:
        """Charges reading value `vid` (sharded as `have` says) as `want` says (None: resolved).

        A read that repeats an earlier one is free. `replicated_free`: a replicated target costs only the resolution.
        """
        have = self._as_read(g, vid, have)
        if want is None:
            want = have.resolved()
            if want is have:
                return
        if self._repeated(g, vid, have, want):
            return
        m = self._matrix(
            g, vid, have, want.shardings, same=want.node == have.node, replicated_free=replicated_free
        )
        if not m.any():
            return
        m = m * mult
        if want.node == have.node:
            self.nodes[have.node].cost += m
        elif have.node == CONST_NODE:
            self.nodes[want.node].cost += m[0]
        elif want.node == CONST_NODE:
            self.nodes[have.node].cost += m[:, 0]
        elif (have.node, want.node) in self.edges:
            self.edges[(have.node, want.node)] += m
        else:
            self.edges[(have.node, want.node)] = m.copy()

    def _repeated(self, g: Graph, vid: int, have: Source, want: Source) -> bool:
        """Whether an earlier read of `vid` wants what this one does under every sampled assignment
        (propagation reshards a value once per target: the forward and backward reads of a
        gathered weight cost one gather)."""
        key = (id(g), vid, self._fingerprint(have), self._fingerprint(want))
        if key in self._seen:
            return True
        self._seen.add(key)
        return False

    def _as_read(self, g: Graph, vid: int, have: Source) -> Source:
        """The first read of a pending sum resolves it; later reads see the resolved value."""
        if (id(g), vid) in self._first_read:
            return have.resolved()
        self._first_read.add((id(g), vid))
        return have

    def _matrix(
        self,
        g: Graph,
        vid: int,
        have: Source,
        wants: tuple[Sharding, ...],
        *,
        same: bool = False,
        replicated_free: bool = False,
    ) -> np.ndarray:
        """Seconds per (have strategy, want) and Part, [n_have, n_want, P]; the diagonal [n, P] if `same`."""
        v = g.values[vid]
        key = (
            v.shape,
            v.itemsize,
            _phase_key(v),
            self._ids(have).tobytes(),
            self._interned(wants).tobytes(),
            same,
            replicated_free,
        )
        m = self._matrix_cache.get(key)
        if m is None:
            pairs = zip(have.shardings, have.groups, strict=True)
            if same:
                m = np.array(
                    [
                        self._reshard(v, h, gr, w, replicated_free)
                        for (h, gr), w in zip(pairs, wants, strict=True)
                    ]
                )
            else:
                m = np.array(
                    [[self._reshard(v, h, gr, w, replicated_free) for w in wants] for h, gr in pairs]
                )
            self._matrix_cache[key] = m
        return m

    def _reshard(
        self, v: Value, have: Sharding, groups: Groups, want: Sharding, replicated_free: bool
    ) -> np.ndarray:
        if replicated_free and not want.used_axes:
            want = Sharding(have.dims)
        if have == want:
            return _ZERO
        key = (v.shape, v.itemsize, _phase_key(v), have, groups, want)
        hit = self._reshard_cache.get(key)
        if hit is not None:
            return hit
        colls, _ = reshard(v, have, want, self.mesh, groups or None)
        backward, param = _phase_key(v)
        out = np.zeros(N_PARTS)
        for c in colls:
            t = collective_time(c, self.topo)
            if not self.overlap:
                out[Part.EXPOSED_COMM] += t
            elif backward:
                out[Part.BWD_COMM] += t
            elif c.kind is CollectiveKind.ALL_GATHER and param:
                out[Part.FWD_COMM] += t
            else:
                out[Part.EXPOSED_COMM] += t
        self._reshard_cache[key] = out
        return out


_ZERO = np.zeros(N_PARTS)


def _reachable(x: Node, y: Node) -> list[tuple[int, int]]:
    if x.sample is None or y.sample is None:
        return [(a, b) for a in range(x.size) for b in range(y.size)]
    flat = np.unique(x.sample * y.size + y.sample)
    return [(int(f // y.size), int(f % y.size)) for f in flat]


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


def _target(node: int, shardings: tuple[Sharding, ...]) -> Source:
    """A sharding a read wants per strategy of `node` (never a pending sum)."""
    return Source(node, shardings, ((),) * len(shardings))


def _phase_key(v: Value) -> tuple[bool, bool]:
    """(made in the backward pass, a parameter or optimizer state): what the overlap rule reads."""
    return ("transpose(" in v.name, v.role in (Role.PARAM, Role.OPT_STATE))


def _compute_part(op: Op) -> Part:
    if "transpose(" in op.scope:
        return Part.BWD_COMPUTE
    if "jvp(" in op.scope:
        return Part.FWD_COMPUTE
    return Part.OTHER_COMPUTE


# --- memory ------------------------------------------------------------------------------------------


# Ops whose result is their operand's buffer (cost_model.fusion's aliases).
_ALIASES = frozenset(
    "name copy copy_p stop_gradient optimization_barrier sharding_constraint mesh_cast reshard reshape squeeze "
    "expand_dims".split()
)


def live_ranges(
    g: Graph, to_end: Sequence[int] = (), in_place: Sequence[int] = ()
) -> dict[int, tuple[int, int]]:
    """Value id -> (op index that writes it, op index that last reads it) of the buffers of `g`.

    A value computed inside its readers' fusions has no buffer, but keeps the buffers it is
    computed from alive until its last reader; an annotation or reshape shares its operand's
    buffer. `to_end`: values live to the end of the graph; `in_place`: values written over an
    argument's buffer (counted with the arguments).
    """
    fused = fused_values(g)
    root: dict[int, int] = {}
    for op in g.ops:
        if op.primitive in _ALIASES and op.inputs and op.outputs:
            root[op.outputs[0]] = root.get(op.inputs[0], op.inputs[0])
    memo: dict[int, frozenset[int]] = {}

    def sources(vid: int) -> frozenset[int]:
        if vid not in memo:
            out: set[int] = set()
            for u in g.ops[g.producer[vid]].inputs:
                out |= sources(u) if u in fused else {root.get(u, u)}
            memo[vid] = frozenset(out)
        return memo[vid]

    born: dict[int, int] = {}
    last: dict[int, int] = {}
    for i, op in enumerate(g.ops):
        for vid in op.inputs:
            for r in sources(vid) if vid in fused else (root.get(vid, vid),):
                last[r] = max(last.get(r, i), i)
        if op.primitive in GENERATED:
            continue  # made at the size each reader reads it in, where it reads it
        for vid in op.outputs:
            if vid not in fused and vid not in root:
                born[vid] = i
    for vid in to_end:
        r = root.get(vid, vid)
        last[r] = len(g.ops)
    skip = set(in_place)
    return {vid: (i, last[vid]) for vid, i in born.items() if vid in last and vid not in skip}


class _Liveness:
    """Per-device bytes live at program points of the top graph (a scan adds its body's peak)."""

    def __init__(self, g: Graph):
        self.g = g
        alias = g.output_alias or (-1,) * len(g.outputs)
        # Outputs live to the end, but those written over a donated input in place.
        kept = [vid for k, vid in enumerate(g.outputs) if alias[k] < 0 or alias[k] not in g.donated]
        in_place = [vid for k, vid in enumerate(g.outputs) if alias[k] >= 0 and alias[k] in g.donated]
        self.spans = live_ranges(g, kept, in_place)
        self.order = {op.id: i for i, op in enumerate(g.ops)}
        self.inside: dict[int, list[tuple[Value, Source]]] = {}

    def body(self, op: Op, body: Graph, inner: Mapping[int, Source]) -> None:
        """A scan body's buffers at its heaviest point (by unsharded bytes) count at the scan."""
        spans = live_ranges(body, body.outputs)
        live = np.zeros(len(body.ops) + 1)
        for vid, (i, j) in spans.items():
            live[i : j + 1] += body.values[vid].nbytes
        p = int(np.argmax(live)) if len(live) else 0
        self.inside[op.id] = [
            (body.values[v], inner[v]) for v, (i, j) in spans.items() if i <= p <= j and v in inner
        ]

    def points(self, builder: Builder, src: Mapping[int, Source], env, n_points: int) -> list[MemoryPoint]:
        """The `n_points` points with most bytes live, half by unsharded and half by fully sharded size."""
        g = self.g
        n = len(g.ops) + 1
        spans = [(vid, i, j) for vid, (i, j) in self.spans.items()]
        per_value = {vid: builder.bytes(g.values[vid], src[vid]) for vid, _, _ in spans}
        high, low = np.zeros(n), np.zeros(n)
        for vid, i, j in spans:
            high[i : j + 1] += per_value[vid].max()
            low[i : j + 1] += per_value[vid].min()
        inside = {
            self.order[op_id]: [(s, builder.bytes(v, s)) for v, s in items]
            for op_id, items in self.inside.items()
        }
        for i, items in inside.items():
            high[i] += sum(b.max() for _, b in items)
            low[i] += sum(b.min() for _, b in items)
        half = max(1, n_points // 2)
        picks = sorted(
            set(np.argsort(-high, kind="stable")[:half].tolist())
            | set(np.argsort(-low, kind="stable")[:half].tolist())
        )
        args = {k: node.bytes for k, node in enumerate(builder.nodes) if node.kind is NodeKind.INPUT}
        args_const = sum(
            g.values[vid].nbytes / env[vid].shardings[0].shard_fraction(builder.mesh)
            for vid in g.inputs
            if env[vid].node == CONST_NODE
        )
        out = []
        for p in picks:
            terms = {k: b.copy() for k, b in args.items()}
            const = float(args_const)
            items = [(src[vid], per_value[vid]) for vid, i, j in spans if i <= p <= j] + inside.get(p, [])
            for s, b in items:
                if s.node == CONST_NODE:
                    const += float(b[0])
                elif s.node in terms:
                    terms[s.node] = terms[s.node] + b
                else:
                    terms[s.node] = b.copy()
            where = f"op {p} ({g.ops[p].primitive})" if p < len(g.ops) else "end"
            out.append(MemoryPoint(where, const, terms))
        return out
