# One image for every Gravity service in docker-compose.yml: the gateway and the simulated backends.
FROM python:3.11-slim

# The project's files stay in /app so the bundled tiktoken BPE files are used instead of a download
# (`pip install .` puts the packages in site-packages, away from config/).
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TIKTOKEN_CACHE_DIR=/app/config/tiktoken

COPY . .
RUN pip install . && gravity --help >/dev/null

# The embedded-Redis fallback writes under .gravity/; everything else is read-only.
RUN useradd --system --home-dir /app gravity && mkdir -p /app/.gravity && chown gravity /app/.gravity
USER gravity

EXPOSE 8080
ENTRYPOINT ["gravity"]
CMD ["serve", "--config", "/etc/gravity/gravity.yaml"]
