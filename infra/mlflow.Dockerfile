# The team tracking server: mlflow with PostgreSQL (psycopg) and S3/MinIO (boto3) support and the
# basic-auth app (flask-wtf). Build context: infra/ (see docker-compose.yml).
# Versions equal requirements.txt; tests/test_infra_configs.py fails when they drift apart.
FROM python:3.11-slim-bookworm

ARG MLFLOW_VERSION=3.17.2
ARG BOTO3_VERSION=1.44.8
ARG PSYCOPG_VERSION=3.3.9
ARG FLASK_WTF_VERSION=1.3.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install \
        "mlflow==${MLFLOW_VERSION}" \
        "boto3==${BOTO3_VERSION}" \
        "psycopg[binary]==${PSYCOPG_VERSION}" \
        "flask-wtf==${FLASK_WTF_VERSION}" \
    && useradd --system --uid 10001 --home-dir /srv/mlflow --create-home mlflow

COPY mlflow_server.py /usr/local/lib/fer/mlflow_server.py

# The server never needs root; the generated auth config goes to a tmpfs it owns (compose).
USER mlflow
WORKDIR /srv/mlflow
EXPOSE 5000

# Writes basic_auth.ini from the environment, then execs `mlflow server` with the command's args.
ENTRYPOINT ["python", "/usr/local/lib/fer/mlflow_server.py"]
CMD ["--app-name", "basic-auth", "--host", "0.0.0.0", "--port", "5000"]
