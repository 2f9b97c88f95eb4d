"""Model flags, named presets, and the one place that turns flags into a model.

A preset is a dict of flag defaults: ``--preset NAME`` installs them, and any flag given
explicitly on the command line overrides its preset value. Checkpoints store the model
flags as a plain dict (``model_args_dict``), so decode can rebuild the exact architecture.
"""
import argparse
import functools
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

from splitformer.model.asr_model import SAMPLES_PER_FRAME, AsrModel
from splitformer.utils import str2bool


def to_int_tuple(s: Any) -> Tuple[int, ...]:
    """"2,2,3" -> (2, 2, 3); "" -> (); ints and sequences pass through."""
    if isinstance(s, int):
        return (s,)
    if isinstance(s, (list, tuple)):
        return tuple(int(x) for x in s)
    s = str(s).strip()
    return tuple(int(x) for x in s.split(",") if x.strip()) if s else ()


def to_float_tuple(s: Any) -> Tuple[float, ...]:
    if isinstance(s, (list, tuple)):
        return tuple(float(x) for x in s)
    s = str(s).strip()
    return tuple(float(x) for x in s.split(",") if x.strip()) if s else ()


# icefall's Zipformer2 sizes (egs/librispeech/ASR/zipformer, "small" and the default "medium").
_ZIPFORMER_S = dict(
    encoder="zipformer",
    encoder_embed="conv2d",
    num_encoder_layers="2,2,2,2,2,2",
    downsampling_factor="1,2,4,8,4,2",
    feedforward_dim="512,768,768,768,768,768",
    num_heads="4,4,4,8,4,4",
    encoder_dim="192,256,256,256,256,256",
    encoder_unmasked_dim="192,192,192,192,192,192",
    cnn_module_kernel="31,31,15,15,15,31",
    decoder_dim=512,
    joiner_dim=512,
)
_ZIPFORMER_M = dict(
    _ZIPFORMER_S,
    num_encoder_layers="2,2,3,4,3,2",
    feedforward_dim="512,768,1024,1536,1024,768",
    encoder_dim="192,256,384,512,384,256",
    encoder_unmasked_dim="192,192,256,256,256,192",
)
# CPU-sized multi-rate Zipformer for AN4: the single-exit baseline of the main job.
_ZIPFORMER_CPU = dict(
    _ZIPFORMER_S,
    num_encoder_layers="2,2,2,2,2,2",
    feedforward_dim="256,320,320,320,320,256",
    num_heads="4,4,4,4,4,4",
    encoder_dim="96,112,112,112,112,96",
    encoder_unmasked_dim="64,64,64,64,64,64",
    cnn_module_kernel="31,31,15,15,15,31",
    decoder_dim=256,
    joiner_dim=256,
)
# The same Zipformer at the compute of ee-zipformer-cpu's last exit (92M MACs per second of audio each on
# 3 s utterances, AN4's mean, by splitformer/summary.py): the x4 Conv1d front end of the early-exit presets,
# no x2 output averaging (so it too emits 25 frames a second), a milder 1,2,2,4,2,1 rate profile, 128 channels.
_ZIPFORMER_CPU_LITE = dict(
    _ZIPFORMER_CPU,
    encoder_embed="conv1d",
    output_downsampling_factor=1,
    downsampling_factor="1,2,2,4,2,1",
    encoder_dim="128,128,128,128,128,128",
    encoder_unmasked_dim="96,96,96,96,96,96",
    feedforward_dim="320,320,320,320,320,320",
)

# The papers' CTC-only Conformer early-exit baseline, as their code builds it.
_EE_CONFORMER_PAPER = dict(
    encoder="early-exit",
    encoder_embed="conv1d",
    conv1d_activation="none",  # the papers' code has none between its two convs
    layer_type="conformer",
    pos_encoding="abs",
    input_downsample=1,
    num_encoder_layers="12",
    exit_layers="2,4,6,8,10,12",
    encoder_dim="256",
    feedforward_dim="2048",
    num_heads="8",
    cnn_module_kernel="31",
    split_blocks="",
    use_transducer=False,
    use_ctc=True,
)
_SPLIT_PAPER = dict(split_blocks="0,5", split_downsampling_factor=2, split_num_layers=1, split_downsample="drop", split_combine="sum")

