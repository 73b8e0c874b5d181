"""The web demo at "/" and the offline /docs assets, served by the `api` app (no CDN: everything is local files).

The page (service/protocols/static/) calls the public API from the browser: POST /v1/translate (streamed as Server-Sent
Events), POST /v1/classify (JSON and `Accept: image/png`), GET /v1/models. Swagger UI's files come from the
`fastapi-offline` wheel, which ships them; without it /docs is a plain page linking /openapi.json.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from service.errors import ServiceError

STATIC = Path(__file__).parent / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".png": "image/png"}
DOCS_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")


class NotFound(ServiceError):
    status, code = 404, "not_found"


def _swagger_dir() -> Path | None:
    try:
        import fastapi_offline
    except ImportError:
        return None
    folder = Path(fastapi_offline.__file__).parent / "static"
    return folder if all((folder / name).is_file() for name in DOCS_ASSETS) else None


def _listing(root: Path) -> dict[str, Path]:
    # Only files present at start are served, by exact name: no path from a request ever reaches the filesystem.
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.suffix in MEDIA_TYPES and p.is_file()}


def docs_page() -> HTMLResponse:
    """Swagger UI from local assets, or a minimal page when they are not installed."""
    if _swagger_dir() is None:
        return HTMLResponse("<!doctype html><title>attnserve API</title><h1>attnserve API</h1>"
                            '<p>The OpenAPI document: <a href="/openapi.json">/openapi.json</a>. '
                            "(Install <code>fastapi-offline</code> for Swagger UI.)</p>")
    return get_swagger_ui_html(openapi_url="/openapi.json", title="attnserve API",
                               swagger_js_url="/static/docs/swagger-ui-bundle.js",
                               swagger_css_url="/static/docs/swagger-ui.css",
                               swagger_favicon_url="/static/docs/favicon.png")


def install(app: FastAPI) -> None:
    """Add GET / (the demo) and GET /static/... (its files and Swagger UI's) to the api app."""
    files = _listing(STATIC)
    swagger = _swagger_dir()
    if swagger is not None:
        files.update({f"docs/{name}": swagger / name for name in DOCS_ASSETS})

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type=MEDIA_TYPES[".html"],
                            headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name:path}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        path = files.get(name)
        if path is None:
            raise NotFound(f"no static file {name!r}", field="path")
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})
