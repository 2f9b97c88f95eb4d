"""BPE tokenizer over the sentencepiece model that `./prepare.sh` stage 4 writes (`data/lang_bpe_<N>/bpe.model`)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Sequence, Union

import sentencepiece as spm


class Tokenizer:
    """Text <-> token ids with icefall's special ids: `<blk>`=0 (transducer/CTC blank), `<sos/eos>`=1, `<unk>`=2."""

    def __init__(self, bpe_model: Union[str, Path]):
        path = Path(bpe_model)
        if path.is_dir():  # accept data/lang_bpe_<N> as well as the model file
            path = path / "bpe.model"
        if not path.is_file():
            raise FileNotFoundError(f"BPE model {path} not found: run ./prepare.sh (stage 4) first")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.blank_id = self.sp.piece_to_id("<blk>")
        self.sos_id = self.eos_id = self.sp.piece_to_id("<sos/eos>")
        self.unk_id = self.sp.unk_id()
        if (self.blank_id, self.sos_id, self.unk_id) != (0, 1, 2):
            raise ValueError(
                f"{path}: expected <blk>=0, <sos/eos>=1, <unk>=2 but got "
                f"{self.blank_id}, {self.sos_id}, {self.unk_id}; retrain it with local/train_bpe.py"
            )

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: Union[str, Iterable[str]]) -> List[List[int]]:
        """A list of texts -> one id list each (a single string is treated as a list of one)."""
        if isinstance(texts, str):
            texts = [texts]
        return self.sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        """One id sequence -> text. Blank and <sos/eos> are dropped (they are never part of the text)."""
        keep = [int(i) for i in ids if int(i) not in (self.blank_id, self.sos_id)]
        return self.sp.decode(keep)

    def decode_batch(self, batch: Iterable[Sequence[int]]) -> List[str]:
        return [self.decode(ids) for ids in batch]

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def __len__(self) -> int:
        return self.vocab_size
