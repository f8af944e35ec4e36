"""Parameter-efficient fine-tuning: LoRA and DoRA adapters on nn.Linear modules and MoE experts."""
from lmlab.adapters.dora import DoRAExperts, DoRALinear
from lmlab.adapters.inject import (
    AdapterConfig, adapter_state_dict, apply_adapters, disabled_adapters, load_adapter, merge_adapters,
    save_adapter, strip_adapters, unmerge_adapters,
)
from lmlab.adapters.lora import LoRAExperts, LoRALinear, lora_scaling
from lmlab.adapters.report import ParameterReport, parameter_report

__all__ = [
    "AdapterConfig", "DoRAExperts", "DoRALinear", "LoRAExperts", "LoRALinear", "ParameterReport", "adapter_state_dict",
    "apply_adapters", "disabled_adapters", "load_adapter", "lora_scaling", "merge_adapters", "parameter_report",
    "save_adapter", "strip_adapters", "unmerge_adapters",
]
