{{- define "pullbridge.fullname" -}}
{{- if contains "pullbridge" .Release.Name -}}{{ .Release.Name | trunc 50 | trimSuffix "-" }}{{- else -}}{{ printf "%s-pullbridge" .Release.Name | trunc 50 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "pullbridge.labels" -}}
app.kubernetes.io/name: pullbridge
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "pullbridge.selector" -}}
app.kubernetes.io/name: pullbridge
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pullbridge.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "pullbridge.brokerSecret" -}}
{{ .Values.broker.existingSecret | default (printf "%s-broker" (include "pullbridge.fullname" .)) }}
{{- end -}}

{{/* Pod security shared by both workloads: non-root, read-only root filesystem, no privileges. */}}
{{- define "pullbridge.podSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "pullbridge.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* config.yaml, rendered from values; credentials and CA bundles become mounted files. */}}
{{- define "pullbridge.config" -}}
proxy:
  host: {{ .Values.proxy.host }}
  port: {{ .Values.proxy.port }}
webhook:
  pullSecretName: {{ .Values.webhook.pullSecretName }}
  optOutLabel: {{ .Values.webhook.optOutLabel }}
  namespace: {{ .Release.Namespace }}
  excludedNamespaces: {{ .Values.webhook.excludedNamespaces | toJson }}
broker:
  keyFiles: [/etc/pullbridge/broker/key-0, /etc/pullbridge/broker/key-1]
{{- if .Values.cache.enabled }}
cache:
  path: /var/lib/pullbridge/cache
  maxBytes: {{ .Values.cache.maxBytes | toJson }}
  minFreeBytes: {{ .Values.cache.minFreeBytes | toJson }}
  minFreeInodes: {{ .Values.cache.minFreeInodes | toJson }}
  tagTTLSeconds: {{ .Values.cache.tagTTLSeconds | int }}
  staleIfErrorSeconds: {{ .Values.cache.staleIfErrorSeconds | int }}
  credentialTTLSeconds: {{ .Values.cache.credentialTTLSeconds | int }}
  reconfirmSeconds: {{ .Values.cache.reconfirmSeconds | int }}
  {{- with include "pullbridge.sharedConfig" . }}
  shared:
    {{- . | nindent 4 }}
  {{- end }}
{{- end }}
registries:
{{- range .Values.registries }}
  - name: {{ .name }}
    match: {{ .match | toJson }}
    upstream: {{ .upstream }}
    auth: {{ mergeOverwrite (dict "mode" "broker") (.auth | default dict) | toJson }}
    {{- with .repositories }}
    repositories: {{ . | toJson }}
    {{- end }}
    {{- with .namespaces }}
    namespaces: {{ . | toJson }}
    {{- end }}
    {{- /* Two Secrets the proxy Pods always mount whole, so that no rule changes their template:
         the chart's (inline credentials) and the webhook's copy of each credentialsSecret. A
         rewrite: never rule's credential is in a pair of its own, which the webhook mounts too: it
         writes that credential into pull secrets, and must not hold any other rule's. */}}
    {{- if eq (toString .rewrite) "never" }}
    {{- if .credentials }}
    credentials:
      usernameFile: /etc/pullbridge/pull-secret-credentials/{{ .name }}.username
      passwordFile: /etc/pullbridge/pull-secret-credentials/{{ .name }}.password
    {{- end }}
    {{- else if .credentialsSecret }}
    credentials:
      usernameFile: /etc/pullbridge/credentials-mirror/{{ .name }}.username
      passwordFile: /etc/pullbridge/credentials-mirror/{{ .name }}.password
    {{- else if .credentials }}
    credentials:
      usernameFile: /etc/pullbridge/credentials/{{ .name }}.username
      passwordFile: /etc/pullbridge/credentials/{{ .name }}.password
    {{- end }}
    {{- if or .caBundle .insecureSkipVerify }}
    tls:
      {{- if .caBundle }}
      caFile: /etc/pullbridge/config/ca-{{ .name }}.crt
      {{- end }}
      insecureSkipVerify: {{ .insecureSkipVerify | default false }}
    {{- end }}
    {{- with .forwardProxy }}
    forwardProxy:
      url: {{ .url }}
      mode: {{ .mode | default "connect" }}
      headers: {{ .headers | default dict | toJson }}
    {{- end }}
    {{- if eq (toString .cache) "false" }}
    cache: false
    {{- end }}
    {{- with .revalidate }}
    revalidate: {{ . }}
    {{- end }}
    {{- with .redirects }}
    redirects: {{ . | toJson }}
    {{- end }}
    {{- if eq (toString .verifyBlobDigests) "false" }}
    verifyBlobDigests: false
    {{- end }}
    {{- with .rewrite }}
    rewrite: {{ . }}
    {{- end }}
    {{- if .shareUpstreamCredentials }}
    shareUpstreamCredentials: true
    {{- end }}
    {{- with .onProbeFailure }}
    onProbeFailure: {{ . }}
    {{- end }}
    {{- if .pinDigest }}
    pinDigest: true
    {{- end }}
    {{- /* The keys are files of the config ConfigMap itself (configmap.yaml): kubelet swaps a
         ConfigMap volume whole, so config.yaml comes with its keys (a new key's link follows the
         swap at once; the webhook retries a config whose file is missing), and a rule change changes
         no Pod template. */}}
    {{- $ruleName := .name }}
    {{- with .verify }}
    verify:
      cosign:
        publicKeyFiles:
        {{- range $index, $_ := .cosign.publicKeys }}
          - {{ include "pullbridge.cosignKeyFile" (list $ruleName $index) }}
        {{- end }}
      onFailure: {{ .onFailure | default "deny" }}
    {{- end }}
{{- end }}
{{- if not .Values.registries }} []{{ end }}
{{- end -}}

