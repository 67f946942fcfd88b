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
  tagTTLSeconds: {{ .Values.cache.tagTTLSeconds | int }}
  staleIfErrorSeconds: {{ .Values.cache.staleIfErrorSeconds | int }}
  credentialTTLSeconds: {{ .Values.cache.credentialTTLSeconds | int }}
{{- end }}
registries:
{{- range .Values.registries }}
  - name: {{ .name }}
    match: {{ .match | toJson }}
    upstream: {{ .upstream }}
    auth: {mode: {{ (.auth | default dict).mode | default "broker" }}}
    {{- with .repositories }}
    repositories: {{ . | toJson }}
    {{- end }}
    {{- with .namespaces }}
    namespaces: {{ . | toJson }}
    {{- end }}
    {{- if or .credentials .credentialsSecret }}
    credentials:
      usernameFile: /etc/pullbridge/credentials/{{ .name }}/username
      passwordFile: /etc/pullbridge/credentials/{{ .name }}/password
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
{{- end }}
{{- if not .Values.registries }} []{{ end }}
{{- end -}}

{{/* Volumes with the upstream credentials of every rule that has some. */}}
{{- define "pullbridge.credentialVolumes" -}}
{{- $root := . -}}
{{- range .Values.registries }}
{{- if or .credentials .credentialsSecret }}
- name: cred-{{ .name }}
  secret:
    secretName: {{ .credentialsSecret | default (printf "%s-cred-%s" (include "pullbridge.fullname" $root) .name) }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "pullbridge.credentialMounts" -}}
{{- range .Values.registries }}
{{- if or .credentials .credentialsSecret }}
- name: cred-{{ .name }}
  mountPath: /etc/pullbridge/credentials/{{ .name }}
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}
