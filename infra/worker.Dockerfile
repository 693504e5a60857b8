# Ray head and worker image for the search on a cluster (`ray up` and KubeRay): TensorFlow's GPU
# image (CUDA and cuDNN matching tensorflow==2.21.0) plus the project's pinned requirements and
# source. Build from the repository root; infra/worker.Dockerfile.dockerignore keeps the context
# small (BuildKit reads a <Dockerfile>.dockerignore beside the Dockerfile):
#
#   docker build -f infra/worker.Dockerfile -t REGISTRY/fer-worker:2.21.0 .
ARG BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu
FROM ${BASE_IMAGE}

# ray[default] adds the dashboard and job server the head needs (`ray job submit`, KubeRay);
# its version equals the ray pin in requirements.txt (tests/test_infra_configs.py checks).
ARG RAY_VERSION=2.60.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app \
    TF_CPP_MIN_LOG_LEVEL=2 \
    RAY_USAGE_STATS_ENABLED=0

# The Ray cluster launcher syncs files into the container with rsync over `docker exec`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends rsync openssh-client \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt ./
# The base image's TensorFlow satisfies the tensorflow pin; pip installs the rest as pinned.
RUN python -m pip install -r requirements.txt "ray[default]==${RAY_VERSION}" \
    && python -c "import tensorflow as tf, ray, mlflow; print(tf.__version__, ray.__version__, mlflow.__version__)"

COPY MLproject conda.yaml ./
COPY model ./model
COPY jobs ./jobs
COPY viz ./viz
COPY schema ./schema
COPY pipeline.py ./

# Ray starts its own processes (ray start / KubeRay); a plain `docker run` gets a shell.
CMD ["bash"]
