import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

from model.vit import Attention, VisionTransformer, ViTConfig

CONFIG = ViTConfig(
    image_size=28, patch_size=4, in_channels=1, num_classes=10, dim=64, depth=3, num_heads=4, mlp_ratio=2.0
)


def timm_twin(config: ViTConfig) -> TimmVisionTransformer:
    return TimmVisionTransformer(**config.timm_kwargs()).eval()


@pytest.fixture
def model() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(CONFIG)


def test_shapes_finite_and_every_parameter_gets_a_gradient(model):
    images = torch.randn(3, 1, 28, 28)
    features = model.forward_features(images)
    assert features.shape == (3, 1 + 49, 64)
    logits = model.forward_head(features)
    assert logits.shape == (3, 10)
    assert torch.isfinite(logits).all()
    model(images).logsumexp(-1).sum().backward()
    missing = [
        name
        for name, parameter in model.named_parameters()
        if parameter.grad is None or not parameter.grad.abs().sum() > 0
    ]
    assert missing == []


def test_class_token_only_last_block_gives_the_full_models_logits_and_gradients():
    model = VisionTransformer(ViTConfig(**{**CONFIG.to_dict(), "drop_path": 0.5})).train()  # drop path draws too
    images = torch.randn(4, 1, 28, 28)
    torch.manual_seed(1)
    shortcut = model(images)
    shortcut.square().sum().backward()
    shortcut_grads = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad()
    torch.manual_seed(1)
    full = model.forward_head(model.forward_features(images))
    full.square().sum().backward()
    assert torch.allclose(shortcut, full, atol=1e-5)
    for name, parameter in model.named_parameters():
        assert torch.allclose(shortcut_grads[name], parameter.grad, atol=1e-5), name


def test_fused_and_explicit_attention_agree():
    torch.manual_seed(0)
    attention = Attention(dim=64, num_heads=4)
    x = torch.randn(2, 50, 64)
    fused, no_weights = attention(x)
    explicit, weights = attention(x, need_weights=True)
    assert no_weights is None
    assert torch.allclose(fused, explicit, atol=1e-5)
    assert weights.shape == (2, 4, 50, 50)


def test_forward_with_attention_matches_forward_and_rows_sum_to_one(model):
    model.eval()
    images = torch.randn(2, 1, 28, 28)
    logits, attentions = model.forward_with_attention(images)
    assert attentions.shape == (3, 2, 4, 50, 50)
    assert torch.allclose(attentions.sum(-1), torch.ones(3, 2, 4, 50), atol=1e-5)
    assert torch.allclose(logits, model(images), atol=1e-5)


def test_timm_weights_load_into_ours_and_give_the_same_logits():
    torch.manual_seed(1)
    theirs = timm_twin(CONFIG)
    ours = VisionTransformer(CONFIG).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    images = torch.randn(4, 1, 28, 28)
    assert torch.allclose(ours(images), theirs(images), atol=1e-5)


def test_our_weights_load_into_timm_and_give_the_same_logits(model):
    model.eval()
    theirs = timm_twin(CONFIG)
    theirs.load_state_dict(model.state_dict(), strict=True)
    images = torch.randn(4, 1, 28, 28)
    assert torch.allclose(model(images), theirs(images), atol=1e-5)


@pytest.mark.parametrize("size", [(40, 36), (20, 16), (12, 28)], ids=["larger", "smaller", "narrower"])
def test_another_image_size_gives_the_logits_of_timm_resampling_the_position_embedding(model, size):
    model.eval()
    theirs = TimmVisionTransformer(**CONFIG.timm_kwargs(), dynamic_img_size=True).eval()
    theirs.load_state_dict(model.state_dict(), strict=True)
    images = torch.randn(2, 1, *size)  # a 10 x 9 patch grid, 5 x 4 or 3 x 7 instead of 7 x 7
    assert torch.allclose(model(images), theirs(images), atol=1e-5)
    assert torch.equal(model.position_embedding(7, 7), model.pos_embed)
    assert model.position_embedding(size[0] // 4, size[1] // 4).shape == (1, 1 + size[0] * size[1] // 16, 64)


def test_init_follows_timm():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(dim=128, depth=2, num_heads=4))
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(model.norm.weight, torch.ones(128))


def test_config_rejects_a_patch_size_that_does_not_divide_the_image():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTConfig(image_size=28, patch_size=5)
