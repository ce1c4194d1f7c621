"""transformers integration: checkpoint loading, the MAGE cache, attention function, enable()."""
from .cache import MageCache
from .enable import disable_mage, enable_mage, is_enabled

__all__ = ["MageCache", "enable_mage", "disable_mage", "is_enabled", "load_model", "LoadedModel"]


def __getattr__(name):  # checkpoint loading pulls in safetensors/tokenizers only when used
    if name in ("load_model", "LoadedModel"):
        from . import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(name)
