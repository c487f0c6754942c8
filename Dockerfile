FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DATABASE_URL=sqlite:////data/messenger.db \
    FORWARDED_ALLOW_IPS=127.0.0.1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY app.py ./
COPY core ./core
COPY storage ./storage
COPY schema ./schema
COPY sync ./sync
COPY webhook ./webhook
COPY routes ./routes
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --home /app app \
    && mkdir -p /data && chown app /data

USER app
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
# The same start command as the README's quick start, listening on all interfaces. The flags are
# routes/limits.py's SERVER_FLAGS: h11 bounds request headers at 64 KiB (httptools has no bound),
# and requests still running 5 s after `docker stop` are answered 503 and cut, which leaves the
# lifespan's shutdown (sync locks released) time to finish before Docker's SIGKILL at 10 s.
# X-Forwarded-For/-Proto are believed only from FORWARDED_ALLOW_IPS (uvicorn reads it; set it to
# the proxy's address, as compose.yaml does), never from anyone. One worker process: scale with
# replicas, or run `python app.py serve --host 0.0.0.0 --workers N` (/metrics then sums the workers
# through PROMETHEUS_MULTIPROC_DIR). `python app.py worker` runs the background work on its own.
CMD ["uvicorn", "app:app", "--host", "0.0.0.0", "--port", "8000", \
     "--http", "h11", "--h11-max-incomplete-event-size", "65536", "--timeout-graceful-shutdown", "5", \
     "--proxy-headers"]
