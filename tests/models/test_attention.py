import torch

from models.attention import MultiHeadAttention, attend


def test_explicit_path_matches_fused_and_rows_sum_to_one():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    fused, none = attend(q, k, v, mask, return_attention=False)
    explicit, probs = attend(q, k, v, mask, return_attention=True)
    assert none is None
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 5))
    assert probs[1, ..., 3:].abs().max() == 0  # masked keys get no weight


def test_module_returns_probabilities_only_when_asked():
    mha = MultiHeadAttention(dim=16, heads=4).eval()
    x = torch.randn(3, 6, 16)
    out, probs = mha(x, mha.project_kv(x))
    assert out.shape == (3, 6, 16) and probs is None
    out2, probs = mha(x, mha.project_kv(x), return_attention=True)
    assert probs.shape == (3, 4, 6, 6)
    torch.testing.assert_close(out, out2, atol=1e-5, rtol=1e-5)
