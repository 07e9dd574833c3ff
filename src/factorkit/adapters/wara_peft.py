"""WaRA from PEFT itself: a LoRA variant whose factors hold wavelet coefficients.

    from peft import get_peft_model, PeftModel
    from factorkit.adapters.wara_peft import WaRALoraConfig

    config = WaRALoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], wavelet="db2", levels=2)
    model = get_peft_model(model, config)               # a PeftModel: train, save_pretrained, merge_and_unload ...
    model.save_pretrained("out/wara")                   # PEFT's files; adapter_config.json keeps wavelet and levels
    model = PeftModel.from_pretrained(base, "out/wara", config=WaRALoraConfig.from_pretrained("out/wara"))

PEFT adds whole tuners only for names in its own PeftType enum, but LoRA has
two extension points a package outside PEFT can use, both marked experimental
by PEFT: a config may map layer types to custom LoRA layers
(``LoraConfig._register_custom_module``), and a LoRA layer picks a
``LoraVariant`` (the mechanism behind DoRA) that takes over its forward pass,
merge and unmerge. ``WaRALoraConfig`` is a ``LoraConfig`` with two more fields
that maps every targeted layer to ``WaRALoraLinear``, a PEFT ``lora.Linear``
whose variant applies (alpha / r) * IDWT(lora_B @ lora_A) through the thin
transformed factors of ``solvers.wavelets``, as ``factors.wara.WaRALinear``
does. Everything else is PEFT's: the A / B parameters and their
initialisation (B = 0, so the update starts at zero), dropout, several named
adapters, ``disable_adapter``, merging, saving and loading.

Loading needs the config class: ``PeftModel.from_pretrained`` alone would
read the folder as a plain LoRA (PEFT warns that it ignores ``wavelet`` and
``levels``) and apply B @ A without the inverse transform.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import peft
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from ..errors import FactorkitError
from ..solvers.wavelets import check_levels, lowrank_idwt_factors

try:
    from peft.tuners.lora.layer import LoraVariant
except ImportError:  # an older peft: check_peft() says so when a config is built
    LoraVariant = object


def check_peft() -> None:
    """Refuse a peft without the extension points WaRA uses: there its layers would run as a plain LoRA."""
    if LoraVariant is object or not hasattr(LoraLayer, "lora_variants") or \
            not hasattr(LoraConfig, "_register_custom_module"):
        raise FactorkitError(f"WaRA through PEFT needs peft's LoRA variant registry, which peft {peft.__version__} "
                             "lacks; upgrade peft (0.21 works) or use factorkit.adapters.wara.WaRAConfig, "
                             "which does not need it.")


@dataclass
class WaRALoraConfig(LoraConfig):
    """A ``LoraConfig`` for WaRA: ``wavelet`` (orthogonal: haar, db2, db4, sym4, ...)
    and ``levels`` of the 2-D transform, every targeted side divisible by 2^levels."""

    wavelet: str = field(default="db2", metadata={"is_lora_variant": True,
                                                  "help": "orthogonal wavelet of the update's coefficients"})
    levels: int = field(default=2, metadata={"help": "levels of the 2-D inverse wavelet transform"})

    def __post_init__(self) -> None:
        check_peft()
        super().__post_init__()
        if not self.wavelet:
            raise FactorkitError("WaRALoraConfig needs a wavelet, for example wavelet='db2'; "
                                 "use peft.LoraConfig for a plain LoRA.")
        try:  # the wavelet exists and is orthogonal, and levels >= 1; the shapes are checked per layer
            check_levels((1 << 20, 1 << 20), self.wavelet, self.levels)
        except ValueError as exc:
            raise FactorkitError(f"WaRALoraConfig: {exc}.") from None
        # every targeted module goes to WaRALoraLinear, which refuses anything but nn.Linear rather than
        # letting PEFT fall back to a plain LoRA layer
        self._register_custom_module({nn.Module: WaRALoraLinear})

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> WaRALoraConfig:
        # PEFT would map peft_type "LORA" to LoraConfig and drop wavelet and levels
        return cls(**kwargs)


class WaRALinearVariant(LoraVariant):
    """The variant PEFT calls for the forward pass, merge and unmerge of a WaRA adapter."""

    def supports_lora_conversion(self) -> bool:
        return False  # a plain LoRA of this adapter needs rank r * (2 * levels - 1), not PEFT's conversion

    @staticmethod
    def init(module: WaRALoraLinear, adapter_name: str, config: WaRALoraConfig | None = None, **kwargs: Any) -> None:
        if not isinstance(config, WaRALoraConfig):
            raise FactorkitError("a WaRA layer needs a WaRALoraConfig; build the adapter with one.")
        out_f, in_f = module.get_base_layer().weight.shape
        try:
            check_levels((out_f, in_f), config.wavelet, config.levels)
        except ValueError as exc:
            raise FactorkitError(f"WaRA on a {out_f}x{in_f} layer: {exc}.") from None
        module.wara_transform[adapter_name] = (config.wavelet, config.levels)

    @staticmethod
    def factors(module: WaRALoraLinear, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(Bt, At) with Bt @ At = IDWT(lora_B @ lora_A), differentiable in both."""
        wavelet, levels = module.wara_transform[adapter]
        return lowrank_idwt_factors(module.lora_B[adapter].weight, module.lora_A[adapter].weight, wavelet, levels)

    @staticmethod
    def delta_weight(module: WaRALoraLinear, adapter: str) -> torch.Tensor:
        Bt, At = WaRALinearVariant.factors(module, adapter)
        return (Bt @ At) * module.scaling[adapter]

    @staticmethod
    def merge_safe(module: WaRALoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + WaRALinearVariant.delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: WaRALoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += WaRALinearVariant.delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: WaRALoraLinear, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight.data - WaRALinearVariant.delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module: WaRALoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        Bt, At = WaRALinearVariant.factors(module, active_adapter)
        x = module.lora_dropout[active_adapter](x)
        return result + ((x @ At.T) @ Bt.T) * module.scaling[active_adapter]


class WaRALoraLinear(PeftLoraLinear):
    """PEFT's LoRA Linear with the WaRA variant: the layer type ``WaRALoraConfig`` registers."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: WaRALoraConfig, **kwargs: Any) -> None:
        base = base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer
        if not isinstance(base, nn.Linear):
            raise FactorkitError(f"WaRA adapts nn.Linear layers, but target_modules also matched a "
                                 f"{type(base).__name__}; name only Linear layers in target_modules.")
        self.wara_transform: dict[str, tuple[str, int]] = {}
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    @property
    def lora_variants(self) -> dict[tuple[str, ...], type[LoraVariant] | None]:
        # WaRA alone; PEFT rejects combinations (DoRA + WaRA, ...) as unsupported
        return {(): None, ("wavelet",): WaRALinearVariant}

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        if adapter in self.lora_variant:
            return WaRALinearVariant.delta_weight(self, adapter)
        return super().get_delta_weight(adapter)

    def __repr__(self) -> str:
        return "wara." + super().__repr__()
