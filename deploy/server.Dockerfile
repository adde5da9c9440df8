# The server image for deploy/compose.yaml: plasma with the [server] extra, as a non-root user.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
# The whole package: its shipped policy bundles (plasma/models) are package data.
COPY plasma ./plasma
RUN pip install --no-cache-dir ".[server]" \
    && useradd --system --uid 10001 --home-dir /var/lib/plasma-server plasma-server \
    && mkdir -p /var/lib/plasma-server && chown plasma-server: /var/lib/plasma-server
USER plasma-server
WORKDIR /var/lib/plasma-server
ENTRYPOINT []
CMD ["plasma-server", "--help"]
