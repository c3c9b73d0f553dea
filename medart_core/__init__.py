"""Med-Art core library: captions, HLDF fine-tuning of PixArt-alpha, generation and evaluation (no UI).

The stages, in the order data flows: data -> captions -> examples -> cache -> train -> checkpoint ->
generate -> evaluate; README.md (Architecture) maps each to its module.
"""
