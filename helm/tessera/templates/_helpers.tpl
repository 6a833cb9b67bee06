{{/* Names, labels and the pieces every role's pod shares. */}}

{{- define "tessera.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tessera.fullname" -}}
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

{{- define "tessera.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tessera.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one role: (dict "root" $ "role" "sync-worker") */}}
{{- define "tessera.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tessera.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{/*
The roles this release runs, as a JSON list: name, binary, the values key of
their settings, and whether they serve HTTP (and so may autoscale). The
federation-receiver only with federation.enabled.
*/}}
{{- define "tessera.roles" -}}
{{- $roles := list
  (dict "name" "room-worker" "binary" "tessera-room-worker" "key" "roomWorker" "http" false)
  (dict "name" "client-api" "binary" "tessera-client-api" "key" "clientApi" "http" true)
  (dict "name" "sync-worker" "binary" "tessera-sync-worker" "key" "syncWorker" "http" true)
}}
{{- if .Values.federation.enabled }}
{{- $roles = append $roles (dict "name" "federation-receiver" "binary" "tessera-federation-receiver" "key" "federationReceiver" "http" true) }}
{{- end }}
{{- toJson $roles }}
{{- end }}

{{- define "tessera.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tessera.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tessera.secretName" -}}
{{- default (printf "%s-secrets" (include "tessera.fullname" .)) .Values.secrets.existingSecret }}
{{- end }}

{{- define "tessera.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Whether a signing key is provided (in values or, possibly, the existing Secret). */}}
{{- define "tessera.hasSigningKey" -}}
{{- if or .Values.secrets.existingSecret .Values.secrets.signingKey }}true{{- end }}
{{- end }}

{{/* Environment every Tessera container gets: secrets, and the pod's identity. */}}
{{- define "tessera.env" -}}
{{- include "tessera.envFrom" (dict "root" . "secret" (include "tessera.secretName" .)) }}
{{- end }}

{{/* As tessera.env, with the secrets from another Secret: (dict "root" $ "secret" name) */}}
{{- define "tessera.envFrom" -}}
{{- $v := .root.Values -}}
- name: TESSERA_CONFIG
  value: /etc/tessera/tessera.toml
- name: TESSERA_DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ $v.secrets.keys.databaseUrl }}
- name: TESSERA_REDIS__URL
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ $v.secrets.keys.redisUrl }}
{{- if or $v.secrets.existingSecret $v.secrets.registrationSharedSecret }}
- name: TESSERA_REGISTRATION__SHARED_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ $v.secrets.keys.registrationSharedSecret }}
      optional: true
{{- end }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Volumes every Tessera pod gets: the config, the signing key if any, /tmp. */}}
{{- define "tessera.volumes" -}}
{{- include "tessera.volumesFrom" (dict "root" . "config" (printf "%s-config" (include "tessera.fullname" .)) "secret" (include "tessera.secretName" .)) }}
{{- end }}

{{/* As tessera.volumes, from another ConfigMap and Secret: (dict "root" $ "config" name "secret" name) */}}
{{- define "tessera.volumesFrom" -}}
- name: config
  configMap:
    name: {{ .config }}
{{- if include "tessera.hasSigningKey" .root }}
- name: signing-key
  secret:
    secretName: {{ .secret }}
    optional: true
    items:
      - key: {{ .root.Values.secrets.keys.signingKey }}
        path: signing.key
{{- end }}
- name: tmp
  emptyDir: {}
{{- end }}

{{- define "tessera.volumeMounts" -}}
- name: config
  mountPath: /etc/tessera
  readOnly: true
{{- if include "tessera.hasSigningKey" . }}
- name: signing-key
  mountPath: /etc/tessera-keys
  readOnly: true
{{- end }}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* Probes on the admin listener's health endpoints. */}}
{{- define "tessera.probes" -}}
startupProbe:
  httpGet: { path: /health/ready, port: admin }
  periodSeconds: 2
  failureThreshold: 60
readinessProbe:
  httpGet: { path: /health/ready, port: admin }
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  httpGet: { path: /health/live, port: admin }
  periodSeconds: 10
  failureThreshold: 3
{{- end }}

{{/* Pod-level settings of a role: (dict "root" $ "role" $roleValues) */}}
{{- define "tessera.podSettings" -}}
serviceAccountName: {{ include "tessera.serviceAccountName" .root }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .root.Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with (default .root.Values.nodeSelector .role.nodeSelector) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default .root.Values.tolerations .role.tolerations) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (default .root.Values.affinity .role.affinity) }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .root.Values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
