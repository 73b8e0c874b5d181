"""What each model takes and gives over the v2 protocol, built from its artifact's manifest (shapes, grid,
classes, layers and heads), never retyped: inputs, outputs, request parameters and their docs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from service.config import CLASSIFIER_APP, TRANSLATOR_APP
from service.deployments.jobs import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TOP_K, MAX_BEAM, MAX_NEW_TOKENS
from service.protocols.v2 import codec
from service.protocols.v2.codec import BYTES, V2Error
from service.runtime import Manifest


class TensorSpec(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size.")


class Param(BaseModel):
    kind: type  # bool, int, str (one of `choices`), or list: whole numbers, comma-separated in a string ("0,2")
    default: Any
    lo: int | None = None  # int and list items
    hi: int | None = None
    doc: str = ""
    choices: tuple[str, ...] = ()

    model_config = {"arbitrary_types_allowed": True}

    def describe(self) -> str:
        kind = {list: "string of comma-separated integers", str: "string"}.get(self.kind, self.kind.__name__)
        bounds = "" if self.lo is None else f" {self.lo}..{self.hi if self.hi is not None else ''}"
        if self.choices:
            bounds = f" {' | '.join(self.choices)}"
        default = "" if self.default is None else f", default {self.default!r}"
        return f"{kind}{bounds}{default}: {self.doc}"


def _p(kind: type, default: Any, lo: int | None = None, hi: int | None = None, doc: str = "",
       choices: tuple[str, ...] = ()) -> Param:
    return Param(kind=kind, default=default, lo=lo, hi=hi, doc=doc, choices=choices)


# Request parameters every model takes (tritonclient sends these itself).
COMMON_PARAMS = {"binary_data_output": _p(bool, False, doc="every output as binary tensor data"),
                 "timeout": _p(int, None, 1, None, "microseconds; shortens (never extends) the deadline")}
ALL_ON = {"return_attention": True, "return_encoder_attention": True}  # for the docs


class ModelSpec:
    """One model's v2 face: its Serve app, inputs, outputs, parameters, and which outputs need which graph."""

    def __init__(self, app: str, inputs: list[TensorSpec], outputs: list[TensorSpec], default: tuple[str, ...],
                 extra: Callable[[dict[str, Any]], list[str]], needs: dict[str, str], params: dict[str, Param],
                 docs: dict[str, str], **facts: Any) -> None:
        self.app, self.inputs, self.outputs, self.params, self.docs = app, inputs, outputs, params, docs
        # `extra(parameters)`: the outputs added to the default ones when no `outputs` are listed (what the
        # return_* flags ask for); `needs`: output -> the boolean parameter whose attention graph it needs (the
        # other outputs come free with every result).
        self.default, self.extra, self.needs = default, extra, needs
        self.output_names = [o.name for o in outputs]
        self.facts = facts  # the manifest's numbers the codec checks against (image_size, grid, classes)

    def wanted(self, req: codec.Request, p: dict[str, Any]) -> list[codec.RequestOutput]:
        """The outputs to return: the requested ones, else the default ones (+ the attention ones asked for)."""
        if req.outputs is None:
            names = list(dict.fromkeys([*self.default, *self.extra(p)]))
            return [codec.RequestOutput(name=n) for n in names]
        seen = set()
        for o in req.outputs:
            if o.name not in self.output_names:
                raise V2Error(f"unknown output {o.name!r}; this model's outputs are {', '.join(self.output_names)}")
            if o.name in seen:
                raise V2Error(f"output {o.name!r} is requested twice")
            seen.add(o.name)
            for k in o.parameters:
                if k not in ("binary_data", "classification"):
                    raise V2Error(f"output {o.name!r}: unknown parameter {k!r}; allowed: binary_data, classification")
        for name, flag in self.needs.items():
            if name in seen and p.get(flag) is False:
                raise V2Error(f"{flag} is false, but {name} is requested")
        return list(req.outputs)

    def describe(self, labels: list[str] | None) -> dict[str, str]:
        """The metadata's `parameters`: what each tensor and request parameter means."""
        docs = {f"{'input' if t.name in {i.name for i in self.inputs} else 'output'}.{t.name}": self.docs[t.name]
                for t in [*self.inputs, *self.outputs]}
        for k, p in {**self.params, **COMMON_PARAMS}.items():
            docs[f"parameter.{k}"] = p.describe()
        extras = dict.fromkeys(n for method in ("rollout", "cls") for n in self.extra({**ALL_ON, "attention": method}))
        flags = " / ".join(k for k in ("return_attention", "return_encoder_attention") if k in self.params)
        docs["outputs.default"] = (f"without `outputs`: {', '.join(self.default)}; {flags} true add (as each "
                                   f"parameter says) {', '.join(extras)}")
        if labels:
            docs["labels"] = ",".join(labels)
        return docs


