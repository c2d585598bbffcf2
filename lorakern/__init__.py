"""lorakern: accelerated LoRA for PyTorch. The public API is described in API.md and README.md."""
from lorakern import init, linalg, ops
from lorakern._backend import backends, get_backend, get_design, set_backend, set_design
from lorakern.capture import capture_gradients
from lorakern.integrations.peft_accel import accelerate, restore
from lorakern.layer import LoRALinear
from lorakern.model import apply_lora, lora_modules, merge_lora, remove_lora, unmerge_lora
from lorakern.peft_io import load_adapter, save_adapter
from lorakern.spectral import spectral_init
from lorakern.tuner import tune
from lorakern import optim
from lorakern import theory

__version__ = "0.1.0"

__all__ = [
    "LoRALinear", "apply_lora", "lora_modules", "merge_lora", "unmerge_lora", "remove_lora",
    "save_adapter", "load_adapter", "backends", "set_backend", "get_backend", "init", "linalg", "ops",
    "spectral_init", "capture_gradients", "optim", "theory", "set_design", "get_design", "tune",
    "accelerate", "restore",
]
