FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DATABASE_URL=sqlite:////data/messenger.db

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
# The same start command as the README's quick start (uvicorn app:app), listening on all interfaces.
CMD ["uvicorn", "app:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", "--forwarded-allow-ips", "*"]
