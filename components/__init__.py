"""Building blocks: plain PyTorch modules, one concept per file, registered by name.

The registry imports the modules below on its first lookup (importing them here would
make ``composer.registry`` and the components import each other). Nothing here imports
Hydra or Lightning.
"""

BUILTIN_MODULES = ("norm", "position", "attention", "ffn", "moe", "head", "block")
