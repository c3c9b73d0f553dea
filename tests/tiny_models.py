"""Tiny real transformers models for the VSG tests (never a Hub download).

* :func:`build_tiny_vlm` writes a LLaVA-style image-text-to-text checkpoint (CLIP vision tower + Llama
  decoder, seeded random weights) with a processor: CLIP image processor, a BPE tokenizer trained here
  with the ``tokenizers`` library (with the ``<image>`` token) and a chat template. It loads with
  ``AutoProcessor`` / ``AutoModelForImageTextToText.from_pretrained(folder)``.
* :func:`build_tiny_seq2seq` writes a T5ForConditionalGeneration with a Unigram tokenizer in T5's
  layout (pad=0, </s>=1, unk=2), loadable with ``AutoTokenizer`` / ``AutoModelForSeq2SeqLM``.

Random weights produce word salad made of corpus pieces, which is exactly what the VSG's constraint
path (retries, cap, flag) needs to be exercised for real.
"""
from __future__ import annotations

from pathlib import Path

CORPUS = [
    "An endoscopic image of polyps with a reddish colour and a round shape.",
    "An endoscopic image of ulcerative colitis showing inflamed surrounding mucosa and bleeding.",
    "A dermoscopic image of melanoma with an irregular border, asymmetry and dark brown structures.",
    "A CT image of the abdomen with a smooth surface texture and no other relevant details.",
    "Describe this image by its visual features: specific colour, shape, surrounding mucosa, surface texture.",
    "The lesion is pale pink, oval, flat, with a granular texture and small vessels on the surface.",
    "user assistant system image describe answer begin exactly words paragraph",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{{ '\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _train_tokenizer(model: str, specials: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if model == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>",
                                          show_progress=False)
    tok.normalizer = normalizers.NFKC()
    # Metaspace keeps spaces through encode/decode, so the gibberish decodes to readable word pieces.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok


def _seeded_init(seed: int):
    import torch

    fork = torch.random.fork_rng(devices=[])
    fork.__enter__()
    torch.manual_seed(seed)
    return fork


def build_tiny_vlm(folder: str | Path, *, seed: int = 0, image_size: int = 32, patch_size: int = 8) -> Path:
    """Save a tiny LLaVA checkpoint + processor to ``folder`` and return it."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = _train_tokenizer("bpe", ["<pad>", "<s>", "</s>", "<unk>", "<image>"], vocab_size=240)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>",
                                        extra_special_tokens={"image_token": "<image>"})
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    n_patches = (image_size // patch_size) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                                       projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_index=image_token_id, image_seq_length=n_patches, vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    fork = _seeded_init(seed)
    try:
        model = LlavaForConditionalGeneration(config).eval()
    finally:
        fork.__exit__(None, None, None)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE, image_token="<image>", num_additional_image_tokens=1,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_seq2seq(folder: str | Path, *, seed: int = 0) -> Path:
    """Save a tiny T5ForConditionalGeneration + T5-layout tokenizer to ``folder`` and return it."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = _train_tokenizer("unigram", ["<pad>", "</s>", "<unk>"], vocab_size=200)
    raw.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", raw.token_to_id("</s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>")
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    fork = _seeded_init(seed)
    try:
        model = T5ForConditionalGeneration(config).eval()
    finally:
        fork.__exit__(None, None, None)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
