"""Exponential moving average of parameters (Polyak averaging), as used by the score-based papers."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Keeps ``shadow = decay * shadow + (1 - decay) * param`` for every floating tensor of a module.

    Buffers are copied, not averaged. With ``warmup`` the decay used at update ``n`` is
    ``min(decay, (1 + n) / (10 + n))`` so that a short run (tests, the demo) still ends with weights
    close to the trained ones instead of close to the initialisation.

    Example:
        >>> ema = EMA(model, decay=0.9999)
        >>> ema.update(model)  # after each optimiser step
        >>> ema.copy_to(eval_model)
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: tensor.detach().clone().float() if tensor.is_floating_point() else tensor.detach().clone()
            for name, tensor in model.state_dict().items()
        }

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.num_updates += 1
        params = dict(model.named_parameters())
        for name, tensor in model.state_dict().items():
            shadow = self.shadow[name]
            if name in params and tensor.is_floating_point():
                shadow.mul_(decay).add_(tensor.detach().float(), alpha=1.0 - decay)
            else:
                shadow.copy_(tensor.detach())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state is missing {sorted(missing)[:5]}")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])
        self.num_updates = num_updates

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})
