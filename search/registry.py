"""Searchers by name: the one table the CLI, the portfolio and the conformance tests read."""

from __future__ import annotations

import importlib

from search.problem import Searcher, SearchError

# name -> "module:Class"; each class takes `seed` (and optional keyword settings) and implements
# the Searcher protocol.
SEARCHERS: dict[str, str] = {
    "mcts": "search.mcts:MCTS",
    "ilp": "search.ilp:ILP",
    "optuna": "search.optuna_search:OptunaSearch",
    "exhaustive": "search.exhaustive:Exhaustive",
    "portfolio": "search.portfolio:Portfolio",
}


def make_searcher(name: str, *, seed: int = 0, **options) -> Searcher:
    """A searcher by name, seeded.

    Raises:
      SearchError: the name is unknown (the message lists the known ones).
    """
    target = SEARCHERS.get(name)
    if target is None:
        raise SearchError(f"unknown searcher {name!r}; choose one of: {', '.join(SEARCHERS)}.")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)(seed=seed, **options)
