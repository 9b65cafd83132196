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
  (dict "name" "busauth" "key" "busauth" "module" "services.busauth" "kind" "worker")
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

{{- /*
The CA file every smarthome pod trusts for the bus when the release's NATS serves TLS: the
`nats.tls.caKey` of the server certificate's Secret, mounted read-only
(`smarthome.natsTlsCaMount`/`smarthome.natsTlsCaVolume`). Empty when TLS is off.
*/}}
{{- define "smarthome.natsTlsCaDir" -}}/etc/smarthome/nats-ca{{- end }}

{{- define "smarthome.natsTlsCa" -}}
{{- if and .Values.nats.enabled (.Values.nats.tls).enabled }}
{{- printf "%s/%s" (include "smarthome.natsTlsCaDir" .) (.Values.nats.tls.caKey | default "ca.crt") }}
{{- end }}
{{- end }}

{{- /*
JetStream's store on each NATS server of the release (`nats.config.jetstream.fileStore.maxSize`,
its `max_file_store`), as SMARTHOME_NATS_MAX_STORE: the gateway shares it out as the streams'
byte budgets (libs/bus.py, STREAM_STORE_SHARES). Empty with an external bus: its store is
unknown here, and the streams get no budgets.
*/}}
{{- define "smarthome.natsMaxStore" -}}
{{- $js := (.Values.nats.config).jetstream | default dict }}
{{- if and .Values.nats.enabled $js.enabled ($js.fileStore).enabled }}
{{- ($js.fileStore).maxSize }}
{{- end }}
{{- end }}

{{- define "smarthome.natsTlsCaMount" -}}
{{- if include "smarthome.natsTlsCa" . }}
- name: nats-ca
  mountPath: {{ include "smarthome.natsTlsCaDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "smarthome.natsTlsCaVolume" -}}
{{- if include "smarthome.natsTlsCa" . }}
- name: nats-ca
  secret:
    secretName: {{ .Values.nats.tls.secretName }}
    items:
      - key: {{ .Values.nats.tls.caKey | default "ca.crt" }}
        path: {{ .Values.nats.tls.caKey | default "ca.crt" }}
{{- end }}
{{- end }}

{{- define "smarthome.natsUrl" -}}
{{- if .Values.nats.enabled }}
{{- $scheme := "nats" }}
{{- if (.Values.nats.tls).enabled }}
{{- $_ := required "nats.tls.enabled: set nats.tls.secretName (the server certificate's Secret)" .Values.nats.tls.secretName }}
{{- $scheme = "tls" }}
{{- end }}
{{- printf "%s://%s:%d" $scheme (include "smarthome.natsFullname" .) (int ((.Values.nats.config).nats).port | default 4222) }}
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
the Secret (upgrades), else a new random one (`prefix` + `length` characters, 32 by default).
A generated one is remembered for the rest of the render, so that every copy of it (the
migration hook's own Secret and the release's) holds the same value on the first install.
(dict "root" $ "secret" name "key" key "value" v ["prefix" p] ["length" n])
*/}}
{{- define "smarthome.password" -}}
{{- if .value }}
{{- .value }}
{{- else }}
{{- if not (hasKey .root "smarthomeGenerated") }}
{{- $_ := set .root "smarthomeGenerated" dict }}
{{- end }}
{{- $generated := get .root "smarthomeGenerated" }}
{{- $id := printf "%s/%s" .secret .key }}
{{- if not (hasKey $generated $id) }}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret }}
{{- if and $existing (hasKey ($existing.data | default dict) .key) }}
{{- $_ := set $generated $id (index $existing.data .key | b64dec) }}
{{- else }}
{{- $_ := set $generated $id (printf "%s%s" (.prefix | default "") (randAlphaNum (int (.length | default 32)))) }}
{{- end }}
{{- end }}
{{- get $generated $id }}
{{- end }}
{{- end }}

{{/* The app Secret's generated credentials, one place each: (dict "root" $). */}}
{{- define "smarthome.adminPassword" -}}
{{- include "smarthome.password" (dict "root" .root "secret" (include "smarthome.fullname" .root) "key" .root.Values.secrets.keys.adminPassword "value" .root.Values.secrets.adminPassword) }}
{{- end }}

