# wsync service image. CPU by default; on GPU hosts build FROM a CUDA PyTorch image and install
# the vllm extra (pip install '.[vllm]') so the service can launch vLLM engines.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 WSYNC_HOST=0.0.0.0 WSYNC_CACHE_DIR=/var/lib/wsync
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
COPY clients ./clients
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir '.[postgres]'
# Build the embedded default model at image build time (deterministic, offline).
RUN python -m wsync.models.tiny /var/lib/wsync/models/wsync-tiny-qwen2-v1
EXPOSE 8321
HEALTHCHECK --interval=15s --timeout=5s CMD python -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:8321/readyz').status_code != 200)"
CMD ["wsync", "serve", "--host", "0.0.0.0", "--port", "8321"]
