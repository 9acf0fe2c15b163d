"""Tiny models built in-process: a word-level tokenizer and a small Llama.

No hub, no network: tests, the demo, the benchmarks and the lab build their models here and save them as
ordinary Hugging Face checkpoint folders, which every command then loads like any other model.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}

# A plain template for tokenizers that ship none (see alignkit.data.tokenize.DEFAULT_CHAT_TEMPLATE).
_TEMPLATE_WORDS = ["system", "user", "assistant", "tool", ":"]


def build_word_tokenizer(words: list[str]):
    """A whitespace/punctuation word-level tokenizer over `words`, with <pad> <s> </s> <unk>.

    Encoding adds <s> at the start (like Llama's tokenizer); decoding joins words with spaces.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS[k] for k in ("pad", "bos", "eos", "unk")]
    vocab: dict[str, int] = {}
    for w in specials + _TEMPLATE_WORDS + list(words):
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    bos = SPECIAL_TOKENS["bos"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIAL_TOKENS["pad"],
        bos_token=bos,
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
    )


def build_tiny_llama(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                     intermediate_size: int | None = None, max_position_embeddings: int = 512, seed: int = 0,
                     **config_kwargs):
    """A randomly initialised `LlamaForCausalLM` sized for CPU tests (deterministic given `seed`).

    `config_kwargs` go to `LlamaConfig` (e.g. `attention_dropout=0.1`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        **config_kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


# Tiny configurations of the decoder architectures users bring, for the architecture matrix in the tests:
# each differs where packing, masks or dropout can go wrong (a short sliding window, layer types, ALiBi,
# learned positions, dropout on by default, logit soft-capping).
ARCHITECTURES = ("llama", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox", "opt", "falcon", "bloom")


def tiny_config(arch: str, tokenizer, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
                sliding_window: int = 6, **overrides):
    """A `transformers` config of `arch` (one of ARCHITECTURES), sized for CPU tests. Sliding-window models get
    a window of `sliding_window` tokens, shorter than the test sequences; GPT-2 keeps its default dropout 0.1."""
    import transformers as tf

    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    common = {**ids, "hidden_size": hidden_size, "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
              "intermediate_size": 2 * hidden_size, "max_position_embeddings": 256}
    head_dim = hidden_size // num_heads
    builders = {
        "llama": lambda: tf.LlamaConfig(**common, num_key_value_heads=num_heads // 2),
        "qwen3": lambda: tf.Qwen3Config(**common, num_key_value_heads=num_heads // 2, head_dim=head_dim),
        "mistral": lambda: tf.MistralConfig(**common, num_key_value_heads=num_heads // 2,
                                            sliding_window=sliding_window),
        "gemma2": lambda: tf.Gemma2Config(**common, num_key_value_heads=num_heads // 2, head_dim=head_dim,
                                          sliding_window=sliding_window),
        "gemma3": lambda: tf.Gemma3TextConfig(**common, num_key_value_heads=num_heads // 2, head_dim=head_dim,
                                              sliding_window=sliding_window, sliding_window_pattern=2),
        "phi3": lambda: tf.Phi3Config(**common, num_key_value_heads=num_heads // 2, sliding_window=sliding_window),
        "gpt2": lambda: tf.GPT2Config(**ids, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                                      n_positions=256),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**common),
        "opt": lambda: tf.OPTConfig(**ids, hidden_size=hidden_size, num_hidden_layers=num_layers,
                                    num_attention_heads=num_heads, ffn_dim=2 * hidden_size,
                                    max_position_embeddings=256, word_embed_proj_dim=hidden_size),
        "falcon": lambda: tf.FalconConfig(**ids, hidden_size=hidden_size, num_hidden_layers=num_layers,
                                          num_attention_heads=num_heads),
        "bloom": lambda: tf.BloomConfig(**ids, hidden_size=hidden_size, n_layer=num_layers, n_head=num_heads),
    }
    if arch not in builders:
        raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHITECTURES)}")
    config = builders[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def save_tiny_model(path: str | Path, words: list[str], seed: int = 0, arch: str = "llama", **model_kwargs) -> Path:
    """Build a word tokenizer + a tiny model and save both to `path` (a normal HF checkpoint folder).
    `arch` "llama" uses `build_tiny_llama(**model_kwargs)`; any other of ARCHITECTURES, `tiny_config`."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tokenizer = build_word_tokenizer(words)
    if arch == "llama":
        model = build_tiny_llama(tokenizer, seed=seed, **model_kwargs)
    else:
        config = tiny_config(arch, tokenizer, **model_kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
