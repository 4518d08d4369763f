# CPU image for one peer daemon. Build: docker build -t peer . ; compose passes the same build arguments.
#   TORCH_VERSION     the torch release (the same default as scripts/_setup.sh)
#   TORCH_INDEX_URL   where torch comes from: PyTorch's CPU wheel index by default (no CUDA downloads)
#   TORCH_FIND_LINKS  optional: a wheel directory or URL searched too (a local mirror, an offline wheel cache)
# pip itself honours PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_CERT given as build arguments, for a private mirror.
FROM python:3.11-slim
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_CERT
RUN useradd --create-home --uid 10001 peer \
    && mkdir -p /home/peer/state /home/peer/certs /home/peer/ca \
    && chown peer:peer /home/peer/state /home/peer/certs /home/peer/ca
WORKDIR /opt/peer
# torch first, in its own layer: it is by far the largest and changes least.
RUN python -m venv /opt/peer/venv \
    && /opt/peer/venv/bin/pip install --no-cache-dir --disable-pip-version-check "torch==${TORCH_VERSION}" \
       --index-url "${TORCH_INDEX_URL}" ${TORCH_FIND_LINKS:+--find-links "${TORCH_FIND_LINKS}"}
COPY pyproject.toml README.md ./
COPY peer ./peer
RUN /opt/peer/venv/bin/pip install --no-cache-dir --disable-pip-version-check .
ENV PATH=/opt/peer/venv/bin:$PATH GRPC_VERBOSITY=ERROR
# The state, certificate and CA directories exist in the image, owned by the daemon's user: a fresh named volume
# mounted there copies it, ownership included, so the daemon can write to it (no root entrypoint needed).
USER peer
ENTRYPOINT ["peer"]
CMD ["run", "--config", "/etc/peer/peer.yaml"]
