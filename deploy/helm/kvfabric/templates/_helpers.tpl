{{- define "kvfabric.name" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The headless Service that gives each pod of the StatefulSet its DNS name (serviceName). */}}
{{- define "kvfabric.headless" -}}
{{- printf "%s-headless" (include "kvfabric.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvfabric.labels" -}}
app.kubernetes.io/name: kvfabric
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kvfabric.selector" -}}
app.kubernetes.io/name: kvfabric
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
A generated secret value that survives upgrades: the value already in the release's Secret under `key`, else a new
random one. Call with (dict "ctx" $ "key" "admin-token").
*/}}
{{- define "kvfabric.kept" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace (include "kvfabric.name" .ctx) | default dict -}}
{{- $data := get $existing "data" | default dict -}}
{{- if hasKey $data .key -}}
{{- get $data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum 48 -}}
{{- end -}}
{{- end -}}
