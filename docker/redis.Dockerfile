# Redis for the services (the registry of the next issue), from the same local base as the services image:
# Debian's redis-server, so no registry is needed.
ARG BASE=expertflow-base:bookworm
FROM ${BASE}
LABEL org.expertflow.image=redis
RUN set -eux; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; \
    rm -rf /var/lib/apt/lists/*; \
    mkdir -p /data; chown redis:redis /data
VOLUME ["/data"]
WORKDIR /data
USER redis
EXPOSE 6379
# In a container the network is the boundary: listen on every address, without protected mode (which refuses
# clients from other containers when no password is set); the data directory is the volume.
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--dir", "/data"]
