#!/usr/bin/env python3
"""Stage 4: sentencepiece BPE on the training transcripts -> `<lang-dir>/bpe.model`, `tokens.txt`.

Ids 0, 1, 2 are `<blk>`, `<sos/eos>`, `<unk>` (icefall's layout: the transducer's blank is 0).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path
from typing import List

import sentencepiece as spm
from lhotse import CutSet

from prep_utils import die_empty, existing_cuts, setup_logging

log = logging.getLogger("prepare")
SPECIALS = ["<blk>", "<sos/eos>"]  # user-defined symbols take ids 0 and 1; <unk> comes right after


def train_bpe(texts: List[str], lang_dir: Path, vocab_size: int) -> None:
    lang_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "transcript.txt"
        text_file.write_text("\n".join(texts) + "\n")
        try:
            spm.SentencePieceTrainer.train(
                input=str(text_file),
                model_prefix=str(Path(tmp) / "bpe"),
                vocab_size=vocab_size,
                model_type="bpe",
                character_coverage=1.0,
                user_defined_symbols=SPECIALS,
                unk_id=len(SPECIALS),
                bos_id=-1,
                eos_id=-1,
                input_sentence_size=100_000_000,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise SystemExit(
                f"sentencepiece could not train a {vocab_size}-piece BPE on {len(texts)} transcripts: {e}\n"
                "Choose another --vocab-size (it must cover every character plus 3 specials)."
            )
        shutil.copyfile(Path(tmp) / "bpe.model", lang_dir / "bpe.model")
    sp = spm.SentencePieceProcessor(model_file=str(lang_dir / "bpe.model"))
    assert [sp.id_to_piece(i) for i in range(3)] == ["<blk>", "<sos/eos>", "<unk>"], "special ids moved"
    (lang_dir / "tokens.txt").write_text("".join(f"{sp.id_to_piece(i)} {i}\n" for i in range(sp.get_piece_size())))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dataset", required=True)
    p.add_argument("--train-splits", nargs="+", required=True)
    p.add_argument("--manifest-dir", type=Path, required=True)
    p.add_argument("--lang-dir", type=Path, required=True)
    p.add_argument("--vocab-size", type=int, required=True)
    args = p.parse_args()
    setup_logging()
    texts: List[str] = []
    for split in args.train_splits:
        path = existing_cuts(args.manifest_dir, args.dataset, split, "stage 1")
        texts += [s.text for c in CutSet.from_file(path) for s in c.supervisions if s.text]
    if not texts:
        die_empty(f"no training transcripts for {args.dataset} in {args.manifest_dir}")
    train_bpe(texts, args.lang_dir, args.vocab_size)
    log.info("BPE with %d pieces on %d transcripts -> %s", args.vocab_size, len(texts), args.lang_dir)


if __name__ == "__main__":
    main()
