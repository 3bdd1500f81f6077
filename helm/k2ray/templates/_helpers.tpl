{{/*
Names. The RayService name is also the prefix of the Services KubeRay creates for it
(<name>-head-svc, <name>-serve-svc); KubeRay accepts at most 47 characters, DNS-1035.
*/}}
{{- define "k2ray.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 47 | trimSuffix "-" -}}
{{- end -}}

{{- define "k2ray.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "k2ray.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every Ray pod carries; the PodMonitor and the metrics Service select on them. */}}
{{- define "k2ray.selectorLabels" -}}
app.kubernetes.io/name: {{ include "k2ray.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "k2ray.labels" -}}
helm.sh/chart: {{ include "k2ray.chart" . }}
{{ include "k2ray.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The Service that carries the OpenAI API: ours when service.enabled, else the one KubeRay names itself. */}}
{{- define "k2ray.serveServiceName" -}}
{{- if .Values.service.enabled -}}
{{- default (printf "%s-openai" (include "k2ray.fullname" .)) .Values.service.name -}}
{{- else -}}
{{- printf "%s-serve-svc" (include "k2ray.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "k2ray.serveServicePort" -}}
{{- if .Values.service.enabled -}}{{ .Values.service.port }}{{- else -}}{{ .Values.serve.port }}{{- end -}}
{{- end -}}

{{/* The edge's in-flight cap: edge.maxRequests, or the model groups' largest capacity (as `k2ray edge` computes it
from a deploy file: (max_num_seqs + max_queued_requests) x K2Router max replicas; ServeArgs' defaults 64 and 256). */}}
{{- define "k2ray.edgeMaxRequests" -}}
{{- if .Values.edge.maxRequests -}}
{{- .Values.edge.maxRequests -}}
{{- else -}}
{{- $a := .Values.serve.args -}}
{{- $engine := $a.engine | default dict -}}
{{- $router := index (.Values.serve.deployments | default dict) "K2Router" | default dict -}}
{{- $scaling := $router.autoscaling_config | default dict -}}
{{- $groups := $scaling.max_replicas | default $router.num_replicas | default 1 -}}
{{- mul (add ($engine.max_num_seqs | default 64) ($a.max_queued_requests | default 256)) $groups -}}
{{- end -}}
{{- end -}}

{{/* The edge's upstream servers, as `k2ray edge` writes them for a deploy file with direct ingress: the ingress
replicas' own ports (from 30000, twice the most ingress replicas) round-robin, the pod's Serve proxy as the backup. */}}
{{- define "k2ray.edgeServers" -}}
{{- $ingress := index (.Values.serve.deployments | default dict) "OpenAIIngress" | default dict -}}
{{- $scaling := $ingress.autoscaling_config | default dict -}}
{{- $replicas := $scaling.max_replicas | default $ingress.num_replicas | default 1 -}}
{{- $servers := list -}}
{{- range $i := until (mul 2 $replicas | int) -}}
{{- $servers = append $servers (printf "server 127.0.0.1:%d max_fails=1 fail_timeout=30s;" (add 30000 $i)) -}}
{{- end -}}
{{- $servers = append $servers (printf "server 127.0.0.1:%v backup;" .Values.serve.port) -}}
{{- join " " $servers -}}
{{- end -}}

{{- define "k2ray.apiKeysSecretName" -}}
{{- if .Values.apiKeys.existingSecret -}}
{{- .Values.apiKeys.existingSecret -}}
{{- else if .Values.apiKeys.keys -}}
{{- printf "%s-api-keys" (include "k2ray.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "k2ray.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/*
The Serve config (serveConfigV2): the same document `serve run deploy/config.yaml` reads. Application args go
through untouched (validated by k2ray.config.ServeArgs); deployments are a map in values so single fields can be
overridden with --set, rendered as Serve's list with OpenAIIngress and K2Router first.
*/}}
{{- define "k2ray.serveConfig" -}}
{{- $s := .Values.serve -}}
{{- $known := list "OpenAIIngress" "K2Router" -}}
{{- $deployments := list -}}
{{- range $name := $known -}}
{{- with index $s.deployments $name -}}
{{- $deployments = append $deployments (merge (dict "name" $name) (deepCopy .)) -}}
{{- end -}}
{{- end -}}
{{- range $name, $d := $s.deployments -}}
{{- if and $d (not (has $name $known)) -}}
{{- $deployments = append $deployments (merge (dict "name" $name) (deepCopy $d)) -}}
{{- end -}}
{{- end -}}
{{- $app := dict "name" $s.applicationName "route_prefix" $s.routePrefix "import_path" $s.importPath "args" $s.args "deployments" $deployments -}}
{{- $runtimeEnv := deepCopy ($s.runtimeEnv | default dict) -}}
{{- if .Values.edge.enabled -}}
{{- /* Serve's direct ingress: each ingress replica answers HTTP on its own port, where the edge sends clients. */ -}}
{{- $envVars := $runtimeEnv.env_vars | default dict -}}
{{- $_ := set $envVars "RAY_SERVE_ENABLE_DIRECT_INGRESS" "1" -}}
{{- $_ := set $runtimeEnv "env_vars" $envVars -}}
{{- end -}}
{{- if $runtimeEnv -}}
{{- $_ := set $app "runtime_env" $runtimeEnv -}}
{{- end -}}
{{- if $s.applicationLoggingConfig -}}
{{- $_ := set $app "logging_config" $s.applicationLoggingConfig -}}
{{- end -}}
{{- /* The proxy listens on all of the pod's interfaces (KubeRay's Service targets the pod IP); httpOptions add the
proxy's timeouts but cannot move host or port. */ -}}
{{- $http := merge (dict "host" "0.0.0.0" "port" $s.port) (deepCopy ($s.httpOptions | default dict)) -}}
{{- $cfg := dict "proxy_location" $s.proxyLocation "http_options" $http "applications" (list $app) -}}
{{- if $s.loggingConfig -}}
{{- $_ := set $cfg "logging_config" $s.loggingConfig -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/*
Placement check, done at render time so `helm install` fails before anything is scheduled.
One model group (= one K2Router replica) runs parallel.attention_workers actors of the "attention" pool and
parallel.expert_shards actors of the "experts" pool. Each worker group hosts pools.attention / pools.experts of them
per pod and advertises that many units of the Ray custom resources k2ray_attention / k2ray_experts (plus
rayResources), which parallel.attention_pool / expert_pool.resources can require (e.g. {k2ray_experts: 1}) to pin
each pool to its pods. Capacity counts maxReplicas pods when Ray autoscaling is on (the autoscaler adds pods for
pending placement groups) and replicas pods otherwise. An elastic pool (parallel.elastic.<pool>.max) counts at its
max: a resize reserves its added workers in a placement group of their own, which must be able to fit.
*/}}
{{- define "k2ray.validate" -}}
{{- $args := .Values.serve.args -}}
{{- $p := $args.parallel | default dict -}}
{{- $executor := "ray" -}}
{{- if hasKey $args "parallel" -}}{{- $executor = $p.executor | default "local" -}}{{- end -}}
{{- $device := $p.device | default "cpu" -}}
{{- $gpw := $p.gpus_per_worker | default 0 | float64 -}}
{{- $router := index .Values.serve.deployments "K2Router" | default dict -}}
{{- $groups := 1.0 -}}
{{- if $router.num_replicas -}}
{{- $groups = $router.num_replicas | float64 -}}
{{- else if $router.autoscaling_config -}}
{{- $groups = $router.autoscaling_config.max_replicas | default 1 | float64 -}}
{{- end -}}
{{- /* per pool: actors per model group, per-actor GPUs, per-actor custom resources, node labels */ -}}
{{- $pools := dict -}}
{{- range $pool, $key := dict "attention" "attention_pool" "experts" "expert_pool" -}}
{{- $spec := index $p $key | default dict -}}
{{- $n := ternary ($p.attention_workers | default 1) ($p.expert_shards | default 1) (eq $pool "attention") | float64 -}}
{{- $range := index ($p.elastic | default dict) (ternary "attention_workers" "expert_shards" (eq $pool "attention")) | default dict -}}
{{- if $range.max -}}{{- $n = maxf $n ($range.max | float64) -}}{{- end -}}
{{- $g := $gpw -}}
{{- if not (kindIs "invalid" $spec.gpus) -}}{{- $g = $spec.gpus | float64 -}}{{- end -}}
{{- $_ := set $pools $pool (dict "n" $n "gpus" $g "key" $key "resources" ($spec.resources | default dict) "labels" ($spec.node_labels | default dict)) -}}
{{- end -}}
{{- $cap := dict "attention" 0.0 "experts" 0.0 -}}
{{- $advertised := dict -}}
{{- $totalGpus := 0.0 -}}
{{- range $name, $g := .Values.workerGroups -}}
{{- if $g.enabled -}}
{{- $min := $g.minReplicas | default 0 | float64 -}}
{{- $max := $g.maxReplicas | default 0 | float64 -}}
{{- $rep := $g.replicas | default 0 | float64 -}}
{{- if or (lt $rep $min) (gt $rep $max) -}}
{{- fail (printf "workerGroups.%s: replicas=%v must lie within minReplicas=%v..maxReplicas=%v" $name $rep $min $max) -}}
{{- end -}}
{{- $pods := $rep -}}
{{- if $.Values.autoscaling.enabled -}}{{- $pods = $max -}}{{- end -}}
{{- $gpus := $g.gpus | default 0 | float64 -}}
{{- $totalGpus = addf $totalGpus (mulf $pods $gpus) -}}
{{- $res := deepCopy ($g.rayResources | default dict) -}}
{{- $podGpus := 0.0 -}}
{{- range $pool, $spec := $pools -}}
{{- $slots := index ($g.pools | default dict) $pool | default 0 | float64 -}}
{{- $_ := set $cap $pool (addf (index $cap $pool) (mulf $pods $slots)) -}}
{{- if gt $slots 0.0 -}}
{{- $_ := set $res (printf "k2ray_%s" $pool) $slots -}}
{{- $podGpus = addf $podGpus (mulf $slots $spec.gpus) -}}
{{- range $lk, $lv := $spec.labels -}}
{{- if ne (index ($g.rayLabels | default dict) $lk | default "" | toString) ($lv | toString) -}}
{{- fail (printf "parallel.%s.node_labels wants %s=%v, but worker group %s hosts %s actors (pools.%s=%v) without that label in rayLabels" $spec.key $lk $lv $name $pool $pool $slots) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $k, $v := $res -}}
{{- $_ := set $advertised $k (addf (index $advertised $k | default 0.0) (mulf $pods ($v | float64))) -}}
{{- end -}}
{{- if and (eq $device "cuda") (eq $executor "ray") (gt $podGpus $gpus) -}}
{{- fail (printf "workerGroups.%s: pools attention=%v + experts=%v need %v GPUs per pod at %v GPU(s) per actor, but gpus=%v" $name (index ($g.pools | default dict) "attention" | default 0) (index ($g.pools | default dict) "experts" | default 0) $podGpus $gpw $gpus) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if eq $executor "ray" -}}
{{- $need := dict -}}
{{- range $pool, $spec := $pools -}}
{{- $want := mulf $groups $spec.n -}}
{{- if lt (index $cap $pool) $want -}}
{{- fail (printf "placement: parallel.%s=%v x %v model group(s) (K2Router replicas) needs %v %s slots, but the enabled workerGroups provide %v (pods x pools.%s)" (ternary "attention_workers" "expert_shards" (eq $pool "attention")) $spec.n $groups $want $pool (index $cap $pool) $pool) -}}
{{- end -}}
{{- range $k, $v := $spec.resources -}}
{{- $_ := set $need $k (addf (index $need $k | default 0.0) (mulf $want ($v | float64))) -}}
{{- end -}}
{{- end -}}
{{- range $k, $v := $need -}}
{{- if lt (index $advertised $k | default 0.0) $v -}}
{{- fail (printf "placement: the pools' resources need %v of Ray resource %s for %v model group(s), but the enabled workerGroups advertise %v (pools and rayResources)" $v $k $groups (index $advertised $k | default 0.0)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (eq $device "cuda") (eq $totalGpus 0.0) -}}
{{- fail "parallel.device=cuda but no enabled worker group has gpus > 0" -}}
{{- end -}}
{{- $m := .Values.model -}}
{{- if ne $m.source "builtin" -}}
{{- $root := trimSuffix "/" $m.mountPath -}}
{{- if not (hasPrefix (printf "%s/" $root) (printf "%s/" $args.model)) -}}
{{- fail (printf "model.source=%s mounts the weights at model.mountPath=%s, but serve.args.model=%s is not under it" $m.source $m.mountPath $args.model) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Env for every Ray container: the API keys Secret, then user extras. */}}
{{- define "k2ray.env" -}}
{{- $root := .root -}}
{{- $secret := include "k2ray.apiKeysSecretName" $root -}}
{{- if $secret }}
- name: K2RAY_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $root.Values.apiKeys.secretKey }}
{{- end }}
{{- with $root.Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with .group.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Pod template shared by the head and the worker groups.
  root:  the top-level context
  role:  "head" or "worker"
  group: the head or worker group values
  name:  the worker group name (workers only)
*/}}
{{- define "k2ray.podTemplate" -}}
{{- $root := .root -}}
{{- $g := .group -}}
{{- $isHead := eq .role "head" -}}
{{- $m := $root.Values.model -}}
{{- $withModel := and (ne $m.source "builtin") (or (not $isHead) (and $m.mountOnHead (has $m.source (list "pvc" "hostPath")))) -}}
{{- $resources := deepCopy ($g.resources | default dict) -}}
{{- $gpus := 0 -}}
{{- if not $isHead -}}{{- $gpus = $g.gpus | default 0 -}}{{- end -}}
{{- if gt (int $gpus) 0 -}}
{{- $limits := $resources.limits | default dict -}}
{{- $_ := set $limits $root.Values.gpuResourceName (int $gpus) -}}
{{- $_ := set $resources "limits" $limits -}}
{{- $requests := $resources.requests | default dict -}}
{{- $_ := set $requests $root.Values.gpuResourceName (int $gpus) -}}
{{- $_ := set $resources "requests" $requests -}}
{{- end -}}
metadata:
  labels:
    {{- include "k2ray.labels" $root | nindent 4 }}
    k2ray.io/role: {{ ternary "head" .name $isHead }}
    {{- with $root.Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with $g.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- $annotations := merge (deepCopy ($g.annotations | default dict)) (deepCopy ($root.Values.podAnnotations | default dict)) }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.serviceAccountName }}
  serviceAccountName: {{ . }}
  {{- end }}
  {{- with $g.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $root.Values.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if and (eq $m.source "download") (not $isHead) }}
  initContainers:
    - name: fetch-model
      image: {{ required "model.download.image is required when model.source=download" $m.download.image }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command:
        {{- toYaml (required "model.download.command is required when model.source=download" $m.download.command) | nindent 8 }}
      {{- with $m.download.args }}
      args:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      env:
        - name: K2RAY_MODEL_DIR
          value: {{ $root.Values.serve.args.model | quote }}
        {{- with $m.download.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $m.download.envFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $m.download.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: model
          mountPath: {{ $m.mountPath }}
  {{- end }}
  containers:
    # KubeRay runs `ray start` in the first container.
    - name: {{ ternary "ray-head" "ray-worker" $isHead }}
      image: {{ include "k2ray.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- $env := include "k2ray.env" (dict "root" $root "group" $g) }}
      {{- if $env }}
      env:
        {{- $env | trim | nindent 8 }}
      {{- end }}
      {{- with $root.Values.extraEnvFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        {{- if $isHead }}
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
        {{- end }}
        - name: serve
          containerPort: {{ $root.Values.serve.port }}
        - name: metrics
          containerPort: {{ $root.Values.metricsPort }}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: ray-logs
          mountPath: /tmp/ray
        {{- if $g.shm.enabled }}
        - name: dshm
          mountPath: /dev/shm
        {{- end }}
        {{- if $withModel }}
        - name: model
          mountPath: {{ $m.mountPath }}
          readOnly: true
          {{- if and (eq $m.source "pvc") $m.pvc.subPath }}
          subPath: {{ $m.pvc.subPath }}
          {{- end }}
        {{- end }}
        {{- with $root.Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    {{- if $root.Values.edge.enabled }}
    {{- $e := $root.Values.edge }}
    # k2ray's edge: nginx in front of this pod's Serve proxy. The image's entrypoint fills in the template mounted
    # under /etc/nginx/templates from the K2RAY_EDGE_* variables (and only those: NGINX_ENVSUBST_FILTER).
    - name: edge
      image: "{{ $e.image.repository }}:{{ $e.image.tag }}"
      imagePullPolicy: {{ $e.image.pullPolicy }}
      env:
        - name: NGINX_ENVSUBST_FILTER
          value: "^K2RAY_EDGE_"
        - name: K2RAY_EDGE_LISTEN
          value: {{ $e.port | quote }}
        - name: K2RAY_EDGE_SERVERS
          value: {{ include "k2ray.edgeServers" $root | quote }}
        - name: K2RAY_EDGE_MAX_REQUESTS
          value: {{ include "k2ray.edgeMaxRequests" $root | quote }}
        - name: K2RAY_EDGE_MAX_PER_CLIENT
          value: {{ $e.maxPerClient | quote }}
        - name: K2RAY_EDGE_HEADER_TIMEOUT
          value: {{ $e.headerTimeout | quote }}
        - name: K2RAY_EDGE_BODY_TIMEOUT
          value: {{ $e.bodyTimeout | quote }}
        - name: K2RAY_EDGE_MAX_BODY
          value: {{ $e.maxBody | quote }}
        - name: K2RAY_EDGE_KEEPALIVE_TIMEOUT
          value: {{ printf "%vs" ($root.Values.serve.httpOptions.keep_alive_timeout_s | default 65) | quote }}
        - name: K2RAY_EDGE_READ_TIMEOUT
          value: {{ printf "%vs" (add ($root.Values.serve.httpOptions.request_timeout_s | default 600) 60) | quote }}
      ports:
        - name: edge
          containerPort: {{ $e.port }}
      readinessProbe:
        tcpSocket:
          port: edge
        periodSeconds: 10
      {{- with $e.resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: edge-template
          mountPath: /etc/nginx/templates
          readOnly: true
        # The filled-in configuration goes here; an empty directory also drops the image's default server on port 80.
        - name: edge-conf
          mountPath: /etc/nginx/conf.d
    {{- end }}
  volumes:
    - name: ray-logs
      emptyDir: {}
    {{- if $root.Values.edge.enabled }}
    - name: edge-template
      configMap:
        name: {{ include "k2ray.fullname" $root }}-edge
    - name: edge-conf
      emptyDir: {}
    {{- end }}
    {{- if $g.shm.enabled }}
    # Shared memory: the Ray object store and NCCL's intra-node transport live in /dev/shm.
    - name: dshm
      emptyDir:
        medium: Memory
        {{- with $g.shm.sizeLimit }}
        sizeLimit: {{ . }}
        {{- end }}
    {{- end }}
    {{- if $withModel }}
    - name: model
      {{- if eq $m.source "pvc" }}
      persistentVolumeClaim:
        claimName: {{ $m.pvc.claimName }}
        readOnly: true
      {{- else if eq $m.source "hostPath" }}
      hostPath:
        path: {{ $m.hostPath.path }}
        type: {{ $m.hostPath.type }}
      {{- else }}
      emptyDir:
        {{- with $m.download.sizeLimit }}
        sizeLimit: {{ . }}
        {{- end }}
      {{- end }}
    {{- end }}
    {{- with $root.Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* rayStartParams: chart defaults, then the group's own (which win). Values are strings for KubeRay. */}}
{{- define "k2ray.rayStartParams" -}}
{{- range $k, $v := . }}
{{ $k }}: {{ $v | toString | quote }}
{{- end }}
{{- end -}}
