"""What a search is given and what it returns: SearchProblem, Budget, SearchResult, the Searcher protocol."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping
from typing import Protocol

from cost_model.hardware import Hardware
from cost_model.simulate import CostReport
from ir.graph import Graph
from ir.plan import Plan
from ir.sharding import MeshShape


class SearchError(ValueError):
    """A search that cannot start or cannot succeed; the message names the cause and the fix."""


class Objective(enum.Enum):
    STEP_TIME = "step_time"  # minimise predicted step time among plans that fit
    STEP_TIME_AND_MEMORY = "step_time_and_memory"  # Pareto front of (step time, peak memory)


class Status(enum.Enum):
    OPTIMAL = "optimal"  # proven best within the decision space (exhaustive or solver bound)
    FEASIBLE = "feasible"  # a fitting plan, not proven best
    INFEASIBLE = "infeasible"  # no plan found that fits the memory budget
    TIMED_OUT = "timed_out"  # the budget ran out before any plan was evaluated


@dataclasses.dataclass(frozen=True, slots=True)
class Budget:
    """How long a searcher may run: wall seconds and/or plan evaluations (whichever ends first)."""

    seconds: float | None = None
    evaluations: int | None = None

    def __post_init__(self):
        if self.seconds is None and self.evaluations is None:
            raise SearchError(
                "a budget needs seconds or evaluations; give e.g. --budget 60s or --budget 500."
            )
        if self.seconds is not None and not self.seconds > 0:
            raise SearchError(f"budget of {self.seconds} s is not positive; give e.g. --budget 60s.")
        if self.evaluations is not None and self.evaluations < 1:
            raise SearchError(
                f"budget of {self.evaluations} evaluations is not positive; give e.g. --budget 500."
            )

    @classmethod
    def parse(cls, text: str) -> Budget:
        """'60s', '2m', '500' (evaluations) or '60s,500'."""
        seconds = evaluations = None
        for part in text.split(","):
            p = part.strip().lower()
            try:
                if p.endswith("ms"):
                    seconds = float(p[:-2]) / 1000
                elif p.endswith("s"):
                    seconds = float(p[:-1])
                elif p.endswith("m"):
                    seconds = float(p[:-1]) * 60
                else:
                    evaluations = int(p)
            except ValueError:
                raise SearchError(
                    f"budget {text!r}: {part!r} is neither seconds (60s, 2m) nor a number of evaluations (500)."
                ) from None
        return cls(seconds, evaluations)


@dataclasses.dataclass(frozen=True, eq=False)
class SearchProblem:
    """A graph to shard on a mesh, and what a plan must satisfy.

    Attributes:
      graph: the traced step.
      mesh: the device mesh.
      hardware: device and link specs the simulator costs plans on.
      nodes: nodes the mesh spans (None: as few as hold it).
      memory_budget: per-device bytes a plan must fit in (default: the device's capacity).
      fixed: decisions fixed by user tactics (a Plan the searchers extend), or None.
      objective: what to optimise.
      source: the workload source and fingerprint, recorded in found plans.
      hints: plans to start from (a previous result, another searcher's incumbent); every
        searcher scores them before searching.
      progress: called as the search goes (a new best plan, and every few hundred plans).
    """

    graph: Graph
    mesh: MeshShape
    hardware: Hardware
    nodes: int | None = None
    memory_budget: int | None = None
    fixed: Plan | None = None
    objective: Objective = Objective.STEP_TIME
    source: tuple[str, str] = ("", "")
    hints: tuple[Plan, ...] = ()
    progress: Callable[[Progress], None] | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def capacity(self) -> int:
        return self.memory_budget if self.memory_budget is not None else self.hardware.device.hbm_capacity


@dataclasses.dataclass(frozen=True, slots=True)
class Progress:
    """A search's state, as `SearchProblem.progress` receives it.

    Attributes:
      searcher: the searcher scoring plans now.
      seconds: since it started.
      evaluations: plans it scored.
      best_step_time: the best fitting plan's step time so far (inf when none fits).
      best_memory: that plan's per-device peak bytes.
      new_best: this report is for a new best plan.
    """

    searcher: str
    seconds: float
    evaluations: int
    best_step_time: float
    best_memory: int
    new_best: bool


@dataclasses.dataclass(frozen=True, slots=True)
class CurvePoint:
    seconds: float
    evaluations: int
    step_time: float


@dataclasses.dataclass(frozen=True, slots=True)
class SearchResult:
    """The outcome of one search.

    Attributes:
      plan: the best plan (the closest to fitting when none fits).
      report: its CostReport.
      curve: the best-so-far step time of fitting plans over wall time and evaluations.
      status: optimal / feasible / infeasible / timed out.
      stats: searcher-specific numbers (evaluations, nodes expanded, solver bound and gap, ...).
      front: for the time-and-memory objective, the Pareto-optimal (plan, report) pairs.
    """

    plan: Plan
    report: CostReport
    curve: tuple[CurvePoint, ...]
    status: Status
    stats: Mapping[str, float | int | str]
    front: tuple[tuple[Plan, CostReport], ...] = ()


class Searcher(Protocol):
    """The one extension point: a searcher maps a problem and a budget to a result, deterministically
    for its seed (a constructor argument)."""

    def search(self, problem: SearchProblem, budget: Budget) -> SearchResult: ...
