# llmclock's OpenAI-compatible server on the CPU, as a non-root user.
#   docker build -t llmclock .
#   docker run --rm -p 8000:8000 -v "$PWD/runs/demo/ckpt:/models/ckpt:ro" llmclock
# Kubernetes manifests for this image: deploy/k8s/.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# g++: `pip install` compiles llmclock's C++ kernels (setup.py builds one library per ISA level).
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/llmclock
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY src ./src
# torch's CPU build first: a bare `torch` requirement would pull the multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
    && pip install '.[serve]'

RUN useradd --create-home --uid 10001 --user-group llmclock
USER 10001:10001
ENV HOME=/home/llmclock OMP_WAIT_POLICY=PASSIVE
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=60s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["llmclock"]
CMD ["serve", "--ckpt", "/models/ckpt", "--host", "0.0.0.0", "--port", "8000"]
