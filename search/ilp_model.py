"""Builds the ILP's Model: the ops coarsened into strategy nodes, each op's factors derived as ir.propagate does.

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
- a pending sum is resolved where propagation resolves it: into the layout of the step input its
  readers meet, over the sum's node and that input's (search.ilp_sums).
Inputs are nodes over the shardings their decisions allow; optimizer state shares its parameter's.
Prices come from search.ilp_costs, memory rows from search.ilp_memory, an op's factors per
strategy from search.ilp_strategies.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from cost_model.compiler import compiler_for
from cost_model.compute import fused_values
from cost_model.meshes import MeshTopology
from ir.graph import Graph, Op, Role, Value
from ir.patterns import name_pattern
from ir.rules import OpRule
from ir.sharding import Sharding
from ir.sum_targets import sum_paths
from search.ilp_costs import Prices
from search.ilp_factors import Factors, op_strategies
from search.ilp_memory import Liveness
from search.ilp_nodes import (
    CONST_NODE,
    N_PARTS,
    Combo,
    Interner,
    Model,
    Node,
    NodeKind,
    Source,
    check_deadline,
    known_assignments,
    reachable_pairs,
)
from search.ilp_strategies import Strategies
from search.ilp_sums import SumResolution
from search.space import Assignment, DecisionSpace, opt_state_params


class Builder(SumResolution, Strategies):
    """Builds the Model of one problem (see the module doc).

    Args:
      graph: the traced step.
      space: its decision space (inputs become nodes over the decisions' options).
      topo: the mesh on its hardware (collective times).
      overlap: whether communication may hide behind compute (the simulator's default).
      free: give every op that reads two or more nodes a FREE node (Alpa's formulation) instead
        of deriving its strategy from its operands'.
      max_strategies: per FREE node, the most strategies kept (its cheapest on its own), besides
        those propagation picks under the sampled assignments of a sampled model.
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
        self.free = free
        self.max_strategies = max_strategies
        self.max_axes = max_axes
        self.max_pairs = max_pairs
        self.constraint = constraint
        self.deadline = deadline
        self.intern = Interner()
        self.prices = Prices(self.mesh, topo, overlap, self.intern, deadline)
        self.nodes: list[Node] = [Node(NodeKind.CONST, "const", [None], np.zeros((1, N_PARTS)))]
        self.combos: dict[int, Combo] = {}
        self.edges: dict[tuple[int, int], np.ndarray] = {}
        self.by_key: dict[object, int] = {}
        self.defining: dict[int, object] = {}  # merge node -> the operand layout its combo is for
        self.n_ops = 0
        # (id of graph, op id) -> (node, factors per strategy of the node): what each op does.
        self.decided: dict[tuple[int, int], tuple[int, list[Factors]]] = {}
        self._first_read: set[tuple[int, int]] = set()
        # (id of graph, value) -> its source as written, for sums resolved into a met input's
        # layout (`_to_partner`): memory counts the buffer the op writes.
        self._written: dict[tuple[int, int], Source] = {}
        # id of a loop body -> per stacked output, the layout (per strategy of a node) a sum left
        # in it is resolved into (ir.sum_targets.stacked_targets).
        self._stacked: dict[int, dict[int, Source]] = {}
        self._seen: set[tuple] = set()
        self._merge_cache: dict[tuple, tuple] = {}
        self._strategy_cache: dict[OpRule, list[Factors]] = {}
        self._reach_cache: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self._fingerprints: dict[tuple[int, bytes], int] = {}
        self._fingerprint_ids: dict[object, int] = {}
        self._wants_cache: dict[tuple[int, int], tuple] = {}
        self._results_cache: dict[tuple[int, int], tuple] = {}
        self.samples, self.exact = known_assignments(space, 256, exact_up_to, seeds)
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
        compiler = compiler_for(self.prices.topo.hardware.name)
        liveness = self.liveness = Liveness(g, self.mesh, compiler, self.intern, self.nodes)
        env = self._inputs(decision_nodes, liveness)
        batch = frozenset(i for i in g.inputs if g.values[i].role is Role.BATCH)
        src = self._graph(g, env, 1, batch)
        alias = g.output_alias or (-1,) * len(g.outputs)
        for k, vid in enumerate(g.outputs):
            # An output that updates an input is returned sharded like it; the evaluator leaves
            # one whose input is replicated as propagation made it.
            want = env.get(alias[k]) if alias[k] >= 0 else None
            self._read(g, vid, src[vid], want, 1, replicated_free=True)
        memory = liveness.points(self.nodes, env, memory_points)
        return Model(
            self.nodes, self.combos, self.edges, memory, tuple(decision_nodes), self.n_ops, self.exact
        )

    def _add(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def _const(self, s: Sharding) -> Source:
        return Source(CONST_NODE, (s,), ((),))

    # -- inputs -----------------------------------------------------------------------------------

    def _inputs(self, decision_nodes: list[int], liveness: Liveness) -> dict[int, Source]:
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
        for p, opts in opt_state_params(g).items():
            if p in env:
                for o in opts:
                    env[o] = env[p]
        for vid in g.inputs:
            if vid not in env:
                env[vid] = self._const(Sharding.replicated(g.values[vid].rank))
        for vid in g.inputs:  # arguments are live for the whole step
            s = env[vid]
            if s.node != CONST_NODE:
                node = self.nodes[s.node]
                node.bytes = node.bytes + liveness.bytes(g.values[vid], s)
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

    # -- one graph --------------------------------------------------------------------------------

    def _graph(self, g: Graph, env: Mapping[int, Source], mult: int, batch) -> dict[int, Source]:
        src: dict[int, Source] = dict(env)
        for v in g.values:
            if v.id not in src and v.id not in g.producer:
                src[v.id] = self._const(Sharding.replicated(v.rank))
        batch = set(batch)
        fused = fused_values(g)
        timeline = self.liveness.timeline(g)
        for position, op in enumerate(g.ops):
            check_deadline(self.deadline, "building the model")
            timeline.here = 2 * position  # where reads happen (search.ilp_memory's positions)
            if any(i in batch for i in op.inputs):
                batch.update(op.outputs)
            self.n_ops += 1
            if op.primitive == "scan":
                self._scan(g, op, src, mult, batch)
            elif op.primitive == "cond":
                self._cond(g, op, src, mult, batch)
            elif op.rule is not None:
                self._op(g, op, src, mult, batch, fused)
        self.liveness.finish(g, src, self._as_written(g, src))
        return src

    def _op(self, g: Graph, op: Op, src: dict[int, Source], mult: int, batch, fused) -> None:
        rule = op.rule
        meetings = g.derived("propagate.sum_paths", sum_paths)
        for vid in op.inputs:
            s = src[vid]
            if (
                vid in meetings
                and (id(g), vid) not in self._first_read
                and any(x.partial for x in s.shardings)
            ):
                src[vid] = self._to_partner(g, vid, s, meetings[vid], src, mult)
                if src[vid] is not s:
                    self._written[(id(g), vid)] = s
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
            key = ("free", rule, fixed, self._fingerprints_of(operands, prios, proposing))
            node, strategies = self._free_node(g, op, key, operands, prios, proposing, fixed)
            self._charge_reads(g, op, operands, proposing, node, strategies, mult)
        self.decided[(id(g), op.id)] = (node, strategies)
        if op.id in g.live_ops:
            self.nodes[node].cost += self.prices.compute_all(g, op, strategies, fused) * mult
        for k, vid in enumerate(op.outputs):
            src[vid] = Source(node, *self._results(rule, strategies, k))
            if targets[k] is not None:
                self._read(g, vid, src[vid], _target(node, (targets[k],) * len(strategies)), mult)
                src[vid] = self._const(targets[k])

    def _pairs(self, reading: list[int]) -> int:
        return len(self.reachable(*reading))

    def reachable(self, i: int, j: int) -> list[tuple[int, int]]:
        """The strategy pairs of nodes i and j some valid assignment reaches. Known only when the
        space was enumerated (`exact`); a sampled space keeps every pair, or an assignment outside
        the sample would find its pair missing and take strategy 0 (measured on the tiny MoE:
        249 op decisions over 6 plans differed from propagation)."""
        hit = self._reach_cache.get((i, j))
        if hit is None:
            if self.exact:
                hit = reachable_pairs(self.nodes[i], self.nodes[j])
            else:
                hit = [(a, b) for a in range(self.nodes[i].size) for b in range(self.nodes[j].size)]
            self._reach_cache[(i, j)] = hit
        return hit

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
        key = ("merge", rule, fixed, self._fingerprints_of(operands, prios, proposing))
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
            self.liveness.read_pairs(
                g, vid, (vid, self._fingerprint(_target(idx, wants))), have, wants, a, b, table
            )
            if self._repeated(g, vid, have, _target(idx, wants)):
                continue
            m = self.prices.matrix(g, vid, have, wants)  # [n_have, n_strategies, P]
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

    def _free_node(
        self, g: Graph, op: Op, key, operands, prios, proposing, fixed
    ) -> tuple[int, list[Factors]]:
        idx = self.by_key.get(key)
        if idx is not None:
            self.nodes[idx].members += 1
            return idx, self.nodes[idx].strategies
        rule = op.rule
        # In a sampled model, the strategy propagation picks for the op under each sampled
        # assignment is the node's sample (and one of its strategies), so what reads it is known
        # per sample too.
        picks = self._sample_picks(rule, operands, prios, proposing, fixed)
        options = self._strategy_cache.get(rule)
        if options is None:
            options = self._strategy_cache[rule] = op_strategies(rule, self.mesh, self.max_axes)
        if len(options) > self.max_strategies:
            fused = fused_values(g)
            own = [float(self.prices.compute(g, op, f, fused).sum()) for f in options]
            keep = sorted(sorted(range(len(options)), key=lambda i: (own[i], i))[: self.max_strategies])
            options = [options[i] for i in keep]
        if picks is not None:
            options = list(dict.fromkeys([*options, *picks]))
        name = g.values[op.outputs[0]].name if op.outputs else op.primitive
        node = Node(NodeKind.FREE, name, list(options), np.zeros((len(options), N_PARTS)))
        node.pick = self._picker(rule, operands, prios, proposing, fixed, node.strategies)
        if picks is not None:
            index = {f: s for s, f in enumerate(options)}
            node.sample = np.array([index[f] for f in picks], dtype=np.int64)
        idx = self.by_key[key] = self._add(node)
        return idx, self.nodes[idx].strategies

    # -- structure --------------------------------------------------------------------------------

    def _scan(self, g: Graph, op: Op, src: dict[int, Source], mult: int, batch) -> None:
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
        self._stacked[id(body)] = self._stacked_targets(g, op, src)
        inner = self._graph(body, env, trips, body_batch)
        self.liveness.runs(g, op, body)
        for j, vid in enumerate(body.outputs):
            # The carry comes back as it went in; stacked outputs resolve their sums.
            self._read(body, vid, inner[vid], env[body.inputs[nc + j]] if j < nk else None, trips)
        for j, vid in enumerate(op.outputs):
            if j < nk:
                src[vid] = env[body.inputs[nc + j]]
            else:
                s = inner[body.outputs[j]].resolved()
                src[vid] = Source(s.node, tuple(Sharding(((), *sh.dims)) for sh in s.shardings), s.groups)

    def _cond(self, g: Graph, op: Op, src: dict[int, Source], mult: int, batch) -> None:
        self._resolve(g, op.inputs[0], src, mult)
        outs: list[Source] | None = None
        for branch in op.body:
            env = {
                b: self._resolve(g, v, src, mult) for v, b in zip(op.inputs[1:], branch.inputs, strict=True)
            }
            branch_batch = {b for v, b in zip(op.inputs[1:], branch.inputs, strict=True) if v in batch}
            inner = self._graph(branch, env, mult, branch_batch)
            self.liveness.runs(g, op, branch)
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

    # -- reads: where their prices land -----------------------------------------------------------

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
        elif not replicated_free:  # (an output's layout is its own buffer's)
            self.liveness.read(g, vid, (vid, self._fingerprint(want)), have, want)
        if self._repeated(g, vid, have, want):
            return
        m = self.prices.matrix(
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


def _target(node: int, shardings: tuple[Sharding, ...]) -> Source:
    """A sharding a read wants per strategy of `node` (never a pending sum)."""
    return Source(node, shardings, ((),) * len(shardings))
