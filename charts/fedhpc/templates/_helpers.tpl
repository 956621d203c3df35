{{/* Names --------------------------------------------------------------------------------- */}}

{{- define "fedhpc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fedhpc.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fedhpc.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fedhpc.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fedhpc.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels: call with (dict "ctx" $ "component" "registry") ------------------------------ */}}

{{- define "fedhpc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedhpc.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "fedhpc.labels" -}}
helm.sh/chart: {{ include "fedhpc.chart" .ctx }}
{{ include "fedhpc.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: fedhpc
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end -}}

{{/* Ports and addresses -------------------------------------------------------------------- */}}

{{- define "fedhpc.grpcPort" -}}
{{- get (dict "registry" 50051 "aggregator" 50052 "coordinator" 50053) . -}}
{{- end -}}

{{- define "fedhpc.metricsPort" -}}
{{- get (dict "registry" 9101 "aggregator" 9102 "coordinator" 9103) . -}}
{{- end -}}

{{- define "fedhpc.serviceName" -}}
{{- printf "%s-%s" (include "fedhpc.fullname" .ctx) .component -}}
{{- end -}}

{{/* host:port of a component's Service, by its namespace-qualified name (what TLS certificates
name). */}}
{{- define "fedhpc.address" -}}
{{- printf "%s.%s.svc:%s" (include "fedhpc.serviceName" .) .ctx.Release.Namespace (include "fedhpc.grpcPort" .component) -}}
{{- end -}}

{{- define "fedhpc.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Mount points. */}}
{{- define "fedhpc.configDir" -}}/etc/fedhpc/config{{- end -}}
{{- define "fedhpc.tlsDir" -}}/etc/fedhpc/tls{{- end -}}

{{/* Checks values the schema cannot express (cross-key conditions), with a clear message. */}}
{{- define "fedhpc.validate" -}}
{{- if and (eq .Values.store.kind "s3") (not .Values.store.endpoint) -}}
{{- fail "store.endpoint is required when store.kind is s3 (host:port of the S3 API, no scheme)" -}}
{{- end -}}
{{- if contains "://" .Values.store.endpoint -}}
{{- fail (printf "store.endpoint %q: give host:port without a scheme; use store.secure for HTTPS" .Values.store.endpoint) -}}
{{- end -}}
{{- if not .Values.store.existingSecret -}}
{{- fail "store.existingSecret is required: the Secret holding the S3 access and secret keys" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) -}}
{{- fail "tls.existingSecret is required when tls.enabled is true (a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt)" -}}
{{- end -}}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) -}}
{{- fail "auth.existingSecret is required when auth.enabled is true (the Secret with the admin, internal and site tokens)" -}}
{{- end -}}
{{- if and .Values.aggregator.autoscaling.enabled (not (dig "requests" "cpu" "" .Values.aggregator.resources)) -}}
{{- fail "aggregator.autoscaling needs aggregator.resources.requests.cpu (utilization is a percentage of the request)" -}}
{{- end -}}
{{- if and .Values.aggregator.autoscaling.enabled (gt (int .Values.aggregator.autoscaling.minReplicas) (int .Values.aggregator.autoscaling.maxReplicas)) -}}
{{- fail "aggregator.autoscaling.minReplicas must not exceed maxReplicas" -}}
{{- end -}}
{{- end -}}

{{/* The fedhpc configuration file (secrets come from the environment, never from here). */}}
{{- define "fedhpc.config" -}}
{{- $tls := .Values.tls.enabled -}}
{{- $store := dict "kind" "s3" "bucket" .Values.store.bucket "create_bucket" .Values.store.createBucket -}}
{{- if eq .Values.store.kind "minio" -}}
{{- $_ := set $store "endpoint" (printf "%s-minio.%s.svc:9000" (include "fedhpc.fullname" .) .Release.Namespace) -}}
{{- $_ := set $store "secure" false -}}
{{- else -}}
{{- $_ := set $store "endpoint" .Values.store.endpoint -}}
{{- $_ := set $store "secure" .Values.store.secure -}}
{{- if .Values.store.region -}}
{{- $_ := set $store "region" .Values.store.region -}}
{{- end -}}
{{- end -}}
{{- if .Values.store.publicEndpoint -}}
{{- $_ := set $store "public_endpoint" .Values.store.publicEndpoint -}}
{{- end -}}
{{- if not (kindIs "invalid" .Values.store.publicSecure) -}}
{{- $_ := set $store "public_secure" .Values.store.publicSecure -}}
{{- end -}}
{{- $config := dict "store" $store "log" (dict "level" .Values.log.level "json" .Values.log.json) -}}
{{- range $component := list "registry" "aggregator" "coordinator" -}}
{{- $server := dict "host" "0.0.0.0" "port" (include "fedhpc.grpcPort" $component | int) "metrics_port" (include "fedhpc.metricsPort" $component | int) "auth" (dict "enabled" $.Values.auth.enabled) -}}
{{- if $tls -}}
{{- $_ := set $server "tls" (dict "cert_file" (printf "%s/tls.crt" (include "fedhpc.tlsDir" $)) "key_file" (printf "%s/tls.key" (include "fedhpc.tlsDir" $))) -}}
{{- end -}}
{{- $_ := set $config $component (dict "server" $server) -}}
{{- end -}}
{{- $registry := include "fedhpc.address" (dict "ctx" . "component" "registry") -}}
{{- $_ := set $config.aggregator "registry_address" $registry -}}
{{- $_ := set $config.aggregator "spool_dir" "/tmp" -}}
{{- $_ := set $config.coordinator "registry_address" $registry -}}
{{- $_ := set $config.coordinator "aggregator_address" (include "fedhpc.address" (dict "ctx" . "component" "aggregator")) -}}
{{- $_ := set $config.coordinator "data_dir" "/data" -}}
{{- if .Values.coordinator.trainerRegistryAddress -}}
{{- $_ := set $config.coordinator "trainer_registry_address" .Values.coordinator.trainerRegistryAddress -}}
{{- end -}}
{{- if $tls -}}
{{- $ca := printf "%s/ca.crt" (include "fedhpc.tlsDir" .) -}}
{{- $_ := set $config.aggregator "registry_tls_ca" $ca -}}
{{- $_ := set $config.coordinator "registry_tls_ca" $ca -}}
{{- $_ := set $config.coordinator "aggregator_tls_ca" $ca -}}
{{- end -}}
{{- toYaml (mustMergeOverwrite $config (deepCopy .Values.extraConfig)) -}}
{{- end -}}

{{/* Pod and container security ------------------------------------------------------------- */}}

{{- define "fedhpc.podSecurityContext" -}}
runAsNonRoot: true
{{- with .Values.podSecurityContext.runAsUser }}
runAsUser: {{ . }}
{{- end }}
{{- with .Values.podSecurityContext.runAsGroup }}
runAsGroup: {{ . }}
{{- end }}
{{- with .Values.podSecurityContext.fsGroup }}
fsGroup: {{ . }}
fsGroupChangePolicy: OnRootMismatch
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "fedhpc.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Scheduling and pod metadata shared by every pod: call with the root context. */}}
{{- define "fedhpc.podScheduling" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "fedhpc.podMetadata" -}}
labels:
  {{- include "fedhpc.labels" . | nindent 2 }}
  {{- with .ctx.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  checksum/config: {{ include "fedhpc.config" .ctx | sha256sum }}
  {{- with .ctx.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* The fedhpc container of a component: call with (dict "ctx" $ "component" "registry"). ---- */}}

{{- define "fedhpc.probe" -}}
{{- $ctx := .ctx -}}
{{- if $ctx.Values.tls.enabled }}
exec:
  command:
    - fedhpc-healthcheck
    - {{ .component }}
    - --tls-ca={{ include "fedhpc.tlsDir" $ctx }}/ca.crt
    - --server-name={{ include "fedhpc.serviceName" . }}.{{ $ctx.Release.Namespace }}.svc
timeoutSeconds: 10
{{- else }}
grpc:
  port: {{ include "fedhpc.grpcPort" .component }}
  service: fedhpc.v1.{{ title .component }}
timeoutSeconds: 5
{{- end }}
{{- end -}}

{{- define "fedhpc.container" -}}
{{- $ctx := .ctx -}}
{{- $component := .component -}}
{{- $values := index $ctx.Values $component -}}
- name: {{ $component }}
  image: {{ include "fedhpc.image" $ctx | quote }}
  imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
  args: ["{{ $component }}", "serve"]
  ports:
    - name: grpc
      containerPort: {{ include "fedhpc.grpcPort" $component }}
      protocol: TCP
    - name: metrics
      containerPort: {{ include "fedhpc.metricsPort" $component }}
      protocol: TCP
  env:
    # The server and its probe (fedhpc-healthcheck) load the same configuration.
    - name: FEDHPC_CONFIG
      value: {{ include "fedhpc.configDir" $ctx }}/config.yaml
    - name: FEDHPC_STORE__ACCESS_KEY
      valueFrom:
        secretKeyRef:
          name: {{ $ctx.Values.store.existingSecret }}
          key: {{ $ctx.Values.store.accessKeyKey }}
    - name: FEDHPC_STORE__SECRET_KEY
      valueFrom:
        secretKeyRef:
          name: {{ $ctx.Values.store.existingSecret }}
          key: {{ $ctx.Values.store.secretKeyKey }}
    {{- if $ctx.Values.auth.enabled }}
    # Tokens: the internal token is an admin token of every service, next to the operators'.
    # Every section gets its tokens in every container: fedhpc validates the whole file.
    - name: FEDHPC_AUTH_INTERNAL_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ $ctx.Values.auth.existingSecret }}
          key: {{ $ctx.Values.auth.internalTokenKey }}
    - name: FEDHPC_AUTH_ADMIN_TOKENS
      valueFrom:
        secretKeyRef:
          name: {{ $ctx.Values.auth.existingSecret }}
          key: {{ $ctx.Values.auth.adminTokensKey }}
    {{- range $section := list "REGISTRY" "AGGREGATOR" "COORDINATOR" }}
    - name: FEDHPC_{{ $section }}__SERVER__AUTH__ADMIN_TOKENS
      value: "[$(FEDHPC_AUTH_INTERNAL_TOKEN), $(FEDHPC_AUTH_ADMIN_TOKENS)]"
    {{- end }}
    {{- if ne $component "aggregator" }}
    # Sites call the registry (registry-stream transport) and the coordinator (reports).
    {{- range $section := list "REGISTRY" "COORDINATOR" }}
    - name: FEDHPC_{{ $section }}__SERVER__AUTH__SITE_TOKENS
      valueFrom:
        secretKeyRef:
          name: {{ $ctx.Values.auth.existingSecret }}
          key: {{ $ctx.Values.auth.siteTokensKey }}
          optional: true
    {{- end }}
    {{- end }}
    {{- if eq $component "aggregator" }}
    - name: FEDHPC_AGGREGATOR__REGISTRY_TOKEN
      value: "$(FEDHPC_AUTH_INTERNAL_TOKEN)"
    {{- end }}
    {{- if eq $component "coordinator" }}
    - name: FEDHPC_COORDINATOR__REGISTRY_TOKEN
      value: "$(FEDHPC_AUTH_INTERNAL_TOKEN)"
    - name: FEDHPC_COORDINATOR__AGGREGATOR_TOKEN
      value: "$(FEDHPC_AUTH_INTERNAL_TOKEN)"
    {{- end }}
    {{- end }}
    {{- if and (eq $component "coordinator") $ctx.Values.globus.existingSecret }}
    - name: GLOBUS_COMPUTE_CLIENT_ID
      valueFrom:
        secretKeyRef:
          name: {{ $ctx.Values.globus.existingSecret }}
          key: {{ $ctx.Values.globus.clientIdKey }}
    - name: GLOBUS_COMPUTE_CLIENT_SECRET
      valueFrom:
        secretKeyRef:
          name: {{ $ctx.Values.globus.existingSecret }}
          key: {{ $ctx.Values.globus.clientSecretKey }}
    {{- end }}
    {{- with $ctx.Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  startupProbe:
    {{- include "fedhpc.probe" . | trim | nindent 4 }}
    periodSeconds: 5
    failureThreshold: 36
  readinessProbe:
    {{- include "fedhpc.probe" . | trim | nindent 4 }}
    periodSeconds: 10
    failureThreshold: 3
  livenessProbe:
    {{- include "fedhpc.probe" . | trim | nindent 4 }}
    periodSeconds: 20
    failureThreshold: 3
  resources:
    {{- toYaml $values.resources | nindent 4 }}
  securityContext:
    {{- include "fedhpc.containerSecurityContext" $ctx | nindent 4 }}
  volumeMounts:
    - name: config
      mountPath: {{ include "fedhpc.configDir" $ctx }}
      readOnly: true
    - name: tmp
      mountPath: /tmp
    {{- if $ctx.Values.tls.enabled }}
    - name: tls
      mountPath: {{ include "fedhpc.tlsDir" $ctx }}
      readOnly: true
    {{- end }}
    {{- if eq $component "coordinator" }}
    - name: data
      mountPath: /data
    {{- end }}
{{- end -}}

{{/* Volumes of a fedhpc pod (the coordinator's data volume comes from its claim template). */}}
{{- define "fedhpc.volumes" -}}
- name: config
  configMap:
    name: {{ include "fedhpc.fullname" . }}-config
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.existingSecret }}
    defaultMode: 0440
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
      - {key: ca.crt, path: ca.crt}
{{- end }}
{{- end -}}

{{/* The Service of a component: call with (dict "ctx" $ "component" "registry"). The
fedhpc.io/job label names the Prometheus job (the ServiceMonitor's jobLabel): the alerts and
the dashboard expect fedhpc-registry, fedhpc-aggregator, fedhpc-coordinator. */}}
{{- define "fedhpc.service" -}}
{{- $values := index .ctx.Values .component -}}
{{- $service := default dict $values.service -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "fedhpc.serviceName" . }}
  labels:
    {{- include "fedhpc.labels" . | nindent 4 }}
    fedhpc.io/metrics: "true"
    fedhpc.io/job: fedhpc-{{ .component }}
  {{- with $service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ default "ClusterIP" $service.type }}
  selector:
    {{- include "fedhpc.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ include "fedhpc.grpcPort" .component }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    - name: metrics
      port: {{ include "fedhpc.metricsPort" .component }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
{{- end -}}

{{/* Pod spec fields shared by the three fedhpc workloads. */}}
{{- define "fedhpc.podSpecCommon" -}}
serviceAccountName: {{ include "fedhpc.serviceAccountName" .ctx }}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- include "fedhpc.podSecurityContext" .ctx | nindent 2 }}
{{- include "fedhpc.podScheduling" .ctx }}
containers:
  {{- include "fedhpc.container" . | nindent 2 }}
volumes:
  {{- include "fedhpc.volumes" .ctx | nindent 2 }}
{{- end -}}