{{- define "smarthome.jwtSecret" -}}
{{- include "smarthome.password" (dict "root" .root "secret" (include "smarthome.fullname" .root) "key" .root.Values.secrets.keys.jwtSecret "value" .root.Values.secrets.jwtSecret "length" 64) }}
{{- end }}

{{/* An admin API key for Prometheus: libs/accounts.py takes `shk_` and 32 characters or more. */}}
{{- define "smarthome.metricsApiKey" -}}
{{- include "smarthome.password" (dict "root" .root "secret" (include "smarthome.fullname" .root) "key" .root.Values.secrets.keys.metricsApiKey "value" .root.Values.secrets.metricsApiKey "prefix" "shk_" "length" 43) }}
{{- end }}

{{/* The demo devices' installer key for the demo home (registered by the migration). */}}
{{- define "smarthome.demoApiKey" -}}
{{- include "smarthome.password" (dict "root" .root "secret" (include "smarthome.fullname" .root) "key" .root.Values.secrets.keys.demoApiKey "value" .root.Values.secrets.demoApiKey "prefix" "shk_" "length" 43) }}
{{- end }}

{{/* "true" when a demo device runs (then the demo API key exists), else empty. */}}
{{- define "smarthome.demoEnabled" -}}
{{- if or .Values.lightbulb.enabled .Values.energyTracker.enabled }}true{{ end }}
{{- end }}

{{/* "true" when the demo rule's hook Job runs (templates/demo-rule-job.yaml), else empty. */}}
{{- define "smarthome.demoRuleJob" -}}
{{- if and .Values.demoRule.enabled .Values.gateway.enabled (include "smarthome.demoEnabled" .) }}true{{ end }}
{{- end }}

{{/*
The Host names the gateway answers to (SMARTHOME_ALLOWED_HOSTS): the Ingress hosts (not a
wildcard: name its hosts in gateway.allowedHosts), the gateway Service's names (the devices
and `helm test` call it by them), the loopback names (`kubectl port-forward`), and
gateway.allowedHosts. Probes come by the pod's address and are let through by path.
*/}}
{{- define "smarthome.allowedHosts" -}}
{{- $svc := include "smarthome.componentName" (dict "root" . "component" "gateway") }}
{{- $ns := .Release.Namespace }}
{{- $hosts := list }}
{{- if .Values.ingress.enabled }}
{{- range .Values.ingress.hosts }}
{{- if not (hasPrefix "*" .host) }}
{{- $hosts = append $hosts .host }}
{{- end }}
{{- end }}
{{- end }}
{{- $hosts = concat $hosts (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) "localhost" "127.0.0.1" "[::1]") }}
{{- concat $hosts .Values.gateway.allowedHosts | uniq | join "," }}
{{- end }}

