"""XLA:CPU's fusion pass replayed on the rebuilt program (cost_model.xla_program), after
xla/service/instruction_fusion.cc with the ShouldFuse of cpu_instruction_fusion.cc: how many
times the compiled program computes each instruction."""

from __future__ import annotations

import dataclasses
from typing import Any

from cost_model.xla_program import (
    INDEX_REBUILDING,
    LIBRARY_ELEMENTWISE,
    LIBRARY_MIN_ELEMENTS,
    LOOP_FUSIBLE,
    Inst,
    Kind,
    Program,
)


def fusion_copies(prog: Program) -> dict[int, int]:
    """How many times the compiled program computes each live instruction.

    First the library fusions (computed once, opaque to what follows), then XLA's loop fusion over
    the rest (see `_LoopFusion`).
    """
    insts = prog.insts
    order = _post_order(insts, prog.root)
    users: list[list[int]] = [[] for _ in insts]
    for k in order:
        for o in dict.fromkeys(insts[k].operands):
            users[o].append(k)
    library = _library_fusions(insts, order, users)
    # One node per library fusion, standing for its members; every other node is an instruction.
    node = {k: ("library", library[k]) if k in library else k for k in order}
    nodes: dict[Any, _Node] = {}
    for k in order:
        n = nodes.setdefault(node[k], _Node(Kind.OPAQUE, [], 0, 0, True))
        inst = insts[k]
        if k not in library:
            n.kind, n.elements, n.rank, n.expensive = inst.kind, inst.elements, inst.rank, inst.expensive
            n.inst = inst
        elif any(node[u] != node[k] for u in users[k]):  # the library fusion's result
            n.elements, n.rank = max((n.elements, n.rank), (inst.elements, inst.rank))
        for o in inst.operands:
            if node[o] != node[k] and node[o] not in n.operands:
                n.operands.append(node[o])
    copies = _LoopFusion(nodes, _topological(nodes), node[prog.root]).run()
    return {k: 1 if k in library else copies.get(k, 0) for k in order}


def _library_fusions(insts: list[Inst], order: list[int], users: list[list[int]]) -> dict[int, int]:
    """Instruction -> library fusion. A fusion starts at each reduce the library takes (from the
    root up) and grows through neighbours it supports: up into producers all of whose users are
    inside, down into the single user of what it just took (backends/cpu/transforms/library_rewriter.cc)."""
    group: dict[int, int] = {}

    def supported(k: int) -> bool:
        inst = insts[k]
        if inst.kind is Kind.BROADCAST:
            return True
        if inst.kind is Kind.MOVE:
            return inst.name in ("bitcast", "reshape", "squeeze", "expand_dims", "broadcast_in_dim")
        if inst.kind is Kind.REDUCE:
            return inst.library
        if inst.kind is not Kind.ELEMENTWISE or inst.name not in LIBRARY_ELEMENTWISE or not inst.floating:
            return False
        # The library only takes elementwise work big enough to pay for the call.
        return max((inst.elements, *(insts[o].elements for o in inst.operands))) >= LIBRARY_MIN_ELEMENTS

    for start in reversed(order):
        if not insts[start].library or start in group:
            continue
        members = {start}
        group[start] = start
        frontier = [(o, True) for o in insts[start].operands]
        if len(users[start]) == 1:
            frontier.append((users[start][0], False))
        while frontier:
            k, up = frontier.pop(0)
            if k in group or insts[k].kind in (Kind.ROOT, Kind.PARAM) or not supported(k):
                continue
            if up and not all(u in members for u in users[k]):
                continue
            group[k] = start
            members.add(k)
            if up:
                frontier.extend((o, True) for o in insts[k].operands if o not in group)
            elif len(users[k]) == 1:
                frontier.append((users[k][0], False))
    return group


@dataclasses.dataclass(eq=False, slots=True)
class _Node:
    """An instruction, or a library fusion, as the loop fusion pass sees it."""

    kind: Kind
    operands: list
    elements: int
    rank: int
    expensive: bool
    inst: Inst | None = None


