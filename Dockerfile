# mcn-exporter: small, non-root, state on a volume, health-checked.
#   docker build -t mcn-exporter .
#   docker run -p 9880:9880 -v mcn-state:/var/lib/mcn-exporter \
#     -e MCN_WEBHOOK_SECRET=... -v ./config.yaml:/etc/mcn-exporter/config.yaml:ro mcn-exporter
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MCN_EXPORTER_CONFIG=/etc/mcn-exporter/config.yaml

WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
RUN pip install --no-cache-dir . \
    && rm -rf /src \
    && useradd --system --uid 10001 --home-dir /var/lib/mcn-exporter --shell /usr/sbin/nologin mcn \
    && mkdir -p /var/lib/mcn-exporter /etc/mcn-exporter \
    && chown mcn /var/lib/mcn-exporter

# The example config keeps its state in ./data, which is here: on the volume.
COPY config.example.yaml /etc/mcn-exporter/config.yaml
WORKDIR /var/lib/mcn-exporter
VOLUME ["/var/lib/mcn-exporter"]
USER mcn
EXPOSE 9880

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9880/healthz', timeout=4)"]

# gunicorn drains on SIGTERM, which `docker stop` sends.
STOPSIGNAL SIGTERM
ENTRYPOINT ["mcn-exporter"]
CMD ["serve"]
