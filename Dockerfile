# The RLM service: its server process (WEB_CONCURRENCY of them, default one), REPL workers as their children.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0

# tini as PID 1 reaps any orphaned process a killed REPL worker leaves behind.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# Dependencies first, in their own layer, so code changes do not reinstall them.
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY backend/ backend/
COPY frontend/ frontend/

# Never run as root: the server and its REPL workers run as this unprivileged user.
# Its history's folder exists in the image, owned by it, so that a volume mounted there starts out writable.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin app \
    && mkdir -p /home/app/.local/share/rlm-service \
    && chown -R app:app /home/app/.local
USER app

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["sh", "-c", "python -c \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:${PORT:-8000}/health', timeout=4)\""]

ENTRYPOINT ["/usr/bin/tini", "--"]
# HOST (above) and PORT, WEB_CONCURRENCY and every other setting come from the environment.
CMD ["python", "backend/main.py"]
