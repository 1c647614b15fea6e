"""`optuna`: one categorical parameter per decision; TPE for step time, NSGA-II for time and memory."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Container
from typing import TYPE_CHECKING, Any

from search.evaluate import Evaluator, add_to_front
from search.problem import Budget, Objective, SearchError, SearchProblem, SearchResult, Status
from search.space import Assignment, DecisionSpace, build_space

if TYPE_CHECKING:
    import optuna

_UNSHARDED = "-"
_INVALID = 1e9  # constraint violation of an assignment the space rejects: more than any memory overflow
_DRAWS = 20  # random draws for an unscored assignment before taking the space as covered


def encode(axes: tuple[str, ...]) -> str:
    """An option as an Optuna choice: 'data+model', or '-' for unsharded."""
    return "+".join(axes) if axes else _UNSHARDED


def decode(choice: str) -> tuple[str, ...]:
    return () if choice == _UNSHARDED else tuple(choice.split("+"))


@dataclasses.dataclass
class OptunaSearch:
    """Optuna's ask/tell loop over the decision space, seeded with the expert baselines.

    Each decision is a categorical parameter over all its options. Every trial carries two
    constraints (feasible when <= 0), which TPE and NSGA-II rank infeasible trials by, after every
    feasible one: `memory`, peak / budget - 1, so a plan that overflows is worse than any that fits
    and better the less it overflows; and `valid`, huge for an assignment the space rejects (two
    decisions giving one tensor the same mesh axis), told with infinite values and never scored.
    Told as FAIL such trials would teach TPE nothing, and told as PRUNED TPE would rank them above
    every plan that overflows memory; either way it kept proposing them.

    A proposal scored before teaches the sampler nothing new; the next trial is then an unscored
    assignment drawn at random. The search ends with the budget, or after `patience` trials in a row
    that scored nothing new (on a small space, once the sampler has about covered it).

    With `storage` (a journal file path) many processes share one study, and a study that was killed
    resumes: its best earlier trials (the fitting Pareto front for two objectives) are re-scored
    first, and the samplers learn from all of them.

    Deterministic for a seed with an in-memory study (under an evaluation budget also independent of
    the clock); a shared study depends on what the other processes told it.

    Attributes:
      seed: seeds the sampler and the random trials.
      storage: journal file of the study (None: in memory).
      study_name: the study in that storage (default: one per workload, fingerprint, mesh and
        objective).
      multi_objective: minimise (step time, peak memory) with NSGA-II and return the Pareto front;
        None follows the problem's objective.
      patience: trials in a row that score nothing new before the search ends.
    """

    seed: int = 0
    storage: str | None = None
    study_name: str | None = None
    multi_objective: bool | None = None
    patience: int = 30

    def search(self, problem: SearchProblem, budget: Budget) -> SearchResult:
        started = time.perf_counter()  # the budget counts importing Optuna (0.17-0.19 s here)
        optuna = _import_optuna()
        from optuna.trial import TrialState

        space = build_space(problem.graph, problem.mesh, fixed=problem.fixed)
        multi = (
            self.multi_objective
            if self.multi_objective is not None
            else problem.objective is Objective.STEP_TIME_AND_MEMORY
        )
        ev = Evaluator(problem, space, front=multi, started=started)
        names = [f"{d.id}:{d.name}" for d in space.decisions]
        distributions = {
            n: optuna.distributions.CategoricalDistribution([encode(o) for o in d.options])
            for n, d in zip(names, space.decisions, strict=True)
        }
        study = self._study(optuna, problem, multi)
        cap = problem.capacity
        score = ev.score

        def spent() -> bool:
            return ev.spent(budget)

        prior = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        for a in _best_of(prior, names, distributions, space, multi):
            if spent():
                break
            score(a)
        for a in ev.seeds():
            study.enqueue_trial({n: encode(o) for n, o in zip(names, a, strict=True)}, skip_if_exists=True)

        rng = random.Random(self.seed)
        trials = invalid = misfits = stale = random_trials = 0
        while stale < self.patience and not spent():
            trial = study.ask(distributions)
            trials += 1
            a = tuple(decode(trial.params[n]) for n in names)
            if not space.valid(a):
                # Worse than any plan, so the samplers steer away (TPE would model a FAIL not at all,
                # and rank a PRUNED trial above every plan that overflows memory).
                trial.set_constraint("valid", _INVALID)
                trial.set_constraint("memory", 0.0)
                study.tell(trial, [math.inf, math.inf] if multi else math.inf)
                invalid += 1
                stale += 1
                continue
            repeat = a in ev.cache
            s = score(a)
            misfits += not s.fits
            trial.set_constraint("valid", 0.0)
            trial.set_constraint("memory", s.memory / cap - 1.0)
            study.tell(trial, [s.step_time, float(s.memory)] if multi else s.step_time)
            stale = stale + 1 if repeat else 0
            if repeat:  # it taught the sampler nothing: the next trial is an unscored plan at random
                b = _unscored(space, ev.cache, rng)
                if b is not None:
                    study.enqueue_trial({n: encode(o) for n, o in zip(names, b, strict=True)})
                    random_trials += 1

        stats: dict[str, Any] = {
            "trials": trials,
            "invalid_trials": invalid,
            "infeasible_trials": misfits,
            "prior_trials": len(prior),
            "random_trials": random_trials,
        }
        if self.storage is not None:
            stats["study"] = study.study_name
        if not trials and not ev.evaluations:
            return ev.result("optuna", seed=self.seed, status=Status.TIMED_OUT, stats=stats)
        result = ev.result("optuna", seed=self.seed, stats=stats)
        if not multi:
            return result
        return dataclasses.replace(result, front=ev.pareto(result.plan.provenance))

    def _study(self, optuna: Any, problem: SearchProblem, multi: bool) -> optuna.Study:
        """A new study, or the one of that name in the journal file (resumed)."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = (
            optuna.samplers.NSGAIISampler(seed=self.seed)
            if multi
            else optuna.samplers.TPESampler(seed=self.seed)
        )
        directions = ["minimize", "minimize"] if multi else ["minimize"]
        if self.storage is None:
            return optuna.create_study(study_name=self.study_name, sampler=sampler, directions=directions)
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        workload, fingerprint = problem.source
        objective = Objective.STEP_TIME_AND_MEMORY if multi else Objective.STEP_TIME
        name = (
            self.study_name or f"{workload or 'workload'}@{fingerprint[:12]}/{problem.mesh}/{objective.value}"
        )
        study = optuna.create_study(
            storage=JournalStorage(JournalFileBackend(self.storage)),
            study_name=name,
            sampler=sampler,
            directions=directions,
            load_if_exists=True,
        )
        if len(study.directions) != len(directions):
            raise SearchError(
                f"study {name!r} in {self.storage} has {len(study.directions)} objective(s) but this search "
                f"has {len(directions)}; give another study_name or a matching objective."
            )
        return study


