import pytest
import torch

from model.attention import (
    attention_gradients,
    attention_map,
    attention_rollout,
    discard_weakest,
    fuse_heads,
    gradient_rollout,
    keep_mass,
    last_layer_attention,
    raw_attention,
)
from model.vit import VisionTransformer, ViTConfig

TOKENS = 5  # class token + a 2 x 2 patch grid


def uniform(layers: int, batch: int = 1, heads: int = 2) -> torch.Tensor:
    return torch.full((layers, batch, heads, TOKENS, TOKENS), 1.0 / TOKENS)


def test_identity_attention_rolls_out_to_nothing_but_the_class_token():
    attentions = torch.eye(TOKENS).expand(3, 1, 2, TOKENS, TOKENS)
    assert torch.equal(attention_rollout(attentions), torch.zeros(1, 2, 2))


def test_one_layer_rollout_is_half_residual_half_attention():
    attentions = uniform(1)
    # (A + I) / 2 row 0: class token keeps 0.5 + 0.1, each patch gets 0.1.
    assert torch.allclose(attention_rollout(attentions), torch.full((1, 2, 2), 0.1))


def test_two_layer_rollout_worked_by_hand():
    first = torch.eye(TOKENS)
    first[0] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])  # layer 1: the class token reads patch 1 only
    second = torch.eye(TOKENS)
    second[0] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])  # layer 2: the class token reads patch 4 only
    attentions = torch.stack([first, second]).reshape(2, 1, 1, TOKENS, TOKENS)
    # Layer maps: M1 row 0 = [.5, .5, 0, 0, 0]; M2 row 0 = [.5, 0, 0, 0, .5]; other rows are identity.
    # (M2 @ M1) row 0 = .5 * M1 row 0 + .5 * M1 row 4 = [.25, .25, 0, 0, .5].
    expected = torch.tensor([[[0.25, 0.0], [0.0, 0.5]]])
    assert torch.allclose(attention_rollout(attentions), expected)


def test_rollout_rows_stay_normalised_with_unnormalised_head_fusion():
    torch.manual_seed(0)
    attentions = torch.rand(4, 2, 3, TOKENS, TOKENS).softmax(-1)
    rolled = attention_rollout(attentions, head_fusion="max")
    assert rolled.shape == (2, 2, 2)
    assert (rolled.sum(dim=(1, 2)) < 1).all() and (rolled > 0).all()


def test_last_layer_reads_the_class_token_row_of_the_last_layer():
    attentions = uniform(2)
    attentions[-1, 0, 0, 0] = torch.tensor([0.0, 0.4, 0.3, 0.2, 0.1])
    attentions[-1, 0, 1, 0] = torch.tensor([0.0, 0.0, 0.1, 0.2, 0.7])
    assert torch.allclose(last_layer_attention(attentions), torch.tensor([[[0.2, 0.2], [0.2, 0.4]]]))


def test_fuse_heads():
    attention = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    assert fuse_heads(attention, "mean").item() == 2.0
    assert fuse_heads(attention, "max").item() == 3.0
    assert fuse_heads(attention, "min").item() == 1.0


def test_discard_ratio_drops_weak_patch_links_but_keeps_the_class_token():
    attention = torch.full((1, TOKENS, TOKENS), 0.01)
    attention[0, 0] = torch.tensor([0.001, 0.002, 0.003, 0.004, 0.005])  # the class token's row: all weak
    attention[0, 2, 3] = 0.5
    kept = discard_weakest(attention, ratio=0.9)
    assert torch.equal(kept[0, 0], attention[0, 0])  # class token row untouched
    assert torch.equal(kept[0, :, 0], attention[0, :, 0])  # class token column untouched
    patch_block = kept[0, 1:, 1:]
    assert (patch_block > 0).sum() == 2  # 16 patch links, 90 % (14) of them dropped
    assert patch_block[1, 2] == 0.5


def test_rollout_with_discard_still_keeps_the_class_tokens_own_attention():
    attentions = uniform(2)
    rolled = attention_rollout(attentions, discard_ratio=0.75)
    assert rolled.shape == (1, 2, 2) and (rolled > 0).all()


