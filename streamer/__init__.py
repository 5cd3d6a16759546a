"""The ctxstream streamer: upload contexts, encode their KV at every level, stream chunks over HTTP.

Entry points: :func:`ctxstream.streamer.app.create_app`, :func:`ctxstream.streamer.server.serve_in_background`,
:class:`ctxstream.streamer.settings.Settings`, the ``serve``/``upload`` commands in :mod:`ctxstream.streamer.cli`.
"""
