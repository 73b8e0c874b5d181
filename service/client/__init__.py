"""A small typed client for a running attnserve, and the `attnserve translate` / `attnserve classify` commands.

The server's URL is `--url`, else $ATTNSERVE_URL, else http://127.0.0.1:8000; a token (`--token` or
$ATTNSERVE_TOKEN) is sent as `Authorization: Bearer ...`. A 503 (queue full, not ready) is retried after its
Retry-After, and a connection that could not be opened is retried with backoff: both a bounded number of times,
and both are safe for a POST (the server did no work). So is a request lost to a replica that died under it (the
proxy's own 500/502, not in the API's error format, or a connection dropped mid-answer): inference has no side
effects and gives the same answer again, so it is retried too. The service's own errors, a JSON 500
(`internal_error`) included, raise `ApiError` with the API's code and message.

`translate_stream` reads POST /v1/translate with `"stream": true` (Server-Sent Events): a `TokenEvent` per
generated token as it is decoded, then the final `TranslateResponse`. Only the start of a stream is retried;
an `error` event, or a stream cut before its `done` event, raises `ApiError`.

Needs only httpx and pydantic (`pip install 'attnserve[client]'`): no Ray, ONNX Runtime, FastAPI or numpy.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from service.protocols.v1.schemas import ClassifyResponse, ModelsResponse, TokenEvent, TranslateResponse

DEFAULT_URL = "http://127.0.0.1:8000"
MAX_RETRY_AFTER_S = 30.0


class ApiError(Exception):
    """An error answer of the API (`{"error": {"code", "message", "field"}}`), or a transport failure."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (field: {field})" if field else ""))
        self.status, self.code, self.message, self.field = status, code, message, field

    @classmethod
    def from_response(cls, r: httpx.Response) -> ApiError:
        try:
            e = r.json()["error"]
            return cls(r.status_code, e["code"], e["message"], e.get("field"))
        except Exception:  # not the API's format (a proxy, Serve's own plain-text 503)
            return cls(r.status_code, f"http_{r.status_code}", r.text[:500] or r.reason_phrase)


def lost_in_the_proxy(r: httpx.Response) -> bool:
    """A 500/502 that the service did not write: Serve's proxy answers so when the replica died mid-request."""
    if r.status_code not in (500, 502):
        return False
    try:
        body = r.json()
    except ValueError:
        return True
    return not (isinstance(body, dict) and "error" in body)  # the service's errors, v1 and v2, have "error"


