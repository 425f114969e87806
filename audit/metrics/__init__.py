"""Memorization metrics: pure functions on arrays (numpy/scipy only, never torch).

Each module cites the paper its metric comes from and states the formula. The names below are the stable public API
for users' own scripts:

    from audit.metrics import exposure_interpolation, exposure_extrapolation, epsilon_lower_bound_one_run, tpr_at_fpr, roc_auc
    from audit.metrics import epsilon_lower_bound_tight, best_of_guess_counts, ez_mia_score, null_calibration
"""

from audit.metrics.exposure import (
    ExtrapolatedExposure,
    NullCalibration,
    SpaceExposureEstimate,
    exposure_extrapolation,
    exposure_from_rank,
    exposure_interpolation,
    null_calibration,
    null_exposure_mean,
    null_exposure_variance,
    rank_against_references,
    sampled_space_exposure,
)
from audit.metrics.extraction import (
    discoverable_match,
    extraction_probability,
    is_np_extractable,
    longest_common_prefix,
    normalized_edit_distance,
    queries_needed,
)
from audit.metrics.information import bits, compression_ratio, information_view, utf8_bits
from audit.metrics.mia import (
    ATTACK_SCOPES,
    InsufficientControlsError,
    TprAtFpr,
    difference_to_base,
    ez_mia_score,
    loss_score,
    min_k_plus_plus_score,
    min_k_score,
    ratio_to_base,
    roc_auc,
    tpr_at_fpr,
    zlib_mimir_score,
    zlib_ratio_score,
)
from audit.metrics.privacy import (
    BOUND_METHODS,
    BestOfGuessCounts,
    OneRunAudit,
    best_of_guess_counts,
    epsilon_ceiling_one_run,
    epsilon_lower_bound_by,
    epsilon_lower_bound_one_run,
    epsilon_lower_bound_tight,
    one_run_audit,
    one_run_p_value,
)
from audit.metrics.stats import Proportion, clopper_pearson

__all__ = [
    "ATTACK_SCOPES", "BOUND_METHODS", "BestOfGuessCounts", "NullCalibration", "best_of_guess_counts",
    "epsilon_lower_bound_by", "epsilon_lower_bound_tight", "ez_mia_score", "null_calibration", "null_exposure_variance",
    "zlib_mimir_score",
    "ExtrapolatedExposure", "InsufficientControlsError", "OneRunAudit", "Proportion", "SpaceExposureEstimate", "TprAtFpr",
    "bits", "clopper_pearson", "compression_ratio", "difference_to_base", "discoverable_match",
    "epsilon_ceiling_one_run", "epsilon_lower_bound_one_run", "exposure_extrapolation", "exposure_from_rank",
    "exposure_interpolation", "extraction_probability", "information_view", "is_np_extractable",
    "longest_common_prefix", "loss_score", "min_k_plus_plus_score", "min_k_score", "normalized_edit_distance",
    "null_exposure_mean", "one_run_audit", "one_run_p_value", "queries_needed", "rank_against_references",
    "ratio_to_base", "roc_auc", "sampled_space_exposure", "tpr_at_fpr", "utf8_bits", "zlib_ratio_score",
]
