"""Tiny random models built from configs, for the demo and the tests (no model hub needed)."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from vlmtune.models.chat_template import DEFAULT_CHAT_TEMPLATE

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained on `corpus`, with the default chat template.

    Words are split on any white space and marked as word starts, so "red" opens the same token after
    a space or after a newline; decoding joins words with single spaces.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=list(string.printable.strip()) + ["\u2581"]
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def save_vision_encoder(out: Path, image_size: int = 32, patch_size: int = 8, hidden: int = 64, layers: int = 2,
                        heads: int = 4, seed: int = 0) -> Path:
    """A random ViT-style CLIP vision encoder folder with its image processor."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch_size)
    CLIPVisionModel(config).save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}).save_pretrained(out)
    return Path(out)


def save_language_model(out: Path, tokenizer: PreTrainedTokenizerFast, hidden: int = 64, layers: int = 2,
                        heads: int = 4, seed: int = 0) -> Path:
    """A random Llama-style causal LM folder with its tokenizer."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=len(tokenizer),
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)
