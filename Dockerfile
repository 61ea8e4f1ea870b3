# One image for every Meterline process; docker-compose.yml picks the process with `meterline run NAME`.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY meterline ./meterline
COPY streams ./streams
COPY api ./api
COPY ledger ./ledger
COPY analytics ./analytics
RUN pip install . && useradd --create-home --uid 10001 meterline
USER meterline
EXPOSE 8080
ENTRYPOINT ["meterline"]
CMD ["run", "api"]
