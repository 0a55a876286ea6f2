"""The local backend process (`python -m backend serve`): a ZeroMQ loop that only routes
(`loop`), the request handlers, and the threads that load the engine and run jobs (`workers`).
It speaks `wire/`, runs each job through `pipeline/`, keeps it in `store/`, and is started and
watched by `supervision/`."""
