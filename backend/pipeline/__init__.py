"""Running one job on the GPU: the runner walks an engine's stages (`engines/`) and the
out-of-memory ladder, predicts memory from a measured model and a learned per-GPU profile,
and keeps the GPU and the process's own memory (`heap`) clean between jobs. `server/` and
`python -m backend generate` run it; it checks the output with `checks/` and records the job
in `store/`."""
