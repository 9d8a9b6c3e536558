# The worker process for a real Supabase project: `docker build -t llm-token-relay .`
# then `docker run --env-file .env llm-token-relay` (DATABASE_URL, SUPABASE_URL,
# SUPABASE_SERVICE_ROLE_KEY, and OPENAI_API_KEY or GROQ_API_KEY), or `docker compose up`
# (docker-compose.yml). Run several for throughput: they share the queue (SKIP LOCKED)
# and never process a request twice.
#
# tests/e2e/test_plain_install.py replays these COPY lines, runs the install script and
# the HEALTHCHECK command, and applies the ENV lines to the worker it starts, so that
# what the image installs is what is tested (no Docker engine is needed for that).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY devstack ./devstack
COPY .ci/image-install.sh ./.ci/image-install.sh
# Only the worker's own dependencies: no devstack extra, no test tools.
ENV PIP_NO_CACHE_DIR=1
RUN sh .ci/image-install.sh
RUN useradd --system relay
USER relay
# /healthz, /readyz and /metrics must be reachable from outside the container.
ENV RELAY_LOG_JSON=true RELAY_HTTP_HOST=0.0.0.0 RELAY_HTTP_PORT=9464
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/readyz' % os.environ.get('RELAY_HTTP_PORT', '9464'); sys.exit(0 if urllib.request.urlopen(url, timeout=2).status == 200 else 1)"
ENTRYPOINT ["llm-relay"]
CMD ["run"]
