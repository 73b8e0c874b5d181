"""Protocol adapters: each decodes its wire format into the replicas' jobs and encodes their results.

`asgi` is the plumbing every route shares (FastAPI app, deadlines, error bodies); `v1/` the JSON and multipart
API, `v2/` the Open Inference Protocol, `demo` the browser page and Swagger UI's files.
"""
