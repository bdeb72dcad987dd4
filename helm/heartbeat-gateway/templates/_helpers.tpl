{{- define "heartbeat-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "heartbeat-gateway.fullname" -}}
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

{{- define "heartbeat-gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "heartbeat-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "heartbeat-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "heartbeat-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "heartbeat-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "heartbeat-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret the pod reads, if any. */}}
{{- define "heartbeat-gateway.secretName" -}}
{{- if .Values.secret.existingSecret }}
{{- .Values.secret.existingSecret }}
{{- else if .Values.secret.values }}
{{- include "heartbeat-gateway.fullname" . }}
{{- end }}
{{- end }}

{{- define "heartbeat-gateway.proxyPort" -}}
{{- ((.Values.config).listen).port | default 8080 }}
{{- end }}

{{- define "heartbeat-gateway.adminPort" -}}
{{- ((.Values.config).admin).port | default 9090 }}
{{- end }}

{{/* The gateway drains for shutdown_grace_seconds after the pre-stop sleep; leave room to exit. */}}
{{- define "heartbeat-gateway.terminationGrace" -}}
{{- $grace := ((.Values.config).limits).shutdown_grace_seconds | default 20 }}
{{- add (int .Values.preStopSleepSeconds) (int (ceil $grace)) 10 }}
{{- end }}

{{- define "heartbeat-gateway.multipleReplicas" -}}
{{- if .Values.autoscaling.enabled }}
{{- if gt (int .Values.autoscaling.minReplicas) 1 }}true{{ end }}
{{- else if gt (int .Values.replicaCount) 1 }}true{{ end }}
{{- end }}

{{/* Combinations the schema cannot express. */}}
{{- define "heartbeat-gateway.validate" -}}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- $mount := trimSuffix "/" .Values.secret.mountPath }}
{{- if or (eq $mount "/etc/heartbeat-gateway") (hasPrefix (printf "%s/" $mount) "/etc/heartbeat-gateway/") }}
{{- fail "secret.mountPath must not be /etc/heartbeat-gateway or above it: the config is mounted there" }}
{{- end }}
{{- if and .Values.tracing.enabled (not .Values.tracing.endpoint) }}
{{- fail "tracing.enabled needs tracing.endpoint: your collector's OTLP/HTTP address" }}
{{- end }}
{{- if and .Values.tracing.enabled .Values.networkPolicy.enabled (not .Values.networkPolicy.egress.collectorCIDRs) }}
{{- fail "tracing.enabled with networkPolicy.enabled needs networkPolicy.egress.collectorCIDRs: where the collector is" }}
{{- end }}
{{- end }}

{{/* OTEL_RESOURCE_ATTRIBUTES: the pod's name and namespace (from the downward API), then the user's,
     each value percent-encoded as the variable's format asks (a "," or "=" in it would split it). */}}
{{- define "heartbeat-gateway.resourceAttributes" -}}
{{- $pairs := list "k8s.pod.name=$(POD_NAME)" "k8s.namespace.name=$(POD_NAMESPACE)" }}
{{- range $name, $value := .Values.tracing.resourceAttributes }}
{{- $pairs = append $pairs (printf "%s=%s" $name ($value | urlquery | replace "+" "%20")) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}

{{/* The TLS Secret for the worker port: yours, or the one the chart's Certificate fills. */}}
{{- define "heartbeat-gateway.tlsSecretName" -}}
{{- if .Values.tls.enabled }}
{{- if .Values.tls.existingSecret }}
{{- .Values.tls.existingSecret }}
{{- else if .Values.tls.certManager.enabled }}
{{- include "heartbeat-gateway.fullname" . }}-tls
{{- else }}
{{- fail "tls.enabled needs tls.existingSecret or tls.certManager.enabled: a certificate to serve" }}
{{- end }}
{{- end }}
{{- end }}