def _layers(n: int) -> tuple[int, int]:
    return -n, n - 1  # negative indices count from the last


def _translator_extra(p: dict[str, Any]) -> list[str]:
    out = ["SOURCE_TOKENS", "TARGET_TOKENS", "ALIGNMENT"] if p["return_attention"] else []
    return out + (["SOURCE_TOKENS", "ENCODER_ATTENTION"] if p["return_encoder_attention"] else [])


def translator_spec(m: Manifest) -> ModelSpec:
    dec, enc, heads = int(m.model["decoder_layers"]), int(m.model["encoder_layers"]), int(m.model["heads"])
    return ModelSpec(
        TRANSLATOR_APP,
        inputs=[TensorSpec(name="TEXT", datatype=BYTES, shape=[-1])],
        outputs=[TensorSpec(name="TRANSLATION", datatype=BYTES, shape=[-1]),
                 TensorSpec(name="SOURCE_TOKENS", datatype=BYTES, shape=[-1, -1]),
                 TensorSpec(name="TARGET_TOKENS", datatype=BYTES, shape=[-1, -1]),
                 TensorSpec(name="ALIGNMENT", datatype="FP32", shape=[-1, -1, -1]),
                 TensorSpec(name="ENCODER_ATTENTION", datatype="FP32", shape=[-1, -1, -1])],
        default=("TRANSLATION",), extra=_translator_extra,
        needs={"ALIGNMENT": "return_attention", "ENCODER_ATTENTION": "return_encoder_attention"},
        params={"beam_size": _p(int, 1, 1, MAX_BEAM, "1 = greedy decoding"),
                "max_new_tokens": _p(int, DEFAULT_MAX_NEW_TOKENS, 1, MAX_NEW_TOKENS,
                                     "cap on generated target tokens per text"),
                "return_attention": _p(bool, None, doc="implied by requesting ALIGNMENT; true with no `outputs` "
                                       "adds SOURCE_TOKENS, TARGET_TOKENS and ALIGNMENT"),
                "attention_layers": _p(list, None, *_layers(dec), "ALIGNMENT: decoder layers averaged, e.g. \"0,2\" "
                                       "(negative counts from the last; duplicates merged); default the last"),
                "attention_heads": _p(list, None, 0, heads - 1, "ALIGNMENT: heads averaged, e.g. \"1,3\"; "
                                      "default all"),
                "return_encoder_attention": _p(bool, None, doc="implied by requesting ENCODER_ATTENTION; true with "
                                               "no `outputs` adds SOURCE_TOKENS and ENCODER_ATTENTION"),
                "encoder_attention_layers": _p(list, None, *_layers(enc), "ENCODER_ATTENTION: encoder layers "
                                               "averaged, as attention_layers; default the last"),
                "encoder_attention_heads": _p(list, None, 0, heads - 1, "ENCODER_ATTENTION: heads averaged; "
                                              "default all")},
        docs={
            "TEXT": "UTF-8 English texts, shape [n] or [n, 1].",
            "TRANSLATION": "UTF-8 Spanish translations, [n].",
            "SOURCE_TOKENS": "[n, S]: each text's source pieces (without EOS), padded with empty strings to the "
                             "longest S.",
            "TARGET_TOKENS": "[n, T]: each translation's pieces (without BOS/EOS), padded with empty strings.",
            "ALIGNMENT": "[n, T, S] decoder cross-attention (target x source), mean over the parameters "
                         "`attention_layers` and `attention_heads` (output parameters `layers` and `heads`); row t "
                         "of text i sums to 1 over its source tokens; zero where TARGET_TOKENS or SOURCE_TOKENS is "
                         "padding. Runs the decoder's attention graph.",
            "ENCODER_ATTENTION": "[n, S, S] encoder self-attention (source x source: row i is what source token i "
                                 "attended to), mean over `encoder_attention_layers` and `encoder_attention_heads` "
                                 "(output parameters `layers` and `heads`); EOS dropped, rows sum to 1; zero where "
                                 "SOURCE_TOKENS is padding. Runs the encoder's attention graph.",
        })