{{/*
The origins whose pages may write and open WebSockets (SMARTHOME_ALLOWED_ORIGINS): each Ingress
host over https (and http when the Ingress has no TLS), and gateway.allowedOrigins. A page
served by the gateway itself is same-origin behind a port-forward; behind the Ingress its
scheme is https while the gateway sees http, hence the Ingress hosts here.
*/}}
{{- define "smarthome.allowedOrigins" -}}
{{- $origins := list }}
{{- if .Values.ingress.enabled }}
{{- range .Values.ingress.hosts }}
{{- if not (hasPrefix "*" .host) }}
{{- $origins = append $origins (printf "https://%s" .host) }}
{{- if not $.Values.ingress.tls }}
{{- $origins = append $origins (printf "http://%s" .host) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- concat $origins .Values.gateway.allowedOrigins | uniq | join "," }}
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
{{- with include "smarthome.natsTlsCa" $root }}
- name: SMARTHOME_NATS_TLS_CA
  value: {{ . | quote }}
{{- end }}
{{- if eq $kind "device" }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_API_URL") }}
- name: SMARTHOME_DEVICE_ID
  value: {{ .v.deviceId | quote }}
- name: SMARTHOME_DEVICE_LOCATION
  value: {{ .v.location | quote }}
- name: SMARTHOME_DEVICE_HEARTBEAT_FILE
  value: {{ include "smarthome.deviceHeartbeatFile" $root | quote }}
{{ include "smarthome.envFromSecret" (dict "root" $root "name" "SMARTHOME_API_TOKEN" "key" $keys.demoApiKey) }}
{{- else }}
{{ include "smarthome.envFromSecret" (dict "root" $root "name" "DATABASE_URL" "key" $keys.databaseUrl) }}
{{ include "smarthome.envFromSecret" (dict "root" $root "name" "REDIS_URL" "key" $keys.redisUrl) }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_DATA_DIR") }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_HTTP_HOST") }}
{{- if eq $kind "api" }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_HTTP_PORT") }}
{{- /* One signing key for every replica: a key of its own in each pod's data dir would
make a token good on one replica only. */}}
{{ include "smarthome.envFromSecret" (dict "root" $root "name" "SMARTHOME_JWT_SECRET" "key" $keys.jwtSecret) }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_ALLOWED_HOSTS") }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_ALLOWED_ORIGINS") }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_TRUSTED_PROXIES") }}
{{- if include "smarthome.natsMaxStore" $root }}
{{- /* It provisions the streams: their byte budgets are shares of the bus's store. */}}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_NATS_MAX_STORE") }}
{{- end }}
{{- else }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_HEALTH_PORT") }}
{{- end }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_HEARTBEAT_TIMEOUT") }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_STREAM_REPLICAS") }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_RULES_PARTITIONS") }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_ACTOR_PARTITIONS") }}
{{- if eq .c.name "recorder" }}
{{- /* The audit chain's retention checkpoints are signed with a key derived from it; the
gateway's verify checks them with the same. */}}
{{ include "smarthome.envFromSecret" (dict "root" $root "name" "SMARTHOME_JWT_SECRET" "key" $keys.jwtSecret) }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_HISTORY_KEEP_DAYS") }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_STATISTICS_KEEP_DAYS") }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_AUDIT_KEEP_DAYS") }}
{{- end }}
{{- if has .c.name (list "gateway" "webhooks") }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_WEBHOOK_ALLOW_NETS") }}
{{- end }}
{{- /* Its own identity on the bus, and no other's (the `<release>-bus` Secret). */}}
{{- $bus := printf "%s-bus" $root.Release.Name }}
- name: SMARTHOME_NATS_USER
  value: {{ .c.name | quote }}
- name: SMARTHOME_NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $bus }}
      key: {{ .c.name }}-password
{{- if eq .c.name "busauth" }}
- name: SMARTHOME_NATS_SYSTEM_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $bus }}
      key: busauth-sys-password
- name: SMARTHOME_BUS_ISSUER_SEED
  valueFrom:
    secretKeyRef:
      name: {{ $bus }}
      key: issuer-seed
{{- end }}
{{- end }}
{{ include "smarthome.envFromConfig" (dict "root" $root "name" "SMARTHOME_LOG_LEVEL") }}
{{- end }}

{{/*
The heartbeat file a demo device rewrites while it runs (on its /tmp emptyDir), and its probes:
(dict "root" $ "check" "live"|"ready" "timing" $.Values.probes.<kind>), the command
`python -m devices.probe <check> <file> <max age>` (devices/probe.py).
*/}}
{{- define "smarthome.deviceHeartbeatFile" -}}/tmp/heartbeat.json{{- end }}

{{- define "smarthome.deviceProbe" -}}
{{- $d := .root.Values.probes.device -}}
exec:
  command:
    - python
    - -m
    - devices.probe
    - {{ .check }}
    - {{ include "smarthome.deviceHeartbeatFile" .root }}
    - {{ ternary $d.liveWithinSeconds $d.readyWithinSeconds (eq .check "live") | quote }}
periodSeconds: {{ .timing.periodSeconds }}
failureThreshold: {{ .timing.failureThreshold }}
timeoutSeconds: {{ .timing.timeoutSeconds }}
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

