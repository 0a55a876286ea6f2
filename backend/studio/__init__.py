"""The studio server (many artists, many GPUs; docs/SCALE.md): a gateway speaking `wire/` over
CURVE-encrypted ZeroMQ, Celery queues over Redis (`dispatch`, `coord`), and one GPU worker per
card that keeps its own `server/` alive through `supervision/`. Jobs live in a shared `store/`.
Needs the `server` extra (Celery, redis-py); the add-on never imports it."""
