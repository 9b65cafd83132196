{{/*
Names and labels.
*/}}
{{- define "smarthome.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "smarthome.fullname" -}}
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

{{- define "smarthome.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: (dict "root" $ "component" "gateway"). */}}
{{- define "smarthome.selectorLabels" -}}
app.kubernetes.io/name: {{ include "smarthome.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component: (dict "root" $ "component" "gateway"). */}}
{{- define "smarthome.labels" -}}
helm.sh/chart: {{ include "smarthome.chart" .root }}
{{ include "smarthome.selectorLabels" . }}
app.kubernetes.io/part-of: smarthome
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{- define "smarthome.componentName" -}}
{{- printf "%s-%s" (include "smarthome.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The processes of the platform. The module is the fixed entry point (`python -m <module>`);
kind decides the port and settings: "api" serves HTTP (API, /health/*, /metrics) on
SMARTHOME_HTTP_PORT, "worker" serves /health/* and /metrics on SMARTHOME_HEALTH_PORT, "device"
serves nothing (a device only calls the platform). Strings only: it goes through JSON.
*/}}
{{- define "smarthome.components" -}}
{{- list
  (dict "name" "gateway" "key" "gateway" "module" "services.gateway" "kind" "api")
  (dict "name" "actors" "key" "actors" "module" "services.actors" "kind" "worker")
  (dict "name" "rules" "key" "rules" "module" "services.rules" "kind" "worker")
  (dict "name" "recorder" "key" "recorder" "module" "services.recorder" "kind" "worker")
  (dict "name" "webhooks" "key" "webhooks" "module" "services.webhooks" "kind" "worker")
  (dict "name" "lightbulb" "key" "lightbulb" "module" "devices.lightbulb" "kind" "device")
  (dict "name" "energy-tracker" "key" "energyTracker" "module" "devices.energy_tracker" "kind" "device")
  | toJson }}
{{- end }}

{{- define "smarthome.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
Where the platform's backing services are.
*/}}
{{- define "smarthome.natsFullname" -}}
{{- if .Values.nats.fullnameOverride }}
{{- .Values.nats.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default "nats" .Values.nats.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "smarthome.natsUrl" -}}
{{- if .Values.nats.enabled }}
{{- printf "nats://%s:%d" (include "smarthome.natsFullname" .) (int ((.Values.nats.config).nats).port | default 4222) }}
{{- else }}
{{- required "nats.enabled is false: set externalNats.url" .Values.externalNats.url }}
{{- end }}
{{- end }}

{{- define "smarthome.postgresqlName" -}}
{{- include "smarthome.componentName" (dict "root" . "component" "postgresql") }}
{{- end }}

{{- define "smarthome.redisName" -}}
{{- include "smarthome.componentName" (dict "root" . "component" "redis") }}
{{- end }}

{{/* The app Secret: the chart's, or the one the user keeps. */}}
{{- define "smarthome.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "smarthome.fullname" .) }}
{{- end }}

{{/*
DATABASE_URL from values; (dict "root" $ "postgresPassword" "...") for the in-chart Postgres.
*/}}
{{- define "smarthome.databaseUrl" -}}
{{- $v := .root.Values }}
{{- if $v.postgresql.enabled }}
{{- printf "postgresql://%s:%s@%s:5432/%s" (urlquery $v.postgresql.auth.username) (urlquery .postgresPassword) (include "smarthome.postgresqlName" .root) $v.postgresql.auth.database }}
{{- else if $v.externalDatabase.url }}
{{- $v.externalDatabase.url }}
{{- else }}
{{- $e := $v.externalDatabase }}
{{- $host := required "postgresql.enabled is false: set externalDatabase.url, externalDatabase.host or secrets.existingSecret" $e.host }}
{{- $auth := urlquery $e.user }}
{{- if $e.password }}{{ $auth = printf "%s:%s" $auth (urlquery $e.password) }}{{ end }}
{{- printf "postgresql://%s@%s:%d/%s" $auth $host (int $e.port) $e.database }}
{{- with $e.params }}?{{ . }}{{ end }}
{{- end }}
{{- end }}

{{/* REDIS_URL from values; (dict "root" $ "redisPassword" "...") for the in-chart Redis. */}}
{{- define "smarthome.redisUrl" -}}
{{- $v := .root.Values }}
{{- if $v.redis.enabled }}
{{- printf "redis://:%s@%s:6379/0" (urlquery .redisPassword) (include "smarthome.redisName" .root) }}
{{- else if $v.externalRedis.url }}
{{- $v.externalRedis.url }}
{{- else }}
{{- $e := $v.externalRedis }}
{{- $host := required "redis.enabled is false: set externalRedis.url, externalRedis.host or secrets.existingSecret" $e.host }}
{{- $auth := "" }}
{{- if $e.password }}{{ $auth = printf ":%s@" (urlquery $e.password) }}{{ end }}
{{- printf "%s://%s%s:%d/%d" (ternary "rediss" "redis" $e.tls) $auth $host (int $e.port) (int $e.db) }}
{{- end }}
{{- end }}

{{/*
A password that is generated once and then kept: the value when set, else the one already in
the Secret (upgrades), else a new random one. (dict "root" $ "secret" name "key" key "value" v)
*/}}
{{- define "smarthome.password" -}}
{{- if .value }}
{{- .value }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret }}
{{- if and $existing (hasKey ($existing.data | default dict) .key) }}
{{- index $existing.data .key | b64dec }}
{{- else }}
{{- randAlphaNum 32 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Pod-level pieces shared by the Deployments, the migration Job and the in-chart stores.
*/}}
{{- define "smarthome.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "smarthome.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext }}
{{- end }}

{{/* One env var read from the settings ConfigMap: (dict "root" $ "name" "NATS_URL"). */}}
{{- define "smarthome.envFromConfig" -}}
- name: {{ .name }}
  valueFrom:
    configMapKeyRef:
      name: {{ include "smarthome.fullname" .root }}-settings
      key: {{ .name }}
{{- end }}

{{/* One env var read from the app Secret: (dict "root" $ "name" "DATABASE_URL" "key" "database-url"). */}}
{{- define "smarthome.envFromSecret" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secretName | default (include "smarthome.secretName" .root) }}
      key: {{ .key }}
{{- end }}

{{/*
The environment of one process: exactly the variables its code reads that it needs
(tests/deploy checks both directions). Services read libs/settings.py; the demo devices stand
for third-party hardware and read only their own few (devices/platform_link.py).
(dict "root" $ "c" component "v" values)
*/}}
{{- define "smarthome.env" -}}
{{- $root := .root }}
{{- $keys := $root.Values.secrets.keys }}
{{- $kind := .c.kind }}
{{- include "smarthome.envFromConfig" (dict "root" $root "name" "NATS_URL") }}
{{- if eq $kind "device" }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_API_URL") }}
- name: SMARTHOME_DEVICE_ID
  value: {{ .v.deviceId | quote }}
{{- else }}
{{ include "smarthome.envFromSecret" (dict "root" $root "name" "DATABASE_URL" "key" $keys.databaseUrl) }}
{{ include "smarthome.envFromSecret" (dict "root" $root "name" "REDIS_URL" "key" $keys.redisUrl) }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_DATA_DIR") }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_HTTP_HOST") }}
{{- if eq $kind "api" }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_HTTP_PORT") }}
{{ include "smarthome.envFromSecret" (dict "root" $root "name" "SMARTHOME_ADMIN_PASSWORD" "key" $keys.adminPassword) }}
{{- else }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_HEALTH_PORT") }}
{{- end }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_HEARTBEAT_TIMEOUT") }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_STREAM_REPLICAS") }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_RULES_PARTITIONS") }}
{{- if eq .c.name "recorder" }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_HISTORY_KEEP_DAYS") }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_STATISTICS_KEEP_DAYS") }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_AUDIT_KEEP_DAYS") }}
{{- end }}
{{- end }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_LOG_LEVEL") }}
{{- end }}

{{/* Checksums that roll the pods when their settings change. */}}
{{- define "smarthome.checksums" -}}
checksum/settings: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret-inputs: {{ toJson (list .Values.secrets .Values.externalDatabase .Values.externalRedis .Values.postgresql.auth .Values.redis.auth) | sha256sum }}
{{- end }}

{{/* Topology spread of one component: (dict "root" $ "component" name). */}}
{{- define "smarthome.topologySpread" -}}
{{- $t := .root.Values.topologySpread }}
{{- if $t.enabled }}
topologySpreadConstraints:
{{- range $t.topologyKeys }}
  - maxSkew: {{ $t.maxSkew }}
    topologyKey: {{ . }}
    whenUnsatisfiable: {{ $t.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "smarthome.selectorLabels" (dict "root" $.root "component" $.component) | nindent 8 }}
    matchLabelKeys:
      - pod-template-hash
{{- end }}
{{- end }}
{{- end }}
