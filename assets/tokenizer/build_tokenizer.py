"""Recipe for ``assets/tokenizer/tokenizer.json``: the tiny backbone's T5-style Unigram tokenizer.

Trained with the ``tokenizers`` library on ``corpus.txt`` (caption templates and visual vocabulary of the
sample dataset and the paper's feature lists). Special tokens follow T5: ``<pad>``=0, ``</s>``=1, ``<unk>``=2,
and the post-processor appends ``</s>`` like T5's tokenizer, so token counts behave like PixArt's.

Run from the repository root: ``python assets/tokenizer/build_tokenizer.py`` (deterministic; rewrites the file).
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

HERE = Path(__file__).resolve().parent
VOCAB_SIZE = 2000


def build(out: Path = HERE / "tokenizer.json") -> Path:
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("\n", " ")])
    # Metaspace like sentencepiece, so that decode(encode(text)) restores spaces.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        shrinking_factor=0.75,
        n_sub_iterations=2,
    )
    lines = [ln.strip() for ln in (HERE / "corpus.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    tok.train_from_iterator(lines, trainer=trainer)
    # The trainer sums scores in parallel, so the last float digits (and the order of tied pieces) vary from
    # run to run. Round the scores and sort ties by piece so the recipe gives the same file every time.
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    special, pieces = vocab[:3], vocab[3:]
    pieces = sorted(((p, round(s, 4)) for p, s in pieces), key=lambda ps: (-ps[1], ps[0]))
    tok.model = models.Unigram([tuple(v) for v in special] + pieces, unk_id=2, byte_fallback=False)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    out.write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    print(build())
