# The reverse proxy of docker-compose.scale.yml: Debian's nginx with deploy/nginx.conf.template, as a non-root user.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx \
 && rm -rf /var/lib/apt/lists/*
COPY nginx.conf.template /etc/nginx/nginx.conf.template
COPY proxy-entrypoint.sh /usr/local/bin/proxy-entrypoint
# www-data, by number, as Kubernetes' runAsNonRoot needs it (see the service's Dockerfile)
USER 33:33
EXPOSE 8000 8001
CMD ["proxy-entrypoint"]
