# MLflow tracking server: PostgreSQL backend, proxied S3/MinIO artifacts, basic auth.
#
# Build from the repository root:
#   docker build -f docker/mlflow.Dockerfile -t REGISTRY/calib-sweep-mlflow:TAG .
#
# Configuration is by environment only (no secret in the image):
#   PGHOST PGPORT PGDATABASE PGUSER PGPASSWORD [PGSSLMODE]  backend store and user store;
#       the image sets MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2:// and libpq fills it in
#   MLFLOW_AUTH_ADMIN_USERNAME MLFLOW_AUTH_ADMIN_PASSWORD    admin created on first start
#   MLFLOW_FLASK_SERVER_SECRET_KEY                           CSRF key of the auth app
#   AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY [MLFLOW_S3_ENDPOINT_URL]  artifact bucket
#   MLFLOW_SERVER_ALLOWED_HOSTS                              Host headers the server answers
# and the artifact bucket on the command line: --artifacts-destination s3://BUCKET/PREFIX

# ---- build: a virtual environment with the pinned server requirements ----
FROM python:3.11.13-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
COPY docker/mlflow/requirements.txt /tmp/requirements.txt
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt

# ---- runtime ----
FROM python:3.11.13-slim-bookworm
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mlflow
COPY --from=build /opt/venv /opt/venv
COPY docker/mlflow/basic_auth.ini /etc/mlflow/basic_auth.ini
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini \
    MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2://
# Nothing is written outside /tmp (the backend and artifacts are remote), so the root
# filesystem can be read-only.
WORKDIR /tmp
USER 10001:10001
EXPOSE 5000

# /health needs no credentials even with basic auth on.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]

ENTRYPOINT ["mlflow", "server"]
CMD ["--host", "0.0.0.0", "--port", "5000", "--app-name", "basic-auth", "--serve-artifacts", "--artifacts-destination", "s3://mlflow/artifacts"]
