# The pipeline's programs (cdc-writer, cdc-source, cdc-sink, cdc-verify, cdc-status) in one image.
# Configured only through environment variables at run time (SOURCE_DSN, TARGET_DSN,
# KAFKA_BOOTSTRAP_SERVERS, TOPIC_PREFIX, TABLES, ...); no setting or secret is baked in.
#
#   docker build -t pg-kafka-cdc .
#   docker run --rm -e SOURCE_DSN=postgresql://... pg-kafka-cdc cdc-writer --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# psycopg2-binary and confluent-kafka ship wheels with libpq and librdkafka inside: no compiler needed.
# README.m[d] copies the README when there is one (pyproject.toml names it) and is no error otherwise.
COPY pyproject.toml README.m[d] ./
COPY pg_kafka_cdc ./pg_kafka_cdc
COPY schemas ./schemas
COPY writer ./writer
COPY source_connector ./source_connector
COPY sink_connector ./sink_connector
RUN pip install . \
    && cd / && rm -rf /src \
    && useradd --system --create-home --home-dir /home/cdc --uid 10001 --user-group cdc

WORKDIR /home/cdc
USER cdc

# Source and sink serve /healthz and /metrics on METRICS_PORT (8000 in docker-compose.yml).
EXPOSE 8000
CMD ["cdc-writer", "--help"]
