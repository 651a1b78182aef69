"""The FP32 parity envelope: an export as accurate as FP32 allows passes, a wrong one does not."""

from __future__ import annotations

import numpy as np

from edgead.runtime.parity import FP32_SCORE_RTOL, compare, fp32_envelope, relative_errors


def test_envelope_accepts_an_export_as_exact_as_pytorch_fp32() -> None:
    exact = np.array([1.0, 2.0, 4.0])
    torch_fp32 = exact * (1 + np.array([1e-3, -8e-4, 5e-4]))  # an ill-conditioned graph: FP32 is 1e-3 off
    export = exact * (1 + np.array([-9e-4, 1e-3, 2e-4]))
    env = fp32_envelope(torch_fp32, export, exact)
    assert env["within"] and abs(env["torch_fp32_vs_float64"] - 1e-3) < 1e-12
    assert compare(torch_fp32[:, None], torch_fp32, export[:, None], export, 1.5)["score_max_rel_error"] > 1e-4


def test_envelope_rejects_an_export_far_outside_fp32_error() -> None:
    exact = np.array([1.0, 2.0, 4.0])
    torch_fp32 = exact * (1 + 1e-7)
    env = fp32_envelope(torch_fp32, exact * 1.01, exact)
    assert not env["within"] and env["allowed"] == FP32_SCORE_RTOL
    assert fp32_envelope(torch_fp32, exact * (1 + 5e-5), exact)["within"]


def test_a_score_near_zero_is_measured_against_the_scale_of_the_scores() -> None:
    reference = np.array([-3.0, 1e-6, 5.0])  # z-scores: one sits at zero
    rounded = reference + np.array([0.0, 3e-7, 0.0])  # FP32 rounding of that one
    assert relative_errors(reference, rounded).max() < 1e-5  # not 0.3
    assert relative_errors(reference, reference * 1.01).max() > 9e-3  # a real 1 % error still shows
