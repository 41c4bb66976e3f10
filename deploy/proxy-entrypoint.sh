#!/bin/sh
# The proxy's start (deploy/proxy.Dockerfile): nginx reads no environment, so its body limit is written into its
# configuration here, from the VIT_MAX_UPLOAD_BYTES that the replicas read too (docker-compose.scale.yml passes it).
set -eu
limit="${VIT_MAX_UPLOAD_BYTES:-10485760}"
case "$limit" in
    "" | *[!0-9]*)
        echo "proxy: VIT_MAX_UPLOAD_BYTES='$limit': not a whole number of bytes" >&2
        exit 1
        ;;
esac
sed "s/@MAX_UPLOAD_BYTES@/$limit/g" /etc/nginx/nginx.conf.template >/tmp/nginx.conf
exec nginx -c /tmp/nginx.conf -g "daemon off;"