class Client:
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout_s: float = 120.0,
                 retries: int = 4, backoff_s: float = 0.5, transport: httpx.BaseTransport | None = None) -> None:
        self.url = (url or os.environ.get("ATTNSERVE_URL") or DEFAULT_URL).rstrip("/")
        token = token if token is not None else os.environ.get("ATTNSERVE_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retries, self.backoff_s = retries, backoff_s
        self.http = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """One call, retried on 503 (after Retry-After), on connection failures and on answers lost to a dead
        replica (see the module docstring); other errors raise ApiError."""
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                r = self.http.request(method, path, **kw)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError) as e:
                if last:
                    raise ApiError(0, "connection_failed", f"cannot reach {self.url}: {e}") from None
                time.sleep(self.backoff_s * 2**attempt)
                continue
            if r.status_code == 503 and not last:
                time.sleep(self._retry_after(r, attempt))
                continue
            if lost_in_the_proxy(r) and not last:
                time.sleep(self.backoff_s * 2**attempt)
                continue
            if r.status_code >= 400:
                raise ApiError.from_response(r)
            return r
        raise AssertionError("unreachable")

    def _retry_after(self, r: httpx.Response, attempt: int) -> float:
        try:
            return min(max(float(r.headers["retry-after"]), 0.0), MAX_RETRY_AFTER_S)
        except (KeyError, ValueError):
            return self.backoff_s * 2**attempt

    def models(self) -> ModelsResponse:
        return ModelsResponse.model_validate_json(self.request("GET", "/v1/models").content)

    def translate(self, texts: list[str], *, beam_size: int = 1, return_attention: bool = False,
                  max_new_tokens: int | None = None, **attention: Any) -> TranslateResponse:
        """`attention`: the request's other attention fields (attention_layers, attention_heads,
        return_encoder_attention, encoder_attention_layers, encoder_attention_heads); None = the default."""
        body: dict[str, Any] = {"texts": texts, "beam_size": beam_size, "return_attention": return_attention,
                                **{k: v for k, v in attention.items() if v is not None}}
        if max_new_tokens is not None:
            body["max_new_tokens"] = max_new_tokens
        return TranslateResponse.model_validate_json(self.request("POST", "/v1/translate", json=body).content)

    def translate_stream(self, texts: list[str], *, beam_size: int = 1, return_attention: bool = False,
                         max_new_tokens: int | None = None,
                         **attention: Any) -> Iterator[TokenEvent | TranslateResponse]:
        """The translation as it is decoded: a TokenEvent per generated token (greedy decoding; beam search sends
        only the final answer), then the TranslateResponse. Arguments as `translate`."""
        body: dict[str, Any] = {"texts": texts, "beam_size": beam_size, "return_attention": return_attention,
                                "stream": True, **{k: v for k, v in attention.items() if v is not None}}
        if max_new_tokens is not None:
            body["max_new_tokens"] = max_new_tokens
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                with self.http.stream("POST", "/v1/translate", json=body,
                                      headers={"Accept": "text/event-stream"}) as r:
                    if r.status_code == 503 and not last:
                        r.read()
                        wait = self._retry_after(r, attempt)
                    elif r.status_code >= 400:
                        r.read()
                        raise ApiError.from_response(r)
                    else:
                        yield from _events(r)
                        return
            except (httpx.ConnectError, httpx.ConnectTimeout) as e:  # nothing was sent: safe to retry
                if last:
                    raise ApiError(0, "connection_failed", f"cannot reach {self.url}: {e}") from None
                wait = self.backoff_s * 2**attempt
            except (httpx.RemoteProtocolError, httpx.ReadError) as e:
                raise ApiError(0, "stream_broken", f"the stream from {self.url} broke off: {e}") from None
            time.sleep(wait)

    def translate_png(self, text: str, *, beam_size: int = 1, **attention: Any) -> bytes:
        """The alignment heatmap of one text (and the encoder's map beside it, if asked), drawn by the server."""
        body = {"texts": [text], "beam_size": beam_size, **{k: v for k, v in attention.items() if v is not None}}
        return self.request("POST", "/v1/translate", json=body, headers={"Accept": "image/png"}).content

    def classify(self, images: list[bytes], *, top_k: int = 3, return_attention: bool = False,
                 attention: str = "rollout", layers: list[int] | None = None,
                 heads: list[int] | None = None) -> ClassifyResponse:
        """`attention`: "rollout" or "cls" (the CLS token's attention, mean over `layers` and `heads`)."""
        body = {"images": [base64.b64encode(i).decode() for i in images], "top_k": top_k,
                "return_attention": return_attention, **_map_choice(attention, layers, heads)}
        return ClassifyResponse.model_validate_json(self.request("POST", "/v1/classify", json=body).content)

    def classify_png(self, image: bytes, *, attention: str = "rollout", layers: list[int] | None = None,
                     heads: list[int] | None = None) -> bytes:
        """The image with its attention map overlaid, drawn by the server."""
        body = {"images": [base64.b64encode(image).decode()], **_map_choice(attention, layers, heads)}
        return self.request("POST", "/v1/classify", json=body, headers={"Accept": "image/png"}).content


def _events(r: httpx.Response) -> Iterator[TokenEvent | TranslateResponse]:
    """Server-Sent Events (`event:` and `data:` lines, a blank line ends one) as typed objects."""
    event, data = "message", []
    for line in r.iter_lines():
        if line:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
            continue
        if not data:
            continue
        payload = "\n".join(data)
        if event == "token":
            yield TokenEvent.model_validate_json(payload)
        elif event == "done":
            yield TranslateResponse.model_validate_json(payload)
            return
        elif event == "error":
            e = json.loads(payload).get("error", {})
            raise ApiError(r.status_code, e.get("code", "stream_error"), e.get("message", payload), e.get("field"))
        event, data = "message", []
    raise ApiError(r.status_code, "stream_broken", "the stream ended before its `done` event")


def _map_choice(attention: str, layers: list[int] | None, heads: list[int] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"attention": attention}
    if layers is not None:
        out["attention_layers"] = layers
    if heads is not None:
        out["attention_heads"] = heads
    return out


