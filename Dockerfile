# keytrace: collector, CLI and dashboard in one image.
#   docker build -t keytrace .
#   docker run -p 8501:8501 keytrace                                   (the demo on the embedded mock cluster)
#   docker run -p 8501:8501 -v "$PWD:/data" keytrace serve --bootstrap-servers broker:9092 --db /data/trace.duckdb --host 0.0.0.0

# Stage 1: compile the native recorder (a librdkafka interceptor plugin, and produce() as a C method;
# the image's Python headers are enough for the second).
FROM python:3.11-slim AS native
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY collector/native/kt_interceptor.c collector/native/kt_produce.c collector/native/build.py ./
RUN python build.py /opt/keytrace-native

# Stage 2: the runtime image, without a compiler.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    KEYTRACE_NATIVE_DIR=/opt/keytrace-native

RUN useradd --create-home --uid 10001 keytrace
WORKDIR /app

COPY pyproject.toml README.md ./
COPY collector ./collector
COPY dashboard ./dashboard
COPY sample_data ./sample_data
RUN pip install --no-cache-dir .
COPY --from=native /opt/keytrace-native /opt/keytrace-native

USER 10001
ENV KEYTRACE_SPOOL_DIR=/home/keytrace/.cache/keytrace/spool
EXPOSE 8501
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"]
ENTRYPOINT ["keytrace"]
CMD ["demo", "--host", "0.0.0.0", "--port", "8501"]
