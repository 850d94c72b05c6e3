"""The component registries (``composer.contract.registry``), with the built-in components registered.

    from composer.registry import ATTENTION, FAMILIES

Importing this module imports the ``components`` package, whose modules register the built-ins with
``register``; the registries themselves live in the contract layer, below the components.
"""

import components  # noqa: F401  (registers the built-in components)

from .contract.registry import (  # noqa: F401
    ATTENTION,
    BLOCK,
    ENTRY_POINT_GROUP,
    FAMILIES,
    FFN,
    HEAD,
    NORM,
    POSITION,
    Entry,
    Registry,
    _state,
    interface_gaps,
    reload_entry_points,
)
