"""Data side of Splitformer: corpus table, BPE tokenizer and lhotse loaders."""
from __future__ import annotations

import os
import shutil


def use_soundfile_for_sphere() -> None:
    """Let lhotse read NIST SPHERE (.sph) with soundfile.

    lhotse sends every .sph file to the `sph2pipe` binary and gives up when it is missing; soundfile
    reads uncompressed SPHERE (AN4, TED-LIUM 3) itself. Keep sph2pipe when it is installed, since
    only it handles shorten-compressed SPHERE. Worker processes (feature extraction, spawned data
    loaders) do not share this process's setting, so they are told through LHOTSE_AUDIO_BACKEND.
    """
    if shutil.which("sph2pipe"):
        return
    os.environ.setdefault("LHOTSE_AUDIO_BACKEND", "LibsndfileBackend")
    from lhotse.audio import backend as B

    current = B.get_current_audio_backend()
    if isinstance(current, B.CompositeAudioBackend) and any(
        isinstance(b, B.Sph2pipeSubprocessBackend) for b in current.backends
    ):
        kept = [b for b in current.backends if not isinstance(b, B.Sph2pipeSubprocessBackend)]
        B.set_current_audio_backend(B.CompositeAudioBackend(kept))
