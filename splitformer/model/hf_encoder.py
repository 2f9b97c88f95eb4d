"""Pretrained self-supervised backbones (Wav2Vec2, HuBERT, WavLM, ... from ``transformers``) with early exits.

Wright et al. compare early-exit training from scratch with fine-tuning such a backbone, an exit every few
transformer layers. Here the backbone is the encoder of an ``AsrModel``: each exit gets its own CTC head and
joiner projection, and the decoder and joiner are shared, exactly as for our own early-exit stacks.

How the backbone is run:
- its own ``forward`` runs the convolutional feature encoder, the feature projection, its time masking
  (training only, as the config says) and the encoder's prelude (positional convolution, norm, attention
  mask); a forward pre-hook on transformer layer 0 takes the hidden states and the layer arguments the model
  prepared, and stops it there.
- the transformer layers are then called one at a time by us, so ``encode(exit_layer=k)`` runs layers
  1..k only and ``iter_exits`` computes the next block only when asked. WavLM's relative position bias is
  passed from layer to layer as its own encoder does.
- pre-LN ("stable layer norm") models apply the encoder's final LayerNorm at every exit, as at the top.
- LayerDrop is not applied: an exit after a dropped layer would have no output of its own.

``transformers`` is imported only when such a model is built: the rest of the project does not need it.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from splitformer.model.early_exit import make_pad_mask

# the backbone families of the presets (architecture from transformers' default config of each: the "base" sizes)
FAMILIES = ("wav2vec2", "hubert", "wavlm")
# eager attention: explicit matmuls, so torch's FLOP counter sees the attention products (it cannot see inside
# scaled_dot_product_attention on CPU) and the ONNX export is plain; the numbers are the same as SDPA's
ATTENTION = "eager"


class HfBackboneError(ValueError):
    """A backbone that cannot be loaded or used, with what to do about it."""


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - requirements.txt installs it
        raise HfBackboneError("--encoder hf needs the transformers package: pip install transformers") from e
    return transformers


def config_from_json(text: str):
    """A transformers config from the JSON a checkpoint stores (``config.to_dict()``)."""
    tf = _transformers()
    d = json.loads(text)
    model_type = d.get("model_type")
    if model_type not in tf.CONFIG_MAPPING:
        raise HfBackboneError(f"stored backbone config has model_type {model_type!r}, unknown to transformers "
                              f"{tf.__version__}")
    return tf.CONFIG_MAPPING[model_type].from_dict(d)


def load_backbone(source: str, weights: str = "pretrained", config_json: str = "") -> nn.Module:
    """The backbone model (``AutoModel``, no task head).

    - ``config_json`` (what a checkpoint of ours stores): that architecture, randomly initialised; the
      checkpoint's state dict then supplies every weight, so the original directory is not needed.
    - ``weights="pretrained"``: ``from_pretrained(source)``, a local directory (config.json + weights) or a hub
      name (only where the machine is online).
    - ``weights="random"``: the architecture only: from ``source``'s config.json when it is a directory,
      else from transformers' default config of the family ``source`` names (wav2vec2, hubert, wavlm).
    """
    tf = _transformers()
    if config_json:
        model = tf.AutoModel.from_config(config_from_json(config_json), attn_implementation=ATTENTION)
    elif weights == "random":
        path = Path(source)
        if path.is_dir():
            config = tf.AutoConfig.from_pretrained(str(path))
        else:
            family = _family_of(source)
            if family is None:
                raise HfBackboneError(f"--hf-weights random: {source!r} is neither a local model directory nor a "
                                      f"family name ({', '.join(FAMILIES)}), and names like it need the hub")
            config = tf.AutoConfig.for_model(family)
        model = tf.AutoModel.from_config(config, attn_implementation=ATTENTION)
    elif weights == "pretrained":
        try:
            model, info = tf.AutoModel.from_pretrained(source, attn_implementation=ATTENTION, output_loading_info=True)
        except (OSError, ValueError) as e:
            where = "the directory has no readable config.json and weights" if Path(source).is_dir() else (
                "it is not a local directory, and the hub is unreachable or has no such model")
            raise HfBackboneError(
                f"cannot load the backbone {source!r}: {where} ({type(e).__name__}: {str(e).splitlines()[0]}). "
                f"Download it where there is internet (huggingface-cli download {source} --local-dir DIR) and pass "
                f"--hf-model DIR, or use --hf-weights random to train the architecture from scratch"
            ) from None
        # a task head's weights (lm_head of a *ForCTC checkpoint) are unexpected and fine; missing backbone weights
        # would silently train from random ones
        missing = [k for k in info.get("missing_keys", []) if not k.endswith("masked_spec_embed")]
        if missing:
            raise HfBackboneError(f"{source}: {len(missing)} backbone weights are missing from the checkpoint "
                                  f"({', '.join(sorted(missing)[:4])}{', ...' if len(missing) > 4 else ''}); it would "
                                  "start from random ones. Use --hf-weights random if that is what you want")
    else:
        raise HfBackboneError(f"--hf-weights must be pretrained or random, not {weights!r}")
    check_backbone(model)
    return model


def _family_of(name: str) -> Optional[str]:
    """'wavlm', 'facebook/wav2vec2-base', 'microsoft/wavlm-base-plus' -> the family, or None."""
    low = name.lower().replace("-", "").replace("_", "")
    for fam in FAMILIES:
        if fam in low:
            return fam
    return None


# transformers model types whose layers run one after the other at the feature encoder's frame rate (SEW, for one,
# pools frames inside its encoder, so its output lengths would be wrong here)
SUPPORTED_TYPES = ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "unispeech", "unispeech-sat")


def check_backbone(model: nn.Module) -> None:
    """Refuse models without the Wav2Vec2-family layout this encoder drives."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        raise HfBackboneError(f"--encoder hf supports the model types {', '.join(SUPPORTED_TYPES)}; this backbone is "
                              f"{model_type!r}")
    enc = getattr(model, "encoder", None)
    ok = (hasattr(model, "feature_extractor") and enc is not None and isinstance(getattr(enc, "layers", None), nn.ModuleList)
          and hasattr(model, "_get_feat_extract_output_lengths"))
    if not ok:
        raise HfBackboneError(f"{type(model).__name__} is not a Wav2Vec2-family model (a convolutional feature "
                              "encoder, then encoder.layers); --encoder hf supports Wav2Vec2, HuBERT, WavLM and their kin")
    if getattr(model.config, "add_adapter", False):
        raise HfBackboneError("backbones with an adapter (config.add_adapter) are not supported: its output rate "
                              "differs from the layers' the exits read")


