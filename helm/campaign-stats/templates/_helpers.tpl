{{/* The chart's name. */}}
{{- define "campaign-stats.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name, used for every object. */}}
{{- define "campaign-stats.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "campaign-stats.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "campaign-stats.selectorLabels" -}}
app.kubernetes.io/name: {{ include "campaign-stats.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "campaign-stats.labels" -}}
helm.sh/chart: {{ include "campaign-stats.chart" . }}
{{ include "campaign-stats.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "campaign-stats.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "campaign-stats.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "campaign-stats.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret holding the database URL, and its key. */}}
{{/* `database.url`, when given, wins: the chart then makes the Secret. */}}
{{- define "campaign-stats.databaseSecret" -}}
{{- if .Values.database.url }}{{ include "campaign-stats.fullname" . }}-database{{ else }}{{ .Values.database.existingSecret }}{{ end }}
{{- end }}
{{- define "campaign-stats.databaseSecretKey" -}}
{{- if .Values.database.url }}url{{ else }}{{ .Values.database.existingSecretKey }}{{ end }}
{{- end }}

{{/* Whether auth tokens are configured, and the Secret holding them. */}}
{{- define "campaign-stats.authEnabled" -}}
{{- if and (not .Values.auth.insecureNoAuth) (or .Values.auth.existingSecret .Values.auth.tokens) }}true{{ end }}
{{- end }}
{{/* `auth.tokens`, when given, wins: the chart then makes the Secret. */}}
{{- define "campaign-stats.authSecret" -}}
{{- if .Values.auth.tokens }}{{ include "campaign-stats.fullname" . }}-auth{{ else }}{{ .Values.auth.existingSecret }}{{ end }}
{{- end }}
{{- define "campaign-stats.authSecretKey" -}}
{{- if .Values.auth.tokens }}tokens{{ else }}{{ .Values.auth.existingSecretKey }}{{ end }}
{{- end }}

{{/* Refuses values the server would refuse at start. */}}
{{- define "campaign-stats.validate" -}}
{{- if not (or .Values.database.existingSecret .Values.database.url) }}
{{- fail "database.existingSecret (a Secret with the PostgreSQL URL) or database.url is required" }}
{{- end }}
{{- if and (not (include "campaign-stats.authEnabled" .)) (not .Values.auth.insecureNoAuth) }}
{{- fail "auth.existingSecret or auth.tokens is required: the server listens on every interface of the pod and refuses to serve without tokens (set auth.insecureNoAuth=true to serve open anyway)" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.existingSecret (a kubernetes.io/tls Secret) is required when tls.enabled" }}
{{- end }}
{{- end }}

{{/* The env of the database URL, shared by the server and the migration Job. */}}
{{- define "campaign-stats.databaseEnv" -}}
- name: STATS_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "campaign-stats.databaseSecret" . }}
      key: {{ include "campaign-stats.databaseSecretKey" . }}
{{- end }}
