"""One training-budget setting: ``budget`` (epochs over the training loader) split into rounds, ADMM epochs
and the final masked retraining, by the rule that measured best so far.

The rule (``ac_kd``, BENCHMARKS.md session 4; not from the AutoCompress paper, whose progressive rounds
assume a far larger budget): one round per decade of the target (10x: one round, 30x: two rounds of ~5.5x,
1000x: three), one ADMM epoch per round, no retraining between rounds, and every remaining epoch in the
last round's retraining, with knowledge distillation from the base model. At short budgets ADMM does not
converge (the hard-pruned model is near chance after it), so epochs buy more as retraining of the final
architecture, and distillation from the base adds about a point there; rounds keep each search step at most
10x. An epoch of fewer than :data:`MIN_ADMM_STEPS` optimiser steps gets no ADMM at all: within so short an
epoch the default rho schedule (0.02, x1.6 every 100 steps) stays far below 1, the weights barely move toward
their projection, and hard pruning after it lands where one-shot pruning of the base does, one retraining
epoch fewer (BENCHMARKS.md sessions 10 and 24: 16 steps cost 22.8 points of top-1; 188 steps 0.78 points on a
weak base and nothing on a converged one). The search's fine-tuning scorer gets at most
:data:`SEARCH_SHARE` of the budget's optimiser steps (fewer evaluations on short budgets).
``benchmarks/run_grid.py`` (variant ``ac_kd``) uses the same function.
"""
from __future__ import annotations

import math

from .alignment import AUTO
from .config import CompressConfig, SettingError, from_dict, getattr_dotted
from .errors import show
from .quick_eval import fine_tunes

#: an epoch of fewer optimiser steps gets no ADMM under the rule: the default rho schedule (0.02, x1.6 every 100
#: steps) reaches 0.86 after 800 steps; one ADMM epoch of 859 steps brought the hard-pruned model to 89.9 % (the
#: demo, base 93.3 %), of 188-390 steps it left it at 10-23 %, as one-shot pruning does (sessions 6, 16 and 24)
MIN_ADMM_STEPS = 800
#: the search's fine-tuning scorer may take at most this share of the budget's optimiser steps (its fine-tuning
#: steps per candidate x evaluations, over every round): at a 3-epoch budget of 94 steps an epoch, 20
#: evaluations took 2-3x the retraining's time and scored no better than the starting action (BENCHMARKS.md,
#: session 22); at 8 epochs and more the default's 20 evaluations fit
SEARCH_SHARE = 1.0
#: a search allowed fewer evaluations than this takes its start (``search.start``), unscored: at 5 evaluations
#: (budget 3, 4 seeds each) it ended within one test image of its start on a weak base and left it on 1 of 4
#: seeds of a converged base (-0.70), at 35-100 s more than the start alone (BENCHMARKS.md, sessions 22-23);
#: 20-evaluation searches on longer budgets moved from their start in most grid cells
MIN_MOVING_EVALUATIONS = 10
#: the name ``config.yaml`` and the log give the rule
RULE = "ac_kd: a round per decade of the target, 1 ADMM epoch per round (none when an epoch has fewer than " \
       f"{MIN_ADMM_STEPS} optimiser steps or no epoch would be left to retrain), the rest as final retraining " \
       "with distillation from the base where the output holds one class vector per item; the search fine-tunes " \
       "its candidates for at most as many steps as the budget trains, and takes its start unscored when that " \
       f"allows fewer than {MIN_MOVING_EVALUATIONS} evaluations"