{{/* A verify rule's cosign public key as the config ConfigMap holds it (list rule-name index): the key,
     and under /etc/pullbridge/config the file, in the webhook and the proxies alike. */}}
{{- define "pullbridge.cosignKeyName" -}}
cosign-{{ index . 0 }}-{{ index . 1 }}.pub
{{- end -}}

{{- define "pullbridge.cosignKeyFile" -}}
/etc/pullbridge/config/{{ include "pullbridge.cosignKeyName" . }}
{{- end -}}

{{/* The Secrets with the rules' upstream credentials: the chart's, and the mirror the webhook
     keeps of the credentialsSecret each rule names (a Pod can mount only Secrets its template names). */}}
{{- define "pullbridge.credentialsSecret" -}}
{{ include "pullbridge.fullname" . }}-upstream-credentials
{{- end -}}

{{- define "pullbridge.credentialsMirrorSecret" -}}
{{ include "pullbridge.fullname" . }}-upstream-credentials-mirror
{{- end -}}

{{/* The inline credentials of rewrite: never rules only, mounted by the webhook as well as the proxies. */}}
{{- define "pullbridge.pullSecretCredentialsSecret" -}}
{{ include "pullbridge.fullname" . }}-pull-secret-credentials
{{- end -}}

{{/* credentialsSecret of each rule that has one, as the webhook reads it: rule name -> Secret name. */}}
{{- define "pullbridge.credentialSources" -}}
{{- $sources := dict -}}
{{- range .Values.registries }}
{{- if .credentialsSecret }}{{ $_ := set $sources .name .credentialsSecret }}{{ end }}
{{- end }}
{{- toJson $sources -}}
{{- end -}}

{{/* The pull secret names of the rewrite: never rules (src/rules/upstreamsecret.ts): the webhook's
     ClusterRole names each. */}}
{{- define "pullbridge.upstreamPullSecretNames" -}}
{{- $names := list -}}
{{- range .Values.registries }}
{{- if eq (toString .rewrite) "never" }}{{ $names = append $names (printf "%s-%s" $.Values.webhook.pullSecretName .name) }}{{ end }}
{{- end }}
{{- toJson $names -}}
{{- end -}}

