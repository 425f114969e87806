# canary-audit image. Default: CUDA (PyTorch's official runtime image). CPU variant:
#   docker build --build-arg VARIANT=cpu -t canary-audit:cpu .
# Run:  docker run --gpus all -v "$PWD/runs:/work/runs" canary-audit run recipes/...
ARG VARIANT=cuda

FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime AS base-cuda

FROM python:3.11-slim AS base-cpu
RUN pip install --no-cache-dir torch==2.5.1 --index-url https://download.pytorch.org/whl/cpu

FROM base-${VARIANT}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_DISABLE_TELEMETRY=1
WORKDIR /opt/canary-audit
COPY pyproject.toml README.md ./
COPY audit ./audit
COPY recipes ./recipes
COPY canaries ./canaries
# torch is already in the base image, so pip keeps it and installs the rest of pyproject's dependencies.
RUN pip install --no-cache-dir .
WORKDIR /work
ENTRYPOINT ["audit"]
CMD ["run"]
