"""The ctxstream streamer: upload contexts, encode their KV at every level, stream chunks over HTTP.

Entry points: :func:`streamer.app.create_app`, :func:`streamer.server.serve_in_background`,
:class:`streamer.settings.Settings`, the ``serve``/``upload`` commands in :mod:`streamer.cli`.
"""
