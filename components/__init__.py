"""Building blocks: plain PyTorch modules, one concept per file, registered by name.

Importing this package imports every module in it, and each module registers its classes with its
family's ``register`` (the one mechanism plugins use too): a new component is a new file here, nothing
else. Components import only the contract layer (``composer.contract``) and each other: nothing here
imports the model, Hydra or Lightning.
"""

import importlib
import pkgutil

BUILTIN_MODULES = tuple(info.name for info in pkgutil.iter_modules(__path__) if info.name != "protocols")
for _name in BUILTIN_MODULES:
    importlib.import_module(f"{__name__}.{_name}")
