# Relay in a container: the wheel built in one stage, installed in another,
# run as an unprivileged user.  docs/operations.md explains the choices.
#
#   docker build -t relay .
#   docker run --rm -p 4000:4000 -p 8080:8080 -p 127.0.0.1:9100:9100 relay

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY relay ./relay
COPY twisted ./twisted
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin relay
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels relay && rm -rf /wheels
USER relay
WORKDIR /tmp
# Relay over TCP, WebSocket and the demo page, metrics and health.
EXPOSE 4000 8080 9100
# 503 while draining or degraded: urlopen raises, and the check fails.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/healthz', timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "relay"]
CMD ["--port", "tcp:4000", "--websocket", "tcp:8080", "--metrics", "tcp:9100", "--log-format", "json"]
