"""The component interfaces, kept importable under their old name: they live in ``composer.contract``
(``composer/contract/protocols.py``), the layer below the components."""

from composer.contract.protocols import (  # noqa: F401
    Attention,
    Block,
    BlockBase,
    BlockConfigBase,
    BuildContext,
    ComponentConfig,
    FeedForward,
    Head,
    HeadBase,
    LayerInputs,
    MixerBase,
    Norm,
    PositionBase,
    PositionEncoding,
    Rotation,
    SequenceMixer,
)

AttentionInputs = LayerInputs  # the per-layer inputs' name before the one-way structure
