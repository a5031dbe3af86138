#!/bin/sh
# lego: the first certificate of DOMAIN, then renewals when RENEW_DAYS are
# left, each handed to certctl-agent by lego-hook. Run it as root from a
# daily timer or cron job; it does nothing while the certificate is fresh.
set -eu
DOMAIN=${DOMAIN:-www.example.com}
ACME_SERVER=${ACME_SERVER:-https://acme-v02.api.letsencrypt.org/directory}
ACME_EMAIL=${ACME_EMAIL:-hostmaster@example.com}
HTTP_PORT=${HTTP_PORT:-80}
# The address lego's http-01 server listens on; empty: every address.
HTTP_ADDRESS=${HTTP_ADDRESS:-}
LEGO_PATH=${LEGO_PATH:-/var/lib/lego}
RENEW_DAYS=${RENEW_DAYS:-30}
# lego waits up to 8 minutes before a renewal so that timers on many hosts
# do not all hit the CA at once; NO_RANDOM_SLEEP=1 skips that when run by hand.
NO_RANDOM_SLEEP=${NO_RANDOM_SLEEP:-}
hook=$(dirname "$0")/lego-hook

set -- --accept-tos --email "$ACME_EMAIL" --server "$ACME_SERVER" \
    --path "$LEGO_PATH" --http --http.port "$HTTP_ADDRESS:$HTTP_PORT" \
    --domains "$DOMAIN"
if [ -e "$LEGO_PATH/certificates/$DOMAIN.crt" ]; then
    lego "$@" renew --days "$RENEW_DAYS" --renew-hook "$hook" \
        ${NO_RANDOM_SLEEP:+--no-random-sleep}
else
    lego "$@" run --run-hook "$hook"
fi
