"""Mixed precision: every encoder family trains a step under bf16 autocast (the CPU stand-in for CUDA AMP)."""
import pytest
import torch

from splitformer.model.config import build_model, default_model_args

TINY = {
    "zipformer-cpu": dict(encoder_dim="32,32,32,32,32,32", encoder_unmasked_dim="16,16,16,16,16,16",
                          feedforward_dim="64,64,64,64,64,64", num_encoder_layers="1,1,1,1,1,1"),
    "splitformer-cpu": dict(encoder_dim="32", encoder_unmasked_dim="32", feedforward_dim="64"),
    "splitformer-paper": dict(encoder_dim="32", feedforward_dim="64", num_heads="4"),
}


@pytest.mark.parametrize("preset", sorted(TINY))
def test_bf16_autocast_training_step(preset):
    torch.manual_seed(0)
    model = build_model(default_model_args(preset=preset, **TINY[preset]), 30).train()
    x, lens = torch.randn(2, 300, 80), torch.tensor([300, 231])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = model(x, lens, [[1, 2, 3], [4, 5]])
        loss = sum(v for r in res.values() for k, v in r.items() if k != "ctc_num_inf")
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.dtype == torch.float32 for g in grads)
