#!/usr/bin/env bash
# The webhook's serving certificate without cert-manager, for kubectl users:
#   1. generate a CA and a serving certificate for <service>.<namespace>.svc (`pullbridge certs`),
#   2. store them in a kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt),
#   3. put the CA into every webhook's caBundle of the MutatingWebhookConfiguration.
# Re-run it to rotate: it renews when the stored certificate expires within RENEW_DAYS, and always
# (re)patches caBundle from the Secret. Run it from a CronJob or by hand; `helm install` with the
# default `webhook.certificates.mode=bootstrap` does all of this inside the webhook instead.
#
# Env: NAMESPACE (pullbridge) SERVICE (pullbridge-webhook) SECRET (pullbridge-webhook-tls)
#      WEBHOOK (pullbridge) DAYS (365) RENEW_DAYS (30) KUBECTL (kubectl) PULLBRIDGE (npx pullbridge)
set -euo pipefail

NAMESPACE=${NAMESPACE:-pullbridge}
SERVICE=${SERVICE:-pullbridge-webhook}
SECRET=${SECRET:-pullbridge-webhook-tls}
WEBHOOK=${WEBHOOK:-pullbridge}
DAYS=${DAYS:-365}
RENEW_DAYS=${RENEW_DAYS:-30}
KUBECTL=${KUBECTL:-kubectl}
PULLBRIDGE=${PULLBRIDGE:-npx pullbridge}

current=$($KUBECTL -n "$NAMESPACE" get secret "$SECRET" -o 'jsonpath={.data.tls\.crt}' 2>/dev/null || true)
if [ -n "$current" ] && echo "$current" | base64 -d | openssl x509 -noout -checkend $((RENEW_DAYS * 86400)) >/dev/null 2>&1; then
  echo "secret $NAMESPACE/$SECRET: certificate valid for more than $RENEW_DAYS days, kept"
else
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' EXIT
  $PULLBRIDGE certs --service "$SERVICE" --namespace "$NAMESPACE" --out "$dir" --days "$DAYS" >/dev/null
  $KUBECTL -n "$NAMESPACE" create secret generic "$SECRET" --type=kubernetes.io/tls \
    --from-file=tls.crt="$dir/tls.crt" --from-file=tls.key="$dir/tls.key" --from-file=ca.crt="$dir/ca.crt" \
    --dry-run=client -o yaml | $KUBECTL apply -f - >/dev/null
  echo "secret $NAMESPACE/$SECRET: new certificate for $SERVICE.$NAMESPACE.svc, valid $DAYS days"
fi

ca=$($KUBECTL -n "$NAMESPACE" get secret "$SECRET" -o 'jsonpath={.data.ca\.crt}')
count=$($KUBECTL get mutatingwebhookconfiguration "$WEBHOOK" -o 'jsonpath={range .webhooks[*]}x{end}')
patch="["
for ((i = 0; i < ${#count}; i++)); do
  [ "$i" -gt 0 ] && patch+=","
  patch+="{\"op\":\"add\",\"path\":\"/webhooks/$i/clientConfig/caBundle\",\"value\":\"$ca\"}"
done
patch+="]"
$KUBECTL patch mutatingwebhookconfiguration "$WEBHOOK" --type=json -p "$patch" >/dev/null
echo "mutatingwebhookconfiguration $WEBHOOK: caBundle set on ${#count} webhook(s)"
