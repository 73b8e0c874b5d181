"""service/client/__init__.py and `attnserve translate` / `attnserve classify` against the live app."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.client import ApiError, Client

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "service" / "protocols" / "static" / "samples" / "ankle-boot.png"


def cli(*args: str, url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.cli", *args, "--url", url], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_client_translate_classify_and_pictures(service):
    with Client(service.base) as c:
        assert {m.name for m in c.models().models} == {"translator-en-es", "vit-fashion"}
        t = c.translate(["Where is the train station?"], return_attention=True).translations[0]
        assert "estación" in t.text and t.attention is not None and t.encoder_attention is None
        t = c.translate(["Where is the train station?"], return_attention=True, attention_layers=[0, 1],
                        return_encoder_attention=True, encoder_attention_heads=[2]).translations[0]
        assert t.attention.layers == [0, 1] and (t.encoder_attention.layers, t.encoder_attention.heads) == ([2], [2])
        cls = c.classify([SAMPLE.read_bytes()], return_attention=True, attention="cls", layers=[0, -1]).predictions[0]
        assert (cls.attention.method, cls.attention.layers) == ("cls", [0, 5])
        png = Image.open(io.BytesIO(c.translate_png("Where is the train station?")))
        assert png.format == "PNG" and png.width > 100
        pred = c.classify([SAMPLE.read_bytes()], top_k=2).predictions[0]
        assert pred.label == "Ankle boot" and len(pred.top_k) == 2
        assert Image.open(io.BytesIO(c.classify_png(SAMPLE.read_bytes()))).format == "PNG"
        with pytest.raises(ApiError) as e:
            c.translate([])
        assert e.value.status == 422 and e.value.code == "invalid_request"


def test_client_retries_503_then_gives_up():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.headers.get("authorization"))
        if len(calls) < 3:
            return httpx.Response(503, headers={"Retry-After": "0"},
                                  json={"error": {"code": "overloaded", "message": "busy"}})
        return httpx.Response(200, json={"models": [], "limits": {k: 1 for k in (
            "max_texts", "max_text_chars", "max_source_tokens", "max_images", "max_image_bytes", "max_image_pixels",
            "max_body_bytes")}})

    with Client("http://test", token="s3cret", transport=httpx.MockTransport(handler)) as c:
        assert c.models().models == []
    assert calls == ["Bearer s3cret"] * 3
    with Client("http://test", retries=1, transport=httpx.MockTransport(
            lambda r: httpx.Response(503, headers={"Retry-After": "0"},
                                     json={"error": {"code": "overloaded", "message": "busy"}}))) as c:
        with pytest.raises(ApiError, match="overloaded"):
            c.models()


def test_client_retries_what_a_dead_replica_lost_but_not_the_services_own_500():
    limits = {k: 1 for k in ("max_texts", "max_text_chars", "max_source_tokens", "max_images", "max_image_bytes",
                             "max_image_pixels", "max_body_bytes")}
    answers = [httpx.Response(500, text="Internal Server Error"),  # Serve's proxy: the replica died
               httpx.Response(502, text="Bad Gateway"),
               httpx.Response(200, json={"models": [], "limits": limits})]
    with Client("http://test", backoff_s=0.01, transport=httpx.MockTransport(lambda r: answers.pop(0))) as c:
        assert c.models().models == [] and not answers
    calls = []

    def internal_error(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(500, json={"error": {"code": "internal_error", "message": "a bug"}})

    with Client("http://test", backoff_s=0.01, transport=httpx.MockTransport(internal_error)) as c:
        with pytest.raises(ApiError, match="internal_error"):
            c.models()
    assert calls == [1]  # a bug answers the same again: not retried


def test_client_connection_errors_are_bounded():
    with Client("http://127.0.0.1:9", retries=2, backoff_s=0.01) as c:
        with pytest.raises(ApiError) as e:
            c.models()
    assert e.value.code == "connection_failed"


def test_cli_translate_and_classify(service, tmp_path):
    out = cli("translate", "Where is the train station?", "--attention", "--png", str(tmp_path / "a.png"),
              url=service.base)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "estación" in lines[0] and any("<-" in line for line in lines[1:])
    assert Image.open(tmp_path / "a.png").format == "PNG"
    out = cli("classify", str(SAMPLE), "--png", str(tmp_path / "o.png"), url=service.base)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{SAMPLE}: Ankle boot")
    assert Image.open(tmp_path / "o.png").format == "PNG"
    bad = cli("translate", "x" * 2000, url=service.base)
    assert bad.returncode == 1 and "limit_exceeded" in bad.stderr
    out = cli("translate", "Where is the train station?", "--attention", "--layers", "0,2", "--heads", "1",
              "--encoder", "--encoder-layers", "-1", "--png", str(tmp_path / "e.png"), url=service.base)
    assert out.returncode == 0, out.stderr
    assert "alignment (decoder layers [0, 2], heads [1])" in out.stdout
    assert "encoder self-attention (layers [2], heads [0, 1, 2, 3])" in out.stdout and " -> " in out.stdout
    assert Image.open(tmp_path / "e.png").width > Image.open(tmp_path / "a.png").width  # the encoder panel
    out = cli("classify", str(SAMPLE), "--map", "cls", "--layers", "0,5", "--attention", url=service.base)
    assert out.returncode == 0 and "cls (layers [0, 5], heads [0, 1, 2, 3]): most attended patches row" in out.stdout
    bad = cli("classify", str(SAMPLE), "--layers", "1", url=service.base)
    assert bad.returncode == 2 and "--map cls" in bad.stderr
    bad = cli("translate", "Hi.", "--layers", "9", url=service.base)
    assert bad.returncode == 1 and "[-3, 2]" in bad.stderr


def test_client_streams_tokens_then_the_same_result(service):
    """translate_stream against the real service: one TokenEvent per generated token, each the text so far, then
    the TranslateResponse, equal to the unstreamed answer (greedy decoding is deterministic)."""
    from service.client import TokenEvent, TranslateResponse

    text = "Where is the train station?"
    with Client(service.base) as c:
        plain = c.translate([text], return_attention=True)
        events = list(c.translate_stream([text], return_attention=True))
        tokens, final = events[:-1], events[-1]
        assert isinstance(final, TranslateResponse) and all(isinstance(e, TokenEvent) for e in tokens)
        assert final.translations[0].text == plain.translations[0].text
        t = final.translations[0]
        assert len(tokens) == len(t.attention.target_tokens)  # one event per generated token (EOS excluded)
        assert [e.token for e in tokens] == t.attention.target_tokens
        assert tokens[-1].text == t.text and all(e.index == 0 for e in tokens)
        np.testing.assert_allclose([e.alignment for e in tokens], t.attention.weights, atol=1e-5)
        # Two texts interleave by index; beam search sends only the final answer.
        two = list(c.translate_stream(["Hello.", "Good night."]))
        assert {e.index for e in two[:-1]} == {0, 1} and len(two[-1].translations) == 2
        beam = list(c.translate_stream([text], beam_size=4))
        assert len(beam) == 1 and isinstance(beam[0], TranslateResponse)
        with pytest.raises(ApiError) as e:  # refused before the stream starts: a plain 422
            list(c.translate_stream([text], attention_layers=[9]))
        assert e.value.status == 422 and e.value.field is not None


def test_cli_streams(service):
    out = cli("translate", "Where is the train station?", "--stream", url=service.base)
    assert out.returncode == 0, out.stderr
    assert "estación" in out.stdout.strip().splitlines()[-1]
    bad = cli("translate", "One.", "Two.", "--stream", url=service.base)
    assert bad.returncode == 2 and "--stream" in bad.stderr
