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

{{/* The store endpoint the app uses: the chart's own MinIO when enabled, else store.endpoint. */}}
{{- define "headshots.storeEndpoint" -}}
{{- if .Values.store.minio.enabled }}
{{- printf "%s-minio.%s.svc:9000" (include "headshots.fullname" .) .Release.Namespace }}
{{- else }}
{{- .Values.store.endpoint }}
{{- end }}
{{- end }}

{{/* The store's port, for the NetworkPolicy (443 when the endpoint names none). */}}
{{- define "headshots.storePort" -}}
{{- $port := regexFind "[0-9]+$" (regexFind ":[0-9]+$" (include "headshots.storeEndpoint" .)) }}
{{- default "443" $port }}
{{- end }}

{{/* The Secret and key holding the store's CA certificate; empty when the image's public CAs apply. */}}
{{- define "headshots.storeCaSecret" -}}
{{- if .Values.store.caBundle.existingSecret }}
{{- .Values.store.caBundle.existingSecret }}
{{- else if .Values.store.minio.enabled }}
{{- .Values.store.minio.tls.existingSecret }}
{{- end }}
{{- end }}
{{- define "headshots.storeCaKey" -}}
{{- if .Values.store.caBundle.existingSecret }}{{ .Values.store.caBundle.key }}{{ else }}ca.crt{{ end }}
{{- end }}

{{/* Where the store's CA certificate is mounted (config.yaml store.ca_file). */}}
{{- define "headshots.storeCaFile" -}}
{{- if include "headshots.storeCaSecret" . }}/etc/headshots/store-ca/ca.crt{{ end }}
{{- end }}

{{/* Egress rules to cluster DNS and to the object store (its port; the chart's MinIO by label). */}}
{{- define "headshots.dnsAndStoreEgress" -}}
- to:
    {{- toYaml .Values.networkPolicy.dnsTo | nindent 4 }}
  ports:
    - {port: 53, protocol: UDP}
    - {port: 53, protocol: TCP}
# The object store.
- ports:
    - port: {{ include "headshots.storePort" . | int }}
      protocol: TCP
  {{- if .Values.store.minio.enabled }}
  to:
    - podSelector:
        matchLabels:
          {{- include "headshots.selectorLabels" . | nindent 10 }}
          app.kubernetes.io/component: minio
  {{- else if .Values.networkPolicy.storeTo }}
  to:
    {{- toYaml .Values.networkPolicy.storeTo | nindent 4 }}
  {{- end }}
{{- end }}

{{/* The external Redis's port (GCS fault tolerance), from ray.gcsFaultTolerance.redisAddress. */}}
{{- define "headshots.redisPort" -}}
{{- default "6379" (regexFind "[0-9]+$" .Values.ray.gcsFaultTolerance.redisAddress) }}
{{- end }}

{{/* Non-empty when the head mounts a CA for Redis's TLS certificate (GCS fault tolerance, rediss://). */}}
{{- define "headshots.redisCaSecret" -}}
{{- with .Values.ray.gcsFaultTolerance }}
{{- if and .enabled .caBundle.existingSecret }}{{ .caBundle.existingSecret }}{{ end }}
{{- end }}
{{- end }}

{{/* Labels that select the studio API's pods. */}}
{{- define "headshots.apiSelectorLabels" -}}
{{ include "headshots.selectorLabels" . }}
app.kubernetes.io/component: api
{{- end }}

{{/*
The Ray address of the API pods: the Ray client port of KubeRay's head Service (the API pods are not
Ray nodes, so they connect as Ray clients).
*/}}
{{- define "headshots.apiRayAddress" -}}
{{- printf "ray://%s-head-svc.%s.svc:10001" (include "headshots.fullname" .) .Release.Namespace }}
{{- end }}

{{/* Labels that select the release's Ray pods (KubeRay puts ray.io/cluster on every pod it creates). */}}
{{- define "headshots.raySelectorLabels" -}}
ray.io/cluster: {{ include "headshots.fullname" . }}
{{- end }}

{{/* Person classes the policy keeps until deleted on request ("keep"), as a comma-separated list. */}}
{{- define "headshots.retentionKeptForever" -}}
{{- $policy := .Values.retention.policy }}
{{- $kept := list }}
{{- range $artifact := list "uploads" "derived" "models" }}
{{- if eq (toString (index $policy.days $artifact)) "keep" }}
{{- $kept = append $kept $artifact }}
{{- end }}
{{- range $tenant, $days := $policy.tenants }}
{{- if eq (toString (index $days $artifact | default "")) "keep" }}
{{- $kept = append $kept (printf "%s (tenant %s)" $artifact $tenant) }}
{{- end }}
{{- end }}
{{- end }}
{{- join ", " $kept }}
{{- end }}

