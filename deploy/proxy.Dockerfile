# The reverse proxy of docker-compose.scale.yml: Debian's nginx with deploy/nginx.conf, as a non-root user.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends nginx \
 && rm -rf /var/lib/apt/lists/*
COPY nginx.conf /etc/nginx/nginx.conf
USER www-data
EXPOSE 8000
CMD ["nginx", "-g", "daemon off;"]
