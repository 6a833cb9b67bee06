{{/* The TOML configuration every role reads (secrets come from the environment). */}}
{{- define "tessera.configToml" -}}
server_name = {{ required "serverName is required" .Values.serverName | quote }}

[admin]
listen = "0.0.0.0:{{ .Values.ports.admin }}"

[client_api]
listen = "0.0.0.0:{{ .Values.ports.http }}"
{{- with .Values.publicBaseUrl }}
public_baseurl = {{ . | quote }}
{{- end }}
{{- with .Values.wellKnownServer }}
well_known_server = {{ . | quote }}
{{- end }}

[sync_worker]
listen = "0.0.0.0:{{ .Values.ports.http }}"

[federation_receiver]
listen = "0.0.0.0:{{ .Values.ports.http }}"
concurrent_memberships = {{ int .Values.federationReceiver.concurrentMemberships }}

[room_worker]
listen = "0.0.0.0:{{ .Values.ports.grpc }}"
concurrency = {{ .Values.roomWorker.concurrency }}
batch_size = {{ .Values.roomWorker.batchSize }}
state_cache_events = {{ int .Values.roomWorker.stateCacheEvents }}
drain_timeout_ms = {{ mul .Values.roomWorker.drainSeconds 1000 }}

[cluster]
partitions = {{ .Values.cluster.partitions }}
lease_ttl_ms = {{ .Values.cluster.leaseTtlMs }}
heartbeat_interval_ms = {{ .Values.cluster.heartbeatIntervalMs }}

[database]
pool_size = {{ .Values.postgres.poolSize }}
min_connections = {{ .Values.postgres.minConnections }}
# The migration Job applies migrations before every install and upgrade.
migrate_on_start = {{ not .Values.migrations.enabled }}

[redis]
key_prefix = {{ .Values.redis.keyPrefix | quote }}
stream_max_len = {{ .Values.redis.streamMaxLen }}

[registration]
open = {{ .Values.registration.open }}
tokens = {{ .Values.registration.tokens }}

[federation]
trusted_key_servers = {{ .Values.federation.trustedKeyServers | toJson }}
verify_certificates = {{ .Values.federation.verifyCertificates }}
origin_pdus_per_second = {{ .Values.federation.originPdusPerSecond | int64 }}
origin_pdu_burst = {{ .Values.federation.originPduBurst | int64 }}
max_staged_per_room = {{ .Values.federation.maxStagedPerRoom | int64 }}
{{- if include "tessera.hasSigningKey" . }}
signing_key_path = "/etc/tessera-keys/signing.key"
{{- end }}

[log]
filter = {{ .Values.log.filter | quote }}
format = {{ .Values.log.format | quote }}

[telemetry]
sample_ratio = {{ .Values.telemetry.sampleRatio | float64 }}
{{- with .Values.telemetry.otlpEndpoint }}
otlp_endpoint = {{ . | quote }}
{{- end }}
{{- range $section, $settings := .Values.extraConfig }}

[{{ $section }}]
{{- range $key, $value := $settings }}
{{ $key }} = {{ $value | toJson }}
{{- end }}
{{- end }}
{{- end }}

{{/* The chart's Secret (when there is no existing one). */}}
{{- define "tessera.secretData" -}}
{{ .Values.secrets.keys.databaseUrl }}: {{ required "postgres.url is required (or secrets.existingSecret)" .Values.postgres.url | quote }}
{{ .Values.secrets.keys.redisUrl }}: {{ required "redis.url is required (or secrets.existingSecret)" .Values.redis.url | quote }}
{{- with .Values.secrets.registrationSharedSecret }}
{{ $.Values.secrets.keys.registrationSharedSecret }}: {{ . | quote }}
{{- end }}
{{- with .Values.secrets.signingKey }}
{{ $.Values.secrets.keys.signingKey }}: {{ . | quote }}
{{- end }}
{{- end }}
