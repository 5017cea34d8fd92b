# The P/D proxy image, with the KV-transfer backends and the bandwidth profiler (torch).
# Pass --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 for the CUDA build the profiler Job needs.
# docker build -f deploy/docker/proxy.Dockerfile -t ghcr.io/inference-epp/pd-proxy:0.1.0 .
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir --extra-index-url ${TORCH_INDEX} -c constraints.txt '.[backends,bench]'
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["pd-proxy"]