def _best_of(
    trials: list[Any],
    names: list[str],
    distributions: dict[str, Any],
    space: DecisionSpace,
    multi: bool,
) -> list[Assignment]:
    """The assignments of a resumed study's best completed trials (its fitting Pareto front for two
    objectives), skipping trials of another decision space."""
    scored: list[tuple[bool, tuple[float, ...], Assignment]] = []
    for t in trials:
        params = t.params
        if set(params) != set(names) or any(params[n] not in distributions[n].choices for n in names):
            continue
        a = tuple(decode(params[n]) for n in names)
        if not space.valid(a):
            continue
        fits = all(v <= 0 for v in t.constraints.values())
        scored.append((fits, tuple(t.values), a))
    if not scored:
        return []
    if not multi:
        return [min(scored, key=lambda t: (not t[0], t[1]))[2]]
    front: list[tuple[float, int, Assignment]] = []
    for fits, values, a in scored:
        if fits:
            add_to_front(front, values[0], int(values[1]), a)
    return [a for _, _, a in front]


def _unscored(space: DecisionSpace, scored: Container[Assignment], rng: random.Random) -> Assignment | None:
    """A valid assignment not in `scored`, drawn as decisions in order each take a random option
    still valid; None when a few draws find only scored ones (the space is about covered)."""
    for _ in range(_DRAWS):
        a = list(space.empty)
        for i in range(len(a)):
            a[i] = rng.choice(space.options(tuple(a), i))
        if tuple(a) not in scored:
            return tuple(a)
    return None


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise SearchError("the optuna searcher needs Optuna; install it with `pip install optuna`.") from None
    return optuna
