"""Tiny random bases for tests and smoke runs: seconds, no real model, no download.

:func:`tiny_tokenizer` trains a small byte-level BPE on a fixed corpus of SMILES-, protein- and
English-like strings,
so the unit tier runs on a machine where the packaged SmolLM2 was never converted (the corpus is the fixed
list below). The models are
2-layer Llama / GPT-2 with random weights: they exercise code paths, not quality.
"""

from __future__ import annotations

from functools import cache

import torch

from .base import Base, fingerprint, freeze

# A small fixed corpus: enough merges for realistic token counts on SMILES, peptides and UI strings.
_CORPUS = [
    "CC(=O)Oc1ccccc1C(=O)O",
    "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",
    "c1ccccc1 CCO CCN CCCl C1CCCCC1 O=C(O)c1ccccc1 [NH4+] [O-] Br I F S P",
    "GLFDIVKKVVGALGSL KWKLFKKIEKVGQNIRDGIIKAGPAVAVVGQATQIAK ACDEFGHIKLMNPQRSTVWY",
    "Save changes. Enter a valid email address. This field is required. Password reset on this site.",
    "Enregistrer les modifications. Saisissez une adresse e-mail valide. Ce champ est obligatoire.",
    "# # Input: The SMILES of the molecule is . # # Output: The quantitative estimate of druglikeness is",
    "The protein sequence is . The descriptor value is . The peptide class is . The Tanimoto similarity is",
]


@cache
def tiny_tokenizer():
    """A byte-level BPE ``PreTrainedTokenizerFast`` (~600 tokens) with BOS/EOS/pad, built in ~0.1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|endoftext|>", pad_token="<pad>"
    )


def tiny_llama_config(vocab_size: int, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        **{
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "tie_word_embeddings": True,
            **kw,
        },
    )


def tiny_base(kind: str = "llama", tokenizer=None, seed: int = 0) -> Base:
    """A frozen 2-layer random ``llama`` or ``gpt2`` with :func:`tiny_tokenizer` (or ``tokenizer``)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    tok = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    if kind == "llama":
        model = LlamaForCausalLM(tiny_llama_config(len(tok), **ids))
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=512, **ids)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"unknown tiny base {kind!r}; use llama or gpt2")
    freeze(model)
    return Base(name=f"tiny-{kind}", model=model, tokenizer=tok, fingerprint=fingerprint(model))