{{/*
The bus's identities in nats-server's configuration (templates are shared with the NATS
subchart, whose values render these through `$tplYaml`). Each service is a static user, its
bcrypt hash from the `<release>-bus` Secret through the server's environment, allowed only
what it uses: the same grants as libs/bus_grants.py (tests/deploy checks they are equal).
Every other client goes through the auth callout (the busauth service); nobody is anonymous.
*/}}
{{- define "smarthome.busGrants" -}}
{"gateway":{"publish":["events.>","commands.>","system.>","deadletter.>","provision.>","$KV.services.gateway.>","$JS.API.>","$JS.ACK.>","$JS.FC.>"],"subscribe":["_INBOX.svc.gateway.>","system.>","events.*.hello"],"responses":false},"actors":{"publish":["system.device.*.state","system.device.*.transition","system.device.*.rejected","events.*.presence_timeout","deadletter.>","$JS.API.CONSUMER.INFO.EVENTS.*","$JS.API.CONSUMER.MSG.NEXT.EVENTS.*","$JS.ACK.EVENTS.*.>","$JS.API.CONSUMER.DELETE.EVENTS.actors","$JS.API.STREAM.INFO.EVENTS","$JS.API.STREAM.MSG.GET.EVENTS","$JS.API.DIRECT.GET.EVENTS","$JS.API.DIRECT.GET.EVENTS.>","$JS.API.STREAM.CREATE.KV_leases","$KV.leases.>","$JS.API.STREAM.INFO.KV_leases","$JS.API.STREAM.MSG.GET.KV_leases","$JS.API.DIRECT.GET.KV_leases","$JS.API.DIRECT.GET.KV_leases.>","$JS.API.CONSUMER.*.KV_leases","$JS.API.CONSUMER.*.KV_leases.>","$JS.API.CONSUMER.DURABLE.CREATE.KV_leases.*","$JS.API.CONSUMER.MSG.NEXT.KV_leases.*","$JS.ACK.KV_leases.>","$JS.FC.KV_leases.>","$JS.API.STREAM.CREATE.KV_actor_leases","$KV.actor_leases.>","$JS.API.STREAM.INFO.KV_actor_leases","$JS.API.STREAM.MSG.GET.KV_actor_leases","$JS.API.DIRECT.GET.KV_actor_leases","$JS.API.DIRECT.GET.KV_actor_leases.>","$JS.API.CONSUMER.*.KV_actor_leases","$JS.API.CONSUMER.*.KV_actor_leases.>","$JS.API.CONSUMER.DURABLE.CREATE.KV_actor_leases.*","$JS.API.CONSUMER.MSG.NEXT.KV_actor_leases.*","$JS.ACK.KV_actor_leases.>","$JS.FC.KV_actor_leases.>","$KV.services.actors.>","$JS.API.STREAM.INFO.KV_services"],"subscribe":["_INBOX.svc.actors.>","system.device.*.registry"],"responses":false},"rules":{"publish":["commands.>","events.>","system.rule.>","system.alert.>","system.notify.>","deadletter.>","$JS.API.CONSUMER.*.SYSTEM","$JS.API.CONSUMER.*.SYSTEM.>","$JS.API.CONSUMER.DURABLE.CREATE.SYSTEM.*","$JS.API.CONSUMER.MSG.NEXT.SYSTEM.*","$JS.ACK.SYSTEM.>","$JS.FC.SYSTEM.>","$JS.API.CONSUMER.*.EVENTS","$JS.API.CONSUMER.*.EVENTS.>","$JS.API.CONSUMER.DURABLE.CREATE.EVENTS.*","$JS.API.CONSUMER.MSG.NEXT.EVENTS.*","$JS.ACK.EVENTS.>","$JS.FC.EVENTS.>","$JS.API.STREAM.INFO.SYSTEM","$JS.API.STREAM.MSG.GET.SYSTEM","$JS.API.DIRECT.GET.SYSTEM","$JS.API.DIRECT.GET.SYSTEM.>","$JS.API.STREAM.INFO.EVENTS","$JS.API.STREAM.MSG.GET.EVENTS","$JS.API.DIRECT.GET.EVENTS","$JS.API.DIRECT.GET.EVENTS.>","$JS.API.STREAM.CREATE.KV_rule_episodes","$KV.rule_episodes.>","$JS.API.STREAM.INFO.KV_rule_episodes","$JS.API.STREAM.MSG.GET.KV_rule_episodes","$JS.API.DIRECT.GET.KV_rule_episodes","$JS.API.DIRECT.GET.KV_rule_episodes.>","$JS.API.CONSUMER.*.KV_rule_episodes","$JS.API.CONSUMER.*.KV_rule_episodes.>","$JS.API.CONSUMER.DURABLE.CREATE.KV_rule_episodes.*","$JS.API.CONSUMER.MSG.NEXT.KV_rule_episodes.*","$JS.ACK.KV_rule_episodes.>","$JS.FC.KV_rule_episodes.>","$JS.API.STREAM.CREATE.KV_leases","$KV.leases.>","$JS.API.STREAM.INFO.KV_leases","$JS.API.STREAM.MSG.GET.KV_leases","$JS.API.DIRECT.GET.KV_leases","$JS.API.DIRECT.GET.KV_leases.>","$JS.API.CONSUMER.*.KV_leases","$JS.API.CONSUMER.*.KV_leases.>","$JS.API.CONSUMER.DURABLE.CREATE.KV_leases.*","$JS.API.CONSUMER.MSG.NEXT.KV_leases.*","$JS.ACK.KV_leases.>","$JS.FC.KV_leases.>","$KV.services.rules.>","$JS.API.STREAM.INFO.KV_services"],"subscribe":["_INBOX.svc.rules.>","system.rule.*.changed","system.device.*.registry"],"responses":false},"recorder":{"publish":["deadletter.>","$JS.API.CONSUMER.INFO.EVENTS.recorder-events","$JS.API.CONSUMER.MSG.NEXT.EVENTS.recorder-events","$JS.ACK.EVENTS.recorder-events.>","$JS.API.STREAM.INFO.EVENTS","$JS.API.STREAM.MSG.GET.EVENTS","$JS.API.DIRECT.GET.EVENTS","$JS.API.DIRECT.GET.EVENTS.>","$JS.API.CONSUMER.INFO.COMMANDS.recorder-commands","$JS.API.CONSUMER.MSG.NEXT.COMMANDS.recorder-commands","$JS.ACK.COMMANDS.recorder-commands.>","$JS.API.STREAM.INFO.COMMANDS","$JS.API.STREAM.MSG.GET.COMMANDS","$JS.API.DIRECT.GET.COMMANDS","$JS.API.DIRECT.GET.COMMANDS.>","$JS.API.CONSUMER.INFO.SYSTEM.recorder-system","$JS.API.CONSUMER.MSG.NEXT.SYSTEM.recorder-system","$JS.ACK.SYSTEM.recorder-system.>","$JS.API.STREAM.INFO.SYSTEM","$JS.API.STREAM.MSG.GET.SYSTEM","$JS.API.DIRECT.GET.SYSTEM","$JS.API.DIRECT.GET.SYSTEM.>","$KV.services.recorder.>","$JS.API.STREAM.INFO.KV_services"],"subscribe":["_INBOX.svc.recorder.>"],"responses":false},"webhooks":{"publish":["deadletter.>","$JS.API.CONSUMER.*.EVENTS","$JS.API.CONSUMER.*.EVENTS.>","$JS.API.CONSUMER.DURABLE.CREATE.EVENTS.*","$JS.API.CONSUMER.MSG.NEXT.EVENTS.*","$JS.ACK.EVENTS.>","$JS.FC.EVENTS.>","$JS.API.STREAM.INFO.EVENTS","$JS.API.STREAM.MSG.GET.EVENTS","$JS.API.DIRECT.GET.EVENTS","$JS.API.DIRECT.GET.EVENTS.>","$JS.API.CONSUMER.*.COMMANDS","$JS.API.CONSUMER.*.COMMANDS.>","$JS.API.CONSUMER.DURABLE.CREATE.COMMANDS.*","$JS.API.CONSUMER.MSG.NEXT.COMMANDS.*","$JS.ACK.COMMANDS.>","$JS.FC.COMMANDS.>","$JS.API.STREAM.INFO.COMMANDS","$JS.API.STREAM.MSG.GET.COMMANDS","$JS.API.DIRECT.GET.COMMANDS","$JS.API.DIRECT.GET.COMMANDS.>","$JS.API.CONSUMER.*.SYSTEM","$JS.API.CONSUMER.*.SYSTEM.>","$JS.API.CONSUMER.DURABLE.CREATE.SYSTEM.*","$JS.API.CONSUMER.MSG.NEXT.SYSTEM.*","$JS.ACK.SYSTEM.>","$JS.FC.SYSTEM.>","$JS.API.STREAM.INFO.SYSTEM","$JS.API.STREAM.MSG.GET.SYSTEM","$JS.API.DIRECT.GET.SYSTEM","$JS.API.DIRECT.GET.SYSTEM.>","$JS.API.CONSUMER.*.DEADLETTER","$JS.API.CONSUMER.*.DEADLETTER.>","$JS.API.CONSUMER.DURABLE.CREATE.DEADLETTER.*","$JS.API.CONSUMER.MSG.NEXT.DEADLETTER.*","$JS.ACK.DEADLETTER.>","$JS.FC.DEADLETTER.>","$JS.API.STREAM.INFO.DEADLETTER","$JS.API.STREAM.MSG.GET.DEADLETTER","$JS.API.DIRECT.GET.DEADLETTER","$JS.API.DIRECT.GET.DEADLETTER.>","$JS.API.STREAM.CREATE.KV_leases","$KV.leases.>","$JS.API.STREAM.INFO.KV_leases","$JS.API.STREAM.MSG.GET.KV_leases","$JS.API.DIRECT.GET.KV_leases","$JS.API.DIRECT.GET.KV_leases.>","$JS.API.CONSUMER.*.KV_leases","$JS.API.CONSUMER.*.KV_leases.>","$JS.API.CONSUMER.DURABLE.CREATE.KV_leases.*","$JS.API.CONSUMER.MSG.NEXT.KV_leases.*","$JS.ACK.KV_leases.>","$JS.FC.KV_leases.>","$KV.services.webhooks.>","$JS.API.STREAM.INFO.KV_services"],"subscribe":["_INBOX.svc.webhooks.>","system.subscription.*.changed","system.device.*.registry","system.rule.*.changed","system.location.*"],"responses":false},"busauth":{"publish":["$JS.API.CONSUMER.INFO.SYSTEM.busauth","$JS.API.CONSUMER.MSG.NEXT.SYSTEM.busauth","$JS.ACK.SYSTEM.busauth.>","$KV.services.busauth.>","$JS.API.STREAM.INFO.KV_services"],"subscribe":["$SYS.REQ.USER.AUTH","_INBOX.svc.busauth.>"],"responses":true},"operator":{"publish":[">"],"subscribe":[">"],"responses":true}}
{{- end }}

