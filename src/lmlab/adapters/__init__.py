"""Parameter-efficient fine-tuning: LoRA and DoRA adapters on nn.Linear modules."""
from lmlab.adapters.dora import DoRALinear
from lmlab.adapters.inject import (
    AdapterConfig, adapter_state_dict, apply_adapters, load_adapter, merge_adapters,
    save_adapter, strip_adapters, unmerge_adapters,
)
from lmlab.adapters.lora import LoRALinear, lora_scaling
from lmlab.adapters.report import ParameterReport, parameter_report

__all__ = [
    "AdapterConfig", "DoRALinear", "LoRALinear", "ParameterReport", "adapter_state_dict",
    "apply_adapters", "load_adapter", "lora_scaling", "merge_adapters", "parameter_report",
    "save_adapter", "strip_adapters", "unmerge_adapters",
]
