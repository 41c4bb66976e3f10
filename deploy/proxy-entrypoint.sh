#!/bin/sh
# The proxy's start (deploy/proxy.Dockerfile). nginx reads no environment, so the replicas' settings that it must
# agree with are written into its configuration here, from the variables docker-compose.scale.yml passes it:
#   VIT_MAX_UPLOAD_BYTES: its body limit, the replicas' own;
#   VIT_REQUEST_TIMEOUT_S: its wait for a replica's answer, 20 s longer, so that a slow request gets the replica's
#   504 rather than nginx's, and is not sent again to another replica (proxy_next_upstream timeout).
set -eu
limit="${VIT_MAX_UPLOAD_BYTES:-10485760}"
timeout="${VIT_REQUEST_TIMEOUT_S:-10}"
refuse() {
    echo "proxy: $1" >&2
    exit 1
}
case "$limit" in "" | *[!0-9]*) refuse "VIT_MAX_UPLOAD_BYTES='$limit': not a whole number of bytes" ;; esac
case "$timeout" in "" | . | *[!0-9.]* | *.*.*) refuse "VIT_REQUEST_TIMEOUT_S='$timeout': not a number of seconds" ;; esac
wait_ms=$(awk -v seconds="$timeout" 'BEGIN { printf "%d", seconds * 1000 + 20000 }')
sed -e "s/@MAX_UPLOAD_BYTES@/$limit/g" -e "s/@READ_TIMEOUT@/${wait_ms}ms/g" /etc/nginx/nginx.conf.template >/tmp/nginx.conf
exec nginx -c /tmp/nginx.conf -g "daemon off;"
