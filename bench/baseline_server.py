"""The bench's reference: a minimal single-process FastAPI + ONNX Runtime server on the same artifacts.

No Ray, no batching, no metrics: one uvicorn process, plain `def` routes (FastAPI runs them in its thread
pool), the same runtime, preprocessing and response schemas as attnserve. Started by `attnserve bench http`:
    ATTNSERVE_ARTIFACTS=artifacts uvicorn bench.baseline_server:app --port 8100
$ATTNSERVE_BASELINE_DEVICE picks ONNX Runtime's provider: cpu (default) or cuda (fails at start without it).
"""

import base64
import os

import numpy as np
from fastapi import FastAPI

from service.config import AppArgs
from service.protocols.v1.preprocess import to_model_input
from service.protocols.v1.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    LabelScore,
    Prediction,
    TranslateRequest,
    TranslateResponse,
    Translation,
)
from service.runtime import ClassifierRuntime, TranslatorRuntime, find_artifact
from service.runtime.sessions import resolve_device

args = AppArgs()
root = args.resolved_root()
# "cuda" without the provider: DeviceError at start, before any artifact is looked up
device = resolve_device(os.environ.get("ATTNSERVE_BASELINE_DEVICE", "cpu"))
translator = TranslatorRuntime(find_artifact(root, args.translator.name), precision="fp32", device=device)
classifier = ClassifierRuntime(find_artifact(root, args.classifier.name), precision="fp32", device=device)
app = FastAPI(title="baseline")


@app.post("/v1/translate", response_model=TranslateResponse)
def translate(req: TranslateRequest) -> TranslateResponse:
    results = translator.translate(req.texts, beam_size=req.beam_size, max_new_tokens=req.max_new_tokens)
    return TranslateResponse(model=translator.name, version=translator.version,
                             translations=[Translation(text=r.text) for r in results])


@app.post("/v1/classify", response_model=ClassifyResponse)
def classify(req: ClassifyRequest) -> ClassifyResponse:
    lim = args.limits
    images = np.stack([to_model_input(base64.b64decode(b), field="images", max_bytes=lim.max_image_bytes,
                                      max_pixels=lim.max_image_pixels) for b in req.images])
    probs = classifier.classify(classifier.normalize(images)).probs
    out = []
    for p in probs:
        order = np.argsort(-p, kind="stable")[: req.top_k]
        out.append(Prediction(label=classifier.labels[int(order[0])], index=int(order[0]), score=float(p[order[0]]),
                              top_k=[LabelScore(label=classifier.labels[int(j)], score=float(p[j])) for j in order]))
    return ClassifyResponse(model=classifier.name, version=classifier.version, predictions=out)
