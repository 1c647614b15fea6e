"""What the backend compiler does to a sharded program that decides its memory: how pending sums
are resolved, which collectives it combines, the order it schedules ops and collectives in, and
which donated inputs copy insertion copies.

cost_model.liveness builds the timeline of buffers on these decisions.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import math
from collections.abc import Callable, Sequence

from ir.comm import CollectiveKind
from ir.graph import Graph, Op
from ir.propagate import Propagation
from ir.reshard import reshard
from ir.rules import FactorKind
from ir.sharding import MeshShape, Sharding
from ir.spans import leaves_sums

_SUMS = (CollectiveKind.ALL_REDUCE, CollectiveKind.REDUCE_SCATTER)
_UNLIMITED = 2**63 - 1


@dataclasses.dataclass(frozen=True, slots=True)
class Compiler:
    """What the backend compiler does to the sharded program that changes its memory.

    Attributes:
      name: the backend.
      all_reduce_combine_bytes: XLA's all-reduce combiner merges independent all-reduces of the
        same mesh axes and dtype into one tuple all-reduce of at most this many bytes (0: none).
      reduce_scatter_combine_bytes: the same for reduce-scatters.
      combine_count: the most collectives one combined collective holds.
      reduce_scatter_as_all_reduce: a reduce-scatter is lowered as a full all-reduce and a local
        slice (XLA:CPU), so its full-size result is live for a moment and it combines as an
        all-reduce.
      pointer_bytes: a tuple buffer (the step's outputs, a combined collective's results) is a
        table of one pointer per element.
      copies_donated_inputs: copy insertion runs before scheduling (XLA:CPU), so a donated input
        that an op off the path to its overwriting output also reads is first copied: nothing
        orders that read before the overwrite. (XLA:GPU elides copies again after scheduling.)
      breadth_first: the scheduler runs every op as soon as its inputs are ready, first come first
        served (XLA:CPU's BFScheduler, xla_cpu_enable_concurrency_optimized_scheduler); else ops
        run in program order, a stand-in for a memory-aware list scheduler.
      library_reduce_elements: reductions of at least this many local elements go to a library
        (XLA:CPU's YNNPACK rewriter; 0: none), which takes in the elementwise producers only it
        reads, while a value it shares with other readers must be written to memory.
    """

    name: str
    all_reduce_combine_bytes: int
    reduce_scatter_combine_bytes: int
    combine_count: int = 256
    reduce_scatter_as_all_reduce: bool = False
    pointer_bytes: int = 8
    copies_donated_inputs: bool = False
    breadth_first: bool = False
    library_reduce_elements: int = 0


# xla/service/cpu/cpu_compiler.cc: CpuAllReduceCombiner(kCombineBytes = int64 max, kCombineCount =
# 256); no reduce-scatter or all-gather combiner; reduce-scatter stays an all-reduce and a
# dynamic-slice (docs/../JAX-NOTES: "The CPU backend keeps gradient synchronisation as all-reduce +
# dynamic-slice").
XLA_CPU = Compiler(
    "xla-cpu",
    all_reduce_combine_bytes=_UNLIMITED,
    reduce_scatter_combine_bytes=0,
    reduce_scatter_as_all_reduce=True,
    copies_donated_inputs=True,
    breadth_first=True,
    library_reduce_elements=4096,  # xla/backends/cpu: YNNPACK's preferred reduce size
)
# xla/debug_options_flags.cc: xla_gpu_all_reduce_combine_threshold_bytes and
# xla_gpu_reduce_scatter_combine_threshold_bytes default to 30 MiB, 256 ops per combined op.
XLA_GPU = Compiler(
    "xla-gpu",
    all_reduce_combine_bytes=30 * 2**20,
    reduce_scatter_combine_bytes=30 * 2**20,
)


def compiler_for(hardware_name: str) -> Compiler:
    """The compiler model of a hardware preset: XLA:CPU for 'cpu', XLA:GPU otherwise (GPUs, and
    TPUs, whose combiner thresholds are of the same order)."""
    return XLA_CPU if hardware_name == "cpu" else XLA_GPU


def local_bytes(shape: Sequence[int], itemsize: int, sharding: Sharding, mesh: MeshShape) -> int:
    """Bytes of one device's shard of a tensor of `shape` laid out as `sharding`."""
    return itemsize * math.prod(
        n // mesh.axes_size(axes) for n, axes in zip(shape, sharding.dims, strict=True)
    )


@dataclasses.dataclass(slots=True)
class Resolution:
    """How a value is turned from the layout its op writes into the layout it is stored in."""

    value: int
    produced: Sharding
    first: CollectiveKind | None  # the kind of the first collective (None: a local slice, none)
    key: tuple | None  # combiner key (kind, axes, dtype) when the first collective can combine
    bytes: int  # bytes of the combinable collective


def _produced(prop: Propagation, op: Op, k: int) -> Sharding:
    """The layout op writes its k-th result in: its factors' axes, and a pending sum over the
    axes of its sharded reduction factors."""
    vid = op.outputs[k]
    decided = prop.ops[op.id]
    if decided is None or op.rule is None:
        return prop.shardings[vid]
    f = decided.factors
    dims = tuple(tuple(a for x in fs for a in f[x]) for fs in op.rule.results[k])
    partial = frozenset(a for x in op.rule.factors_of(FactorKind.REDUCTION) for a in f[x])
    return Sharding(dims, partial)


def _sum_groups(prop: Propagation, op: Op) -> tuple[tuple[str, ...], ...]:
    f = prop.ops[op.id].factors
    return tuple(f[x] for x in reversed(op.rule.factors_of(FactorKind.REDUCTION)) if f[x])


def resolutions_of(
    prop: Propagation, op: Op, compiler: Compiler, memo: dict | None = None
) -> tuple[Resolution, ...]:
    """The resolutions of an op's results that are not stored as written.

    `memo`: the collectives of each resolution by what decides them (shape, dtype, layouts, sum
    groups): values of one shape resolve alike (an unrolled model's layers)."""
    found = (_resolution(prop, op, k, compiler, memo) for k in range(len(op.outputs)))
    return tuple(r for r in found if r is not None)


def renamed_resolutions(found: tuple[Resolution, ...], like: Op, op: Op) -> tuple[Resolution, ...]:
    """`found`, the resolutions of op `like`, as those of `op`, an op of the same kind
    (`Graph.op_kinds`) decided and laid out alike: result for result."""
    return tuple(
        [
            Resolution(op.outputs[like.outputs.index(r.value)], r.produced, r.first, r.key, r.bytes)
            for r in found
        ]
    )


def _resolution(
    prop: Propagation, op: Op, k: int, compiler: Compiler, memo: dict | None
) -> Resolution | None:
    vid = op.outputs[k]
    v = prop.graph.values[vid]
    made = _produced(prop, op, k)
    stored = prop.shardings[vid]
    if made == stored:
        return None
    groups = _sum_groups(prop, op) if made.partial else None
    if memo is None:
        colls = tuple(reshard(v, made, Sharding(stored.dims), prop.mesh, groups)[0])
    else:
        alike = (v.shape, v.dtype, made, stored.dims, groups, prop.mesh)
        colls = memo.get(alike)
        if colls is None:
            colls = memo[alike] = tuple(reshard(v, made, Sharding(stored.dims), prop.mesh, groups)[0])
    key = None
    nbytes = 0
    if colls and colls[0].kind in _SUMS:
        kind = colls[0].kind
        axes = colls[0].axes
        if compiler.reduce_scatter_as_all_reduce and kind is CollectiveKind.REDUCE_SCATTER:
            # One all-reduce over every pending axis, then this device's slice.
            kind = CollectiveKind.ALL_REDUCE
            axes = tuple(a for a in prop.mesh.axes if a in made.partial)
        key = (kind, axes, v.dtype)
        nbytes = local_bytes(v.shape, v.itemsize, Sharding(made.dims), prop.mesh)
        if kind is CollectiveKind.REDUCE_SCATTER:
            nbytes = local_bytes(v.shape, v.itemsize, stored, prop.mesh)
    return Resolution(vid, made, colls[0].kind if colls else None, key, nbytes)


def combine(g: Graph, order: list[Op], cands: list[Resolution], compiler: Compiler) -> list[list[int]]:
    """Groups of candidate indices XLA's combiner merges (xla/service/collective_combiner_utils.h,
    CombineInstructionsByKey): in program order, the first remaining candidate opens a group of
    its key; later candidates of that key join while the bytes stay under the threshold, until
    one depends on a member (the group closes). Repeat until every candidate is placed. A merged
    group makes everything that read one member's result depend on every member's input."""
    if not cands:
        return []
    # anc[c]: the candidates (a bitset) whose reduced results candidate c's input depends on;
    # bit[c]: candidate c's bit. The bits are positions among the graph's values that may be
    # pending sums (`_sum_ancestors`, worked out once per graph); bits of values that are not
    # candidates of this plan are never tested.
    position, ancestors = g.derived(("compiler.sum_ancestors", id(order)), lambda g: _sum_ancestors(order))
    if all(c.value in position for c in cands):
        anc = [ancestors[c.value] for c in cands]
        bit = [1 << position[c.value] for c in cands]
    else:  # (a candidate that is not a sum: walk this plan's ops)
        anc = _ancestors(g, order, cands)
        bit = [1 << c for c in range(len(cands))]
    return _group(cands, anc, bit, compiler)


def _group(cands: list[Resolution], anc: list[int], bit: list[int], compiler: Compiler) -> list[list[int]]:
    """`combine`'s groups, given per candidate the bits of those it depends on and its own bit.

    A group opens at the first candidate left (in program order) and takes the candidates of its
    key that follow, in order: one over the threshold alone is a group of its own; the group
    closes at the first that would take it over the threshold or depends on a member, or when
    it is full. So the candidates of a key are always placed first to last: each key keeps its
    candidates in order and how many of them are placed."""
    limit = {
        CollectiveKind.ALL_REDUCE: compiler.all_reduce_combine_bytes,
        CollectiveKind.REDUCE_SCATTER: compiler.reduce_scatter_combine_bytes,
    }
    by_key: dict[tuple, list[int]] = {}
    at = []  # per candidate, its place among its key's
    # Per key, its candidates under the threshold (one over it is a group of its own and never
    # depends on a member, so its bits are never tested), and per place among its candidates
    # how many of those come before it: what the sweep after a merge looks at.
    small: dict[tuple, list[int]] = {}
    small_before: dict[tuple, list[int]] = {}
    for c, r in enumerate(cands):
        key = r.key
        same = by_key.get(key)
        if same is None:
            same = by_key[key] = []
            small[key], small_before[key] = [], []
        at.append(len(same))
        same.append(c)
        small_before[key].append(len(small[key]))
        if r.bytes <= limit[key[0]]:
            small[key].append(c)
    for key, before in small_before.items():  # (and once all are placed)
        before.append(len(small[key]))
    placed = dict.fromkeys(by_key, 0)  # key -> how many of its candidates are placed
    groups: list[list[int]] = []
    head = 0  # every candidate before it is placed
    while True:
        while head < len(cands) and placed[cands[head].key] > at[head]:
            head += 1
        if head == len(cands):
            return groups
        key = cands[head].key
        same = by_key[key]
        cap = limit[key[0]]
        chosen: list[int] = []
        total = 0
        bits = inputs = 0  # the members' bits; the bits of what their inputs depend on
        k = placed[key]
        while k < len(same):
            c = same[k]
            if cands[c].bytes > cap:
                groups.append([c])
                k += 1
                if not chosen:
                    break  # (the next group opens at the next candidate left, of any key)
                continue
            if total + cands[c].bytes > cap:
                break
            # Dependent either way (a merged group can make an earlier op wait on a later one).
            if anc[c] & bits or inputs & bit[c]:
                break
            chosen.append(c)
            bits |= bit[c]
            inputs |= anc[c]
            total += cands[c].bytes
            k += 1
            if len(chosen) >= compiler.combine_count:
                break
        placed[key] = k
        if chosen:
            groups.append(chosen)
        if len(chosen) > 1:
            # Whoever depended on one member now depends on every member's inputs. The sets stay
            # transitively closed, so one sweep (of the candidates not placed) suffices.
            mask = inputs | bits
            for key_, cs in small.items():
                for c in cs[small_before[key_][placed[key_]] :]:
                    if anc[c] & bits:
                        anc[c] |= mask


def schedule(
    g: Graph,
    order: list[Op],
    groups: list[list[Resolution]],
    breadth_first: bool,
    memo: dict | None = None,
) -> list[int]:
    """The order the ops and (combined) collectives run in: an op by its id, group k by -1 - k.

    Program order, each collective right after the last op that writes one of its inputs and the
    ops that need its results moved after it, as any scheduler must; or, `breadth_first`, XLA's
    BFScheduler: every node runs as soon as its inputs are ready, first come first served.
    """

    def make() -> list[int]:
        return _nodes(g, order, groups, True) if breadth_first else _program_order(g, order, groups)

    if memo is None:
        return make()
    key = (id(g), breadth_first, tuple(tuple(r.value for r in members) for members in groups))
    nodes = memo.get(key)
    if nodes is None:
        nodes = memo[key] = make()
    return nodes


def _program_order(g: Graph, order: list[Op], groups: list[list[Resolution]]) -> list[int]:
    """`_nodes(g, order, groups, False)` without a heap for every node.

    Each node has a priority, its place in program order (`rank`, ties between collectives
    broken by node id, as the heap breaks them). The node run next is the ready one of least
    priority, so a node runs in its place unless it reads, through any chain, a node placed
    after it: a reader of a combined collective that comes before the member written last, and
    whatever waits for it in turn. Such a node is held back to the collective of greatest
    priority it waits for (its `key`, pushed along the edges from the readers placed too early)
    and runs in the batch that collective releases, right after it, the ready one of least
    priority first (`_batch`). So the schedule is every node not held back, in order, each
    collective followed by its batch: Python for the collectives and the nodes held back, slices
    of the graph's op ids for the rest. The edges between ops are the graph's, worked out once
    per `order`."""
    static = g.derived(("compiler.program_order", id(order)), lambda g: _edges(g, order))
    if static[0] is not order:  # another list under a reused id: work it out again
        static = _edges(g, order)
    _, position, _, op_users, ids = static
    producer = g.producer
    consumers = g.consumers
    # Priorities: the op at position q: 2q * m + last; group k, ranked r (2 * its last producer's
    # position + 1): r * m + last - 1 - k (a tie in rank goes to the greater k, the smaller id).
    last = len(groups)
    m = last + 1
    prio: dict[int, int] = {}  # of the groups
    made_by: dict[int, list[int]] = {}  # op -> the groups resolving what it writes
    key: dict[int, int] = {}  # node held back -> the priority of the node that releases it
    stack: list[int] = []
    for k, members in enumerate(groups):
        n = -1 - k
        if len(members) == 1:  # (most)
            d = producer[members[0].value]
            prio[n] = (2 * position[d] + 1) * m + last - 1 - k
            made_by.setdefault(d, []).append(n)
            continue
        ds = {producer[r.value] for r in members}
        at = max(map(position.__getitem__, ds))
        prio[n] = p = (2 * at + 1) * m + last - 1 - k
        for d in ds:
            made_by.setdefault(d, []).append(n)
        if len(ds) > 1:  # a member's reader may come before another member's producer
            for r in members:
                for u in consumers.get(r.value, ()):
                    q = position.get(u)
                    if q is not None and q <= at and p > key.get(u, -1):
                        key[u] = p
                        stack.append(u)
    # Push each hold to what waits for the node held: its readers, and the collectives that
    # resolve what an op writes (a reader of such a collective is also a reader of the op: the
    # edge adds nothing the collective does not).
    while stack:
        x = stack.pop()
        p = key[x]
        if x < 0:
            users = [u for r in groups[-1 - x] for u in consumers.get(r.value, ()) if u in position]
        else:
            users = op_users[x] + tuple(made_by.get(x, ()))
        for u in users:
            if p > key.get(u, -1) and p > (prio[u] if u < 0 else 2 * position[u] * m + last):
                key[u] = p
                stack.append(u)
    batches: dict[int, list[int]] = {}
    for x, p in key.items():
        batches.setdefault(p, []).append(x)
    # (A hold is always a collective's priority: what holds a node back is a collective.)
    events = [(p, n) for n, p in prio.items() if n not in key]
    events += [(2 * position[x] * m + last, x) for x in key if x >= 0]
    events.sort()
    out: list[int] = []
    i = 0
    for p, x in events:
        if x < 0:  # a collective in its place, then what it releases
            j = (p // m + 1) // 2
            out += ids[i:j]
            i = j
            out.append(x)
            if p in batches:
                out += _batch(g, x, batches[p], groups, static, prio, m, last)
        else:  # held back: runs in a batch
            out += ids[i : position[x]]
            i = position[x] + 1
    out += ids[i:]
    if len(out) != len(order) + len(groups):  # only a cycle leaves nodes out
        raise RuntimeError("memory: combined collectives that depend on each other; this is a bug.")
    return out


def _batch(
    g: Graph,
    releaser: int,
    members: list[int],
    groups: list[list[Resolution]],
    static: tuple,
    prio: dict[int, int],
    m: int,
    last: int,
) -> list[int]:
    """The order `members`, held back to `releaser`, run in once it has run: each as soon as
    what it waits for among them has run, the ready one of least priority first. An op waits
    for the ops among them that write what it reads and the collectives among them that
    resolve it (and so for their producers: an edge that adds nothing)."""
    _, position, op_deps, _, _ = static
    held = set(members)
    consumers = g.consumers
    users: dict[int, list[int]] = {}
    pending = dict.fromkeys(members, 0)
    # (the releaser has run: it must wait for none of them, or they wait for each other)
    if held.intersection(_node_deps(g, releaser, groups, op_deps)):
        raise RuntimeError("memory: combined collectives that depend on each other; this is a bug.")
    if min(members) >= 0:
        # Ops alone: what each waits for among them comes before it in program order, so the
        # ready one of least priority is always the next in program order.
        return sorted(members, key=position.__getitem__)
    for x in members:
        if x < 0:
            for r in groups[-1 - x]:  # its readers among them wait for it
                for u in consumers.get(r.value, ()):
                    if u in held:
                        users.setdefault(x, []).append(u)
                        pending[u] += 1
        ds = held.intersection(_node_deps(g, x, groups, op_deps))
        for d in ds:
            users.setdefault(d, []).append(x)
        pending[x] += len(ds)
    heap = [(prio[x] if x < 0 else 2 * position[x] * m + last, x) for x in members if not pending[x]]
    heapq.heapify(heap)
    out = []
    while heap:
        x = heapq.heappop(heap)[1]
        out.append(x)
        for u in users.get(x, ()):
            pending[u] -= 1
            if not pending[u]:
                heapq.heappush(heap, (prio[u] if u < 0 else 2 * position[u] * m + last, u))
    return out


def _node_deps(g: Graph, x: int, groups: list[list[Resolution]], op_deps: dict) -> frozenset[int] | list[int]:
    """The ops node `x` waits for: a collective's producers; an op's (`_edges`)."""
    if x < 0:
        return [g.producer[r.value] for r in groups[-1 - x]]
    return op_deps[x]


def _waits_for(g: Graph, op: Op, group_of: dict[int, int], position: dict[int, int]) -> set[int]:
    """The nodes `op` waits for: per operand, the collective group that resolves it, else the
    live op that writes it."""
    producer = g.producer
    return {
        group_of[u] if u in group_of else producer[u]
        for u in op.inputs
        if u in group_of or (u in producer and producer[u] in position)
    }


def _sum_ancestors(order: list[Op]) -> tuple[dict[int, int], dict[int, int]]:
    """(per value that may be left a pending sum (made by an op with a reduction factor), its
    position; per such value, the positions (a bitset) of those its op's inputs depend on)."""
    position: dict[int, int] = {}
    for op in order:
        if leaves_sums(op):
            for u in op.outputs:
                position[u] = len(position)
    after: dict[int, int] = {}  # value id -> the positions it depends on, itself included
    ancestors: dict[int, int] = {}
    for op in order:
        bits = 0
        for u in op.inputs:
            bits |= after.get(u, 0)
        for u in op.outputs:
            p = position.get(u)
            if p is not None:
                ancestors[u] = bits
                bits_out = bits | 1 << p
            else:
                bits_out = bits
            if bits_out:
                after[u] = bits_out
    return position, ancestors


def _ancestors(g: Graph, order: list[Op], cands: list[Resolution]) -> list[int]:
    """Per candidate, the candidates (a bitset of indices) whose results its op's inputs depend on."""
    index_of = {c.value: i for i, c in enumerate(cands)}
    after: dict[int, int] = {}  # value id -> what its readers inherit
    at_op: dict[int, int] = {}
    for op in order:
        bits = 0
        for u in op.inputs:
            bits |= after.get(u, 0)
        at_op[op.id] = bits
        for u in op.outputs:
            c = index_of.get(u)
            after[u] = bits if c is None else bits | 1 << c
    return [at_op[g.producer[c.value]] for c in cands]


def _edges(g: Graph, order: list[Op]) -> tuple:
    """(order, per op id its position, its producers among `order`, the ops that read it, the op
    ids in order): the schedule's edges without collectives."""
    position = {op.id: i for i, op in enumerate(order)}
    deps = {op.id: frozenset(_waits_for(g, op, {}, position)) for op in order}
    users: dict[int, list[int]] = {op.id: [] for op in order}
    for n, ds in deps.items():
        for d in ds:
            users[d].append(n)
    return (
        order,
        position,
        deps,
        {n: tuple(us) for n, us in users.items()},
        [op.id for op in order],
    )


def _nodes(g: Graph, order: list[Op], groups: list[list[Resolution]], breadth_first: bool) -> list[int]:
    """The schedule as node ids: an op by its id, a collective group k by -1 - k."""
    position = {op.id: i for i, op in enumerate(order)}
    producer = g.producer
    # Nodes: an op by its id, a collective group k by -1 - k. Rank: program order, a collective
    # just after the last op that writes one of its inputs.
    group_of = {r.value: -1 - k for k, members in enumerate(groups) for r in members}
    rank = {op.id: 2 * position[op.id] for op in order}
    deps: dict[int, set[int]] = {}
    for k, members in enumerate(groups):
        deps[-1 - k] = {producer[r.value] for r in members}
        rank[-1 - k] = 2 * max(position[producer[r.value]] for r in members) + 1
    for op in order:
        deps[op.id] = _waits_for(g, op, group_of, position)
    users: dict[int, list[int]] = {n: [] for n in deps}
    for n, ds in deps.items():
        for d in ds:
            users[d].append(n)
    for n in users:
        users[n].sort(key=rank.__getitem__)
    pending = {n: len(ds) for n, ds in deps.items()}
    ready = sorted((n for n, c in pending.items() if not c), key=rank.__getitem__)
    if breadth_first:
        queue = collections.deque(ready)
        pop, push = queue.popleft, queue.append
    else:  # the ready node earliest in program order
        heap = [(rank[n], n) for n in ready]

        def pop():
            return heapq.heappop(heap)[1]

        def push(n):
            heapq.heappush(heap, (rank[n], n))

        queue = heap
    out = []
    while queue:
        n = pop()
        out.append(n)
        for u in users[n]:
            pending[u] -= 1
            if not pending[u]:
                push(u)
    if len(out) != len(deps):  # only a cycle leaves nodes waiting
        raise RuntimeError("memory: combined collectives that depend on each other; this is a bug.")
    return out


def donated_copies(
    prop: Propagation,
    order: list[Op],
    groups: list[list[Resolution]],
    alias: dict[int, int],
    op_step: dict[int, int],
    size: Callable[[int, Sharding], int],
) -> list[tuple[int, int, int, int]]:
    """The copies copy insertion makes of donated inputs read by an op that does not lead to the
    output overwriting them, live from the first read to the last: (input, bytes, first step,
    last step), with `op_step` the step of each op and `size` a value's bytes in a sharding."""
    g = prop.graph
    targets: dict[int, int] = {}  # donated input -> bit of the output that overwrites it
    bits_of: dict[int, int] = {}  # value (buffer root) -> bits of the aliased outputs it is
    for k, (vid, src) in enumerate(zip(g.outputs, g.output_alias, strict=False)):
        if src in g.donated and src >= 0:
            targets[src] = 1 << k
            root = alias.get(vid, vid)
            bits_of[root] = bits_of.get(root, 0) | 1 << k
    if not targets:
        return []
    merged = {r.value: members for members in groups if len(members) > 1 for r in members}
    # Per op, the aliased outputs it leads to; a combined collective joins its members' readers.
    leads: dict[int, int] = {}
    via: dict[int, int] = {}  # value -> outputs its readers lead to
    while True:
        before = dict(leads)
        for op in reversed(order):
            bits = 0
            for u in op.outputs:
                root = alias.get(u, u)
                b = bits_of.get(root, 0)
                for m in merged.get(u, ()):
                    b |= via.get(m.value, 0)
                bits |= b | via.get(u, 0)
            leads[op.id] = bits
            for u in op.inputs:
                via[u] = via.get(u, 0) | bits
        if leads == before:
            break
    reads: dict[int, list[int]] = {}  # donated input -> ops that read its buffer
    for op in order:
        for u in dict.fromkeys(alias.get(u, u) for u in op.inputs):
            if u in targets:
                reads.setdefault(u, []).append(op.id)
    out = []
    for src, ops in reads.items():
        if any(not leads[o] & targets[src] for o in ops):
            steps = [op_step[o] for o in ops]
            b = size(src, prop.shardings[src])
            out.append((src, b, min(steps), max(steps)))
    return out
