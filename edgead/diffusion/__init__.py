"""Forward SDEs, DDPM/DDIM schedules and single sampler steps as pure tensor functions.

Every method of the toolkit uses these; none copies them. See :mod:`edgead.diffusion.sde` and
:mod:`edgead.diffusion.schedules`.
"""

from edgead.diffusion.schedules import (
    alpha_bar_from_betas,
    cosine_alpha_bar,
    cosine_betas,
    ddim_step,
    ddpm_q_sample,
    ddpm_step,
    linear_betas,
    make_alpha_bar,
    predict_x0_from_eps,
)
from edgead.diffusion.sde import (
    SDE,
    append_dims,
    broadcast_like,
    perturb,
    probability_flow_step,
    reverse_sde_step,
    spr_diffusion_coeff,
    spr_drift_diffusion,
    spr_marginal,
    spr_sigma,
    subvp_drift_diffusion,
    subvp_marginal,
    ve_drift_diffusion,
    ve_marginal,
    ve_sigma,
    vp_beta,
    vp_drift_diffusion,
    vp_marginal,
)

__all__ = [
    "SDE",
    "alpha_bar_from_betas",
    "append_dims",
    "broadcast_like",
    "cosine_alpha_bar",
    "cosine_betas",
    "ddim_step",
    "ddpm_q_sample",
    "ddpm_step",
    "linear_betas",
    "make_alpha_bar",
    "perturb",
    "predict_x0_from_eps",
    "probability_flow_step",
    "reverse_sde_step",
    "spr_diffusion_coeff",
    "spr_drift_diffusion",
    "spr_marginal",
    "spr_sigma",
    "subvp_drift_diffusion",
    "subvp_marginal",
    "ve_drift_diffusion",
    "ve_marginal",
    "ve_sigma",
    "vp_beta",
    "vp_drift_diffusion",
    "vp_marginal",
]
