{{/* The chart's name, or nameOverride. */}}
{{- define "shardserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Resource names: "<release>-<chart>", or just the release when it already holds the chart's
name. Kept to 50 characters so the "-worker"/"-config" suffixes still fit in 63.
*/}}
{{- define "shardserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "shardserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "shardserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shardserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "shardserve.labels" -}}
helm.sh/chart: {{ include "shardserve.chart" . }}
{{ include "shardserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "shardserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The headless Service through which workers (and `ray job submit`) reach the head. */}}
{{- define "shardserve.rayService" -}}
{{- printf "%s-ray" (include "shardserve.fullname" .) }}
{{- end }}

{{- define "shardserve.rayTokenSecret" -}}
{{- .Values.rayAuth.existingSecret | default (printf "%s-ray-token" (include "shardserve.fullname" .)) }}
{{- end }}

{{/*
Container resources with the GPU count merged in: (dict "resources" R "gpus" N).
nvidia.com/gpu goes in limits (where Kubernetes requires it) and in requests; `gpus` wins
over a count written by hand in resources.
*/}}
{{- define "shardserve.resources" -}}
{{- $res := deepCopy (.resources | default dict) }}
{{- if gt (int .gpus) 0 }}
{{- $gpu := dict "nvidia.com/gpu" (int .gpus) }}
{{- $_ := set $res "limits" (merge $gpu (deepCopy ($res.limits | default dict))) }}
{{- $_ := set $res "requests" (merge (deepCopy $gpu) (deepCopy ($res.requests | default dict))) }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/*
Refuse, at install time, a layout the pods cannot hold; otherwise shardserve would wait for
a Ray placement group that never fits, and time out.
*/}}
{{- define "shardserve.checkLayout" -}}
{{- $p := .Values.config.parallel | default dict }}
{{- $tp := int ($p.tensor_parallel_size | default 1) }}
{{- $pp := int ($p.pipeline_parallel_size | default 1) }}
{{- $replicas := int ($p.replicas | default 1) }}
{{- $headGpus := int .Values.head.gpus }}
{{- $workerGpus := 0 }}
{{- if gt (int .Values.worker.replicas) 0 }}{{ $workerGpus = int .Values.worker.gpus }}{{ end }}
{{- $podMax := max $headGpus $workerGpus }}
{{- $total := add $headGpus (mul (int .Values.worker.replicas) $workerGpus) }}
{{- /* num_gpus_per_shard null means 1 GPU per shard when the cluster has GPUs */}}
{{- $perShard := 1.0 }}
{{- if not (kindIs "invalid" $p.num_gpus_per_shard) }}{{ $perShard = float64 $p.num_gpus_per_shard }}{{ end }}
{{- if and (gt $total 0) (gt $perShard 0.0) }}
{{- $needed := mulf $perShard (mul $tp $pp $replicas) }}
{{- if gt $needed (float64 $total) }}
{{- fail (printf "config.parallel asks for %v GPU(s) (%d shards x %v each), but the pods have %d in all (head.gpus + worker.replicas x worker.gpus)" $needed (mul $tp $pp $replicas) $perShard $total) }}
{{- end }}
{{- if and (eq ($p.placement_strategy | default "stage") "stage") (gt (mulf $perShard $tp) (float64 $podMax)) }}
{{- fail (printf "config.parallel.placement_strategy \"stage\" puts each tensor-parallel group (%d shards x %v GPU each) in one pod, but no pod has more than %d GPU(s): raise worker.gpus, or use placement_strategy SPREAD" $tp $perShard $podMax) }}
{{- end }}
{{- else if and (eq $total 0) (not (kindIs "invalid" $p.num_gpus_per_shard)) (gt $perShard 0.0) }}
{{- fail (printf "config.parallel.num_gpus_per_shard is %v but no pod has a GPU: set worker.gpus (or head.gpus)" $perShard) }}
{{- end }}
{{- end }}

{{/* Volumes and mounts that every Ray pod has. */}}
{{- define "shardserve.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
- name: cache
  emptyDir: {}
{{- if .root.Values.models.existingClaim }}
- name: models
  persistentVolumeClaim:
    claimName: {{ .root.Values.models.existingClaim }}
    readOnly: true
{{- end }}
{{- end }}

{{- define "shardserve.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
- name: cache
  mountPath: /cache
{{- if .Values.models.existingClaim }}
- name: models
  mountPath: {{ .Values.models.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Environment of every Ray container; SHARDSERVE_CACHE (converted models, compiled
kernels) goes to a writable per-pod volume whatever the image's home directory. */}}
{{- define "shardserve.env" -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- if .Values.rayAuth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "shardserve.rayTokenSecret" . }}
      key: token
{{- else }}
{{- /* Explicit: a token file in the image would otherwise turn auth on for the head only. */}}
- name: RAY_AUTH_MODE
  value: disabled
{{- end }}
- name: SHARDSERVE_CACHE
  value: /cache
{{- end }}

{{/*
The head's OpenAI-compatible HTTP and metrics ports: config.server's, else the loader's
defaults; "" where service.http / service.metrics turn them off (Helm drops a key set to null
when it merges values, so a null port could not).
*/}}
{{- define "shardserve.httpPort" -}}
{{- if .Values.service.http }}{{ int ((.Values.config.server | default dict).http_port | default 8000) }}{{ end }}
{{- end }}
{{- define "shardserve.metricsPort" -}}
{{- if .Values.service.metrics }}{{ int ((.Values.config.server | default dict).metrics_port | default 9400) }}{{ end }}
{{- end }}

{{/* Where the TLS Secret is mounted on the head. */}}
{{- define "shardserve.tlsDir" -}}
/etc/shardserve-tls
{{- end }}

{{/* The serving config as mounted: .Values.config, with the TLS Secret's files when set. */}}
{{- define "shardserve.config" -}}
{{- $config := deepCopy .Values.config }}
{{- $served := $config.server | default dict }}
{{- if not .Values.service.http }}{{ $_ := set $served "http_port" nil }}{{ end }}
{{- if not .Values.service.metrics }}{{ $_ := set $served "metrics_port" nil }}{{ end }}
{{- $_ := set $config "server" $served }}
{{- if .Values.tls.secretName }}
{{- $server := $config.server | default dict }}
{{- $_ := set $server "tls_cert_file" (printf "%s/tls.crt" (include "shardserve.tlsDir" .)) }}
{{- $_ := set $server "tls_key_file" (printf "%s/tls.key" (include "shardserve.tlsDir" .)) }}
{{- $_ := set $config "server" $server }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* The head's grace period: head.terminationGracePeriodSeconds, or the drain's plus 30 s. */}}
{{- define "shardserve.terminationGracePeriod" -}}
{{- if kindIs "invalid" .Values.head.terminationGracePeriodSeconds }}
{{- $drain := (.Values.config.server | default dict).drain_grace_s }}
{{- if kindIs "invalid" $drain }}{{ $drain = 30 }}{{ end }}
{{- add (int (ceil $drain)) 30 }}
{{- else }}
{{- int .Values.head.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
A probe of the gRPC health service (dict "root" . "port" P "service" S "settings" probes.X):
kubelet's own gRPC probe, or with TLS (which kubelet's cannot speak) `shardserve health` run
in the container against 127.0.0.1.
*/}}
{{- define "shardserve.healthProbe" -}}
{{- $root := .root }}
{{- if $root.Values.tls.secretName -}}
exec:
  command:
    - shardserve
    - health
    - --target
    - 127.0.0.1:{{ .port }}
    - --tls-ca-file
    - {{ include "shardserve.tlsDir" $root }}/{{ $root.Values.tls.caKey }}
    - --tls-server-name
    - {{ $root.Values.tls.serverName | default (printf "%s.%s.svc" (include "shardserve.fullname" $root) $root.Release.Namespace) }}
    {{- if .service }}
    - --service
    - {{ .service }}
    {{- end }}
{{- else -}}
grpc:
  port: {{ .port }}
  {{- if .service }}
  service: {{ .service }}
  {{- end }}
{{- end }}
{{ toYaml .settings }}
{{- end }}
