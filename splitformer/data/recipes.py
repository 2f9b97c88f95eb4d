"""What each corpus provides: its splits and a BPE size that suits its amount of text.

`./prepare.sh` and the training/decoding executables both read this table, so that split names are
spelled in exactly one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    recipe: str  # directory under egs/ that prepares it
    train_splits: List[str]
    dev_split: str
    test_splits: List[str]
    default_vocab_size: int
    # every split that stage 1 writes (train + dev + tests, without repeats)
    splits: List[str] = field(default_factory=list)

    def all_splits(self) -> List[str]:
        seen: List[str] = []
        for s in [*self.train_splits, self.dev_split, *self.test_splits, *self.splits]:
            if s not in seen:
                seen.append(s)
        return seen


DATASETS: Dict[str, DatasetInfo] = {
    # AN4 has 948 training utterances: local/an4.py holds 8 whole speakers out as dev (--dev-rule).
    # Its ~100-word vocabulary is mostly spelled letters and digit words: 30 pieces (as ESPnet's
    # an4 recipe) is the 26 letters, the word boundary and the 3 specials, i.e. about characters.
    "an4": DatasetInfo(
        name="an4",
        recipe="an4",
        train_splits=["train"],
        dev_split="dev",
        test_splits=["dev", "test"],
        default_vocab_size=30,
    ),
    "librispeech": DatasetInfo(
        name="librispeech",
        recipe="librispeech",
        train_splits=["train-clean-100", "train-clean-360", "train-other-500"],
        dev_split="dev-clean",
        test_splits=["test-clean", "test-other"],
        default_vocab_size=500,
        splits=["dev-other"],
    ),
    "mini_librispeech": DatasetInfo(
        name="mini_librispeech",
        recipe="librispeech",
        train_splits=["train-clean-5"],
        dev_split="dev-clean-2",
        test_splits=["dev-clean-2"],
        default_vocab_size=256,
    ),
    "tedlium3": DatasetInfo(
        name="tedlium3",
        recipe="tedlium3",
        train_splits=["train"],
        dev_split="dev",
        test_splits=["dev", "test"],
        default_vocab_size=500,
    ),
}


def get_dataset(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}") from None