def budget_schedule(factor: float | None, budget: int, steps_per_epoch: int | None = None,
                    finetune_steps: int | None = None) -> dict:
    """The settings the rule derives for a target ``factor`` (e.g. 30.0 for ``params=30x``; None for a
    ``latency=Nms`` target, whose factor is known only once the base is measured: one round) and ``budget``
    epochs: ``rounds``, ``admm.epochs``, ``retrain.epochs`` (0), ``final_retrain_epochs`` and
    ``distillation.enabled`` (``"auto"``: from the base for class scores per item), as a nested dict of
    :class:`CompressConfig` settings.
    ``steps_per_epoch``: optimiser steps of one training epoch (None: unknown); below :data:`MIN_ADMM_STEPS`
    no round runs ADMM and every epoch is final retraining. So too when the budget has no epoch beyond the rounds'
    ADMM epochs: a model hard-pruned after one ADMM epoch is near chance until retrained.
    ``finetune_steps``: the search scorer's fine-tuning steps per candidate (None: a scorer that does not
    fine-tune); with ``steps_per_epoch`` known it also derives ``search.max_evaluations``
    (:func:`search_evaluations`).

    Raises:
        SettingError (``budget``): no epoch.
    """
    rounds = 1 if factor is None else max(1, math.ceil(math.log10(factor) - 1e-9))
    few_steps = steps_per_epoch is not None and steps_per_epoch < MIN_ADMM_STEPS
    admm = 0 if few_steps or budget <= rounds else 1  # ADMM without a retraining epoch after it ends near chance
    if budget < 1:
        raise SettingError("budget", f"budget={budget} is too small: the schedule needs at least one epoch",
                           "use budget=1 or more")
    schedule = {"rounds": rounds, "admm": {"epochs": admm}, "retrain": {"epochs": 0},
                "final_retrain_epochs": budget - rounds * admm, "distillation": {"enabled": AUTO}}
    if steps_per_epoch is not None and finetune_steps:
        schedule["search"] = {"max_evaluations": search_evaluations(budget * steps_per_epoch, rounds,
                                                                    finetune_steps)}
    return schedule


def search_evaluations(budget_steps: int, rounds: int, finetune_steps: int) -> int:
    """Evaluations per round's search within :data:`SEARCH_SHARE` of ``budget_steps`` (the budget's optimiser
    steps) at ``finetune_steps`` fine-tuning steps per candidate over ``rounds`` searches, at most
    ``search.max_evaluations``' default; 1 (the start, not scored) when fewer than
    :data:`MIN_MOVING_EVALUATIONS` fit."""
    default = CompressConfig().search.max_evaluations
    fits = min(default, int(SEARCH_SHARE * budget_steps / (rounds * finetune_steps)))
    return fits if fits >= MIN_MOVING_EVALUATIONS else 1


def search_share_warning(config: CompressConfig, rounds: int, training_steps: int) -> str | None:
    """The warning for a schedule written by hand (no ``budget``) of ``rounds`` rounds whose search fine-tunes its
    candidates for more optimiser steps than the schedule trains (``training_steps``), past :data:`SEARCH_SHARE` of
    them (a fresh user's 2-epoch schedule spent 267 s of 321 s in its search); None otherwise, or for a scorer
    that does not fine-tune."""
    quick = config.quick_eval
    if config.budget is not None or not fine_tunes(quick.scorer):
        return None
    evaluations = config.search.annealing(config.seed).planned_evaluations()
    searched = rounds * evaluations * quick.finetune_steps
    if evaluations < 2 or searched <= SEARCH_SHARE * training_steps:
        return None
    return (f"the search fine-tunes its candidates for {searched} optimiser steps ({evaluations} evaluations x "
            f"{quick.finetune_steps} steps x {rounds} round(s)), more than the {training_steps} the schedule "
            "trains: set budget (which keeps the search within the training's steps), or lower "
            "search.max_evaluations or quick_eval.finetune_steps")


def _leaves(settings: dict, prefix: str = "") -> list[tuple[str, object]]:
    """``{"admm": {"epochs": 1}}`` -> ``[("admm.epochs", 1)]``."""
    out = []
    for key, value in settings.items():
        out.extend(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [(f"{prefix}{key}", value)])
    return out


#: derived settings a caller may still set with ``budget`` (distillation from a weak base can cost more than it
#: gives: a fresh user's 2-epoch, 79.6 % base lost 4.6 points of top-1 to it at flops=2x; a longer search)
OVERRIDABLE = ("distillation.enabled", "search.max_evaluations")


def given_settings(data: dict) -> set[str]:
    """The dotted names of the settings a config's plain data gives (``{"admm": {"epochs": 2}}`` ->
    ``{"admm.epochs"}``), for :func:`apply_budget`."""
    return {name for name, _ in _leaves(data)}