def conv_output_length(config: Any, num_samples: int) -> int:
    """Frames the convolutional feature encoder makes of ``num_samples`` samples (no padding, as HF's)."""
    n = int(num_samples)
    for k, s in zip(config.conv_kernel, config.conv_stride):
        n = (n - k) // s + 1 if n >= k else 0
    return n


class WaveformInput(nn.Module):
    """The front end of a waveform model: per-utterance zero-mean, unit-variance normalisation of the valid
    samples (what transformers' feature extractor does with ``do_normalize``), padding left at 0.

    It lives in the model, so decode.py, pretrained.py and an export apply it without being told."""

    input_kind = "waveform"

    def __init__(self, normalize: bool = True) -> None:
        super().__init__()
        self.do_normalize = bool(normalize)

    def forward(self, x: Tensor, x_lens: Tensor) -> Tuple[Tensor, Tensor]:
        if x.dim() != 2:
            raise ValueError(f"a waveform model takes (batch, samples) audio; got shape {tuple(x.shape)} "
                             "(fbank features? this model reads raw 16 kHz audio)")
        if not self.do_normalize:
            return x, x_lens
        mask = (~make_pad_mask(x_lens, x.size(1))).to(x.dtype)
        n = x_lens.clamp(min=1).to(x.dtype).unsqueeze(1)
        mean = (x * mask).sum(1, keepdim=True) / n
        var = (((x - mean) * mask) ** 2).sum(1, keepdim=True) / n
        return (x - mean) / torch.sqrt(var + 1e-7) * mask, x_lens


class _Stop(Exception):
    """Raised by the pre-hook on layer 0 once the backbone has prepared the layers' input."""


