"""The decision space every searcher shares: shard a dimension group's input dims over mesh axes.

A decision is one dimension group (ir.dims) seen through the step's inputs: the parameter and
batch dims the factor rules tie together (the ff dim of w_in, w_gate, w_out and b_in; the batch
dim of every batch tensor; the model dim of every weight). Groups that differ only in their layer
index are tied into one decision by default (decide once for all layers, as for a scanned body),
so a transformer has a handful of decisions however deep it is. Optimizer state follows its
parameter (the plan's `follow_params`). Propagation decides every other value.

An option for a decision is a set of mesh axes, taken major to minor in mesh order. Validity is
checked once here for all searchers: each axis must divide every dim the decision shards, and no
tensor may use an axis twice (two decisions that share a tensor cannot both take 'model').
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Mapping, Sequence

from ir.dims import dim_groups
from ir.graph import Graph, Role
from ir.patterns import name_pattern
from ir.plan import Plan, Provenance, followed_param, param_index
from ir.sharding import MeshShape, Sharding

Assignment = tuple[tuple[str, ...], ...]  # per decision, its mesh axes (() = not sharded)


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """One unit decision.

    Attributes:
      id: index in `DecisionSpace.decisions`.
      name: a readable label, e.g. 'params/layers_*/mlp/w_in:1 +3'.
      members: (input value id, dim) pairs the decision shards.
      options: valid axis tuples on their own (before interactions with other decisions).
    """

    id: int
    name: str
    members: tuple[tuple[int, int], ...]
    options: tuple[tuple[str, ...], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class DecisionSpace:
    """The decisions of a graph on a mesh, and how an assignment becomes input shardings.

    Attributes:
      graph: the graph.
      mesh: the mesh.
      decisions: the decisions, biggest first (by bytes they shard).
      fixed: (value id, dim) -> axes fixed by user tactics; decisions never touch these dims.
    """

    graph: Graph
    mesh: MeshShape
    decisions: tuple[Decision, ...]
    fixed: Mapping[tuple[int, int], tuple[str, ...]]

    @property
    def empty(self) -> Assignment:
        return ((),) * len(self.decisions)

    @functools.cached_property
    def opt_state(self) -> dict[int, list[int]]:
        """`opt_state_params(graph)`: the optimizer-state inputs that follow each parameter."""
        return opt_state_params(self.graph)

    def tensor_axes(self, assignment: Assignment) -> dict[int, dict[int, tuple[str, ...]]]:
        """value id -> dim -> axes, fixed dims first."""
        out: dict[int, dict[int, tuple[str, ...]]] = {}
        for (vid, dim), axes in self.fixed.items():
            out.setdefault(vid, {})[dim] = axes
        for d, axes in zip(self.decisions, assignment, strict=True):
            if axes:
                for vid, dim in d.members:
                    out.setdefault(vid, {})[dim] = axes
        return out

    def valid(self, assignment: Assignment) -> bool:
        """No tensor uses a mesh axis twice."""
        for dims in self.tensor_axes(assignment).values():
            used = [a for axes in dims.values() for a in axes]
            if len(used) != len(set(used)):
                return False
        return True

    def options(self, assignment: Assignment, decision: int) -> tuple[tuple[str, ...], ...]:
        """The options of one decision that keep `assignment` valid (() always among them)."""
        others = list(assignment)
        taken: dict[int, set[str]] = {}
        others[decision] = ()
        for vid, dims in self.tensor_axes(tuple(others)).items():
            taken[vid] = {a for axes in dims.values() for a in axes}
        members = {vid for vid, _ in self.decisions[decision].members}
        busy = set().union(*(taken.get(v, set()) for v in members)) if members else set()
        return tuple(o for o in self.decisions[decision].options if not set(o) & busy)

    def shardings(self, assignment: Assignment) -> dict[int, Sharding]:
        """Input shardings of the params and batch (optimizer state follows in the plan)."""
        out = {}
        for vid, dims in self.tensor_axes(assignment).items():
            v = self.graph.values[vid]
            out[vid] = Sharding(tuple(dims.get(d, ()) for d in range(v.rank)))
        return out

    def plan(self, assignment: Assignment, provenance: Provenance | None = None) -> Plan:
        """The assignment as a Plan (params, batch; optimizer state following the params)."""
        g = self.graph
        shardings = self.shardings(assignment)
        named = {g.values[vid].name: s for vid, s in shardings.items()}
        # Optimizer state takes its parameter's sharding, as the plan's follow_params does.
        for pid, states in self.opt_state.items():
            if pid in shardings:
                for vid in states:
                    named[g.values[vid].name] = shardings[pid]
        kwargs = {"provenance": provenance} if provenance is not None else {}
        return Plan.from_shardings(self.mesh, g, named, **kwargs)

    def assignment_of(self, plan: Plan) -> Assignment | None:
        """The assignment closest to `plan`'s parameter and batch shardings (per decision, the axes
        most of its member dims take), or None when that assignment is not valid. Used to seed
        searchers with expert baselines and to warm-start from a plan file."""
        shardings = plan.input_shardings(self.graph)
        out = []
        for d in self.decisions:
            votes: dict[tuple[str, ...], int] = {}
            for vid, dim in d.members:
                axes = shardings[vid].dims[dim] if vid in shardings else ()
                votes[axes] = votes.get(axes, 0) + 1
            best = max(votes.items(), key=lambda kv: (kv[1], -len(kv[0])))[0] if votes else ()
            out.append(best if best in d.options else ())
        a = tuple(out)
        return a if self.valid(a) else None

    def enumerate(self) -> itertools.chain:
        """Every valid assignment (for small spaces: the exhaustive reference)."""

        def rec(i: int, acc: list[tuple[str, ...]]):
            if i == len(self.decisions):
                yield tuple(acc)
                return
            for o in self.options(tuple(acc) + ((),) * (len(self.decisions) - i), i):
                acc.append(o)
                if i + 1 < len(self.decisions) or self.valid(tuple(acc)):
                    yield from rec(i + 1, acc)
                acc.pop()

        return rec(0, [])

    @property
    def size(self) -> int:
        """Number of assignments ignoring interactions (an upper bound of `enumerate`)."""
        n = 1
        for d in self.decisions:
            n *= len(d.options)
        return n


def build_space(
    graph: Graph,
    mesh: MeshShape,
    *,
    fixed: Plan | None = None,
    tie_layers: bool = True,
    max_axes: int = 2,
) -> DecisionSpace:
    """The decision space of `graph` on `mesh`.

    Args:
      graph: the traced step.
      mesh: the mesh.
      fixed: a plan from user tactics; the dims it shards are fixed and excluded from decisions.
      tie_layers: decide once for groups that differ only in their layer index.
      max_axes: the most mesh axes one decision may shard over.
    """
    groups = dim_groups(graph)
    fixed_dims: dict[tuple[int, int], tuple[str, ...]] = {}
    if fixed is not None:
        for vid, s in fixed.input_shardings(graph).items():
            if graph.values[vid].role in (Role.PARAM, Role.BATCH):
                for d, axes in enumerate(s.dims):
                    if axes:
                        fixed_dims[(vid, d)] = axes
    inputs = {vid for vid in graph.inputs if graph.values[vid].role in (Role.PARAM, Role.BATCH)}
    units: dict[object, list[tuple[int, int]]] = {}
    for grp in groups.groups:
        if grp.loop:
            continue
        members = [
            (vid, d) for n, vid, d in grp.members if n == 0 and vid in inputs and (vid, d) not in fixed_dims
        ]
        if not members:
            continue
        key = (
            frozenset((name_pattern(graph.values[vid].name), d) for vid, d in members)
            if tie_layers
            else grp.id
        )
        units.setdefault(key, []).append((grp.id, members))
    # A tie is legal only if it never puts two dims of one tensor in one decision (an MLP's
    # hidden dims chain: layer i's output dim is layer i+1's input dim); such units stay untied.
    flat: dict[object, list[tuple[int, int]]] = {}
    for key, parts in units.items():
        members = [m for _, ms in parts for m in ms]
        if _one_dim_per_tensor(members):
            flat[key] = members
            continue
        for gid, ms in parts:
            # A group that holds two dims of one tensor (a square weight read both ways) decides
            # the first of them; propagation places the other.
            seen: set[int] = set()
            kept = []
            for vid, d in dict.fromkeys(ms):
                if vid not in seen:
                    seen.add(vid)
                    kept.append((vid, d))
            flat[("group", gid)] = kept
    units = flat
    axis_sets = [
        combo
        for k in range(1, max_axes + 1)
        for combo in itertools.combinations(
            tuple(a for a, s in zip(mesh.axes, mesh.shape, strict=True) if s > 1), k
        )
    ]
    decisions = []
    for members in units.values():
        sizes = [graph.values[vid].shape[d] for vid, d in members]
        opts = tuple(axes for axes in axis_sets if all(n % mesh.axes_size(axes) == 0 for n in sizes))
        if not opts:
            continue
        nbytes = sum(graph.values[vid].nbytes for vid, _ in dict.fromkeys(members))
        decisions.append((nbytes, tuple(sorted(set(members))), ((), *opts)))
    decisions.sort(key=lambda t: (-t[0], t[1]))
    out = tuple(
        Decision(i, _label(graph, members), members, opts) for i, (_, members, opts) in enumerate(decisions)
    )
    return DecisionSpace(graph, mesh, out, fixed_dims)


def _one_dim_per_tensor(members: Sequence[tuple[int, int]]) -> bool:
    vids = [vid for vid, _ in dict.fromkeys(members)]
    return len(vids) == len(set(vids))


def _label(graph: Graph, members: Sequence[tuple[int, int]]) -> str:
    names = sorted(
        {
            f"{name_pattern(graph.values[v].name)}:{d}".replace("\\d+", "*").replace("\\", "")
            for v, d in members
        }
    )
    return names[0] + (f" +{len(names) - 1}" if len(names) > 1 else "")


def opt_state_params(graph: Graph) -> dict[int, list[int]]:
    """Parameter input id -> the optimizer-state inputs that take its sharding, in input order:
    the plan file's follow_params rule (`ir.plan.followed_param`)."""
    index = param_index(graph)
    out: dict[int, list[int]] = {}
    for vid in graph.inputs:
        v = graph.values[vid]
        if v.role is Role.OPT_STATE:
            param = followed_param(v, index)
            if param is not None:
                out.setdefault(param.id, []).append(vid)
    return out


