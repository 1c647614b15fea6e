"""Compaction of per-tensor choices into regex rules: one rule per tensor of a layer stands for
its siblings in every other layer (`name_pattern`), and `compact_patterns` makes the shortest
ordered rule list that gives every tensor its choice (what a Plan's sections are written in)."""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Hashable, Mapping
from typing import Any, TypeVar

K = TypeVar("K", bound=Hashable)


# Layer indices, generalised to '\d+' (applied to the regex-escaped name).
_GENERALISE = (
    re.compile(r"(layers_)\d+"),
    re.compile(r"(?<=/)((?:h|layer|layers|block|blocks)/)\d+(?=/|$)"),
    re.compile(r"^(activations/.+/)\d+$"),
)


def name_pattern(name: str) -> str:
    """The regex that stands for `name` and its siblings in other layers.

    'params/layers_3/attn/q/kernel' → 'params/layers_\\d+/attn/q/kernel';
    'params/transformer/h/11/mlp/c_fc/kernel' → 'params/transformer/h/\\d+/mlp/c_fc/kernel';
    'activations/resid/4' → 'activations/resid/\\d+'.
    """
    out = re.escape(name)
    for pattern in _GENERALISE:
        out = pattern.sub(lambda m: m.group(1) + r"\d+", out)
    return out


def compact_patterns(targets: Mapping[str, K | None], *, fallback: K | None = None) -> list[tuple[str, K]]:
    """Ordered (regex, key) pairs, first full match wins, that resolve every name to its target.

    A name no pair matches resolves to `fallback`. A target of None has no rule form (e.g. an
    unconstrained activation), so it can only be reached through `fallback=None`.

    Args:
      targets: name → key, in the order rules should follow (graph order reads like the model).
      fallback: what a name resolves to when no pair matches.

    Returns:
      Exact-name exceptions first, then general patterns in order of first appearance.
    """
    groups: dict[str, list[str]] = {}
    for name in targets:
        groups.setdefault(name_pattern(name), []).append(name)
    exceptions: list[tuple[str, K]] = []
    general: list[tuple[tuple[tuple[str, ...], ...], K, int]] = []
    order = {name: i for i, name in enumerate(targets)}
    for pattern, members in groups.items():
        needed = [n for n in members if targets[n] != fallback]
        if not needed:
            continue
        counts = Counter(targets[n] for n in members if targets[n] is not None)
        best, _ = max(counts.items(), key=lambda kv: kv[1]) if counts else (None, 0)
        others = [n for n in members if targets[n] != best]
        if (
            best is None
            or best == fallback
            or any(targets[n] is None for n in others)
            or 1 + len(others) > len(needed)
        ):
            exceptions.extend((re.escape(n), targets[n]) for n in needed)
            continue
        exceptions.extend((re.escape(n), targets[n]) for n in others)
        general.append((tuple((c,) for c in pattern.split("/")), best, order[members[0]]))
    pairs = exceptions + [(_render(c), k) for c, k, _ in _merge_siblings(general)]
    if any(_resolve(pairs, n, fallback) != t for n, t in targets.items()):
        # Cannot happen while name_pattern keeps groups disjoint; exact rules are always right.
        pairs = [(re.escape(n), t) for n, t in targets.items() if t != fallback]
    return pairs


def _merge_siblings(rules: list[tuple[tuple[tuple[str, ...], ...], K, int]]):
    """Merges rules with one key that differ in one path component into an alternation there.

    Other components being identical, the merged regex matches exactly the union of the names.
    """
    changed = True
    while changed:
        changed = False
        for i in range(max((len(c) for c, _, _ in rules), default=0)):
            buckets: dict[Any, list[tuple[tuple[tuple[str, ...], ...], K, int]]] = {}
            for rule in rules:
                comps, key, _ = rule
                # Rules too short for position i sit alone in a bucket keyed by their identity.
                at = (len(comps), key, comps[:i], comps[i + 1 :]) if len(comps) > i else (rule,)
                buckets.setdefault(at, []).append(rule)
            merged = []
            for bucket in buckets.values():
                comps, key, _ = bucket[0]
                if len(bucket) > 1:
                    alts = tuple(dict.fromkeys(a for c, _, _ in bucket for a in c[i]))
                    comps = (*comps[:i], alts, *comps[i + 1 :])
                    changed = True
                merged.append((comps, key, min(o for _, _, o in bucket)))
            rules = sorted(merged, key=lambda r: r[2])
    return rules


def _render(comps: tuple[tuple[str, ...], ...]) -> str:
    return "/".join(c[0] if len(c) == 1 else "(" + "|".join(c) + ")" for c in comps)


def _resolve(pairs: list[tuple[str, K]], name: str, fallback: K | None) -> K | None:
    for pattern, key in pairs:
        if _compiled(pattern).fullmatch(name):
            return key
    return fallback


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)  # patterns made here are escaped names and '\d+': always valid