class HfExitEncoder(nn.Module):
    """A transformers backbone as an early-exit encoder: ``forward(wave, lens, max_exit)`` returns
    ``[(out, lens)]`` for every exit up to ``max_exit``, like ``EarlyExitEncoder``.

    ``backbone_frozen`` (set by the trainer for ``--freeze-backbone-steps``) runs the whole backbone without
    gradients, so only the heads, decoder and joiner learn; the convolutional feature encoder is frozen for
    good with ``freeze_feature_encoder``.
    """

    def __init__(self, backbone: nn.Module, exit_layers: Sequence[int], freeze_feature_encoder: bool = True) -> None:
        super().__init__()
        check_backbone(backbone)
        self.backbone = backbone
        n = len(backbone.encoder.layers)
        exits = sorted(set(int(e) for e in exit_layers))
        if not exits or exits[0] < 1 or exits[-1] > n:
            raise HfBackboneError(f"--exit-layers {','.join(map(str, exit_layers))}: this backbone has layers 1..{n}")
        self.exits = exits
        self.output_dims = [int(backbone.config.hidden_size)] * len(exits)
        self.final_norm = bool(getattr(backbone.config, "do_stable_layer_norm", False))
        self.freeze_feature_encoder = bool(freeze_feature_encoder)
        if self.freeze_feature_encoder:
            if hasattr(backbone, "freeze_feature_encoder"):
                backbone.freeze_feature_encoder()
            else:  # pragma: no cover - every family in transformers has it
                for p in backbone.feature_extractor.parameters():
                    p.requires_grad_(False)
        self.backbone_frozen = False
        # LayerDrop would skip layer 0 (and with it the hook that hands the layers to us) or an exit's own layer
        backbone.config.layerdrop = 0.0
        # "group" feature encoders (the base checkpoints) normalise their first conv's output over the whole padded
        # length: made padding-free here, so an utterance gives the same output alone or in any batch
        self._sample_lens: Optional[Tensor] = None
        if getattr(backbone.config, "feat_extract_norm", "") == "group":
            norm = backbone.feature_extractor.conv_layers[0].layer_norm
            if not isinstance(norm, nn.GroupNorm):  # pragma: no cover - transformers' layout
                raise HfBackboneError(f"expected a GroupNorm after the first convolution, found {type(norm).__name__}")
            norm.register_forward_hook(self._masked_group_norm)

    def output_lengths(self, num_samples: Tensor) -> Tensor:
        return self.backbone._get_feat_extract_output_lengths(num_samples).to(torch.int64).clamp(min=0)

    def _masked_group_norm(self, module: nn.GroupNorm, inputs: Tuple[Tensor, ...], output: Tensor) -> Tensor:
        """The first conv's GroupNorm over each utterance's own frames (padding left out of the statistics)."""
        lens = self._sample_lens
        if lens is None:
            return output
        x = inputs[0]  # (B, C, T)
        b, c, t = x.shape
        cfg = self.backbone.config
        frames = ((lens - cfg.conv_kernel[0]) // cfg.conv_stride[0] + 1).clamp(min=1)
        mask = (~make_pad_mask(frames, t)).to(x.dtype)
        g = module.num_groups
        xg = x.reshape(b, g, c // g, t)
        m = mask.reshape(b, 1, 1, t)
        count = frames.to(x.dtype).reshape(b, 1, 1, 1) * (c // g)
        mean = (xg * m).sum((2, 3), keepdim=True) / count
        var = (((xg - mean) * m) ** 2).sum((2, 3), keepdim=True) / count
        y = ((xg - mean) / torch.sqrt(var + module.eps)).reshape(b, c, t)
        if module.affine:
            y = y * module.weight.reshape(1, c, 1) + module.bias.reshape(1, c, 1)
        return y

    def _prelude(self, x: Tensor, x_lens: Tensor) -> Tuple[Tensor, Tensor, Dict[str, Any]]:
        """Layer 0's input and arguments as the backbone's own forward prepares them."""
        mask = (~make_pad_mask(x_lens, x.size(1))).long()
        got: Dict[str, Any] = {}

        def hook(module, args, kwargs):
            got["h"] = args[0] if args else kwargs.pop("hidden_states")
            got["kw"] = dict(kwargs)
            raise _Stop

        handle = self.backbone.encoder.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        self._sample_lens = x_lens
        try:
            self.backbone(x, attention_mask=mask)
        except _Stop:
            pass
        finally:
            handle.remove()
            self._sample_lens = None
        if "h" not in got:  # pragma: no cover - a transformers change that skips layer 0
            raise HfBackboneError(f"{type(self.backbone).__name__}.forward never reached encoder.layers[0]")
        return got["h"], self.output_lengths(x_lens), got["kw"]

    def _layers(self, h: Tensor, kw: Dict[str, Any], start: int, stop: int) -> Tensor:
        """Layers ``start..stop-1`` (0-based), carrying WavLM's position bias in ``kw``."""
        layers = self.backbone.encoder.layers
        for i in range(start, stop):
            args = dict(kw)
            if "index" in args:
                args["index"] = i
            out = layers[i](h, **args)
            if isinstance(out, tuple):
                h = out[0]
                if "position_bias" in kw and len(out) > 1:
                    kw["position_bias"] = out[1]
            else:
                h = out
        return h

    def iter_exits(self, x: Tensor, x_lens: Tensor, max_exit: Optional[int] = None) -> Iterator[Tuple[Tensor, Tensor]]:
        """Yield ``(out, lens)`` exit by exit; the layers above an exit run only when the next is asked for."""
        h, lens, kw = self._prelude(x, x_lens)
        done = 0
        for e in self.exits:
            if max_exit is not None and e > max_exit:
                return
            h = self._layers(h, kw, done, e)
            done = e
            yield (self.backbone.encoder.layer_norm(h) if self.final_norm else h), lens

    def forward(self, x: Tensor, x_lens: Tensor, max_exit: Optional[int] = None) -> List[Tuple[Tensor, Tensor]]:
        frozen = self.training and self.backbone_frozen
        with torch.no_grad() if frozen else contextlib.nullcontext():
            return list(self.iter_exits(x, x_lens, max_exit))


def backbone_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """Named parameters inside an ``HfExitEncoder``'s backbone (for their own learning rate)."""
    return [(n, p) for n, p in model.named_parameters() if ".backbone." in f".{n}"]
