"""Acceptance math, pure torch and free of I/O: processed laws (params), single-draft rules
(greedy, SpS, Cactus, TAS), multi-draft sibling verifiers (RRS, RRS-wor, SpecHub) with the
matching sibling sampler, tree verification, closed forms, and improved MCSD (LOSSY).

Lossy rules: cactus, tas, mcsd-ti (see LOSSY_RULES)."""

from .closed_form import (
    cactus_closed_form,
    expected_tokens_per_call,
    greedy_closed_form,
    hub_joint,
    iid_joint,
    kl,
    optimal_acceptance,
    rrs_acceptance,
    rrs_wor_acceptance,
    sps_acceptance,
    spechub_acceptance,
    standardized_walltime_improvement,
    tas_closed_form,
    walltime_improvement,
    wor_joint,
)
from .mcsd import (
    DECISION_THRESHOLD,
    DecisionModel,
    LossyBranchSelection,
    acceptance_targets,
    select_branch_lossy,
    should_stop,
    ti_first_token_law_lossy,
    ti_roots_lossy,
    train_decision_model,
)
from .multidraft import (
    draw_hub_pair,
    draw_independent,
    draw_without_replacement,
    hub_token,
    rrs_verify,
    sample_siblings,
    spechub_verify,
)
from .params import SamplingParams, process_logits
from .rules import (
    accept_or_recover,
    cactus_gamma,
    cactus_step,
    cactus_target,
    greedy_accept,
    sample_row,
    sample_rows,
    sps_step,
    tas_accept,
    tas_threshold,
)
from .tree_verify import (
    LOSSY_RULES,
    RULES,
    NodeDecision,
    RuleConfig,
    TreeVerdict,
    coupling_for_rule,
    drafted_counts,
    verify_node,
    verify_tree,
)

__all__ = [name for name in dir() if not name.startswith("_")]