{{/* The retention policy in the app's file shape: "keep" becomes null (what the app reads as "keep"). */}}
{{- define "headshots.retentionPolicyFile" -}}
{{- $policy := deepCopy .Values.retention.policy }}
{{- $toFile := dict }}
{{- range $artifact, $value := $policy.days }}
{{- $_ := set $toFile $artifact (ternary nil $value (eq (toString $value) "keep")) }}
{{- end }}
{{- $_ := set $policy "days" $toFile }}
{{- $tenants := dict }}
{{- range $tenant, $days := ($policy.tenants | default dict) }}
{{- $tenantDays := dict }}
{{- range $artifact, $value := $days }}
{{- $_ := set $tenantDays $artifact (ternary nil $value (eq (toString $value) "keep")) }}
{{- end }}
{{- $_ := set $tenants $tenant $tenantDays }}
{{- end }}
{{- $_ := set $policy "tenants" $tenants }}
{{- toYaml $policy }}
{{- end }}

{{/*
Environment shared by every Ray container (head, controllers, workers). Secrets are referenced,
never inlined.
*/}}
{{- define "headshots.env" -}}
- name: HEADSHOTS_CONFIG
  value: /etc/headshots/config.yaml
# The app's working folder (stack record, model cache): on the writable /tmp emptyDir.
- name: HEADSHOTS_HOME
  value: /tmp/headshots
# The node's cache (base models copied from s3://, read by the GPU workers): on the pod's /tmp emptyDir,
# so it survives a container restart and is gone with the pod.
- name: HEADSHOTS_NODE_CACHE_DIR
  value: /tmp/node-cache
{{- with .Values.ray.healthCheck }}
{{- if ne (toString .periodMs) "" }}
# Ray's node health checks (values.yaml ray.healthCheck): the same in every Ray container, since GPU
# workers size their leases from them.
- name: RAY_health_check_period_ms
  value: {{ .periodMs | quote }}
{{- end }}
{{- if ne (toString .timeoutMs) "" }}
- name: RAY_health_check_timeout_ms
  value: {{ .timeoutMs | quote }}
{{- end }}
{{- if ne (toString .failureThreshold) "" }}
- name: RAY_health_check_failure_threshold
  value: {{ .failureThreshold | quote }}
{{- end }}
{{- end }}
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
- name: HEADSHOTS_SECURITY_MASTER_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.security.existingSecret }}
      key: master-key
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
{{- if .Values.ray.tls.enabled }}
- name: RAY_USE_TLS
  value: "1"
- name: RAY_TLS_SERVER_CERT
  value: /etc/ray/tls/tls.crt
- name: RAY_TLS_SERVER_KEY
  value: /etc/ray/tls/tls.key
- name: RAY_TLS_CA_CERT
  value: /etc/ray/tls/ca.crt
{{- end }}
{{- end }}

{{/* Volume mounts shared by every Ray container. */}}
{{- define "headshots.volumeMounts" -}}
- name: config
  mountPath: /etc/headshots
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: shm
  mountPath: /dev/shm
{{- if include "headshots.storeCaSecret" . }}
- name: store-ca
  mountPath: /etc/headshots/store-ca
  readOnly: true
{{- end }}
{{- if .Values.ray.tls.enabled }}
- name: ray-tls
  mountPath: /etc/ray/tls
  readOnly: true
{{- end }}
{{- end }}

{{/* Volumes for a Ray pod; call with (dict "root" $ "group" .Values.head), .Values.gpuWorkers or .Values.cpuWorkers. */}}
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
{{- with include "headshots.storeCaSecret" .root }}
- name: store-ca
  secret:
    secretName: {{ . }}
    items:
      - key: {{ include "headshots.storeCaKey" $.root }}
        path: ca.crt
{{- end }}
{{- if .root.Values.ray.tls.enabled }}
- name: ray-tls
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
- name: ray-tls-ca
  secret:
    secretName: {{ .root.Values.ray.tls.existingSecret }}
    items:
      - key: ca.crt
        path: ca.crt
      - key: ca.key
        path: ca.key
