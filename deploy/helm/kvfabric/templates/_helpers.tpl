{{- define "kvfabric.name" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvfabric.labels" -}}
app.kubernetes.io/name: kvfabric
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "kvfabric.selector" -}}
app.kubernetes.io/name: kvfabric
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
