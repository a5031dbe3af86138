#!/bin/sh
# uacme: the first certificate of DOMAIN, then renewals when RENEW_DAYS are
# left, handed to certctl-agent through its drop directory. uacme has no
# deploy hook: it exits 0 when it issued a certificate and 1 when none was
# due. http-01 through the hook uacme ships, writing to
# UACME_CHALLENGE_PATH, which your web server serves as
# http://DOMAIN/.well-known/acme-challenge/. Run it as root from a daily
# timer or cron job.
set -eu
DOMAIN=${DOMAIN:-www.example.com}
ACME_SERVER=${ACME_SERVER:-https://acme-v02.api.letsencrypt.org/directory}
ACME_EMAIL=${ACME_EMAIL:-hostmaster@example.com}
UACME_DIR=${UACME_DIR:-/etc/ssl/uacme}
UACME_CHALLENGE_PATH=${UACME_CHALLENGE_PATH:-/var/www/.well-known/acme-challenge}
RENEW_DAYS=${RENEW_DAYS:-30}
export UACME_CHALLENGE_PATH
drop_dir=${CERTCTL_DROP_DIR:-/var/lib/certctl/drop}
# The drop name: by default the domain.
name=${CERTCTL_DROP_NAME:-$DOMAIN}

mkdir -p "$UACME_CHALLENGE_PATH"
set -- --confdir "$UACME_DIR" --acme-url "$ACME_SERVER"
[ -e "$UACME_DIR/private/key.pem" ] || uacme "$@" --yes new "$ACME_EMAIL"
status=0
uacme "$@" --days "$RENEW_DAYS" --hook /usr/share/uacme/uacme.sh issue "$DOMAIN" || status=$?
case $status in
    0) ;;          # issued: hand it over below
    1) exit 0 ;;   # not due for renewal
    *) exit "$status" ;;
esac

tmp="$drop_dir/.$name.pem.tmp"
umask 077
cat "$UACME_DIR/private/$DOMAIN/key.pem" "$UACME_DIR/$DOMAIN/cert.pem" >"$tmp"
mv -f "$tmp" "$drop_dir/$name.pem"
