"""Tiny random transformers backbones saved as model directories, as a user's checkpoint would be.

Usage: ``tiny_backbone_dir(root, "wav2vec2")`` writes ``root/wav2vec2/{config.json, model.safetensors}`` once and
returns the directory. The sizes are small, but the convolutions are the real ones (x320: 50 frames a second).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

TINY: Dict[str, dict] = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                             conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                             mask_time_prob=0.0, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                             feat_proj_dropout=0.0)
VARIANTS: Dict[str, tuple] = {
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model", {}),
    # pre-LN ("stable layer norm") with layer-normed convolutions, as the large checkpoints are
    "wav2vec2-stable": ("Wav2Vec2Config", "Wav2Vec2Model", dict(do_stable_layer_norm=True, feat_extract_norm="layer")),
    "hubert": ("HubertConfig", "HubertModel", {}),
    "wavlm": ("WavLMConfig", "WavLMModel", dict(num_buckets=32, max_bucket_distance=100)),
}


def tiny_backbone(variant: str, seed: int = 0):
    """A tiny random backbone of ``variant`` (a key of VARIANTS), in eval mode."""
    import transformers

    config_cls, model_cls, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**TINY, **extra)
    return getattr(transformers, model_cls)(config).eval()


def tiny_backbone_dir(root: Path, variant: str) -> Path:
    out = Path(root) / variant
    if not (out / "config.json").is_file():
        tiny_backbone(variant).save_pretrained(str(out))
    return out