{{/* The shared cache tier (cache.shared): the selected backend, "" when off, after checking the
     values; every template that renders part of it goes through here, so a bad combination fails
     the whole chart with one message. */}}
{{- define "pullbridge.sharedBackend" -}}
{{- $shared := .Values.cache.shared | default dict -}}
{{- $backend := $shared.backend | default "" -}}
{{- $backends := list "s3" "azure" "gcs" "filesystem" -}}
{{- range $key, $_ := $shared }}
{{- if not (has $key (concat $backends (list "backend" "existingSecret" "fillWaitSeconds" "timeoutSeconds" "streamFills" "recordKey"))) }}
{{- fail (printf "cache.shared.%s is not a setting of the shared cache tier: the backends are s3, azure, gcs and filesystem, chosen with cache.shared.backend" $key) }}
{{- end }}
{{- end }}
{{- if not (has $backend (concat (list "") $backends)) }}
{{- fail (printf "cache.shared.backend must be s3, azure, gcs or filesystem (or empty: no shared tier), not %q" $backend) }}
{{- end }}
{{- if $backend }}
{{- if not .Values.cache.enabled }}
{{- fail "cache.shared needs the node cache: set cache.enabled=true, or cache.shared.backend=\"\"" }}
{{- end }}
{{- /* What names each backend's store; another backend's being set is a second backend. */}}
{{- $names := dict "s3" "bucket" "azure" "container" "gcs" "bucket" "filesystem" "existingClaim" -}}
{{- range $other := $backends }}
{{- $name := get $names $other }}
{{- $value := dig $name "" (get $shared $other | default dict) }}
{{- if and (eq $other $backend) (not $value) }}
{{- fail (printf "cache.shared.backend is %s: set cache.shared.%s.%s" $backend $backend $name) }}
{{- end }}
{{- if and (ne $other $backend) $value }}
{{- fail (printf "cache.shared.backend is %s, but cache.shared.%s.%s is set too: the shared tier has one backend (clear the %s settings)" $backend $other $name $other) }}
{{- end }}
{{- end }}
{{- with $shared.recordKey }}
{{- if and .existingSecret (not .secretKey) }}
{{- fail "cache.shared.recordKey.secretKey must name the key in cache.shared.recordKey.existingSecret that holds the record key" }}
{{- end }}
{{- end }}
{{- $config := get $shared $backend -}}
{{- $keys := $config.secretKeys | default dict -}}
{{- if eq $backend "s3" }}
{{- if and $shared.existingSecret (not (and $keys.accessKey $keys.secretKey)) }}
{{- fail "cache.shared.s3.secretKeys needs accessKey and secretKey (the key names in cache.shared.existingSecret)" }}
{{- end }}
{{- else if eq $backend "azure" }}
{{- if not $shared.existingSecret }}
{{- fail "cache.shared.backend is azure: set cache.shared.existingSecret, a Secret with the storage account key or a SAS token (Azure has no default credential chain here)" }}
{{- end }}
{{- if not (or $keys.sasToken $keys.accountKey) }}
{{- fail "cache.shared.azure.secretKeys needs accountKey or sasToken (the key name in cache.shared.existingSecret)" }}
{{- end }}
{{- if not (or $config.accountName $keys.accountName) }}
{{- fail "cache.shared.azure needs accountName, or secretKeys.accountName to read it from cache.shared.existingSecret" }}
{{- end }}
{{- else if eq $backend "gcs" }}
{{- if and $shared.existingSecret (not $keys.key) }}
{{- fail "cache.shared.gcs.secretKeys.key must name the key in cache.shared.existingSecret that holds the service account key" }}
{{- end }}
{{- end }}
{{- end }}
{{- $backend -}}
{{- end -}}

