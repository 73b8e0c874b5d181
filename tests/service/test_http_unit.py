"""Fast unit tests of the HTTP plumbing (service/protocols/asgi.py): how `Observed` counts every outcome, and what the
OpenAPI document promises. No Ray cluster: the middleware runs around small FastAPI apps made by `make_api`.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import Request

from service.config import AppArgs
from service.deployments.ingress import build_api, merged_openapi
from service.protocols.asgi import Observed, RouteSettings, make_api
from service.protocols.v2.routes import V2Config


def document(args: AppArgs | None = None) -> dict:
    """The merged OpenAPI document of the service, as the `api` app serves it (no v2 models: no artifacts read)."""
    args = args or AppArgs()
    return merged_openapi(args, build_api(None, args, V2Config.from_args(args, {})))


@pytest.fixture
def recorded(monkeypatch) -> list[tuple[int, str | None]]:
    """(status, code) of every request `Observed` counts, as it hands them to the metrics."""
    out: list[tuple[int, str | None]] = []
    monkeypatch.setattr(Observed, "_record", lambda self, state, route, seconds: out.append(
        (int(state["status"]), state["code"])))
    return out


def app_for_tests():
    app = make_api("test", RouteSettings("/t"))
    started = asyncio.Event()

    @app.post("/boom")
    async def boom(request: Request) -> dict:
        raise RuntimeError("a bug")

    @app.post("/slow")
    async def slow(request: Request) -> dict:
        started.set()
        await asyncio.sleep(60)
        return {}

    return app, started


async def call(app, path: str, body: bytes = b"{}", ctype: bytes = b"application/json") -> list[dict]:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "server": ("t", 80),
             "client": ("c", 1), "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]}
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def test_unhandled_exception_is_answered_and_counted_as_internal_error(recorded):
    app, _ = app_for_tests()
    sent = asyncio.run(call(app, "/boom"))
    assert sent[0]["status"] == 500
    assert json.loads(sent[1]["body"])["error"]["code"] == "internal_error"
    assert recorded == [(500, "internal_error")]


def test_client_disconnect_is_counted_as_499_never_500(recorded):
    app, started = app_for_tests()

    async def go() -> None:
        task = asyncio.create_task(call(app, "/slow"))
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()  # what Serve does to the replica's request when the client goes away
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert recorded == [(499, "client_disconnected")]


def test_body_checks_are_counted_with_their_codes(recorded):
    app, _ = app_for_tests()
    assert asyncio.run(call(app, "/boom", b"hi", b"text/plain"))[0]["status"] == 415
    assert asyncio.run(call(app, "/boom", b'{"a": "\xff"}'))[0]["status"] == 422
    assert recorded == [(415, "unsupported_media_type"), (422, "invalid_request")]


def test_openapi_documents_every_status_and_the_deadline_header():
    doc = document()
    posts = {path: doc["paths"][path]["post"] for path in ("/v1/translate", "/v1/classify")}
    for path, op in posts.items():
        assert {"413", "415", "422", "500", "503", "504"} <= set(op["responses"]), path
        assert "Retry-After" in op["responses"]["503"]["headers"]
        header = next(p for p in op["parameters"] if p["name"] == "X-Timeout-Ms")
        assert header["in"] == "header" and header["schema"]["exclusiveMinimum"] == 0
    assert "400" in posts["/v1/classify"]["responses"]
    content = posts["/v1/classify"]["requestBody"]["content"]
    items = content["application/json"]["schema"]["properties"]["images"]["items"]
    assert items["minLength"] == 1  # "" is a schema violation (422), documented as such
    assert content["multipart/form-data"]["schema"]["properties"]["return_attention"]["type"] == "boolean"
    for path in ("/readyz", "/v1/models"):
        assert "503" in doc["paths"][path]["get"]["responses"]


def auth_app(tokens: tuple[bytes, ...]):
    settings = RouteSettings("/t", tokens=tokens, public=("/healthz", "/static/"))
    app = make_api("test", settings)

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"ok": True}

    @app.post("/healthz")
    async def health(request: Request) -> dict:
        return {"ok": True}

    @app.post("/static/x")
    async def static(request: Request) -> dict:
        return {"ok": True}

    return app


async def call_with(app, path: str, headers: list[tuple[bytes, bytes]], method: str = "POST") -> list[dict]:
    body = b"{}"
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "server": ("t", 80),
             "client": ("c", 1), "headers": [(b"content-type", b"application/json"),
                                             (b"content-length", b"2"), *headers]}
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("headers,status", [
    ([], 401), ([(b"authorization", b"Bearer nope")], 401), ([(b"authorization", b"Basic a2V5")], 401),
    ([(b"authorization", b"Bearer key-one")], 200), ([(b"authorization", b"bearer key-two")], 200),
])
def test_bearer_tokens(recorded, headers, status):
    sent = asyncio.run(call_with(auth_app((b"key-one", b"key-two")), "/echo", headers))
    assert sent[0]["status"] == status
    if status == 401:
        hdrs = dict(sent[0]["headers"])
        assert hdrs[b"www-authenticate"] == b'Bearer realm="attnserve"'
        assert json.loads(sent[1]["body"])["error"]["code"] == "unauthorized"
        assert recorded[-1] == (401, "unauthorized")


def test_public_paths_and_auth_off(recorded):
    app = auth_app((b"key-one",))
    assert asyncio.run(call_with(app, "/healthz", []))[0]["status"] == 200
    assert asyncio.run(call_with(app, "/static/x", []))[0]["status"] == 200
    assert asyncio.run(call_with(auth_app(()), "/echo", []))[0]["status"] == 200  # no tokens: auth off


def test_v2_paths_answer_auth_and_body_errors_in_the_protocols_form(recorded):
    from service.protocols.v2.routes import error_response

    settings = RouteSettings("/", tokens=(b"key-one",), error_forms={"/v2": error_response})
    app = make_api("test", settings)

    @app.post("/v2/models/m/infer")
    async def infer(request: Request) -> dict:
        return {"ok": True}

    sent = asyncio.run(call_with(app, "/v2/models/m/infer", []))
    assert sent[0]["status"] == 401
    assert dict(sent[0]["headers"])[b"www-authenticate"] == b'Bearer realm="attnserve"'
    body = json.loads(sent[1]["body"])
    assert set(body) == {"error"} and isinstance(body["error"], str) and "Bearer" in body["error"]
    assert recorded[-1] == (401, "unauthorized")
    settings.tokens = ()
    sent = asyncio.run(call(app, "/v2/models/m/infer", b"x", ctype=b"text/plain"))
    assert sent[0]["status"] == 415 and isinstance(json.loads(sent[1]["body"])["error"], str)
    sent = asyncio.run(call(app, "/echo-v1", b"x", ctype=b"text/plain"))  # other paths keep the v1 form
    assert json.loads(sent[1]["body"])["error"]["code"] == "unsupported_media_type"


def test_tokens_from_env_and_file(tmp_path, monkeypatch):
    from service.config import AuthArgs

    (tmp_path / "tokens").write_text("# rotated weekly\nfile-token\n\n")
    monkeypatch.setenv("ATTNSERVE_API_TOKENS", "env-a, env-b")
    args = AuthArgs(tokens_file=str(tmp_path / "tokens"))
    assert args.tokens() == (b"env-a", b"env-b", b"file-token")
    monkeypatch.delenv("ATTNSERVE_API_TOKENS")
    assert AuthArgs().tokens() == ()


def test_v2_unserved_method_is_405_with_allow_in_the_protocols_form(recorded):
    from service.protocols.v2.routes import V2Config, build_router, error_response

    app = make_api("test", RouteSettings("/", media_types=(), error_forms={"/v2": error_response}))
    app.include_router(build_router(V2Config(specs={}, max_body_bytes=1024, max_batch={})))
    sent = asyncio.run(call_with(app, "/v2/models/m/infer", [], method="GET"))
    assert sent[0]["status"] == 405 and b"POST" in dict(sent[0]["headers"])[b"allow"]
    assert isinstance(json.loads(sent[1]["body"])["error"], str)
    sent = asyncio.run(call_with(app, "/v2/nothing-here", [], method="GET"))
    assert sent[0]["status"] == 404 and isinstance(json.loads(sent[1]["body"])["error"], str)


def test_bearer_scheme_documented_when_tokens_are_on(monkeypatch):
    monkeypatch.setenv("ATTNSERVE_API_TOKENS", "k")
    doc = document()
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {**doc["components"]["securitySchemes"][
        "bearerAuth"], "type": "http", "scheme": "bearer"}
    assert doc["paths"]["/v1/translate"]["post"]["security"] == [{"bearerAuth": []}]
    assert doc["paths"]["/v2/models/{name}/infer"]["post"]["security"] == [{"bearerAuth": []}]
    assert "security" not in doc["paths"]["/healthz"]["get"]  # public
    monkeypatch.delenv("ATTNSERVE_API_TOKENS")
    assert "securitySchemes" not in document()["components"]


def test_schema_publishes_the_configured_limits():
    from service.config import Limits

    doc = document(AppArgs(limits=Limits(max_texts=5, max_text_chars=300, max_images=7, max_image_bytes=3000)))
    texts = doc["components"]["schemas"]["TranslateRequest"]["properties"]["texts"]
    assert texts["maxItems"] == 5 and texts["items"]["maxLength"] == 300
    content = doc["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    images = content["application/json"]["schema"]["properties"]["images"]
    assert images["maxItems"] == content["multipart/form-data"]["schema"]["properties"]["images"]["maxItems"] == 7
    assert images["items"]["maxLength"] == 4004  # the longest base64 whose decoded size passes the check


def test_ints_pattern_is_the_range():
    import re

    from service.protocols.v1.bounds import ints_pattern

    p = re.compile(ints_pattern(-6, 5, 3))
    assert all(p.fullmatch(s) for s in ("0", "-6", "5", "-1,0,5"))
    assert not any(p.fullmatch(s) for s in ("6", "-7", "1,2,3,4", "1,", "01x", ""))
