# syntax=docker/dockerfile:1
# workload-extproc: build the wheel (protos compiled by the build), then install
# only that wheel into a slim runtime image that runs as a non-root user.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos ./protos
COPY extproc ./extproc
RUN pip install --no-cache-dir build \
 && python -m build --wheel --outdir /dist .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin extproc
COPY --from=build /dist/ /tmp/dist/
RUN pip install --no-cache-dir /tmp/dist/workload_extproc-*.whl && rm -rf /tmp/dist
USER 10001
# Listening beyond loopback requires EXTPROC_ADMIN_TOKEN (the read APIs need it).
ENV EXTPROC_LISTEN=0.0.0.0:9002 \
    EXTPROC_ADMIN_LISTEN=0.0.0.0:9003 \
    PYTHONUNBUFFERED=1
EXPOSE 9002 9003
# `extproc health` dials the port the EXTPROC_* settings name (TLS or plaintext as it answers).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s \
  CMD ["extproc", "health", "--service", "liveness"]
ENTRYPOINT ["extproc"]
CMD ["serve"]