class _LoopFusion:
    """XLA's InstructionFusion (may_duplicate) with the CPU ShouldFuse, replayed.

    Consumers are visited in reverse post order and pull in their producers one at a time,
    operands nearest in the order first; a producer that has other users is copied. It is not
    fused when it is expensive and would be copied or read more than once per element (a
    broadcast, a dot), when it rebuilds its index (concatenate, pad, ...) and would be copied, or
    when it is "globally unfusible": it reads more than it writes and some path to a user cannot
    fuse it. A producer all of whose users took a copy disappears.
    """

    def __init__(self, nodes: dict, order: list, root):
        self.nodes = nodes
        self.order = order
        self.root = root
        self.position = {n: i for i, n in enumerate(order)}
        self.ancestors: dict = {}  # node -> bitset of the positions it depends on
        for n in order:
            bits = 0
            for o in nodes[n].operands:
                bits |= self.ancestors[o] | (1 << self.position[o])
            self.ancestors[n] = bits
        self.users: dict = {n: set() for n in order}
        for n in order:
            for o in nodes[n].operands:
                self.users[o].add(n)
        reusing = (Kind.BROADCAST, Kind.OPAQUE, Kind.ROOT)
        # A fusion's state: its members, its operands, and the operands some member reads more
        # than once per element (a broadcast, a dot).
        self.state = {
            n: _Fusion(
                [n], list(nodes[n].operands), set(nodes[n].operands) if nodes[n].kind in reusing else set()
            )
            for n in order
        }
        self.unfusible: set = set()
        self._paths: dict = {}

    def run(self) -> dict:
        nodes = self.nodes
        for n in reversed(self.order):
            if self._globally_unfusible(n):
                self.unfusible.add(n)
        queue = list(self.order)
        index = {n: i for i, n in enumerate(queue)}
        fusions = 0
        while queue:
            while queue and queue[-1] is None:
                queue.pop()
            if not queue:
                break
            n = queue.pop()
            index.pop(n, None)
            st = self.state[n]
            if not st.fused and nodes[n].kind not in LOOP_FUSIBLE:
                continue
            for o in sorted(
                (o for o in dict.fromkeys(st.operands) if o in index), key=index.__getitem__, reverse=True
            ):
                if o in self.unfusible or not self._should_fuse(n, o):
                    continue
                if not st.fused:  # the consumer becomes a fusion
                    fusions += 1
                    n, st = self._make_fusion(n, ("fusion", fusions))
                producer = self.state[o]
                st.members += producer.members
                st.operands = [p for p in st.operands if p != o] + producer.operands
                st.reused = (st.reused - {o}) | producer.reused
                self.users[o].discard(n)
                for p in set(producer.operands):
                    self.users[p].add(n)
                index[n] = len(queue)
                queue.append(n)  # look at its (new) operands again
                if not self.users[o]:  # every user took a copy
                    self.unfusible.discard(o)
                    queue[index.pop(o)] = None
                    for p in set(producer.operands):
                        self.users[p].discard(o)
                    del self.state[o]
                break
        copies: dict = {}
        for st in self.state.values():
            for m in st.members:
                copies[m] = copies.get(m, 0) + 1
        return copies

    def _make_fusion(self, n, f):
        st = self.state.pop(n)
        st.fused = True
        self.state[f] = st
        self.nodes[f] = self.nodes[n]
        self.users[f] = self.users.pop(n)
        for u in self.users[f]:
            self.state[u].operands = [f if p == n else p for p in self.state[u].operands]
        for p in set(st.operands):
            self.users[p].discard(n)
            self.users[p].add(f)
        self.ancestors[f], self.position[f] = self.ancestors[n], self.position[n]
        if n == self.root:
            self.root = f
        return f, st

    def _should_fuse(self, consumer, producer) -> bool:
        p = self.nodes[producer]
        if self.state[producer].fused or p.kind not in LOOP_FUSIBLE or producer == self.root:
            return False
        if p.expensive and producer in self.state[consumer].reused:
            return False
        if len(self.users[producer]) > 1:
            inst = p.inst
            if p.expensive and not (inst and inst.duplicable):
                return False
            if inst and (inst.name in INDEX_REBUILDING or inst.kind is Kind.REDUCE):
                return False
        return self.state[consumer].fused or self.nodes[consumer].kind in LOOP_FUSIBLE

    def _globally_unfusible(self, n) -> bool:
        """ComputeGloballyUnfusible: a producer with more than one operand as large as its result
        that reads more than it writes is not copied unless it fuses into every user on every path."""
        nodes = self.nodes
        node = nodes[n]
        if node.inst is None or node.kind is Kind.PARAM:
            return False
        operands = list(dict.fromkeys(node.operands))
        large = sum(
            1
            for o in operands
            if nodes[o].kind is not Kind.BROADCAST
            and not (nodes[o].inst and nodes[o].inst.name == "iota")
            and nodes[o].rank >= node.rank
        )
        if large <= 1 or sum(nodes[o].elements for o in operands) <= node.elements:
            return False
        return not all(self._fuses_on_all_paths(n, u) for u in self.users[n])

    def _fuses_on_all_paths(self, producer, consumer) -> bool:
        if consumer == producer:
            return True
        if self.nodes[consumer].kind not in LOOP_FUSIBLE:
            return False
        key = (producer, consumer)
        if key not in self._paths:
            self._paths[key] = all(
                o not in self.unfusible
                and self._should_fuse(consumer, o)
                and self._fuses_on_all_paths(producer, o)
                for o in self.nodes[consumer].operands
                if o == producer or self.ancestors[o] >> self.position[producer] & 1
            )
        return self._paths[key]


@dataclasses.dataclass(eq=False, slots=True)
class _Fusion:
    members: list
    operands: list
    reused: set
    fused: bool = False


def _post_order(insts: list[Inst], root: int) -> list[int]:
    """The instructions the root depends on, operands before users (dead code is dropped)."""
    order: list[int] = []
    done: dict[int, bool] = {}
    stack = [(root, 0)]
    while stack:
        k, i = stack.pop()
        if i == 0:
            if k in done:
                continue
            done[k] = False
        ops = insts[k].operands
        if i < len(ops):
            stack.append((k, i + 1))
            if ops[i] not in done:
                stack.append((ops[i], 0))
        elif not done[k]:
            done[k] = True
            order.append(k)
    return order


def _topological(nodes: dict) -> list:
    """The nodes (in post order already, but for library fusions) in an order where operands come first."""
    out, seen = [], set()
    for start in nodes:
        if start in seen:
            continue
        seen.add(start)
        stack = [(start, iter(nodes[start].operands))]
        while stack:
            cur, it = stack[-1]
            nxt = next((o for o in it if o not in seen), None)
            if nxt is None:
                stack.pop()
                out.append(cur)
            else:
                seen.add(nxt)
                stack.append((nxt, iter(nodes[nxt].operands)))
    return out


__all__ = ["fusion_copies"]
