# The EPP image: the ext_proc server and its plugins only (no torch, no vLLM).
# docker build -f deploy/docker/epp.Dockerfile -t ghcr.io/inference-epp/epp:0.1.0 .
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY epp epp
COPY filters filters
COPY scorers scorers
COPY profiles profiles
RUN pip install --no-cache-dir -c constraints.txt . && python -c "import epp.server, sys; assert 'torch' not in sys.modules"
ENV EPP_PROFILES_DIR=/app/profiles
USER 65532:65532
EXPOSE 9002 9003 9090
ENTRYPOINT ["epp"]
CMD ["serve", "--help"]
