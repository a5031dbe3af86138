#!/bin/sh
# dehydrated: the first certificate of DOMAIN, then renewals when
# RENEW_DAYS are left, each handed to certctl-agent by dehydrated-hook.
# http-01 through WELLKNOWN, a directory your web server serves as
# http://DOMAIN/.well-known/acme-challenge/. Run it as root from a daily
# timer or cron job.
set -eu
DOMAIN=${DOMAIN:-www.example.com}
ACME_SERVER=${ACME_SERVER:-https://acme-v02.api.letsencrypt.org/directory}
ACME_EMAIL=${ACME_EMAIL:-hostmaster@example.com}
DEHYDRATED_DIR=${DEHYDRATED_DIR:-/var/lib/dehydrated}
WELLKNOWN=${WELLKNOWN:-/var/www/dehydrated}
RENEW_DAYS=${RENEW_DAYS:-30}

mkdir -p "$DEHYDRATED_DIR" "$WELLKNOWN"
cat >"$DEHYDRATED_DIR/config" <<CONFIG
CA="$ACME_SERVER"
CONTACT_EMAIL="$ACME_EMAIL"
BASEDIR="$DEHYDRATED_DIR"
WELLKNOWN="$WELLKNOWN"
CHALLENGETYPE="http-01"
KEY_ALGO="prime256v1"
RENEW_DAYS="$RENEW_DAYS"
HOOK="$(cd "$(dirname "$0")" && pwd)/dehydrated-hook"
CONFIG

dehydrated --config "$DEHYDRATED_DIR/config" --register --accept-terms >/dev/null
dehydrated --config "$DEHYDRATED_DIR/config" --cron --domain "$DOMAIN"
