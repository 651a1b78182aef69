"""The one pseudo-validation service: every automatic choice of a method and ``edgead tune`` go through it.

A user has only normal images, so a free setting is chosen as LafitE does (Sec. 3.4, Fig. 6): on the run's
held-out normal images (label 0) plus as many pseudo-anomalies made from them (label 1, with masks;
:func:`edgead.data.pseudo.pseudo_validation_set`, seed 0). Never on test data.

- The set is built once per choice (:meth:`edgead.methods.base.Method.pseudo_validation_set`).
- A candidate is an inference graph (``forward(image) -> (anomaly_map, score)``) or a callable that
  takes the set's preprocessed images and gives ``(maps or None, scores)``.
- Its figures are computed one way (:func:`pseudo_figures`): image AUROC over all images and pixel AUROC
  over the pseudo-anomalies (maps resized to the masks), each rounded to four digits.
- The choice is the best candidate by a named rule (:data:`RULES`), the earlier candidate winning exact ties.
  Where the choice has a default (the paper's value), the default is kept unless the best candidate's image
  AUROC beats it by more than one standard error of the set, or, within that, its maps localise the
  pseudo-anomalies better by more than one standard error of the paired per-image pixel AUROCs
  (:func:`keep_default_unless_beaten`): a set of a few dozen images cannot tell closer candidates apart, and
  the choice says so.
- The set can be made as hard as the choice needs (:func:`calibrated_set`): pseudo-anomalies of several
  kinds (small and low-contrast ones too) at the strongest of :data:`STRENGTHS` at which a reference
  candidate (the default) scores at most :data:`TARGET_AUROC`, so candidates are not all tied near 1.0.
- The record goes into the run's state (:meth:`edgead.methods.base.Method.record_choice`).

Example:
    >>> validation = method.pseudo_validation_set(ctx, limit=200)  # doctest: +SKIP
    >>> choice = validation.choose({tau: method.graph_for(tau=tau) for tau in (50, 100)})  # doctest: +SKIP
    >>> choice.best, choice.rows[choice.best]["image_auroc"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch import nn

from edgead.data.preprocess import PreprocessConfig
from edgead.data.pseudo import DISCRIMINATING_KINDS, pseudo_validation_set
from edgead.metrics import auroc_standard_error, image_auroc, pixel_auroc
from edgead.train.memory import release_freed_memory

K = TypeVar("K", bound=Hashable)
#: A candidate: an inference graph, or a callable taking the set's preprocessed images ``(N, C, S, S)`` and
#: giving ``(maps (N, H, W) or None, scores (N,))`` (e.g. from features it computed once for every candidate).
Candidate = nn.Module | Callable[[np.ndarray], tuple[np.ndarray | None, np.ndarray]]

#: How candidates are ranked, by name -> the figures that decide, in order. ``image_then_pixel``: image
#: AUROC, pixel AUROC breaking ties (LafitE Sec. 4.5; ``edgead tune``; a candidate without maps ranks by
#: image AUROC alone). ``mean``: ``(image AUROC + pixel AUROC) / 2`` (score-tscale's feature maps).
RULES: dict[str, tuple[str, ...]] = {"image_then_pixel": ("image_auroc", "pixel_auroc"), "mean": ("criterion",)}
#: What ``edgead tune`` and the records say the default rule is.
CRITERION = "pseudo-validation image AUROC, then pixel AUROC"
#: The tie rule of every choice that has a default.
ONE_SE_RULE = (
    "the default is kept unless the best candidate's image AUROC exceeds it by more than one standard error "
    "(Hanley & McNeil 1982, the larger of the two candidates' errors on this set; the one-standard-error rule "
    "of Breiman et al. 1984), or, within that, the best's maps localise the pseudo-anomalies better by more "
    "than one standard error of the mean paired difference of per-image pixel AUROC"
)
#: Defect strengths a calibrated set tries, strongest first (share of each defect's contrast kept).
STRENGTHS: tuple[float, ...] = (1.0, 0.6, 0.4, 0.25, 0.15)
#: A calibrated set is the strongest one on which the reference candidate's image AUROC is at most this.
#: Our choice: the issue's 0.8-0.9 band; below 0.9 a better candidate has room to show (engineering).
TARGET_AUROC = 0.9


@torch.no_grad()
def run_graph(
    graph: nn.Module,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run an inference graph over preprocessed images in batches; return ``(maps (N,H,W), scores (N,))``.
    ``on_batch`` receives the number of images of each finished batch (progress)."""
    graph = graph.to(device).eval()
    tensor = torch.as_tensor(images)
    maps, scores = [], []
    for start in range(0, len(tensor), batch_size):
        batch = tensor[start : start + batch_size].to(device)
        anomaly_map, score = graph(batch)
        maps.append(anomaly_map.float().cpu().numpy())
        scores.append(score.float().cpu().numpy())
        if on_batch is not None:
            on_batch(len(batch))
    if not maps:
        raise ValueError("no images to run")
    return np.concatenate(maps), np.concatenate(scores)