def apply_budget(config: CompressConfig, given: set[str] | None = None, steps_per_epoch: int | None = None
                 ) -> CompressConfig:
    """``config`` with the schedule its ``budget`` derives (:func:`budget_schedule`) filled in; ``config``
    itself when ``budget`` is None. A schedule setting given together with ``budget`` is refused unless it
    equals what the budget derives (so a resolved config, e.g. a stored ``config.yaml``, applies again
    unchanged) or is one of :data:`OVERRIDABLE` (then the given value stays). ``given``: the dotted names the
    user set (:func:`given_settings`); None when unknown (a CompressConfig instance), then a setting that
    differs from its default counts as given.
    ``steps_per_epoch``: see :func:`budget_schedule`; when None (the loader is not known yet), a config that
    gives ``admm.epochs`` 0 is checked against the schedule for a short loader (a stored ``config.yaml`` of
    such a run), and the call with the loader's length checks it again.

    Raises:
        SettingError: ``budget`` and a schedule setting that contradicts it (naming both), a budget below one
            epoch, or a missing / malformed ``target``.
    """
    if config.budget is None:
        return config
    tunes = fine_tunes(config.quick_eval.scorer)
    derived = budget_schedule(config.parsed_target().factor, config.budget, steps_per_epoch,
                              config.quick_eval.finetune_steps if tunes else None)
    few_steps = config.admm.epochs == 0 and (given is None or "admm.epochs" in given)
    if steps_per_epoch is None and few_steps:  # a stored schedule derived for a short loader (checked again later)
        derived = budget_schedule(config.parsed_target().factor, config.budget, 0)
    default = CompressConfig()
    for name, value in _leaves(derived):
        given_value = getattr_dotted(config, name)
        explicit = name in given if given is not None else given_value != getattr_dotted(default, name)
        if not explicit or given_value == value:
            continue
        if name in OVERRIDABLE:
            section, _, key = name.partition(".")
            derived[section][key] = given_value
        else:
            raise SettingError("budget", f"budget={config.budget} and {name}={show(given_value)} both set the training "
                               f"schedule (budget derives {name}={show(value)})",
                               f"give budget={config.budget} alone, or drop it and write the schedule ({name}, ...) "
                               "yourself",
                               also=(name,))
    return from_dict(CompressConfig, derived, base=config)


def describe(config: CompressConfig, own_loop: bool = False) -> str:
    """One line for the log and ``config.yaml`` (``run.schedule``): the budget and what the rule made of it,
    naming the rule (its words: :data:`RULE`, ``run.rule`` in ``config.yaml``); ``own_loop``: the caller's
    ``train_fn`` trains, which distils only where it calls ``phase.distill``."""
    why = "" if config.admm.epochs else (
        f" (none: {config.rounds} ADMM epoch(s) would leave the budget no epoch to retrain)"
        if config.budget <= config.rounds
        else f" (an epoch has fewer than {MIN_ADMM_STEPS} optimiser steps: too few for ADMM)")
    return (f"budget {config.budget} epochs (rule {RULE.partition(':')[0]}) -> {config.rounds} round(s), "
            f"{config.admm.epochs} ADMM epoch per round{why}, {config.retrain.epochs} retraining epochs between "
            f"rounds, {config.final_retrain_epochs} final retraining epochs, "
            f"{_distillation(config.distillation.enabled, own_loop)}, "
            f"{_search(config.search.annealing(config.seed).planned_evaluations())}")


def _distillation(enabled: bool | str, own_loop: bool) -> str:
    """What the schedule line says of ``distillation.enabled`` (with ``own_loop``: a ``train_fn``'s)."""
    if own_loop and enabled:
        return "distillation from the base offered to train_fn (phase.distill)"
    if enabled == AUTO:
        return "distillation from the base for class scores per item (auto)"
    return "distillation from the base" if enabled else "no distillation"


def _search(evaluations: int) -> str:
    """What the schedule line says of a search of at most ``evaluations`` evaluations per round (the annealing's
    plan: ``search.max_evaluations`` or fewer where the temperature schedule ends first)."""
    if evaluations == 1:
        return "no search: the start (search.start), not scored"
    return f"a search of at most {evaluations} evaluations per round"
