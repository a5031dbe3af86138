#!/bin/sh
# certbot: the first certificate of DOMAIN, handed to certctl-agent, and the
# hook that hands over every renewal. Run once as root; certbot's own timer
# (`certbot renew`) renews from then on.
set -eu
DOMAIN=${DOMAIN:-www.example.com}
ACME_SERVER=${ACME_SERVER:-https://acme-v02.api.letsencrypt.org/directory}
ACME_EMAIL=${ACME_EMAIL:-hostmaster@example.com}
HTTP_PORT=${HTTP_PORT:-80}
# The address the standalone server listens on; empty: every address.
HTTP_ADDRESS=${HTTP_ADDRESS:-}
CERTBOT_CONFIG_DIR=${CERTBOT_CONFIG_DIR:-/etc/letsencrypt}
CERTBOT_WORK_DIR=${CERTBOT_WORK_DIR:-/var/lib/letsencrypt}
CERTBOT_LOGS_DIR=${CERTBOT_LOGS_DIR:-/var/log/letsencrypt}

# 1. The hook where `certbot renew` runs it after every renewal. certbot runs
#    renewal-hooks/deploy/ only on renew, never on the first `certonly`.
hook=$CERTBOT_CONFIG_DIR/renewal-hooks/deploy/certctl
install -D -m 0755 "$(dirname "$0")/certbot-hook" "$hook"

# 2. The first certificate: the same hook, given with --deploy-hook (certbot
#    remembers it for renewals and runs it once even though it is also in
#    renewal-hooks/deploy/). Standalone mode answers http-01 on HTTP_PORT.
certbot certonly --non-interactive --agree-tos -m "$ACME_EMAIL" \
    --server "$ACME_SERVER" \
    --config-dir "$CERTBOT_CONFIG_DIR" --work-dir "$CERTBOT_WORK_DIR" \
    --logs-dir "$CERTBOT_LOGS_DIR" \
    --standalone --http-01-address "$HTTP_ADDRESS" --http-01-port "$HTTP_PORT" \
    --cert-name "$DOMAIN" -d "$DOMAIN" \
    --deploy-hook "$hook"