# Zipformer-layer early-exit models, transducer + CTC, sized like the paper's (~31.5M / ~36.7M).
_EE_ZIPFORMER = dict(
    encoder="early-exit",
    encoder_embed="conv2d",
    layer_type="zipformer",
    pos_encoding="rel",
    input_downsample=2,
    num_encoder_layers="12",
    exit_layers="2,4,6,8,10,12",
    encoder_dim="256",
    encoder_unmasked_dim="256",
    feedforward_dim="1024",
    num_heads="4",
    cnn_module_kernel="31",
    split_blocks="",
    decoder_dim=512,
    joiner_dim=512,
    use_transducer=True,
    use_ctc=True,
)
# The branch output is summed with the block output, as in the paper (a bypass would halve block 0's main
# path from the first step, and block 0 feeds every exit).
_SPLIT_ZIP = dict(split_blocks="0,5", split_downsampling_factor=2, split_num_layers=1, split_downsample="learned", split_combine="sum")
# The x4 Conv1d front end keeps the earliest exit cheap: Zipformer's Conv2d front end alone
# costs ~150M MACs per second of audio, more than half of a 4M-parameter model.
_EE_ZIPFORMER_CPU = dict(
    _EE_ZIPFORMER,
    encoder_embed="conv1d",
    input_downsample=1,
    encoder_dim="96",
    encoder_unmasked_dim="96",
    feedforward_dim="256",
    num_heads="4",
    cnn_module_kernel="15",
    decoder_dim=256,
    joiner_dim=256,
)
# The control for the Splitformer at equal compute: the early-exit baseline whose blocks 0 and 5, where
# splitformer-cpu has its branches, spend the branches' MACs on wider feed-forwards (384 against 256). Its MACs per
# second of audio equal splitformer-cpu's within 0.2 % at every exit (summary.py on 3 s); it has 4.00M parameters
# against 4.27M.
_EE_ZIPFORMER_CPU_MATCHED = dict(_EE_ZIPFORMER_CPU, feedforward_dim="384,256,256,256,256,384")

# Wright et al.'s other half: a pretrained self-supervised backbone fine-tuned with an exit every 2 layers. The
# architecture is the checkpoint's (config.json); --hf-weights random builds it from transformers' default config of
# the family, which is the "base" size of each (12 layers, 768 wide).
_HF_EXITS = dict(
    encoder="hf",
    feature_norm="none",  # the backbone reads raw audio, normalised per utterance (--hf-normalize)
    exit_layers="2,4,6,8,10,12",
    decoder_dim=512,
    joiner_dim=512,
    use_transducer=True,
    use_ctc=True,
)

# Streaming: the Splitformer of the main job made chunk-causal. Its front end (x4 Conv1d) gives 40 ms frames, so
# these are icefall's 320/640/1280 ms chunks and 1.28-5.12 s left contexts, counted in its frames. Half of the
# chunked batches train with per-chunk exits (docs/an4-experiments.md: chosen on dev over 0).
_CAUSAL_CONV1D = dict(causal=True, chunk_size="8,16,32,-1", left_context_frames="32,64,128,-1", chunk_exit_prob=0.5)