def test_start_layer_skips_the_early_layers():
    attentions = torch.eye(TOKENS).repeat(2, 1, 1, 1, 1)
    attentions[0, 0, 0, 0] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])
    assert attention_rollout(attentions, start_layer=0)[0, 0, 0] == 0.5  # (A + I) / 2, row 0
    assert attention_rollout(attentions, start_layer=1).abs().sum() == 0  # layer 0 is left out


def test_gradient_rollout_worked_by_hand():
    attention = torch.zeros(1, 1, 2, TOKENS, TOKENS)
    gradient = torch.zeros(1, 1, 2, TOKENS, TOKENS)
    attention[0, 0, :, 0, 1] = 0.5
    gradient[0, 0, 0, 0, 1] = 2.0  # head 0: positive relevance 1.0 on (class token -> patch 1)
    gradient[0, 0, 1, 0, 1] = -2.0  # head 1: negative, clamped to 0
    attention[0, 0, :, 0, 4] = 0.5
    gradient[0, 0, :, 0, 4] = 1.0  # both heads: 0.5 on (class token -> patch 4)
    # R = I + mean_h((dA * A)+) @ I: row 0 gets 0.5 at patch 1 and 0.5 at patch 4.
    assert torch.allclose(gradient_rollout(attention, gradient), torch.tensor([[[0.5, 0.0], [0.0, 0.5]]]))


def test_gradient_pairs_each_layer_with_its_own_attention():
    torch.manual_seed(0)
    model = VisionTransformer(
        ViTConfig(image_size=28, patch_size=7, in_channels=1, num_classes=10, dim=32, depth=3, num_heads=2)
    ).eval()
    images = torch.randn(2, 1, 28, 28)
    target = torch.tensor([3, -1])
    logits, attentions, gradients, used = attention_gradients(model, images, target)
    assert used.tolist() == [3, int(logits[1].argmax())]
    # The same gradients by another route: keep each layer's tensor and read its .grad after backward.
    logits_again, layers = model.forward_with_attention_layers(images)
    for layer in layers:
        layer.retain_grad()
    logits_again.gather(1, used.view(-1, 1)).sum().backward()
    for index, layer in enumerate(layers):
        assert torch.allclose(gradients[index], layer.grad, atol=1e-6), f"layer {index}"
    # The layers really differ, so pairing a layer with another's gradient would change the answer.
    assert not torch.allclose(gradient_rollout(attentions, gradients), gradient_rollout(attentions, gradients.flip(0)))


def test_keep_mass_keeps_the_strongest_patches_holding_that_share():
    attention_map = torch.tensor([[[1.0, 0.6], [0.3, 0.1]]])  # shares 0.5, 0.3, 0.15, 0.05
    assert keep_mass(attention_map, 0.5).tolist() == [[[1.0, 0.0], [0.0, 0.0]]]
    assert keep_mass(attention_map, 0.6).tolist() == [[[1.0, 1.0], [0.0, 0.0]]]
    assert keep_mass(attention_map, 1.0).sum() == 4


def test_attention_map_dispatches_by_name():
    attentions = uniform(2)
    assert torch.equal(attention_map("rollout", attentions), attention_rollout(attentions))
    assert torch.equal(attention_map("raw", attentions, layer=0, head=1), raw_attention(attentions, 0, 1))
    with pytest.raises(ValueError, match="needs the attention gradients"):
        attention_map("gradient", attentions)
    with pytest.raises(ValueError, match="unknown method"):
        attention_map("saliency", attentions)


def test_attention_gradients_make_every_tensor_on_the_models_device():
    # The meta device stands in for a GPU: a tensor made on the CPU and mixed in fails the same way.
    config = ViTConfig(image_size=28, patch_size=7, in_channels=1, num_classes=10, dim=32, depth=2, num_heads=2)
    model = VisionTransformer(config).to("meta").eval()
    images = torch.zeros(2, 1, 28, 28, device="meta")
    for target in (torch.tensor([-1, 3]), [-1, 3], None):
        outputs = attention_gradients(model, images, target)
        assert {tensor.device.type for tensor in outputs} == {"meta"}