{{/* The Secret keys mounted for the shared tier: file name under /etc/pullbridge/shared -> key. */}}
{{- define "pullbridge.sharedFiles" -}}
{{- $backend := include "pullbridge.sharedBackend" . -}}
{{- $shared := .Values.cache.shared -}}
{{- $files := dict -}}
{{- if and $backend $shared.existingSecret -}}
{{- $config := get $shared $backend -}}
{{- $keys := $config.secretKeys | default dict -}}
{{- if eq $backend "s3" -}}
{{- $files = dict "access-key" $keys.accessKey "secret-key" $keys.secretKey -}}
{{- else if eq $backend "azure" -}}
{{- if $keys.sasToken }}{{ $_ := set $files "sas-token" $keys.sasToken }}{{ else }}{{ $_ := set $files "account-key" $keys.accountKey }}{{ end -}}
{{- if not $config.accountName }}{{ $_ := set $files "account-name" $keys.accountName }}{{ end -}}
{{- else if eq $backend "gcs" -}}
{{- $files = dict "key" $keys.key -}}
{{- end -}}
{{- end -}}
{{- toJson $files -}}
{{- end -}}

{{/* config.yaml's cache.shared, at the indentation of `cache`'s keys' values. */}}
{{- define "pullbridge.sharedConfig" -}}
{{- $backend := include "pullbridge.sharedBackend" . -}}
{{- if $backend -}}
{{- $shared := .Values.cache.shared -}}
{{- $config := get $shared $backend -}}
{{- $files := include "pullbridge.sharedFiles" . | fromJson -}}
fillWaitSeconds: {{ $shared.fillWaitSeconds | default 120 | int }}
timeoutSeconds: {{ $shared.timeoutSeconds | default 30 | int }}
streamFills: {{ ne $shared.streamFills false }}
{{- if ($shared.recordKey | default dict).existingSecret }}
recordKeyFile: /etc/pullbridge/shared-record-key/record-key
{{- end }}
{{ $backend }}:
{{- if eq $backend "s3" }}
  bucket: {{ $config.bucket | toJson }}
  region: {{ $config.region | default "us-east-1" | toJson }}
  {{- with $config.endpoint }}
  endpoint: {{ . | toJson }}
  {{- end }}
  forcePathStyle: {{ $config.forcePathStyle | default false }}
{{- else if eq $backend "azure" }}
  container: {{ $config.container | toJson }}
  {{- with $config.accountName }}
  accountName: {{ . | toJson }}
  {{- end }}
  {{- with $config.endpoint }}
  endpoint: {{ . | toJson }}
  {{- end }}
{{- else if eq $backend "gcs" }}
  bucket: {{ $config.bucket | toJson }}
  {{- with $config.endpoint }}
  endpoint: {{ . | toJson }}
  {{- end }}
{{- else if eq $backend "filesystem" }}
  path: /var/lib/pullbridge/shared
{{- end }}
{{- with $config.prefix }}
  prefix: {{ . | toJson }}
{{- end }}
{{- $paths := dict "access-key" "accessKeyFile" "secret-key" "secretKeyFile" "account-name" "accountNameFile" "account-key" "accountKeyFile" "sas-token" "sasTokenFile" "key" "keyFile" }}
{{- range $file, $_ := $files }}
  {{ get $paths $file }}: /etc/pullbridge/shared/{{ $file }}
{{- end }}
{{- end -}}
{{- end -}}