{{- define "smarthome.busEnvName" -}}
NATS_PW_{{ . | upper | replace "-" "_" }}
{{- end }}

{{- define "smarthome.natsAuthorization" -}}
{{- $grants := include "smarthome.busGrants" . | fromJson }}
{{- $users := list }}
{{- range $name := list "gateway" "actors" "rules" "recorder" "webhooks" "busauth" "operator" }}
{{- $g := get $grants $name }}
{{- $perms := dict "publish" (dict "allow" $g.publish) "subscribe" (dict "allow" $g.subscribe) }}
{{- if $g.responses }}{{- $_ := set $perms "allow_responses" true }}{{- end }}
{{- $users = append $users (dict "user" $name "password" (printf "<< $%s >>" (include "smarthome.busEnvName" $name)) "permissions" $perms) }}
{{- end }}
authorization:
  timeout: 10
  users: {{ toJson $users }}
  auth_callout:
    issuer: << $BUS_ISSUER >>
    auth_users: ["gateway", "actors", "rules", "recorder", "webhooks", "busauth", "operator", "busauth-sys"]
accounts:
  SYS:
    users: [{user: busauth-sys, password: "<< ${{ include "smarthome.busEnvName" "busauth-sys" }} >>"}]
system_account: SYS
{{- end }}
