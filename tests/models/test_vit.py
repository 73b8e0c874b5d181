import pytest
import torch

from models.vit import ViT, ViTConfig


@pytest.mark.parametrize("stem", ["conv", "linear"])
def test_shapes_and_attention_rows(stem):
    torch.manual_seed(0)
    m = ViT(ViTConfig(dim=32, depth=2, heads=4, mlp_dim=64, stem=stem)).eval()
    x = torch.randn(3, 1, 28, 28)
    logits, none = m(x)
    assert logits.shape == (3, 10) and none is None
    logits2, attn = m(x, return_attention=True)
    assert attn.shape == (2, 3, 4, 50, 50)  # (layers, batch, heads, tokens, tokens)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 4, 50))
    torch.testing.assert_close(logits, logits2, atol=1e-5, rtol=1e-5)


def test_batch_does_not_change_each_result():
    torch.manual_seed(0)
    m = ViT(ViTConfig(dim=32, depth=2, heads=4, mlp_dim=64)).eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        together = m(x)[0]
        alone = torch.cat([m(x[i : i + 1])[0] for i in range(4)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_one_training_step_lowers_the_loss():
    torch.manual_seed(0)
    m = ViT(ViTConfig(dim=32, depth=1, heads=2, mlp_dim=64))
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = torch.nn.functional.cross_entropy(m(x)[0], y).item()
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x)[0], y).backward()
        opt.step()
    assert torch.nn.functional.cross_entropy(m(x)[0], y).item() < first
