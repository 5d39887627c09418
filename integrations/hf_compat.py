"""What differs between the transformers 5.x releases we support (5.17 to 5.24, tested on
both ends), in one place, so the caches are written once (docs/FACTS.md: the cache API
drifts inside 5.x).
"""
from __future__ import annotations

import functools
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


@functools.cache
def generate_cache_kwarg() -> str:
    """The name generate() takes a cache under: ``cache`` from transformers 5.24 on (where
    ``past_key_values`` still works but warns that it is deprecated), else
    ``past_key_values``. Found from generate()'s output, whose field was renamed with it."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return "cache" if "cache" in getattr(GenerateDecoderOnlyOutput, "__dataclass_fields__", {}) else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for generate(), under the name this transformers takes."""
    return {generate_cache_kwarg(): cache}


def given_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a generate() call was given, under either name."""
    given = kwargs.get("cache")
    return given if given is not None else kwargs.get("past_key_values")


def output_cache(output: Any) -> Any:
    """The cache generate()'s output hands back (``cache``, or ``past_key_values`` before 5.24)."""
    return getattr(output, "cache" if generate_cache_kwarg() == "cache" else "past_key_values", None)
