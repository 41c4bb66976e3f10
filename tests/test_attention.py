import torch

from model.attention import attention_rollout, fuse_heads, last_layer_attention

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
