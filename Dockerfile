# The worker process for a real Supabase project: `docker build -t llm-token-relay .`
# then `docker run --env-file .env llm-token-relay` (DATABASE_URL, SUPABASE_URL,
# SUPABASE_SERVICE_ROLE_KEY, and OPENAI_API_KEY or GROQ_API_KEY). Run several for
# throughput: they share the queue (SKIP LOCKED) and never process a request twice.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY devstack ./devstack
# Only the worker's own dependencies: no devstack extra, no test tools.
RUN pip install --no-cache-dir . && useradd --system relay
USER relay
ENV RELAY_LOG_JSON=true RELAY_HTTP_HOST=0.0.0.0 RELAY_HTTP_PORT=9464
EXPOSE 9464
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9464/readyz').status == 200 else 1)"
ENTRYPOINT ["llm-relay"]
CMD ["run"]
