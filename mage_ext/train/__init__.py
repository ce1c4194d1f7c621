"""Training through the MAGE ops: the block-diffusion layout (layout.py) and MAGE-FT."""
from .layout import TrainLayout, causal_lm, disable_train_attention, enable_train_attention

__all__ = ["TrainLayout", "causal_lm", "enable_train_attention", "disable_train_attention"]