- name: ray-tls-script
  configMap:
    name: {{ include "headshots.fullname" .root }}-ray-tls
{{- end }}
{{- end }}

{{/*
Init container that issues a Ray pod its TLS certificate (for its IP and the head Service's name),
signed by the CA from ray.tls.existingSecret. The CA key is mounted here only.
*/}}
{{- define "headshots.rayTlsInitContainer" -}}
{{- if .Values.ray.tls.enabled }}
- name: ray-tls-certificate
  image: {{ include "headshots.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["python", "/etc/ray/tls-script/issue-certificate.py"]
  env:
    - name: POD_IP
      valueFrom:
        fieldRef:
          fieldPath: status.podIP
    - name: HEAD_SERVICE_DNS
      value: {{ printf "%s-head-svc.%s.svc" (include "headshots.fullname" .) .Release.Namespace | quote }}
    - name: CERTIFICATE_DAYS
      value: {{ .Values.ray.tls.certificateDays | quote }}
  resources:
    requests:
      cpu: 50m
      memory: 64Mi
    limits:
      cpu: 200m
      memory: 128Mi
  securityContext:
    {{- include "headshots.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    - name: ray-tls
      mountPath: /etc/ray/tls
    - name: ray-tls-ca
      mountPath: /etc/ray/tls-ca
      readOnly: true
    - name: ray-tls-script
      mountPath: /etc/ray/tls-script
      readOnly: true
{{- end }}
{{- end }}

{{/*
A Ray pod spec's scheduling and security part; call with (dict "root" $ "group" <group values>
"automountToken" bool).
*/}}
{{- define "headshots.podCommon" -}}
automountServiceAccountToken: {{ .automountToken }}
securityContext:
  {{- include "headshots.podSecurityContext" .root | nindent 2 }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A worker group's entry in workerGroupSpecs; call with (dict "root" $ "group" <values> "component" name "gpu" bool). */}}
{{- define "headshots.workerGroup" -}}
{{- $root := .root }}
{{- $group := .group }}
{{- $params := $group.rayStartParams }}
{{- if not .gpu }}
{{- /* CPU-only group: never advertise GPUs, whatever the node has. */}}
{{- $params = merge (dict "num-gpus" "0") $group.rayStartParams }}
{{- end }}
- groupName: {{ $group.groupName }}
  replicas: {{ $group.replicas }}
  minReplicas: {{ $group.minReplicas }}
  maxReplicas: {{ $group.maxReplicas }}
  rayStartParams:
    {{- include "headshots.rayStartParams" $params | nindent 4 }}
  template:
    metadata:
      labels:
        {{- include "headshots.labels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ .component }}
        {{- with $group.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        {{- with $group.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      {{- include "headshots.podCommon" (dict "root" $root "group" $group "automountToken" false) | nindent 6 }}
      {{- with $group.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with include "headshots.rayTlsInitContainer" $root }}
      initContainers:
        {{- . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "headshots.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          env:
            {{- include "headshots.env" $root | nindent 12 }}
          resources:
            {{- if .gpu }}
            {{- /* One GPU per pod: the app runs one GPU worker actor per GPU (num_gpus=1). */}}
            requests:
              {{- with omit ($group.resources.requests | default dict) "nvidia.com/gpu" }}
              {{- toYaml . | nindent 14 }}
              {{- end }}
              nvidia.com/gpu: 1
            limits:
              {{- with omit ($group.resources.limits | default dict) "nvidia.com/gpu" }}
              {{- toYaml . | nindent 14 }}
              {{- end }}
              nvidia.com/gpu: 1
            {{- else }}
            {{- toYaml $group.resources | nindent 12 }}
            {{- end }}
          securityContext:
            {{- include "headshots.containerSecurityContext" $root | nindent 12 }}
          volumeMounts:
            {{- include "headshots.volumeMounts" $root | nindent 12 }}
      volumes:
        {{- include "headshots.volumes" (dict "root" $root "group" $group) | nindent 8 }}
{{- end }}

{{/*
validateConfig: refuse to render a release that would run unsafely or not at all. Each message
names the key path, its value and what is allowed.
*/}}
{{- define "headshots.validateConfig" -}}
{{- $store := .Values.store }}
{{- if $store.minio.enabled }}
{{- if $store.endpoint }}
{{- fail (printf "store.endpoint must be empty while store.minio.enabled is true (the chart points the app at its own MinIO) but is %q" $store.endpoint) }}
{{- end }}
{{- if not $store.minio.tls.existingSecret }}
{{- fail (printf "store.minio.tls.existingSecret must name an existing Secret with the keys tls.crt, tls.key and ca.crt while store.minio.enabled is true (photos only travel over TLS) but is %q" (toString $store.minio.tls.existingSecret)) }}
{{- end }}
{{- if not $store.secure }}
{{- fail "store.secure must be true while store.minio.enabled is true (the chart's MinIO serves TLS only) but is false" }}
{{- end }}
{{- else }}
{{- if not $store.endpoint }}
{{- fail (printf "store.endpoint is required (the S3/MinIO endpoint as host:port, e.g. minio.storage.svc:9000), or set store.minio.enabled=true for a trial MinIO; it is %q" (toString $store.endpoint)) }}
{{- end }}
{{- if or (contains "://" $store.endpoint) (contains "/" $store.endpoint) }}
{{- fail (printf "store.endpoint must be host:port without a scheme or path but is %q; store.secure chooses TLS" $store.endpoint) }}
{{- end }}
{{- $loopback := regexMatch "^(localhost|127(\\.[0-9]{1,3}){3}|\\[::1\\]|::1)(:[0-9]+)?$" $store.endpoint }}
{{- if and (not $store.secure) (not $loopback) }}
{{- fail (printf "store.secure must be true for store.endpoint %q (not loopback) but is %v: photos may only travel over TLS" $store.endpoint $store.secure) }}
{{- end }}
{{- end }}
{{- if not $store.existingSecret }}
{{- fail (printf "store.existingSecret must name an existing Secret with the keys access-key and secret-key but is %q" (toString $store.existingSecret)) }}
{{- end }}
{{- if not .Values.security.existingSecret }}
{{- fail (printf "security.existingSecret must name an existing Secret with the key master-key (base64 of 32 random bytes; it wraps every person's data key) but is %q" (toString .Values.security.existingSecret)) }}
{{- end }}
{{- if and .Values.ray.auth.enabled (not .Values.ray.auth.existingSecret) }}
{{- fail (printf "ray.auth.existingSecret must name an existing Secret with the key token while ray.auth.enabled is true, but is %q" (toString .Values.ray.auth.existingSecret)) }}
{{- end }}
{{- if and .Values.ray.tls.enabled (not .Values.ray.tls.existingSecret) }}
{{- fail (printf "ray.tls.existingSecret must name an existing Secret with the keys ca.crt and ca.key while ray.tls.enabled is true, but is %q" (toString .Values.ray.tls.existingSecret)) }}
{{- end }}
{{- /*
GCS fault tolerance. A Redis password never appears as a value: not in ray.gcsFaultTolerance, not in
the address, not in head.rayStartParams (each would be written into the RayCluster object). The
messages do not repeat what was given, since it may be the password.
*/}}
{{- $ft := .Values.ray.gcsFaultTolerance }}
{{- if kindIs "string" $ft.redisPassword }}
{{- fail "ray.gcsFaultTolerance.redisPassword must name a Secret (redisPassword.existingSecret, redisPassword.key), not hold the password: a plaintext value would be written into the RayCluster object and the release's stored values (the value given is not repeated here)" }}
{{- end }}
{{- if contains "@" $ft.redisAddress }}
{{- fail "ray.gcsFaultTolerance.redisAddress must not carry credentials (user:password@host): a plaintext password would be written into the RayCluster object; put the password in a Secret named by ray.gcsFaultTolerance.redisPassword.existingSecret (the address given is not repeated here)" }}
{{- end }}
{{- if hasKey .Values.head.rayStartParams "redis-password" }}
{{- fail "head.rayStartParams.redis-password must not be set: it puts the Redis password into the RayCluster object in plaintext. Name a Secret in ray.gcsFaultTolerance.redisPassword.existingSecret instead; KubeRay hands the password to Ray (the value given is not repeated here)" }}
{{- end }}
{{- if $ft.enabled }}
{{- if not $ft.redisAddress }}
{{- fail (printf "ray.gcsFaultTolerance.redisAddress is required while ray.gcsFaultTolerance.enabled is true (the external Redis as redis://host:port, or rediss://host:port for TLS), but is %q" (toString $ft.redisAddress)) }}
{{- end }}
{{- $redisPort := regexFind "[0-9]+$" $ft.redisAddress }}
{{- if or (not (regexMatch "^((redis|rediss)://)?[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?:[0-9]{1,5}$" $ft.redisAddress)) (lt (int $redisPort) 1) (gt (int $redisPort) 65535) }}
{{- fail (printf "ray.gcsFaultTolerance.redisAddress must be redis://host:port or rediss://host:port (TLS), or a bare host:port, with a port in 1-65535 and no path, but is %q" $ft.redisAddress) }}
{{- end }}
{{- if not $ft.redisPassword.existingSecret }}
{{- fail (printf "ray.gcsFaultTolerance.redisPassword.existingSecret must name an existing Secret with the Redis password (key ray.gcsFaultTolerance.redisPassword.key) while ray.gcsFaultTolerance.enabled is true: Redis then holds the actors' arguments, store credentials and master key included, so it must not be open; it is %q" (toString $ft.redisPassword.existingSecret)) }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (not $ft.redisEgress.to) }}
{{- fail (printf "ray.gcsFaultTolerance.redisEgress.to must say where Redis is (NetworkPolicyPeer list, e.g. a namespaceSelector with a podSelector, or an ipBlock) while ray.gcsFaultTolerance.enabled and networkPolicy.enabled are true: the default-deny NetworkPolicy would block the head from Redis on port %s and the head would not start; it is []" $redisPort) }}
{{- end }}
{{- end }}
{{- range $key := list "gpuWorkers" "cpuWorkers" }}
{{- $workers := index $.Values $key }}
{{- if or (lt (int $workers.replicas) (int $workers.minReplicas)) (gt (int $workers.replicas) (int $workers.maxReplicas)) }}
{{- fail (printf "%s.replicas must be between %s.minReplicas (%d) and %s.maxReplicas (%d) but is %d" $key $key (int $workers.minReplicas) $key (int $workers.maxReplicas) (int $workers.replicas)) }}
{{- end }}
{{- end }}
{{- if and .Values.cpuWorkers.enabled (eq .Values.cpuWorkers.groupName .Values.gpuWorkers.groupName) }}
{{- fail (printf "cpuWorkers.groupName must differ from gpuWorkers.groupName but both are %q" .Values.gpuWorkers.groupName) }}
{{- end }}
{{- if eq (int .Values.metrics.port) (int .Values.metrics.retentionPort) }}
{{- fail (printf "metrics.retentionPort must differ from metrics.port but both are %d" (int .Values.metrics.port)) }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) }}
{{- fail "metrics.serviceMonitor.enabled is true but metrics.service.enabled is false: the ServiceMonitor scrapes through that Service; enable both or neither" }}
{{- end }}
{{- with $store.publicEndpoint }}
{{- if or (contains "://" .) (contains "/" .) }}
{{- fail (printf "store.publicEndpoint must be host:port without a scheme or path but is %q; store.publicSecure chooses TLS" .) }}
{{- end }}
{{- if not $store.publicSecure }}
{{- fail (printf "store.publicSecure must be true for store.publicEndpoint %q but is false: download URLs for headshots may only use TLS" .) }}
{{- end }}
{{- end }}
{{- with .Values.api.ingress }}
{{- if and $.Values.api.enabled .enabled }}
{{- if not .host }}
{{- fail (printf "api.ingress.host must be the host name studios use (e.g. api.headshots.example.com) while api.ingress.enabled is true, but is %q" (toString .host)) }}
{{- end }}
{{- if not .tls.secretName }}
{{- fail (printf "api.ingress.tls.secretName must name a Secret with the certificate for %q while api.ingress.enabled is true (the API takes API keys and photos: TLS only), but is %q" .host (toString .tls.secretName)) }}
{{- end }}
{{- end }}
{{- end }}
{{- if lt (float64 .Values.webhooks.maxRetryDelaySeconds) (float64 .Values.webhooks.firstRetryDelaySeconds) }}
{{- fail (printf "webhooks.maxRetryDelaySeconds (%v) must not be less than webhooks.firstRetryDelaySeconds (%v)" .Values.webhooks.maxRetryDelaySeconds .Values.webhooks.firstRetryDelaySeconds) }}
{{- end }}
{{- if and .Values.head.avoidSpotNodes (dig "nodeAffinity" "requiredDuringSchedulingIgnoredDuringExecution" "" .Values.head.affinity) }}
{{- fail "head.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution cannot be set while head.avoidSpotNodes is true (the chart sets it to keep the head off spot nodes): use head.nodeSelector, a preferred nodeAffinity, or head.avoidSpotNodes=false" }}
{{- end }}
{{- end }}