def indices(text: str) -> list[int]:
    """argparse type: "0,2" or "-1" -> [0, 2] / [-1]."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,2 or -1, got {text!r}") from None


# --- the commands ----------------------------------------------------------------------------------------------

def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--url", help=f"server URL (default $ATTNSERVE_URL or {DEFAULT_URL})")
    p.add_argument("--token", help="bearer token (default $ATTNSERVE_TOKEN)")
    p.add_argument("--png", type=Path, metavar="OUT.png", help="also write the server's attention picture here")
    return p


def _run(fn) -> None:
    try:
        fn()
    except ApiError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def translate_main(argv: list[str] | None = None) -> None:
    p = _parser("attnserve translate", "Translate English to Spanish with a running attnserve.")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="English text(s) to translate, one translation each")
    p.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    p.add_argument("--attention", action="store_true", help="print each target token's most attended source token")
    p.add_argument("--layers", type=indices, metavar="0,2", help="decoder layers averaged (default: the last)")
    p.add_argument("--heads", type=indices, metavar="1,3", help="heads averaged (default: all)")
    p.add_argument("--encoder", action="store_true",
                   help="also the encoder's self-attention: print each source token's most attended source token "
                        "(and draw it beside the alignment in --png)")
    p.add_argument("--encoder-layers", type=indices, metavar="0,2", help="encoder layers averaged (default: the last)")
    p.add_argument("--encoder-heads", type=indices, metavar="1,3", help="encoder heads averaged (default: all)")
    p.add_argument("--stream", action="store_true",
                   help="print the translation token by token as it is decoded (Server-Sent Events; one TEXT)")
    args = p.parse_args(argv)
    if args.png and len(args.texts) != 1:
        p.error("--png draws one text: give one TEXT")
    if args.stream and len(args.texts) != 1:
        p.error("--stream prints one text as it is decoded: give one TEXT")
    choice = {"attention_layers": args.layers, "attention_heads": args.heads,
              "return_encoder_attention": args.encoder or None, "encoder_attention_layers": args.encoder_layers,
              "encoder_attention_heads": args.encoder_heads}

    def strongest(rows: list[list[float]], queries: list[str], keys: list[str], arrow: str) -> None:
        for q, row in zip(queries, rows, strict=True):
            j = max(range(len(row)), key=row.__getitem__) if row else None
            print(f"  {q:>16} {arrow} {'-' if j is None else f'{keys[j]} ({row[j]:.2f})'}")

    def go() -> None:
        with Client(args.url, args.token) as c:
            if args.stream:
                shown = ""
                for ev in c.translate_stream(args.texts, beam_size=args.beam, return_attention=args.attention,
                                             **choice):
                    if isinstance(ev, TokenEvent):
                        print(ev.text[len(shown):] if ev.text.startswith(shown) else f"\n{ev.text}", end="",
                              flush=True)
                        shown = ev.text
                    else:
                        resp = ev
                print()
            else:
                resp = c.translate(args.texts, beam_size=args.beam, return_attention=args.attention, **choice)
            for t in resp.translations:
                if not args.stream:  # streamed: printed already
                    print(t.text)
                if t.attention is not None:
                    a = t.attention
                    print(f"  alignment (decoder layers {a.layers}, heads {a.heads}):")
                    strongest(a.weights, a.target_tokens, a.source_tokens, "<-")
                if t.encoder_attention is not None:
                    e = t.encoder_attention
                    print(f"  encoder self-attention (layers {e.layers}, heads {e.heads}):")
                    strongest(e.weights, e.tokens, e.tokens, "->")
            if args.png:
                args.png.write_bytes(c.translate_png(args.texts[0], beam_size=args.beam, **choice))
                print(f"wrote {args.png}", file=sys.stderr)

    _run(go)


def classify_main(argv: list[str] | None = None) -> None:
    p = _parser("attnserve classify", "Classify PNG/JPEG images with a running attnserve (Fashion-MNIST ViT).")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG or JPEG file(s)")
    p.add_argument("--top-k", type=int, default=3, help="classes printed per image (default %(default)s)")
    p.add_argument("--map", choices=("rollout", "cls"), default="rollout",
                   help="attention map of --png and --attention: rollout, or the CLS token's attention (cls)")
    p.add_argument("--layers", type=indices, metavar="0,5", help="cls: layers averaged (default: the last)")
    p.add_argument("--heads", type=indices, metavar="0,2", help="cls: heads averaged (default: all)")
    p.add_argument("--attention", action="store_true", help="print each image's most attended patches")
    args = p.parse_args(argv)
    if args.map != "cls" and (args.layers or args.heads):
        p.error("--layers and --heads choose the CLS map: add --map cls")
    if args.png and len(args.images) != 1:
        p.error("--png draws one image: give one IMAGE")
    missing = [str(i) for i in args.images if not i.is_file()]
    if missing:
        p.error(f"no such file: {', '.join(missing)}")

    def go() -> None:
        data = [i.read_bytes() for i in args.images]
        choice = {"attention": args.map, "layers": args.layers, "heads": args.heads}
        with Client(args.url, args.token) as c:
            resp = c.classify(data, top_k=args.top_k, return_attention=args.attention, **choice)
            for path, pred in zip(args.images, resp.predictions, strict=True):
                others = ", ".join(f"{s.label} {s.score:.1%}" for s in pred.top_k[1:])
                print(f"{path}: {pred.label} {pred.score:.1%}" + (f"  ({others})" if others else ""))
                if pred.attention is not None:
                    a = pred.attention
                    cells = sorted(((w, r, c) for r, row in enumerate(a.weights) for c, w in enumerate(row)),
                                   reverse=True)[:3]
                    top = ", ".join(f"row {r} col {c} ({w:.2f})" for w, r, c in cells)
                    print(f"  {a.method} (layers {a.layers}, heads {a.heads}): most attended patches {top}")
            if args.png:
                args.png.write_bytes(c.classify_png(data[0], **choice))
                print(f"wrote {args.png}", file=sys.stderr)

    _run(go)
