{{/* Name of the chart, overridable. */}}
{{- define "stream-asd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "stream-asd.fullname" -}}
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

{{- define "stream-asd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels; call with (dict "ctx" $ "component" "processor"). */}}
{{- define "stream-asd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stream-asd.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{/* Standard labels; call with (dict "ctx" $ "component" "processor"). */}}
{{- define "stream-asd.labels" -}}
helm.sh/chart: {{ include "stream-asd.chart" .ctx }}
{{ include "stream-asd.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: stream-asd
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "stream-asd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "stream-asd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "stream-asd.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "stream-asd.registryClaim" -}}
{{- default (printf "%s-registry" (include "stream-asd.fullname" .)) .Values.registry.persistence.existingClaim }}
{{- end }}

{{- define "stream-asd.archiveClaim" -}}
{{- default (printf "%s-archive" (include "stream-asd.fullname" .)) .Values.archive.persistence.existingClaim }}
{{- end }}

{{/* Where bundles live, as the app's model.registry setting. */}}
{{- define "stream-asd.registryLocation" -}}
{{- if eq .Values.registry.type "objectStore" }}
{{- required "registry.objectStore.url is required when registry.type is objectStore" .Values.registry.objectStore.url }}
{{- else }}
{{- .Values.registry.mountPath }}
{{- end }}
{{- end }}

{{- define "stream-asd.archiveLocation" -}}
{{- if eq .Values.archive.type "objectStore" }}
{{- required "archive.objectStore.url is required when archive.type is objectStore" .Values.archive.objectStore.url }}
{{- else }}
{{- .Values.archive.mountPath }}
{{- end }}
{{- end }}

{{/* Cross-field checks the JSON schema cannot express; rendered from the ConfigMap. */}}
{{- define "stream-asd.validate" -}}
{{- $p := .Values.processor }}
{{- if and $p.autoscaling.hpa.enabled $p.autoscaling.keda.enabled }}
{{- fail "processor.autoscaling: enable either hpa or keda, not both (both would scale the processor Deployment)" }}
{{- end }}
{{- $parts := int .Values.topics.partitions }}
{{- if gt (int $p.replicas) $parts }}
{{- fail (printf "processor.replicas (%d) exceeds topics.partitions (%d): extra consumers would sit idle" (int $p.replicas) $parts) }}
{{- end }}
{{- if and $p.autoscaling.hpa.enabled (gt (int $p.autoscaling.hpa.maxReplicas) $parts) }}
{{- fail (printf "processor.autoscaling.hpa.maxReplicas (%d) exceeds topics.partitions (%d)" (int $p.autoscaling.hpa.maxReplicas) $parts) }}
{{- end }}
{{- if and $p.autoscaling.keda.enabled (gt (int $p.autoscaling.keda.maxReplicas) $parts) }}
{{- fail (printf "processor.autoscaling.keda.maxReplicas (%d) exceeds topics.partitions (%d)" (int $p.autoscaling.keda.maxReplicas) $parts) }}
{{- end }}
{{- $batchSeconds := add (div (int .Values.settings.batch.maxWaitMs) 1000) 10 }}
{{- if le (int $p.terminationGracePeriodSeconds) (int $batchSeconds) }}
{{- fail (printf "processor.terminationGracePeriodSeconds (%d) must exceed one batch: settings.batch.maxWaitMs/1000 + 10 s = %d" (int $p.terminationGracePeriodSeconds) (int $batchSeconds)) }}
{{- end }}
{{- if and (hasPrefix "SASL" .Values.kafka.securityProtocol) (not .Values.kafka.sasl.mechanism) }}
{{- fail "kafka.securityProtocol SASL_* needs kafka.sasl.mechanism (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)" }}
{{- end }}
{{- if and (hasPrefix "SASL" .Values.kafka.securityProtocol) (not .Values.kafka.sasl.existingSecret) }}
{{- fail "kafka.securityProtocol SASL_* needs kafka.sasl.existingSecret (a Secret with the password)" }}
{{- end }}
{{- if and .Values.kafka.tls.enabled (not .Values.kafka.tls.existingSecret) }}
{{- fail "kafka.tls.enabled needs kafka.tls.existingSecret" }}
{{- end }}
{{- if and .Values.kafka.tls.enabled (not (hasSuffix "SSL" .Values.kafka.securityProtocol)) }}
{{- fail "kafka.tls.enabled needs kafka.securityProtocol SSL or SASL_SSL" }}
{{- end }}
{{- end }}

{{/* Environment of every container beyond the ConfigMap: secrets and object-store keys. */}}
{{- define "stream-asd.secretEnv" -}}
{{- $k := .Values.kafka }}
{{- if hasPrefix "SASL" $k.securityProtocol }}
{{- if $k.sasl.usernameKey }}
- name: ASD_KAFKA__SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $k.sasl.existingSecret }}
      key: {{ $k.sasl.usernameKey }}
{{- end }}
{{- if eq $k.sasl.passwordFrom "env" }}
- name: ASD_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $k.sasl.existingSecret }}
      key: {{ $k.sasl.passwordKey }}
{{- else }}
- name: ASD_KAFKA__SASL_PASSWORD_FILE
  value: /etc/stream-asd/kafka-sasl/{{ $k.sasl.passwordKey }}
{{- end }}
{{- end }}
{{- if $k.tls.enabled }}
- name: ASD_KAFKA__SSL_CA_LOCATION
  value: /etc/stream-asd/kafka-tls/{{ $k.tls.caKey }}
{{- if $k.tls.certKey }}
- name: ASD_KAFKA__SSL_CERTIFICATE_LOCATION
  value: /etc/stream-asd/kafka-tls/{{ $k.tls.certKey }}
{{- end }}
{{- if $k.tls.keyKey }}
- name: ASD_KAFKA__SSL_KEY_LOCATION
  value: /etc/stream-asd/kafka-tls/{{ $k.tls.keyKey }}
{{- end }}
{{- end }}
{{- end }}

{{/* AWS-style object store credentials; call with (dict "store" .Values.registry.objectStore). */}}
{{- define "stream-asd.objectStoreEnv" -}}
{{- with .store }}
{{- if .endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ .endpoint | quote }}
{{- end }}
{{- if .region }}
- name: AWS_DEFAULT_REGION
  value: {{ .region | quote }}
{{- end }}
{{- if .existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .secretAccessKeyKey }}
{{- end }}
{{- end }}
{{- end }}

{{/* Volumes for Kafka credentials and /tmp. */}}
{{- define "stream-asd.commonVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- $k := .Values.kafka }}
{{- if and (hasPrefix "SASL" $k.securityProtocol) (ne $k.sasl.passwordFrom "env") }}
- name: kafka-sasl
  secret:
    secretName: {{ $k.sasl.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $k.sasl.passwordKey }}
        path: {{ $k.sasl.passwordKey }}
{{- end }}
{{- if $k.tls.enabled }}
- name: kafka-tls
  secret:
    secretName: {{ $k.tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "stream-asd.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- $k := .Values.kafka }}
{{- if and (hasPrefix "SASL" $k.securityProtocol) (ne $k.sasl.passwordFrom "env") }}
- name: kafka-sasl
  mountPath: /etc/stream-asd/kafka-sasl
  readOnly: true
{{- end }}
{{- if $k.tls.enabled }}
- name: kafka-tls
  mountPath: /etc/stream-asd/kafka-tls
  readOnly: true
{{- end }}
{{- end }}

{{/* Pod-level settings shared by every role; call with (dict "ctx" $ "component" "processor"). */}}
{{- define "stream-asd.podMeta" -}}
labels:
  {{- include "stream-asd.labels" . | nindent 2 }}
annotations:
  checksum/config: {{ include (print .ctx.Template.BasePath "/configmap.yaml") .ctx | sha256sum }}
{{- with .annotations }}
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* A value as an environment string; whole numbers without an exponent (YAML numbers are
floats in Helm: 1048576 would print as 1.048576e+06). */}}
{{- define "stream-asd.envValue" -}}
{{- if kindIs "float64" . -}}
{{- if eq (floor .) . -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end }}

{{/* A container's env list (items at column 0, may be empty). Call with
(dict "ctx" $ "cuda" bool "metricsOff" bool "stores" (list objectStore...) "extraEnv" list). */}}
{{- define "stream-asd.env" -}}
{{- if .cuda }}
- name: ASD_BATCH__DEVICE
  value: cuda
{{- end }}
{{- if .metricsOff }}
- name: ASD_METRICS__PORT
  value: "0"
{{- end }}
{{- include "stream-asd.secretEnv" .ctx }}
{{- range .stores }}
{{- include "stream-asd.objectStoreEnv" (dict "store" .) }}
{{- end }}
{{- with .extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Object stores whose credentials a role needs; (dict "ctx" $ "registry" bool "archive" bool). */}}
{{- define "stream-asd.storesJson" -}}
{{- $stores := list }}
{{- if and .registry (eq .ctx.Values.registry.type "objectStore") }}
{{- $stores = append $stores .ctx.Values.registry.objectStore }}
{{- else if and .archive (eq .ctx.Values.archive.type "objectStore") }}
{{- /* one set of AWS_* variables per pod: with both on object stores, registry's credentials serve both */}}
{{- $stores = append $stores .ctx.Values.archive.objectStore }}
{{- end }}
{{- toJson $stores }}
{{- end }}

{{/* Pod spec fields every role shares; (dict "ctx" $ "role" .Values.<role> "gpu" bool). */}}
{{- define "stream-asd.podCommon" -}}
{{- $ctx := .ctx }}
{{- $r := .role -}}
serviceAccountName: {{ include "stream-asd.serviceAccountName" $ctx }}
automountServiceAccountToken: {{ $ctx.Values.serviceAccount.automountToken }}
{{- with $ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml $ctx.Values.podSecurityContext | nindent 2 }}
{{- $nodeSelector := $r.nodeSelector }}
{{- $tolerations := $r.tolerations }}
{{- if .gpu }}
{{- $nodeSelector = merge (deepCopy $r.gpu.nodeSelector) $r.nodeSelector }}
{{- $tolerations = concat $r.tolerations $r.gpu.tolerations }}
{{- end }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $r.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Resources with the GPU request added; (dict "resources" ... "gpu" role.gpu "enabled" bool). */}}
{{- define "stream-asd.resources" -}}
{{- $resources := deepCopy .resources }}
{{- if .enabled }}
{{- $limits := default dict $resources.limits }}
{{- $requests := default dict $resources.requests }}
{{- $_ := set $limits .gpu.resourceName .gpu.count }}
{{- $_ := set $requests .gpu.resourceName .gpu.count }}
{{- $_ := set $resources "limits" $limits }}
{{- $_ := set $resources "requests" $requests }}
{{- end }}
{{- toYaml $resources }}
{{- end }}
