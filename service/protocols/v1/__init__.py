"""The /v1 API: its schemas, image decoding and the attention pictures."""
