"""Reading decode.py's recogs files back, independently of splitformer.decoding.results (for checks)."""
import ast
from pathlib import Path
from typing import Dict, List, Tuple


def read_recogs(path: Path) -> Tuple[Dict[str, List[str]], Dict[str, List[str]]]:
    """(refs, hyps), each cut id -> words, from the ``<cut id>:\\tref=[...]`` / ``hyp=[...]`` lines."""
    refs: Dict[str, List[str]] = {}
    hyps: Dict[str, List[str]] = {}
    for line in Path(path).read_text().splitlines():
        cut_id, _, field = line.partition(":\t")
        kind, _, words = field.partition("=")
        (refs if kind == "ref" else hyps)[cut_id] = ast.literal_eval(words)
    assert refs and refs.keys() == hyps.keys(), f"{path}: refs and hyps do not pair up"
    return refs, hyps


def wer_from_recogs(path: Path) -> float:
    """WER (%) recomputed from a recogs file alone: refs and hyps paired by cut id, edits by kaldialign."""
    import kaldialign

    refs, hyps = read_recogs(path)
    errors = sum(kaldialign.edit_distance(refs[c], hyps[c])["total"] for c in refs)
    return 100.0 * errors / sum(len(r) for r in refs.values())
