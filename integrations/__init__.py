"""Hugging Face integrations on vmmalloc's memory (KV caches, patched generate()).

Populated by the virtual-tensor and offloading work; importing it needs no transformers.
"""
__all__: list[str] = []