class InputLayouts:
    """A searcher's assignments one after another as the step's input shardings, each worked out
    from the last: only the values of the decisions that changed are made again (a searcher's
    next plan changes one or two). One per searcher (it keeps the last assignment)."""

    def __init__(self, space: DecisionSpace):
        g = space.graph
        members: dict[int, list[tuple[int, int]]] = {}
        for d in space.decisions:
            for vid, dim in d.members:
                members.setdefault(vid, []).append((d.id, dim))
        fixed: dict[int, dict[int, tuple[str, ...]]] = {}
        for (vid, dim), axes in space.fixed.items():
            fixed.setdefault(vid, {})[dim] = axes
        # value -> (rank, its fixed dims, (decision, dim) of each decision that shards it)
        self._values = {
            vid: (g.values[vid].rank, fixed.get(vid, {}), tuple(members.get(vid, ())))
            for vid in (*fixed, *(v for v in members if v not in fixed))
        }
        self._of_decision = tuple(tuple(dict.fromkeys(vid for vid, _ in d.members)) for d in space.decisions)
        # Values alike in rank, fixed dims and deciding (decision, dim)s are laid out alike (the
        # layers of a model): per value, a number for its class.
        classes: dict[tuple, int] = {}
        self._class = {
            vid: classes.setdefault((rank, tuple(sorted(fixed_dims.items())), ms), len(classes))
            for vid, (rank, fixed_dims, ms) in self._values.items()
        }
        self._followers = space.opt_state
        self._leader = {o: pid for pid, states in space.opt_state.items() for o in states}
        self._last: Assignment | None = None
        self._own: dict[int, Sharding] = {}  # `DecisionSpace.shardings` of the last assignment
        self._inputs: dict[int, Sharding] = {}  # ... with the optimizer state following
        self._bad: set[int] = set()  # values that take a mesh axis twice

    def __call__(self, assignment: Assignment) -> dict[int, Sharding]:
        """`DecisionSpace.shardings(assignment)`, each parameter's optimizer state following it
        (the plan's follow_params). The dict is kept for the next call: read it, do not change
        it."""
        last = self._last
        if last is None:
            touched = list(self._values)
        elif assignment == last:
            touched = []
        else:
            touched = [
                vid
                for d, (a, b) in enumerate(zip(assignment, last, strict=True))
                if a != b
                for vid in self._of_decision[d]
            ]
        made: dict[int, tuple] = {}  # per class of value, (its sharding or None, bad)
        for vid in touched:
            self._set(vid, assignment, made)
        self._last = assignment
        return self._inputs

    def valid(self, assignment: Assignment) -> bool:
        """`DecisionSpace.valid(assignment)`, kept per value as the layouts are made."""
        self(assignment)
        return not self._bad

    def _set(self, vid: int, assignment: Assignment, made: dict[int, tuple]) -> None:
        cls = self._class[vid]
        hit = made.get(cls)
        if hit is None:
            rank, fixed, members = self._values[vid]
            dims = dict(fixed)
            for d, dim in members:
                if assignment[d]:
                    dims[dim] = assignment[d]
            used = [a for axes in dims.values() for a in axes]
            s = Sharding(tuple(dims.get(d, ()) for d in range(rank))) if dims else None
            hit = made[cls] = (s, len(used) != len(set(used)))
        s, bad = hit
        if bad:
            self._bad.add(vid)
        else:
            self._bad.discard(vid)
        own, inputs = self._own, self._inputs
        if s is not None:
            own[vid] = inputs[vid] = s
        else:
            own.pop(vid, None)
            inputs.pop(vid, None)
        leader = self._leader.get(vid)
        if leader is not None and leader in own:  # it follows its parameter whatever it is given
            inputs[vid] = own[leader]
        for o in self._followers.get(vid, ()):
            if vid in own:
                inputs[o] = own[vid]
            elif o in own:
                inputs[o] = own[o]
            else:
                inputs.pop(o, None)
