"""The decode engine through real HTTP: streaming, continuous batching, and work dropped for absent clients."""

from __future__ import annotations

import threading
import time

import httpx
from service_helpers import LONG_DECODE as LONG
from service_helpers import events, scrape, value, wait_for

TEXTS = ["Where is the library?", "The cat sleeps on the red chair.", ""]



def test_stream_rebuilds_the_final_response(service):
    body = {"texts": TEXTS, "return_attention": True}
    with service.client() as c:
        plain = c.post("/v1/translate", json=body).json()
        with c.stream("POST", "/v1/translate", json={**body, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            got = events(r.iter_lines())
    kinds = [k for k, _ in got]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"token"}
    final = got[-1][1]
    assert [t["text"] for t in final["translations"]] == [t["text"] for t in plain["translations"]]
    for i, tr in enumerate(final["translations"]):
        toks = [d for k, d in got if k == "token" and d["index"] == i]
        att = tr["attention"]
        assert [d["token"] for d in toks] == att["target_tokens"]  # one event per generated token, in order
        assert (toks[-1]["text"] if toks else "") == tr["text"]  # the text so far ends as the translation
        for d, row in zip(toks, att["weights"], strict=True):  # each event's alignment row is the final's row
            assert max(abs(a - b) for a, b in zip(d["alignment"], row, strict=True)) < 1e-5
        assert tr["text"] == plain["translations"][i]["text"]


def test_beam_stream_sends_only_the_final_event(service):
    with service.client() as c, c.stream("POST", "/v1/translate",
                                         json={"texts": TEXTS[:1], "beam_size": 4, "stream": True}) as r:
        got = events(r.iter_lines())
    assert [k for k, _ in got] == ["done"] and got[0][1]["translations"][0]["text"]


def test_short_request_is_not_held_by_a_long_one(service):
    done: dict[str, float] = {}

    def post(name: str, body: dict) -> None:
        with service.client() as c:
            assert c.post("/v1/translate", json=body).status_code == 200
        done[name] = time.monotonic()

    long_body = {"texts": [LONG] * 32, "max_new_tokens": 256}
    long_t = threading.Thread(target=post, args=("long", long_body))
    long_t.start()
    time.sleep(0.5)  # the long request is decoding
    post("short", {"texts": ["Hello."], "max_new_tokens": 8})
    long_t.join()
    assert done["short"] < done["long"], done


def dropped(url: str, reason: str) -> float:
    return value(scrape(url), "ray_attnserve_engine_dropped_total", reason=reason)


def slots_free(s) -> bool:
    return value(s, "ray_attnserve_engine_slots_in_use") == 0


def expect_dropped(service, reason: str, before: float, n: int) -> None:
    """Exactly ``n`` more texts dropped for ``reason``, and no slot left in use."""
    def count(s) -> float:
        return value(s, "ray_attnserve_engine_dropped_total", reason=reason)

    after = wait_for(service.metrics_url, lambda s: count(s) >= before + n and slots_free(s), timeout_s=30)
    assert count(after) == before + n
    assert slots_free(after)


def test_disconnected_client_frees_its_slots(service):
    before = dropped(service.metrics_url, "disconnect")
    try:
        with httpx.Client(base_url=service.base, timeout=0.3) as c:
            c.post("/v1/translate", json={"texts": [LONG] * 16, "max_new_tokens": 256})
    except httpx.TimeoutException:
        pass  # the client hangs up mid-decode
    expect_dropped(service, "disconnect", before, 16)


def test_expired_request_is_dropped_as_deadline(service):
    before = dropped(service.metrics_url, "deadline")
    with service.client() as c:
        r = c.post("/v1/translate", json={"texts": [LONG] * 8, "max_new_tokens": 256},
                   headers={"X-Timeout-Ms": "300"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    expect_dropped(service, "deadline", before, 8)


def test_client_leaving_a_stream_frees_its_slots(service):
    before = dropped(service.metrics_url, "disconnect")
    body = {"texts": [LONG] * 4, "max_new_tokens": 256, "stream": True}
    with service.client() as c, c.stream("POST", "/v1/translate", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("event: token"):
                break  # hang up after the first token
    expect_dropped(service, "disconnect", before, 4)


def test_alignment_layers_and_heads_are_chosen_per_request(service):
    body = {"texts": TEXTS[:1], "return_attention": True}
    with service.client() as c:
        default = c.post("/v1/translate", json=body).json()["translations"][0]["attention"]
        chosen = c.post("/v1/translate", json={**body, "attention_layers": [0], "attention_heads": [1, 2]}).json()
        bad_layer = c.post("/v1/translate", json={**body, "attention_layers": [7]})
        bad_head = c.post("/v1/translate", json={**body, "attention_heads": [9]})
    att = chosen["translations"][0]["attention"]
    assert (default["layers"], default["heads"]) == ([2], [0, 1, 2, 3])  # the last layer, mean of all heads
    assert (att["layers"], att["heads"]) == ([0], [1, 2])
    assert att["target_tokens"] == default["target_tokens"]  # the choice changes the map, never the tokens
    assert att["weights"] != default["weights"]
    assert all(abs(sum(row) - 1) < 1e-4 for row in att["weights"])
    for r, field in ((bad_layer, "attention_layers"), (bad_head, "attention_heads")):
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
