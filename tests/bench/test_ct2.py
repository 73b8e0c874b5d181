"""The CTranslate2 conversion computes our model: its token log-probabilities equal torch's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

ctranslate2 = pytest.importorskip("ctranslate2")

from bench.ct2 import AttnserveConverter, source_tokens  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.translator import BOS, EOS  # noqa: E402


def test_ct2_scores_match_torch(tiny_artifacts, tmp_path):
    ckpt = tiny_artifacts["checkpoints"]["translator"]
    AttnserveConverter(ckpt).convert(str(tmp_path / "ct2"))
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    translator = ctranslate2.Translator(str(tmp_path / "ct2"), device="cpu", intra_threads=1)
    model, _ = load_checkpoint(ckpt)
    for en, es in [("The cat sleeps on the red chair.", "El gato duerme."), ("I", "Quiero ir a casa ahora.")]:
        src = source_tokens(tok, [en])
        tgt = tok.encode(es).tokens
        (scored,) = translator.score_batch(src, [tgt])
        ids = torch.tensor([[BOS, *(tok.token_to_id(t) for t in tgt), EOS]])
        with torch.no_grad():
            hidden = model(torch.tensor([[tok.token_to_id(t) for t in src[0]]]), ids[:, :-1])
            logp = (hidden @ model.embed.weight.T).log_softmax(-1)[0, torch.arange(ids.size(1) - 1), ids[0, 1:]]
        np.testing.assert_allclose(scored.log_probs, logp.numpy(), atol=1e-4)
