"""LoRA operations: one module per operation, each holding its kernels and its torch.autograd.Function."""
from lorakern.ops.lora_linear import LoRALinearFunction, lora_linear

__all__ = ["LoRALinearFunction", "lora_linear"]
