# canary-audit image. Default: CUDA. CPU variant:
#   docker build --build-arg VARIANT=cpu -t canary-audit:cpu .
# Run:  docker run --gpus all -v "$PWD/runs:/work/runs" canary-audit run recipes/...
# torch is the version the test suite runs on. transformers 5.x disables torch < 2.6 (its is_torch_available), so an
# older base image (the pytorch/pytorch:2.5.1 runtime this file used) builds but cannot load a model;
# tests/test_packaging.py checks this pin against the installed transformers' own floor.
# PyPI's Linux x86_64 torch wheel is a CUDA build that brings its CUDA runtime and cuDNN as wheels: the image needs
# only the host's NVIDIA driver (docker --gpus all), not a CUDA base image.
ARG VARIANT=cuda
ARG TORCH_VERSION=2.13.0

FROM python:3.11-slim AS base-cuda
ARG TORCH_VERSION
RUN pip install --no-cache-dir torch==${TORCH_VERSION}

FROM python:3.11-slim AS base-cpu
ARG TORCH_VERSION
RUN pip install --no-cache-dir torch==${TORCH_VERSION} --index-url https://download.pytorch.org/whl/cpu

FROM base-${VARIANT}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_DISABLE_TELEMETRY=1
WORKDIR /opt/canary-audit
COPY pyproject.toml README.md ./
COPY audit ./audit
COPY recipes ./recipes
COPY canaries ./canaries
# torch is already installed, so pip keeps it and installs the rest of pyproject's dependencies.
RUN pip install --no-cache-dir .
WORKDIR /work
ENTRYPOINT ["audit"]
CMD ["run"]
