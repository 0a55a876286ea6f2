"""What enters and leaves the backend: input images and meshes sent for texturing, checked
before anything runs; generated meshes and GLB files, checked before a job succeeds. Pure
functions (numpy, Pillow) used by `server/`, `studio/`, `pipeline/` and `engines/`."""
