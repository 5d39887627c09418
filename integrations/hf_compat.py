"""What differs between the transformers 5.x releases we support (5.17 to 5.23 at least),
in one place, so the caches are written once (docs/FACTS.md: the cache API drifts inside 5.x).
"""
from __future__ import annotations

from typing import Any

SLIDING_TYPES = ("sliding_attention",)
FULL_TYPES = ("full_attention",)


def text_config(config: Any) -> Any:
    """The decoder's config of a (possibly multimodal) model config."""
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter is not None else config


def layer_windows(config: Any) -> list[int | None]:
    """Per decoder layer: its sliding window, or None for full attention.

    Follows transformers' own rule: ``config.layer_types`` when the config has it, else every
    layer slides when ``config.sliding_window`` is set (Mistral), else none does.

    Raises:
        ValueError: for a layer type the virtual caches do not implement (chunked attention,
            linear attention, ...), naming the layer and its type.
    """
    cfg = text_config(config)
    window = getattr(cfg, "sliding_window", None)
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    if types is None:
        types = ["sliding_attention" if window is not None else "full_attention"] * n
    out: list[int | None] = []
    for i, kind in enumerate(types[:n]):
        if kind in SLIDING_TYPES:
            if window is None:
                raise ValueError(f"layer {i} is {kind!r} but the config has no sliding_window")
            out.append(int(window))
        elif kind in FULL_TYPES:
            out.append(None)
        else:
            raise ValueError(f"layer {i} is {kind!r}: vmmalloc's virtual KV caches implement "
                             f"{', '.join(FULL_TYPES + SLIDING_TYPES)} layers only; use DynamicCache for this model")
    return out


def crop_to_removal(tokens_to_remove: Any, length: int) -> int:
    """The number of tokens ``crop()`` removes (>= 0).

    5.18+ passes ``-n`` (remove n) or 0; 5.17 may pass a 0-d tensor, and a positive value
    there is the legacy absolute length to keep.
    """
    n = int(tokens_to_remove)
    if n > 0:
        return max(length - n, 0)
    return min(-n, length)
