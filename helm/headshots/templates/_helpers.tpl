{{/*
Names, labels, shared pod parts and validateConfig for the headshots chart.
*/}}

{{/* The chart name (nameOverride wins). */}}
{{- define "headshots.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full resource name: also the RayCluster name, so at most 53 characters (KubeRay rejects longer
names because it derives pod and Service names from it).
*/}}
{{- define "headshots.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 53 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 53 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 53 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "headshots.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "headshots.labels" -}}
helm.sh/chart: {{ include "headshots.chart" . }}
{{ include "headshots.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: headshots
{{- end }}

{{/* Labels that select this release's pods (never change them: selectors are immutable). */}}
{{- define "headshots.selectorLabels" -}}
app.kubernetes.io/name: {{ include "headshots.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The container image reference. */}}
{{- define "headshots.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* rayStartParams as a mapping of strings (KubeRay's type); call with the dict. */}}
{{- define "headshots.rayStartParams" -}}
{{- $params := dict }}
{{- range $key, $value := . }}
{{- $_ := set $params $key (toString $value) }}
{{- end }}
{{- toYaml $params }}
{{- end }}

{{/* The ConfigMap that holds config.yaml. */}}
{{- define "headshots.configMapName" -}}
{{- printf "%s-config" (include "headshots.fullname" .) }}
{{- end }}

{{/*
Pod-level security context: Pod Security "restricted".
*/}}
{{- define "headshots.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Container-level security context: Pod Security "restricted", repeated on the container because
KubeRay copies it onto the init container it injects into worker pods.
*/}}
{{- define "headshots.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ .Values.podSecurity.readOnlyRootFilesystem }}
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Environment shared by the head and the GPU workers. Secrets are referenced, never inlined.
*/}}
{{- define "headshots.env" -}}
- name: HEADSHOTS_CONFIG
  value: /etc/headshots/config.yaml
# The app's working folder (stack record, model cache): on the writable /tmp emptyDir.
- name: HEADSHOTS_HOME
  value: /tmp/headshots
# torch, Hugging Face and other libraries cache under $XDG_CACHE_HOME: keep it off the read-only root.
- name: XDG_CACHE_HOME
  value: /tmp/cache
- name: HEADSHOTS_STORE_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.store.existingSecret }}
      key: access-key
- name: HEADSHOTS_STORE_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.store.existingSecret }}
      key: secret-key
{{- if .Values.ray.auth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.ray.auth.existingSecret }}
      key: token
{{- else }}
- name: RAY_AUTH_MODE
  value: disabled
{{- end }}
{{- end }}

{{/* Volume mounts shared by the head and the GPU workers. */}}
{{- define "headshots.volumeMounts" -}}
- name: config
  mountPath: /etc/headshots
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: shm
  mountPath: /dev/shm
{{- end }}

{{/* Volumes for a pod; call with (dict "root" $ "group" .Values.head) or .Values.gpuWorkers. */}}
{{- define "headshots.volumes" -}}
- name: config
  configMap:
    name: {{ include "headshots.configMapName" .root }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .group.tmpSizeLimit }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .group.shmSizeLimit }}
{{- end }}

{{/*
validateConfig: refuse to render a release that would run unsafely or not at all. Each message
names the key path, its value and what is allowed.
*/}}
{{- define "headshots.validateConfig" -}}
{{- $store := .Values.store }}
{{- if not $store.endpoint }}
{{- fail (printf "store.endpoint is required (the S3/MinIO endpoint as host:port, e.g. minio.storage.svc:9000) but is %q" (toString $store.endpoint)) }}
{{- end }}
{{- if or (contains "://" $store.endpoint) (contains "/" $store.endpoint) }}
{{- fail (printf "store.endpoint must be host:port without a scheme or path but is %q; store.secure chooses TLS" $store.endpoint) }}
{{- end }}
{{- $loopback := regexMatch "^(localhost|127(\\.[0-9]{1,3}){3}|\\[::1\\]|::1)(:[0-9]+)?$" $store.endpoint }}
{{- if and (not $store.secure) (not $loopback) }}
{{- fail (printf "store.secure must be true for store.endpoint %q (not loopback) but is %v: photos may only travel over TLS" $store.endpoint $store.secure) }}
{{- end }}
{{- if not $store.existingSecret }}
{{- fail (printf "store.existingSecret must name an existing Secret with the keys access-key and secret-key but is %q" (toString $store.existingSecret)) }}
{{- end }}
{{- if and .Values.ray.auth.enabled (not .Values.ray.auth.existingSecret) }}
{{- fail (printf "ray.auth.existingSecret must name an existing Secret with the key token while ray.auth.enabled is true, but is %q" (toString .Values.ray.auth.existingSecret)) }}
{{- end }}
{{- $workers := .Values.gpuWorkers }}
{{- if or (lt (int $workers.replicas) (int $workers.minReplicas)) (gt (int $workers.replicas) (int $workers.maxReplicas)) }}
{{- fail (printf "gpuWorkers.replicas must be between gpuWorkers.minReplicas (%d) and gpuWorkers.maxReplicas (%d) but is %d" (int $workers.minReplicas) (int $workers.maxReplicas) (int $workers.replicas)) }}
{{- end }}
{{- end }}
