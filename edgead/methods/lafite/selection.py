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

from edgead.methods.validation import ranked
from edgead.metrics import auroc_standard_error

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
    ``n_normal``, ``n_pseudo``) and what decided it, by :data:`RULE`."""
    order = ranked(rows)
    best = order[0]
    decision: dict[str, Any] = {"rule": RULE, "best": list(best)}
    if default not in rows or best == default:
        return best, {**decision, "chosen": list(best), "kept_paper_setting": best == default}
    b, d = rows[best], rows[default]
    n_pos, n_neg = int(b["n_pseudo"]), int(b["n_normal"])
    error = max(
        auroc_standard_error(b["image_auroc"], n_pos, n_neg), auroc_standard_error(d["image_auroc"], n_pos, n_neg)
    )
    margin = b["image_auroc"] - d["image_auroc"]
    keep = margin <= error
    chosen = default if keep else best
    decision.update(
        {
            "margin": round(margin, 4),
            "standard_error": round(error, 4),
            "chosen": list(chosen),
            "kept_paper_setting": keep,
        }
    )
    return chosen, decision


def by_weighting(rows: Mapping[tuple[str, int], dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{weighting: {str(K): figures}}``: the record of every candidate, one table per weighting."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for (weighting, k), row in rows.items():
        table.setdefault(weighting, {})[str(k)] = row
    return table
