"""Numbers and labels that more than one stage relies on; each is defined here and nowhere else."""
from __future__ import annotations

# PixArt-α reads at most this many T5 tokens (pipeline max_sequence_length); captions are counted against it.
MAX_TOKENS = 120
# Reviewer names are stored with every caption event, vote and job; longer names are refused, not cut.
MAX_REVIEWER_CHARS = 64
# Shown on every image, grid and banner that comes from a backbone with seeded random weights.
RANDOM_LABEL = "random-weight demo backbone"
# The PixArt-α checkpoint the paper fine-tunes (and whose T5 tokenizer counts the 120 tokens).
PAPER_BACKBONE = "PixArt-alpha/PixArt-XL-2-512x512"
# Shown wherever the embedded demo backbone (assets/demo_backbone, trained by medart_core.demo_backbone) is used.
DEMO_LABEL = "demo backbone trained on 213 sample images — not a medical model"
