"""The wire: the protocol (signed multipart envelopes, message types, the connection file) and
the clients that speak it, to a local backend (`client`) or a studio gateway (`remote`, with
its CURVE keys in `curvekeys`). Standard library and pyzmq only, so the add-on imports it in
Blender's Python; `server/`, `supervision/` and `studio/` speak it too."""
