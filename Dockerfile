# syntax=docker/dockerfile:1
# zypher-ws: build a wheel, then install it alone into a slim runtime image.
# BASE_IMAGE: any image with python3 (>= 3.10) and venv, e.g. a local mirror of python:3.11-slim.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY zypher_ws ./zypher_ws
COPY static ./static
RUN python3 -m venv /build-venv \
    && /build-venv/bin/pip install --no-cache-dir "setuptools>=61" wheel \
    && /build-venv/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation -w /wheels .

FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/zypher/bin:$PATH \
    ZYPHER_HOST=0.0.0.0 \
    ZYPHER_PORT=8080 \
    ZYPHER_STORE=sqlite:////data/zypher.db
COPY --from=build /wheels /wheels
RUN python3 -m venv /opt/zypher \
    && /opt/zypher/bin/pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && mkdir -p /data && chown 10001:10001 /data
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
CMD ["zypher-ws", "serve"]