PRESETS: Dict[str, Dict[str, Any]] = {
    "zipformer-s": _ZIPFORMER_S,
    "zipformer-m": _ZIPFORMER_M,
    "zipformer-cpu": _ZIPFORMER_CPU,
    "zipformer-cpu-lite": _ZIPFORMER_CPU_LITE,
    "ee-conformer-paper": _EE_CONFORMER_PAPER,
    "splitformer-paper": dict(_EE_CONFORMER_PAPER, **_SPLIT_PAPER),
    "ee-zipformer": _EE_ZIPFORMER,
    "splitformer": dict(_EE_ZIPFORMER, **_SPLIT_ZIP),
    "ee-zipformer-cpu": _EE_ZIPFORMER_CPU,
    "ee-zipformer-cpu-matched": _EE_ZIPFORMER_CPU_MATCHED,
    "splitformer-cpu": dict(_EE_ZIPFORMER_CPU, **_SPLIT_ZIP),
    "splitformer-cpu-causal": dict(_EE_ZIPFORMER_CPU, **_SPLIT_ZIP, **_CAUSAL_CONV1D),
    "w2v2-base-exits": dict(_HF_EXITS, hf_model="facebook/wav2vec2-base"),
    "hubert-base-exits": dict(_HF_EXITS, hf_model="facebook/hubert-base-ls960"),
    "wavlm-base-plus-exits": dict(_HF_EXITS, hf_model="microsoft/wavlm-base-plus"),
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag that shapes the model or its loss; presets set their defaults."""
    g = parser.add_argument_group("model")
    g.add_argument("--preset", type=str, default=None, choices=sorted(PRESETS), help="named model size; explicit flags override it")
    g.add_argument("--encoder", type=str, default="zipformer", choices=["zipformer", "early-exit", "hf"],
                   help="zipformer: multi-rate Zipformer2 (single exit); early-exit: one-rate stack with exits (and "
                        "Splitformer branches); hf: a pretrained transformers backbone (Wav2Vec2 family) with exits")
    # --encoder hf (splitformer.model.hf_encoder)
    g.add_argument("--hf-model", type=str, default="",
                   help="hf: a local model directory (config.json + weights) or a hub name (online machines only)")
    g.add_argument("--hf-weights", type=str, default="pretrained", choices=["pretrained", "random"],
                   help="hf: random builds the architecture only (from --hf-model's config.json, or the default "
                        "config of the family it names), for tests and for training from scratch")
    g.add_argument("--hf-normalize", type=str, default="auto", choices=["auto", "true", "false"],
                   help="hf: per-utterance mean/variance normalisation of the audio; auto reads do_normalize from "
                        "the model directory's preprocessor_config.json (true where there is none)")
    g.add_argument("--freeze-feature-encoder", type=str2bool, default=True,
                   help="hf: keep the convolutional feature encoder frozen (as in the papers' fine-tuning)")
    g.add_argument("--hf-config", type=str, default="", help=argparse.SUPPRESS)  # set by build_model: the backbone's config as JSON
    g.add_argument("--encoder-embed", type=str, default="conv2d", choices=["conv2d", "conv1d"],
                   help="conv2d: Zipformer's x2 front end (+ConvNeXt); conv1d: the papers' x4 front end")
    g.add_argument("--feature-norm", type=str, default="global", choices=["global", "none"],
                   help="global: normalise the fbank by the training set's per-bin mean and std (stored in the model)")
    g.add_argument("--conv1d-activation", type=str, default="relu", choices=["relu", "swish", "none"],
                   help="activation between the two convs of the conv1d front end")
    # Zipformer2 per-stack settings (comma lists, icefall's names). The early-exit encoder reads the first value,
    # except --feedforward-dim: one width, or one per block (per exit).
    g.add_argument("--num-encoder-layers", type=str, default=_ZIPFORMER_M["num_encoder_layers"],
                   help="layers per stack (zipformer) or total layers (early-exit)")
    g.add_argument("--downsampling-factor", type=str, default=_ZIPFORMER_M["downsampling_factor"])
    g.add_argument("--output-downsampling-factor", type=int, default=2, choices=[1, 2],
                   help="zipformer: 2 averages output frames in pairs (icefall's, for the x2 conv2d front end); "
                        "1 keeps the front end's rate (25 Hz with the x4 conv1d front end)")
    g.add_argument("--feedforward-dim", type=str, default=_ZIPFORMER_M["feedforward_dim"],
                   help="per stack (zipformer); early-exit: one width for every block, or one per block (as many as "
                        "--exit-layers), e.g. a control that spends a Splitformer branch's compute in its block")
    g.add_argument("--num-heads", type=str, default=_ZIPFORMER_M["num_heads"])
    g.add_argument("--encoder-dim", type=str, default=_ZIPFORMER_M["encoder_dim"])
    g.add_argument("--encoder-unmasked-dim", type=str, default=_ZIPFORMER_M["encoder_unmasked_dim"])
    g.add_argument("--cnn-module-kernel", type=str, default=_ZIPFORMER_M["cnn_module_kernel"])
    g.add_argument("--query-head-dim", type=str, default="32")
    g.add_argument("--value-head-dim", type=str, default="12")
    g.add_argument("--pos-head-dim", type=str, default="4")
    g.add_argument("--pos-dim", type=int, default=48)
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--use-balancers", type=str2bool, default=False, help="Zipformer's activation Balancer regulariser")
    g.add_argument("--use-whiten", type=str2bool, default=False, help="Zipformer's Whiten regulariser")
    # Early-exit encoder and Splitformer branches.
    g.add_argument("--layer-type", type=str, default="zipformer", choices=["zipformer", "conformer"])
    g.add_argument("--pos-encoding", type=str, default="rel", choices=["rel", "abs"])
    g.add_argument("--input-downsample", type=int, default=2, choices=[1, 2],
                   help="x2 downsampling before the early-exit stack (conv2d front end: 50 Hz -> 25 Hz)")
    g.add_argument("--exit-layers", type=str, default="2,4,6,8,10,12", help="layers after which an exit sits")
    g.add_argument("--split-blocks", type=str, default="", help="blocks (spans between exits, from 0) with a parallel downsampled branch")
    g.add_argument("--split-downsampling-factor", type=int, default=2)
    g.add_argument("--split-num-layers", type=int, default=1)
    g.add_argument("--split-downsample", type=str, default="learned", choices=["learned", "drop"])
    g.add_argument("--split-combine", type=str, default="sum", choices=["sum", "bypass"])
    # Streaming (icefall's names and units).
    g.add_argument("--causal", type=str2bool, default=False,
                   help="chunk-causal attention and convolutions, so that the model can decode a live stream chunk "
                        "by chunk (zipformer layers)")
    g.add_argument("--chunk-size", type=str, default="16,32,64,-1",
                   help="--causal: chunk sizes drawn per training batch, in frames after the front end: 20 ms each "
                        "with --encoder-embed conv2d (16 = 320 ms), 40 ms with conv1d (16 = 640 ms); -1 = full "
                        "context, so that the model also decodes offline")
    g.add_argument("--left-context-frames", type=str, default="64,128,256,-1",
                   help="--causal: left contexts drawn per training batch, in the same frames (64 = 1.28 s with "
                        "conv2d, 2.56 s with conv1d); -1 = everything before the chunk")
    g.add_argument("--chunk-exit-prob", type=float, default=0.0,
                   help="--causal early-exit models: the share of chunked training batches in which every chunk stops "
                        "at a random exit and the blocks above see it as absent, as streaming with per-chunk exits "
                        "computes it (0: never)")
    # Decoder / joiner.
    g.add_argument("--decoder-dim", type=int, default=512)
    g.add_argument("--joiner-dim", type=int, default=512)
    g.add_argument("--context-size", type=int, default=2)
    # Losses.
    g.add_argument("--use-transducer", type=str2bool, default=True)
    g.add_argument("--use-ctc", type=str2bool, default=True)
    g.add_argument("--prune-range", type=int, default=5)
    g.add_argument("--lm-scale", type=float, default=0.25)
    g.add_argument("--am-scale", type=float, default=0.0)
    g.add_argument("--simple-loss-scale", type=float, default=0.5)
    g.add_argument("--ctc-loss-scale", type=float, default=0.2)
    g.add_argument("--exit-loss-weights", type=str, default="", help="one weight per exit; equal (1.0) if empty")
    g.add_argument("--train-exits", type=str, default="all", choices=["all", "last"],
                   help="last: train only the top exit (the single-exit model of Wright et al.)")


# Flags that define the architecture; a checkpoint must agree on all of them.
ARCH_KEYS: Tuple[str, ...] = (
    "encoder", "encoder_embed", "feature_norm", "conv1d_activation", "num_encoder_layers", "downsampling_factor", "output_downsampling_factor", "feedforward_dim", "num_heads",
    "encoder_dim", "encoder_unmasked_dim", "cnn_module_kernel", "query_head_dim", "value_head_dim", "pos_head_dim",
    "pos_dim", "use_balancers", "use_whiten", "layer_type", "pos_encoding", "input_downsample", "exit_layers",
    "split_blocks", "split_downsampling_factor", "split_num_layers", "split_downsample", "split_combine", "causal",
    "decoder_dim", "joiner_dim", "context_size", "use_transducer", "use_ctc", "vocab_size",
)
MODEL_KEYS: Tuple[str, ...] = ARCH_KEYS + (
    # the backbone's architecture is hf_config itself (resolved when the model is first built); hf_model may move
    "hf_model", "hf_weights", "hf_normalize", "hf_config", "freeze_feature_encoder",
    "preset", "chunk_size", "left_context_frames", "chunk_exit_prob", "dropout", "prune_range", "lm_scale", "am_scale", "simple_loss_scale", "ctc_loss_scale",
    "exit_loss_weights", "train_exits",
)


def parse_with_preset(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` with the chosen preset's values as defaults, so explicit flags win."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.preset is not None:
        if known.preset not in PRESETS:
            parser.error(f"unknown preset {known.preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
        parser.set_defaults(**PRESETS[known.preset])
    return parser.parse_args(argv)


def model_args_dict(args: argparse.Namespace) -> Dict[str, Any]:
    """The model flags as a plain dict (safe for ``torch.load(weights_only=True)``)."""
    return {k: getattr(args, k) for k in MODEL_KEYS if hasattr(args, k)}


def default_model_args(**overrides: Any) -> argparse.Namespace:
    """All model flags at their defaults (with a preset, if given), e.g. for tests and tools."""
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    preset = overrides.pop("preset", None)
    args = parse_with_preset(parser, ["--preset", preset] if preset else [])
    for k, v in overrides.items():
        if not hasattr(args, k):
            raise KeyError(f"unknown model flag {k!r}")
        setattr(args, k, v)
    return args


def exit_loss_weights(args: argparse.Namespace, exits: List[int]) -> Dict[int, float]:
    """Per-exit loss weights: equal by default; only the top exit with --train-exits last."""
    if getattr(args, "train_exits", "all") == "last":
        return {exits[-1]: 1.0}
    w = to_float_tuple(getattr(args, "exit_loss_weights", ""))
    if not w:
        return {e: 1.0 for e in exits}
    if len(w) != len(exits):
        raise ValueError(f"--exit-loss-weights has {len(w)} values but the model has {len(exits)} exits ({exits})")
    return dict(zip(exits, w))


def _first(s: Any) -> int:
    vals = to_int_tuple(s)
    if not vals:
        raise ValueError(f"expected at least one integer, got {s!r}")
    return vals[0]


def encoder_output_frames(args: argparse.Namespace, num_frames: int) -> int:
    """Encoder output length for ``num_frames`` fbank frames, without building the model."""
    if args.encoder == "hf":  # the backbone's convolutions over the samples of those 10 ms frames
        from splitformer.model.hf_encoder import conv_output_length

        return conv_output_length(_hf_conv(args.hf_config), num_frames * SAMPLES_PER_FRAME)
    if args.encoder_embed == "conv1d":
        t = (num_frames - 3) // 4
    else:
        t = (num_frames - 7) // 2
    if args.encoder == "zipformer":
        downsample = int(getattr(args, "output_downsampling_factor", 2))
    else:
        downsample = int(args.input_downsample)
    return (t + downsample - 1) // downsample if t > 0 else t


@functools.lru_cache(maxsize=4)
def _hf_conv(hf_config: str) -> argparse.Namespace:
    """The backbone's convolution shapes, from the config ``build_model`` recorded (parsed once, not per cut)."""
    import json

    if not hf_config:
        raise ValueError("the backbone's config is unknown until the model is built (build_model sets --hf-config)")
    d = json.loads(hf_config)
    return argparse.Namespace(conv_kernel=tuple(d["conv_kernel"]), conv_stride=tuple(d["conv_stride"]))


def _hf_normalize(args: argparse.Namespace) -> bool:
    """--hf-normalize, with auto read from the model directory's preprocessor_config.json."""
    import json
    from pathlib import Path

    if args.hf_normalize in ("true", "false"):
        return args.hf_normalize == "true"
    pre = Path(args.hf_model or ".") / "preprocessor_config.json"
    if args.hf_model and pre.is_file():
        return bool(json.loads(pre.read_text()).get("do_normalize", True))
    return True


def build_hf_encoder(args: argparse.Namespace) -> Tuple[nn.Module, nn.Module]:
    """(front end, encoder) of ``--encoder hf``. Records the backbone's config (``args.hf_config``) and the
    resolved normalisation in ``args``, so that a checkpoint rebuilds the same model without the original files."""
    from splitformer.model.hf_encoder import HfExitEncoder, WaveformInput, load_backbone

    if not args.hf_config and not args.hf_model:
        raise ValueError("--encoder hf needs --hf-model DIR (a transformers model directory) or a preset "
                         "(w2v2-base-exits, hubert-base-exits, wavlm-base-plus-exits)")
    backbone = load_backbone(args.hf_model, args.hf_weights, args.hf_config)
    args.hf_normalize = "true" if _hf_normalize(args) else "false"
    args.hf_config = backbone.config.to_json_string(use_diff=False)
    enc = HfExitEncoder(backbone, to_int_tuple(args.exit_layers), freeze_feature_encoder=args.freeze_feature_encoder)
    return WaveformInput(normalize=args.hf_normalize == "true"), enc


def build_encoder_embed(args: argparse.Namespace, out_dim: int) -> nn.Module:
    from splitformer.model.encoder_embed import Conv1dSubsampling, Conv2dSubsampling

    if args.encoder_embed == "conv1d":
        return Conv1dSubsampling(in_channels=80, out_channels=out_dim, activation=args.conv1d_activation)
    return Conv2dSubsampling(in_channels=80, out_channels=out_dim, dropout=args.dropout)


def build_encoder(args: argparse.Namespace) -> Tuple[nn.Module, int]:
    """(encoder, front-end output dim)."""
    if args.encoder == "zipformer":
        from splitformer.model.zipformer import Zipformer2

        encoder_dim = to_int_tuple(args.encoder_dim)
        enc = Zipformer2(
            output_downsampling_factor=getattr(args, "output_downsampling_factor", 2),
            downsampling_factor=to_int_tuple(args.downsampling_factor),
            num_encoder_layers=to_int_tuple(args.num_encoder_layers),
            encoder_dim=encoder_dim,
            encoder_unmasked_dim=to_int_tuple(args.encoder_unmasked_dim),
            query_head_dim=to_int_tuple(args.query_head_dim),
            pos_head_dim=to_int_tuple(args.pos_head_dim),
            value_head_dim=to_int_tuple(args.value_head_dim),
            pos_dim=args.pos_dim,
            num_heads=to_int_tuple(args.num_heads),
            feedforward_dim=to_int_tuple(args.feedforward_dim),
            cnn_module_kernel=to_int_tuple(args.cnn_module_kernel),
            dropout=args.dropout,
            use_balancers=args.use_balancers,
            use_whiten=args.use_whiten,
            **_causal_kwargs(args),
        )
        return enc, encoder_dim[0]

    from splitformer.model.early_exit import EarlyExitEncoder

    d_model = _first(args.encoder_dim)
    enc = EarlyExitEncoder(
        input_dim=d_model,
        d_model=d_model,
        num_layers=_first(args.num_encoder_layers),
        exit_layers=to_int_tuple(args.exit_layers),
        layer_type=args.layer_type,
        num_heads=_first(args.num_heads),
        feedforward_dim=to_int_tuple(args.feedforward_dim),  # one width, or one per block
        cnn_module_kernel=_first(args.cnn_module_kernel),
        dropout=args.dropout,
        input_downsample=args.input_downsample,
        pos_encoding=args.pos_encoding,
        split_blocks=to_int_tuple(args.split_blocks),
        split_downsampling_factor=args.split_downsampling_factor,
        split_num_layers=args.split_num_layers,
        split_downsample=args.split_downsample,
        split_combine=args.split_combine,
        query_head_dim=_first(args.query_head_dim),
        pos_head_dim=_first(args.pos_head_dim),
        value_head_dim=_first(args.value_head_dim),
        pos_dim=args.pos_dim,
        encoder_unmasked_dim=_first(args.encoder_unmasked_dim),
        use_balancers=args.use_balancers,
        use_whiten=args.use_whiten,
        **_causal_kwargs(args, early_exit=True),
    )
    return enc, d_model


def _causal_kwargs(args: argparse.Namespace, early_exit: bool = False) -> Dict[str, Any]:
    """--causal and the chunk sizes training draws (checkpoints older than streaming have neither)."""
    from splitformer.model.chunking import parse_sizes

    if not getattr(args, "causal", False):
        if float(getattr(args, "chunk_exit_prob", 0.0) or 0.0) > 0:
            logging.warning("--chunk-exit-prob trains per-chunk exits of a streaming model; with --causal false "
                            "it does nothing")
        return {}
    if not early_exit and float(getattr(args, "chunk_exit_prob", 0.0) or 0.0) > 0:
        raise ValueError("--chunk-exit-prob needs an encoder with exits (--encoder early-exit); the Zipformer "
                         "baseline has one exit: drop it or set it to 0")
    extra = dict(chunk_exit_prob=float(getattr(args, "chunk_exit_prob", 0.0))) if early_exit else {}
    return dict(causal=True, chunk_size=parse_sizes(args.chunk_size, "chunk-size"),
                left_context_frames=parse_sizes(args.left_context_frames, "left-context-frames"), **extra)


def build_model(args: argparse.Namespace, vocab_size: Optional[int] = None) -> AsrModel:
    """Flags (and the BPE's vocabulary size) -> an untrained AsrModel."""
    if vocab_size is None:
        vocab_size = getattr(args, "vocab_size", None)
    if not vocab_size:
        raise ValueError("vocab_size is unknown: pass it, or set args.vocab_size (from data/lang_bpe_<N>/tokens.txt)")
    args.vocab_size = int(vocab_size)
    if args.encoder == "hf":
        if getattr(args, "causal", False):
            raise ValueError("--causal true streams the Zipformer encoders; a pretrained --encoder hf backbone "
                             "attends to the whole utterance: drop --causal or pick --encoder early-exit")
        encoder_embed, encoder = build_hf_encoder(args)
        args.feature_norm = "none"  # fbank statistics mean nothing to a waveform model
    else:
        encoder, embed_dim = build_encoder(args)
        encoder_embed = build_encoder_embed(args, embed_dim)
    return AsrModel(
        encoder_embed=encoder_embed,
        encoder=encoder,
        vocab_size=int(vocab_size),
        decoder_dim=args.decoder_dim,
        joiner_dim=args.joiner_dim,
        context_size=args.context_size,
        blank_id=0,
        use_transducer=args.use_transducer,
        use_ctc=args.use_ctc,
        feature_norm=getattr(args, "feature_norm", "none") == "global",
    )