def _classifier_maps(p: dict[str, Any]) -> list[str]:
    if not p["return_attention"]:
        return []
    return ["CLS_ATTENTION" if p["attention"] == "cls" else "ROLLOUT"]


def classifier_spec(m: Manifest) -> ModelSpec:
    size, grid, classes = int(m.model["image_size"]), int(m.model["grid"]), int(m.model["classes"])
    layers, heads = int(m.model["layers"]), int(m.model["heads"])
    g = f"{grid}, {grid}"
    return ModelSpec(
        CLASSIFIER_APP,
        inputs=[TensorSpec(name="IMAGE", datatype="UINT8", shape=[-1, size, size]),
                TensorSpec(name="IMAGE_BYTES", datatype=BYTES, shape=[-1])],
        outputs=[TensorSpec(name="PROBABILITIES", datatype="FP32", shape=[-1, classes]),
                 TensorSpec(name="LABEL", datatype=BYTES, shape=[-1]),
                 TensorSpec(name="TOP_K_LABELS", datatype=BYTES, shape=[-1, -1]),
                 TensorSpec(name="TOP_K_SCORES", datatype="FP32", shape=[-1, -1]),
                 TensorSpec(name="ROLLOUT", datatype="FP32", shape=[-1, grid, grid]),
                 TensorSpec(name="CLS_ATTENTION", datatype="FP32", shape=[-1, grid, grid])],
        default=("PROBABILITIES", "LABEL", "TOP_K_LABELS", "TOP_K_SCORES"), extra=_classifier_maps,
        needs={"ROLLOUT": "return_attention", "CLS_ATTENTION": "return_attention"},
        params={"top_k": _p(int, DEFAULT_TOP_K, 1, classes, "classes in TOP_K_LABELS and TOP_K_SCORES"),
                "return_attention": _p(bool, None, doc="implied by requesting ROLLOUT or CLS_ATTENTION; true with no "
                                       "`outputs` adds the map `attention` names"),
                "attention": _p(str, None, choices=("rollout", "cls"), doc="the map: ROLLOUT (rollout, the default) "
                                "or CLS_ATTENTION (cls); implied by requesting one of them (one map per request)"),
                "attention_layers": _p(list, None, *_layers(layers), "CLS_ATTENTION only: layers averaged, e.g. "
                                       "\"0,5\" (negative counts from the last; duplicates merged); default all"),
                "attention_heads": _p(list, None, 0, heads - 1, "CLS_ATTENTION only: heads averaged, e.g. \"0,2\"; "
                                      "default all")},
        docs={
            "IMAGE": f"UINT8 grayscale pixels, [n, {size}, {size}] or [n, {size}, {size}, 1], Fashion-MNIST style "
                     "(light object on black).",
            "IMAGE_BYTES": "Encoded PNG or JPEG files, [n] or [n, 1], any size or mode (converted like "
                           "/v1/classify; not an image: 400). With IMAGE too, the IMAGE rows come first, then these.",
            "PROBABILITIES": f"[n, {classes}] class probabilities in label order (config parameter `labels`). Output "
                             "parameter `classification: k` returns BYTES [n, k] \"score:index:label\" instead.",
            "LABEL": "[n] the most likely label.",
            "TOP_K_LABELS": "[n, top_k] labels, most likely first.",
            "TOP_K_SCORES": "[n, top_k] their probabilities.",
            "ROLLOUT": f"[n, {g}] attention rollout of CLS onto the patches over all layers (sums to 1; as /v1's "
                       "`attention: rollout`). Runs the rollout graph. Output parameters `method`, `layers`, `heads`.",
            "CLS_ATTENTION": f"[n, {g}] the CLS token's attention over the patches, mean over the parameters "
                             "`attention_layers` and `attention_heads`, renormalised (sums to 1; as /v1's `attention: "
                             "cls`). Runs the CLS graph. Output parameters `method`, `layers`, `heads`. Not with "
                             "ROLLOUT in one request. All layers averaged (the default) and ROLLOUT beat random order "
                             "at finding the evidence; a single layer's map need not (layer 0 alone is worse than "
                             "random; docs/BENCHMARKS.md).",
        }, image_size=size, grid=grid, classes=classes)
