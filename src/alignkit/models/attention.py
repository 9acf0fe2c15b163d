"""A packed row's attention mask, in the model's own attention pattern.

A packed row (`alignkit.data.collate.PackedBatch`) holds several sequences; its 4D mask says which earlier
tokens each token may see: its prompt and its own earlier tokens. That is the whole story for full causal
attention, but not for layers that restrict attention further: a sliding window (Mistral, Phi-3, Gemma 2/3,
Qwen2 with `use_sliding_window`: a token sees the last `sliding_window` positions, itself included) or chunks
(Llama 4: a token sees the tokens of its own `attention_chunk_size` chunk). transformers uses a 4D mask as
given, for every layer, so the packed mask must carry those restrictions itself. Both are functions of the
tokens' positions in their own sequence, which the packed row's `position_ids` hold.

A model whose layers are of several types (Gemma 2/3, Qwen2) takes a dict {layer type: mask}; one with a
window on every layer (Mistral, Phi-3) takes the windowed mask. Anything this module does not know (another
layer type, an attention that is not a mask at all, like ALiBi or a state-space layer) is caught by the check
in `alignkit.models.logps`, which compares the packed forward with a padded one and falls back.
"""

from __future__ import annotations

import torch


def layer_restrictions(config) -> dict[str, tuple[str, int] | None]:
    """Each layer type of the model → the restriction on top of causal attention: None (none),
    ("sliding", W) or ("chunked", C). The key "" stands for "every layer" in models without `layer_types`."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    window = getattr(config, "sliding_window", None)
    chunk = getattr(config, "attention_chunk_size", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        kinds: dict[str, tuple[str, int] | None] = {}
        for kind in dict.fromkeys(layer_types):
            if kind == "sliding_attention" and window:
                kinds[kind] = ("sliding", int(window))
            elif kind == "chunked_attention" and chunk:
                kinds[kind] = ("chunked", int(chunk))
            else:
                kinds[kind] = None
        return kinds
    if window and getattr(config, "use_sliding_window", True):
        return {"": ("sliding", int(window))}
    return {"": None}


def smallest_window(config) -> int | None:
    """The narrowest sliding window or chunk of any layer (None: every layer attends to the whole sequence).
    Sequences no longer than it see the same tokens with or without the restriction."""
    sizes = [r[1] for r in layer_restrictions(config).values() if r is not None]
    return min(sizes) if sizes else None


def restrict(mask: torch.Tensor, position_ids: torch.Tensor, restriction: tuple[str, int] | None) -> torch.Tensor:
    """`mask` (R, 1, T, T) bool narrowed by a restriction, with each token's position in its own sequence read
    from `position_ids` (R, T). A query always keeps itself, so no row of the mask becomes empty."""
    if restriction is None:
        return mask
    kind, size = restriction
    query, key = position_ids[:, None, :, None], position_ids[:, None, None, :]      # (R, 1, T, 1), (R, 1, 1, T)
    if kind == "sliding":  # transformers' sliding_window_overlay: key > query − W
        return mask & (query - key < size)
    return mask & (query // size == key // size)                                       # chunked


def packed_attention_mask(config, mask: torch.Tensor, position_ids: torch.Tensor):
    """What to pass as `attention_mask` for a packed row: the 4D mask, the windowed 4D mask, or a dict
    {layer type: 4D mask} for a model with several layer types. Eager attention adds its mask to the scores,
    so it gets 0 / −max instead of True / False (as transformers builds it); SDPA takes the bool mask."""
    additive = getattr(config, "_attn_implementation", None) == "eager"

    def form(m: torch.Tensor) -> torch.Tensor:
        if not additive:
            return m
        return torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill(~m, torch.finfo(torch.float32).min)

    kinds = layer_restrictions(config)
    if all(r is None for r in kinds.values()):
        return form(mask)
    if "" in kinds:
        return form(restrict(mask, position_ids, kinds[""]))
    return {kind: form(restrict(mask, position_ids, r)) for kind, r in kinds.items()}
