"""The HTTP/JSON gateway core: routes, transcoding and OpenAPI from `google.api.http`.

Pure functions of the gRPC descriptors: no server, no event loop, no I/O.
"""
