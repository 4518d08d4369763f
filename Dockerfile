# CPU image for one peer daemon. Build: docker build -t peer . (TORCH_VERSION selects the torch wheel.)
FROM python:3.11-slim
ARG TORCH_VERSION=2.13.0
RUN useradd --create-home --uid 10001 peer
WORKDIR /opt/peer
COPY pyproject.toml README.md ./
COPY peer ./peer
RUN python -m venv /opt/peer/venv \
    && /opt/peer/venv/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu \
    && /opt/peer/venv/bin/pip install --no-cache-dir .
ENV PATH=/opt/peer/venv/bin:$PATH GRPC_VERBOSITY=ERROR
USER peer
ENTRYPOINT ["peer"]
CMD ["run", "--config", "/etc/peer/peer.yaml"]