{{/* Checks across a rule's keys that the proxy makes at start (src/rules/config.ts crossKeyErrors and
     the URL/CIDR checks JSON Schema cannot carry): helm refuses them at install, naming the key,
     instead of rendering a config.yaml the proxy refuses. */}}
{{- define "pullbridge.checkRules" -}}
{{- $names := dict -}}
{{- range $index, $rule := .Values.registries }}
{{- $key := printf "registries[%d]" $index }}
{{- $mode := (($rule.auth | default dict).mode | default "broker") }}
{{- if and $rule.credentials $rule.credentialsSecret }}
{{- fail (printf "%s: set credentials or credentialsSecret, not both (%s.credentials and %s.credentialsSecret are both set)" $key $key $key) }}
{{- end }}
{{- if hasKey $names (toString $rule.name) }}
{{- fail (printf "%s.name: duplicate rule name %q (also registries[%v])" $key $rule.name (get $names (toString $rule.name))) }}
{{- end }}
{{- $_ := set $names (toString $rule.name) $index }}
{{- if eq (toString $rule.rewrite) "never" }}
{{- if not $rule.shareUpstreamCredentials }}
{{- fail (printf "%s.shareUpstreamCredentials: rewrite: never writes this rule's upstream credential itself into a pull secret in each namespace it admits; set shareUpstreamCredentials: true to accept that (docs/security.md)" $key) }}
{{- end }}
{{- if not ($rule.namespaces | default dict).include }}
{{- fail (printf "%s.namespaces.include: rewrite: never hands the upstream credential to namespaces: list the namespaces that may have it" $key) }}
{{- end }}
{{- if $rule.credentialsSecret }}
{{- fail (printf "%s.credentialsSecret: not with rewrite: never (the webhook reads that rule's credential from a Secret the chart writes); give credentials" $key) }}
{{- end }}
{{- if not $rule.credentials }}
{{- fail (printf "%s.credentials: rewrite: never provisions a pull secret from the rule's credentials: give credentials" $key) }}
{{- end }}
{{- if gt (len (printf "%s-%s" $.Values.webhook.pullSecretName $rule.name)) 253 }}
{{- fail (printf "%s.name: webhook.pullSecretName, \"-\" and the rule name make the rule's pull secret name, longer than 253 characters" $key) }}
{{- end }}
{{- else if $rule.shareUpstreamCredentials }}
{{- fail (printf "%s.shareUpstreamCredentials: only with rewrite: never (other modes never hand the upstream credential to a namespace)" $key) }}
{{- end }}
{{- if not (regexMatch "^\\s*[hH][tT][tT][pP][sS]?:/*[^/?#@\\s]" (toString $rule.upstream)) }}
{{- fail (printf "%s.upstream must be an absolute http:// or https:// URL with a host, got %q" $key (toString $rule.upstream)) }}
{{- end }}
{{- $namespaces := $rule.namespaces | default dict }}
{{- if and (or (eq $mode "anonymous") (eq $mode "passthrough")) (or $namespaces.include $namespaces.exclude) }}
{{- fail (printf "%s.namespaces: auth mode %q does not identify the client's namespace, so the proxy cannot enforce a namespace filter; use auth mode broker" $key $mode) }}
{{- end }}
{{- if and (eq $mode "anonymous") (or $rule.credentials $rule.credentialsSecret) (not ($rule.repositories | default dict).include) }}
{{- fail (printf "%s.repositories.include: an anonymous rule with credentials must list the repositories it serves; without a list, anyone who reaches the proxy pulls every repository of the upstream with these credentials" $key) }}
{{- end }}
{{- with $rule.verify }}
{{- if eq $mode "passthrough" }}
{{- fail (printf "%s.verify: auth mode \"passthrough\" gives the webhook no credential of the namespace to resolve the image with; use auth mode broker or anonymous" $key) }}
{{- end }}
{{- if not $.Values.webhook.resolver.enabled }}
{{- fail (printf "%s.verify: signatures are fetched through the proxies by the admission resolver: set webhook.resolver.enabled=true" $key) }}
{{- end }}
{{- range $keyIndex, $pem := .cosign.publicKeys }}
{{- include "pullbridge.checkPublicKey" (list (printf "%s.verify.cosign.publicKeys[%d]" $key $keyIndex) (toString $pem)) }}
{{- end }}
{{- /* A signature policy that fails open is no policy: while the webhook is down, Ignore admits every Pod unchecked. */}}
{{- if and (ne (toString (.onFailure | default "deny")) "warn") (ne (toString $.Values.webhook.failurePolicy) "Fail") }}
{{- fail (printf "%s.verify.onFailure: deny, but webhook.failurePolicy is %s: while the webhook is down or slow the apiserver admits Pods with unverified images; set webhook.failurePolicy=Fail (docs/adopting.md), or onFailure: warn" $key (toString $.Values.webhook.failurePolicy)) }}
{{- end }}
{{- end }}
{{- /* rewrite: private-only and pinDigest ask the upstream at admission, through the proxies (the resolver). */}}
{{- if and (not $.Values.webhook.resolver.enabled) (eq (toString $rule.rewrite) "private-only") }}
{{- fail (printf "%s.rewrite: private-only asks the upstream through the proxies by the admission resolver: set webhook.resolver.enabled=true" $key) }}
{{- end }}
{{- if and (not $.Values.webhook.resolver.enabled) $rule.pinDigest }}
{{- fail (printf "%s.pinDigest: tags are resolved through the proxies by the admission resolver: set webhook.resolver.enabled=true" $key) }}
{{- end }}
{{- range $cidrIndex, $cidr := (($rule.redirects | default dict).allow | default list) }}
{{- $v4 := "^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(/([0-9]|[12][0-9]|3[0-2]))?$" }}
{{- $v6 := "^[0-9a-fA-F]*:[0-9a-fA-F:.]*(/([0-9]{1,2}|1[01][0-9]|12[0-8]))?$" }}
{{- if not (or (regexMatch $v4 (toString $cidr)) (regexMatch $v6 (toString $cidr))) }}
{{- fail (printf "%s.redirects.allow[%d]: %q must be an IP address or a CIDR block such as 10.0.0.0/8" $key $cidrIndex (toString $cidr)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}


{{/* (list key pem): fails naming the key unless pem is one PEM public key whose body is whole DER (a
     SEQUENCE as long as its header says). Looser than the webhook's parse (src/signature/cosign.ts
     parsePublicKey), which refuses the rest when it loads the config; a private key is refused here,
     so that it never lands in a ConfigMap. */}}
{{- define "pullbridge.checkPublicKey" -}}
{{- $key := index . 0 -}}
{{- $pem := index . 1 -}}
{{- $armor := "(?s)^\\s*-----BEGIN (?:RSA )?PUBLIC KEY-----([A-Za-z0-9+/=\\s]*)-----END (?:RSA )?PUBLIC KEY-----\\s*$" -}}
{{- if regexMatch "PRIVATE KEY-----" $pem }}
{{- fail (printf "%s: a private key; give the public key (cosign public-key --key cosign.key prints it): a private key must never be in chart values" $key) }}
{{- end }}
{{- if not (regexMatch $armor $pem) }}
{{- fail (printf "%s: not one PEM public key (-----BEGIN PUBLIC KEY----- ... -----END PUBLIC KEY-----, as in cosign.pub)" $key) }}
{{- end }}
{{- /* b64dec answers a body that is not base64 with its error text, which starts with no SEQUENCE tag. */}}
{{- $der := b64dec (regexReplaceAll "\\s" (regexReplaceAll $armor $pem "${1}") "") -}}
{{- $whole := false -}}
{{- if and (ge (len $der) 4) (eq (int (index $der 0)) 48) }}
{{- $length := int (index $der 1) }}
{{- if lt $length 128 }}{{ $whole = eq (len $der) (add 2 $length) }}
{{- else if eq $length 129 }}{{ $whole = eq (len $der) (add 3 (int (index $der 2))) }}
{{- else if eq $length 130 }}{{ $whole = eq (len $der) (add 4 (mul 256 (int (index $der 2))) (int (index $der 3))) }}
{{- end }}
{{- end }}
{{- if not $whole }}
{{- fail (printf "%s: the PEM public key is garbled or truncated (its body is not the base64 of a whole DER key)" $key) }}
{{- end }}
{{- end -}}
