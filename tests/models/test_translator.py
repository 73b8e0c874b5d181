import torch

from models.translator import BOS, EOS, PAD, Translator, TranslatorConfig, greedy_decode

TINY = TranslatorConfig(
    vocab_size=50, dim=32, heads=4, encoder_layers=2, decoder_layers=2, ffn_dim=64, max_positions=64
)


def tiny_model() -> Translator:
    torch.manual_seed(0)
    return Translator(TINY).eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.randint(4, 50, (3, 7))
    src[0, 5:] = PAD
    tgt = torch.randint(4, 50, (3, 6))
    tgt[:, 0] = BOS
    return src, tgt


def test_shapes_and_cross_attention_rows():
    m = tiny_model()
    src, tgt = batch()
    memory, enc_attn = m.encode(src, return_attention=True)
    assert memory.shape == (3, 7, 32) and enc_attn.shape == (2, 3, 4, 7, 7)
    cross = m.cross_kv(memory)
    assert cross.shape == (2, 2, 3, 4, 7, 8)
    logits, present, attn = m.decode(tgt, cross, src != PAD, None, return_attention=True)
    assert logits.shape == (3, 6, 50) and present.shape == (2, 2, 3, 4, 6, 8)
    assert attn.shape == (2, 3, 4, 6, 7)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 4, 6))
    assert attn[:, 0, ..., 5:].abs().max() == 0  # no weight on source padding


def test_cached_step_by_step_equals_full_sequence():
    m = tiny_model()
    src, tgt = batch()
    with torch.no_grad():
        full = m(src, tgt) @ m.embed.weight.T
        cross = m.cross_kv(m.encode(src)[0])
        past, steps = None, []
        for t in range(tgt.size(1)):
            logits, past, _ = m.decode(tgt[:, t : t + 1], cross, src != PAD, past)
            steps.append(logits)
        # an empty past (length 0) behaves like no past
        empty = torch.zeros(2, 2, 3, 4, 0, 8)
        first, _, _ = m.decode(tgt[:, :1], cross, src != PAD, empty)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first, steps[0], atol=1e-6, rtol=1e-6)


def test_padding_does_not_change_outputs():
    m = tiny_model()
    src, tgt = batch()
    padded = torch.cat([src, torch.full((3, 4), PAD)], dim=1)
    with torch.no_grad():
        a = m(src, tgt)
        b = m(padded, tgt)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_greedy_decode_batched_equals_single():
    m = tiny_model()
    src, _ = batch()
    together = greedy_decode(m, src, max_new_tokens=10)
    for i in range(3):
        row = src[i : i + 1]
        row = row[:, : int((row != PAD).sum())]
        assert greedy_decode(m, row, max_new_tokens=10)[0] == together[i]
    assert all(EOS not in h for h in together)


def test_one_training_step_lowers_the_loss():
    m = tiny_model().train()
    src, tgt = batch()
    tgt[:, -1] = EOS
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = m.loss(src, tgt, label_smoothing=0.0)
    for _ in range(5):
        opt.zero_grad()
        m.loss(src, tgt, label_smoothing=0.0).backward()
        opt.step()
    assert m.loss(src, tgt, label_smoothing=0.0).item() < first.item()