def pseudo_figures(
    labels: np.ndarray, masks: np.ndarray, maps: np.ndarray | None, scores: np.ndarray, rule: str = "image_then_pixel"
) -> dict[str, Any]:
    """Image AUROC over all images and pixel AUROC over the pseudo-anomalies (maps resized to the masks),
    rounded to four digits, with the set's counts; ``rule="mean"`` adds ``criterion``, the mean of the two
    unrounded AUROCs, rounded. Without maps only the image AUROC."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    defect = labels == 1
    image = float(image_auroc(labels, scores))
    figures: dict[str, Any] = {"image_auroc": round(image, 4)}
    if maps is not None:
        if maps.shape[-2:] != masks.shape[-2:]:  # a map at another size (e.g. score-resilience map_size)
            import cv2

            maps = np.stack([cv2.resize(m, masks.shape[-2:][::-1], interpolation=cv2.INTER_LINEAR) for m in maps])
        pixel = float(pixel_auroc(masks[defect], maps[defect]))
        figures["pixel_auroc"] = round(pixel, 4)
        if rule == "mean":
            figures["criterion"] = round((image + pixel) / 2, 4)
    figures.update({"n_normal": int((~defect).sum()), "n_pseudo": int(defect.sum())})
    return figures


def ranked(rows: Mapping[K, dict[str, Any]], rule: str = "image_then_pixel") -> list[K]:
    """The candidates best first by ``rule`` (:data:`RULES`); a stable sort, so exact ties keep their order."""
    keys = RULES[rule]
    return sorted(rows, key=lambda name: tuple(rows[name][k] for k in keys if k in rows[name]), reverse=True)


def per_image_pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """The pixel AUROC of each image's map against its own mask (NaN where the mask is empty or full): how well
    each pseudo-anomaly is localised, one figure per image, so two candidates can be compared pairwise."""
    if maps.shape[-2:] != masks.shape[-2:]:
        import cv2

        maps = np.stack([cv2.resize(m, masks.shape[-2:][::-1], interpolation=cv2.INTER_LINEAR) for m in maps])
    values = np.full(len(masks), np.nan)
    for index, (mask, anomaly_map) in enumerate(zip(masks, maps, strict=True)):
        if 0 < mask.sum() < mask.size:
            values[index] = pixel_auroc(mask[None], anomaly_map[None])
    return values


def keep_default_unless_beaten(
    rows: Mapping[K, dict[str, Any]],
    default: K | None,
    rule: str = "image_then_pixel",
    paired: Mapping[K, np.ndarray] | None = None,
) -> tuple[K, dict[str, Any]]:
    """The chosen candidate among ``rows`` (figures with ``image_auroc``, ``n_normal``, ``n_pseudo``) and
    what decided it: the best by ``rule``, unless ``default`` is given and the best's image AUROC exceeds
    the default's by no more than one standard error (:data:`ONE_SE_RULE`); then the default.

    With ``paired`` (each candidate's :func:`per_image_pixel_auroc` on the pseudo-anomalies), a best that is
    within one standard error on image AUROC still wins when it localises better: the mean of the paired
    per-image pixel AUROC differences exceeds one standard error of that mean (choices that change only the
    map, whose image AUROCs tie by construction)."""
    best = ranked(rows, rule)[0]
    decision: dict[str, Any] = {"best": _plain(best)}
    if default is None or default not in rows or best == default:
        return best, {**decision, "chosen": _plain(best), "default": _plain(default), "kept_default": best == default}
    b, d = rows[best], rows[default]
    n_pos, n_neg = int(b["n_pseudo"]), int(b["n_normal"])
    error = max(
        auroc_standard_error(b["image_auroc"], n_pos, n_neg), auroc_standard_error(d["image_auroc"], n_pos, n_neg)
    )
    margin = b["image_auroc"] - d["image_auroc"]
    keep = margin <= error
    pixel: dict[str, Any] = {}
    if keep and paired is not None and best in paired and default in paired:
        both = ~(np.isnan(paired[best]) | np.isnan(paired[default]))
        differences = (paired[best] - paired[default])[both]
        if len(differences) >= 2:
            pixel_margin = float(differences.mean())
            pixel_error = float(differences.std(ddof=1) / np.sqrt(len(differences)))
            pixel = {"pixel_margin": round(pixel_margin, 4), "pixel_standard_error": round(pixel_error, 4)}
            if pixel_margin > pixel_error:
                keep = False
                pixel["why"] = "within one standard error on image AUROC, better localised by more than one"
    chosen = default if keep else best
    decision.update(
        {
            "rule": ONE_SE_RULE,
            "default": _plain(default),
            "margin": round(margin, 4),
            "standard_error": round(error, 4),
            "chosen": _plain(chosen),
            "kept_default": keep,
            **pixel,
        }
    )
    if keep:
        decision["why"] = "the candidates differ by less than this set can resolve: the default stays"
    return chosen, decision


def _plain(value: Any) -> Any:
    """A candidate key as JSON writes it (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Choice(Generic[K]):
    """The outcome of :meth:`PseudoValidationSet.choose`: the best candidate by the rule, the chosen one
    (the default where the best does not beat it by more than one standard error), what decided, and
    every candidate's figures."""

    best: K
    rows: dict[K, dict[str, Any]]
    chosen: K
    decision: dict[str, Any]

    def by_name(self) -> dict[str, dict[str, Any]]:
        """The rows keyed by ``str(candidate)``, as ``config.json`` records them."""
        return {str(name): row for name, row in self.rows.items()}


@dataclass(frozen=True)
class PseudoValidationSet:
    """Held-out normal images and as many pseudo-anomalies made from them, preprocessed, with where the
    normal images came from (LafitE Sec. 3.4)."""

    images: np.ndarray  # (N, C, S, S) float32, preprocessed
    labels: np.ndarray  # (N,) int: 0 normal, 1 pseudo-anomaly
    masks: np.ndarray  # (N, S, S) bool, all False for the normal images
    source: str  # e.g. "10 held-out normal images"
    kinds: tuple[str, ...] = ("paste",)
    strength: float = 1.0
    calibration: dict[str, Any] | None = None  # how the strength was chosen (calibrated_set)

    @classmethod
    def from_normals(
        cls,
        normal_rgb: Sequence[np.ndarray],
        pre: PreprocessConfig,
        source: str,
        seed: int = 0,
        kinds: Sequence[str] = ("paste",),
        strength: float = 1.0,
    ) -> PseudoValidationSet:
        """Build the set from at least two uint8 RGB normal images at the input size (the default: the
        paper's pasted fragments at full strength)."""
        images, labels, masks = pseudo_validation_set(normal_rgb, pre, seed=seed, kinds=kinds, strength=strength)
        return cls(images, labels, masks, source, tuple(kinds), float(strength))

    @property
    def n_normal(self) -> int:
        return int((self.labels == 0).sum())

    @property
    def n_pseudo(self) -> int:
        return int((self.labels == 1).sum())

    def describe(self) -> dict[str, Any]:
        """What a choice's record says about the set: ``validation`` (the source), ``n_normal``, ``n_pseudo``,
        the pseudo-anomaly kinds and strength, and the calibration that chose the strength (if any)."""
        described: dict[str, Any] = {
            "validation": self.source,
            "n_normal": self.n_normal,
            "n_pseudo": self.n_pseudo,
            "kinds": list(self.kinds),
            "strength": self.strength,
        }
        if self.calibration is not None:
            described["calibration"] = self.calibration
        return described

    def figures(self, maps: np.ndarray | None, scores: np.ndarray, rule: str = "image_then_pixel") -> dict[str, Any]:
        """:func:`pseudo_figures` of outputs on this set's images."""
        return pseudo_figures(self.labels, self.masks, maps, np.asarray(scores), rule)

    def evaluate(
        self,
        candidate: Candidate,
        *,
        rule: str = "image_then_pixel",
        batch_size: int = 8,
        device: str | torch.device = "cpu",
    ) -> dict[str, Any]:
        """Run one candidate on the set (a graph in batches of ``batch_size`` on ``device``) and return its figures."""
        return self.figures(*self.outputs(candidate, batch_size=batch_size, device=device), rule)

    def outputs(
        self, candidate: Candidate, *, batch_size: int = 8, device: str | torch.device = "cpu"
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """``(maps or None, scores)`` of one candidate on the set's images."""
        if isinstance(candidate, nn.Module):
            return run_graph(candidate, self.images, batch_size=batch_size, device=device)
        return candidate(self.images)

    def choose(
        self,
        candidates: Mapping[K, Candidate],
        *,
        rule: str = "image_then_pixel",
        default: K | None = None,
        batch_size: int = 8,
        device: str | torch.device = "cpu",
    ) -> Choice[K]:
        """Evaluate every candidate in order and choose by ``rule`` (earlier candidates win exact ties); with
        a ``default``, by :func:`keep_default_unless_beaten`."""
        if not candidates:
            raise ValueError("no candidates to choose from")
        rows: dict[K, dict[str, Any]] = {}
        paired: dict[K, np.ndarray] = {}
        for name, candidate in candidates.items():
            maps, scores = self.outputs(candidate, batch_size=batch_size, device=device)
            rows[name] = self.figures(maps, scores, rule)
            if maps is not None and default is not None:
                defect = self.labels == 1
                paired[name] = per_image_pixel_auroc(self.masks[defect], np.asarray(maps)[defect])
            del maps, scores
            release_freed_memory()  # one candidate's outputs, before the next candidate's
        chosen, decision = keep_default_unless_beaten(rows, default, rule, paired or None)
        return Choice(ranked(rows, rule)[0], rows, chosen, decision)


def calibrated_set(
    normal_rgb: Sequence[np.ndarray],
    pre: PreprocessConfig,
    source: str,
    reference: Callable[[PseudoValidationSet], float],
    *,
    seed: int = 0,
    kinds: Sequence[str] = DISCRIMINATING_KINDS,
    strengths: Sequence[float] = STRENGTHS,
    target: float = TARGET_AUROC,
) -> PseudoValidationSet:
    """A pseudo-validation set hard enough to discriminate: pseudo-anomalies of ``kinds`` (the paper's
    fragments, small fragments, blemishes, scratches, texture changes) at the strongest of ``strengths`` on
    which ``reference`` (the choice's default candidate; it gives the image AUROC of a set) scores at most
    ``target``; the faintest if none does. The same defects at every strength (one seed), only their
    contrast changes. The set records each strength's reference AUROC (``calibration``)."""
    if not strengths or any(not 0.0 < s <= 1.0 for s in strengths):
        raise ValueError(f"strengths must be values in (0, 1], got {tuple(strengths)}")
    tried: dict[str, float] = {}
    candidate = None
    for strength in sorted(strengths, reverse=True):
        candidate = PseudoValidationSet.from_normals(normal_rgb, pre, source, seed, kinds, strength)
        tried[str(strength)] = round(float(reference(candidate)), 4)
        if tried[str(strength)] <= target:
            break
    assert candidate is not None
    record = {"target_reference_auroc": target, "reference_auroc_by_strength": tried}
    return dataclasses.replace(candidate, calibration=record)


__all__ = [
    "CRITERION",
    "ONE_SE_RULE",
    "RULES",
    "STRENGTHS",
    "TARGET_AUROC",
    "Candidate",
    "Choice",
    "PseudoValidationSet",
    "calibrated_set",
    "keep_default_unless_beaten",
    "per_image_pixel_auroc",
    "pseudo_figures",
    "ranked",
    "run_graph",
]
