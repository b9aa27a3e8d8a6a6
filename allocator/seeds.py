"""Placed plans (the baselines') as count-level plans of the search's spaces, so that the
search starts from them: its incumbent is never worse, in the planner's model, than a
baseline whose plan lies in the space searched, and a good incumbent prunes more.

A placed plan is in a space when every replica has the same stage boundaries and
recomputation, and every group of devices is one unit of a class of that space (its
devices of one type in the class's node group, as many as the class's unit). Replicas
then merge into one pipeline whose stages hold the units of every replica (the search's
R = 1 form; ``allocator.search``), at the plan's micro-batch count.
"""

from __future__ import annotations

from hetalloc.plan import Plan

from .problem import CountPlan, CountStage, Problem


def count_plan_of(plan: Plan, prob: Problem) -> CountPlan | None:
    """``plan`` as a count-level plan of ``prob``'s space, or None if it is not in it."""
    first = plan.replicas[0].stages
    cuts = [(s.start, s.stop, s.recompute) for s in first]
    if any([(s.start, s.stop, s.recompute) for s in r.stages] != cuts for r in plan.replicas):
        return None
    if any(rc not in prob.recompute_options for _, _, rc in cuts):
        return None
    if prob.global_batch % plan.num_microbatches:
        return None
    owner: dict[str, int] = {d: c.index for c in prob.classes for d in c.devices}
    stages = []
    for si, (i, j, rc) in enumerate(cuts):
        counts = [0] * len(prob.classes)
        for r in plan.replicas:
            for g in r.stages[si].groups:
                ci = owner.get(g.devices[0])
                if ci is None or len(g.devices) != prob.classes[ci].tp or \
                        any(owner.get(d) != ci for d in g.devices):
                    return None
                counts[ci] += 1
        stages.append(CountStage(i, j, tuple(counts), rc))
    return CountPlan(1, plan.num_microbatches, stages)


def seeds_of(plans: list[Plan], probs: list[Problem]) -> list[tuple[CountPlan, Problem]]:
    """Each plan in each space it belongs to."""
    out = []
    for p in plans:
        for prob in probs:
            cp = count_plan_of(p, prob)
            if cp is not None:
                out.append((cp, prob))
    return out
