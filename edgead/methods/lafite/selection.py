"""How LafitE's automatic selection decides between the edit weighting and K (Sec. 4.5, with our tie rule).

The candidates are every ``(weighting, K)`` pair, scored on the pseudo-validation set by the shared service
(:mod:`edgead.methods.validation`: image AUROC, pixel AUROC breaking ties). A set of a few dozen images
cannot tell apart candidates whose image AUROCs differ by less than their sampling error, so the paper's
own setting (eq. 10 exactly, ``K = 2``: the one K where its weights sum to 1) is kept unless the best
candidate beats it by more than one standard error: the "one-standard-error rule" of model selection
(Breiman et al. 1984), with the standard error of an AUROC from Hanley & McNeil (1982).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgead.methods.validation import keep_default_unless_beaten

#: The paper's setting: eq. 10 as printed, two neighbours (Sec. 4.5's K with weights summing to 1).
PAPER_EDIT = ("paper", 2)

RULE = (
    "best (weighting, K) by pseudo-validation image AUROC, pixel AUROC breaking ties; the paper's setting "
    "(paper weighting, K = 2) is kept unless the best's image AUROC exceeds it by more than one standard "
    "error (Hanley & McNeil 1982; the larger of the two candidates' errors on this set)"
)


def choose_edit(
    rows: Mapping[tuple[str, int], dict[str, Any]], default: tuple[str, int] = PAPER_EDIT
) -> tuple[tuple[str, int], dict[str, Any]]:
    """The chosen ``(weighting, K)`` among ``rows`` (pseudo-validation figures with ``image_auroc``,
    ``n_normal``, ``n_pseudo``) and what decided it, by :data:`RULE` (the service's
    :func:`~edgead.methods.validation.keep_default_unless_beaten` with the paper's setting as the default)."""
    chosen, decision = keep_default_unless_beaten(rows, default)
    decision = {**decision, "rule": RULE, "kept_paper_setting": decision["kept_default"]}
    return chosen, decision


def by_weighting(rows: Mapping[tuple[str, int], dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{weighting: {str(K): figures}}``: the record of every candidate, one table per weighting."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for (weighting, k), row in rows.items():
        table.setdefault(weighting, {})[str(k)] = row
    return table
